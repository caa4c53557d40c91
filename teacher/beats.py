"""BEATs audio encoder (Chen et al., 2023), state-dict compatible with the official `.pt` checkpoints.

A checkpoint is `{"cfg": dict, "model": state_dict}`. The model cuts the normalised Kaldi fbank
`[frames, 128]` into 16 × 16 patches, flattened time-major (8 frequency patches per 160 ms), and runs a
post-LN (optionally DeepNorm) or pre-LN Transformer with a convolutional positional embedding and a
bucketed, query-gated relative position bias that layer 0 owns and every layer shares.

Written from the paper and the layout of the official checkpoints; parameter names match them exactly,
including the shared `relative_attention_bias`, which appears under every layer's name in a state dict.

The layer loop is exposed (`BEATsEncoder.run_layers`) with a callback between layers and per-token
original positions, so a student can drop tokens mid-encoder and keep the relative position bias right.

One file on purpose (over 500 lines): it is one model, read side by side with the official `BEATs.py` /
`backbone.py` and the checkpoints' key names; split into rooms, the parity with those files (tested against the
official code's features in `tests/test_beats.py`) would be harder to check, not easier.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.fbank import beats_fbank

FBANK_BINS = 128
"""Mel channels of BEATs' input fbank (eight 16-bin frequency patches)."""

# The official attention divides q by this before q·kᵀ and multiplies it back afterwards, so that the
# product of fp16 activations cannot overflow; we keep the trick and finish the softmax in fp32.
_FP16_LOGIT_GUARD = 32.0


@dataclass
class BEATsConfig:
    """Every field of the official `BEATsConfig`, with its official default."""

    input_patch_size: int = -1
    """Side of the square fbank patches (16 in every released checkpoint; -1 = unset)."""
    embed_dim: int = 512
    """Channels of the patch embedding."""
    conv_bias: bool = False
    """Whether the patch-embedding convolution has a bias."""
    encoder_layers: int = 12
    """Transformer layers."""
    encoder_embed_dim: int = 768
    """Transformer width; `post_extract_proj` maps `embed_dim` to it when they differ."""
    encoder_ffn_embed_dim: int = 3072
    """Hidden width of each feed-forward block."""
    encoder_attention_heads: int = 12
    """Attention heads per layer."""
    activation_fn: str = "gelu"
    """Feed-forward activation: relu, gelu, gelu_fast / gelu_accurate (tanh approximation), tanh, linear, or
    glu, which makes `fc1` a swish-gated linear layer."""
    layer_wise_gradient_decay_ratio: float = 1.0
    """Gradient scale applied in front of every layer during backprop (1 = none)."""
    layer_norm_first: bool = False
    """Pre-LN layers (plus a final LayerNorm) instead of post-LN ones."""
    deep_norm: bool = False
    """DeepNorm: post-LN residuals scaled by (2 · layers)^(1/4); incompatible with `layer_norm_first`."""
    dropout: float = 0.1
    """Dropout on the residual branches and after the positional embedding."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the feed-forward activation."""
    encoder_layerdrop: float = 0.0
    """Probability of skipping a whole layer in training."""
    dropout_input: float = 0.0
    """Dropout on the patch embeddings before the encoder."""
    conv_pos: int = 128
    """Kernel size (in tokens) of the convolutional positional embedding."""
    conv_pos_groups: int = 16
    """Groups of that convolution."""
    relative_position_embedding: bool = False
    """Add a learned, bucketed relative position bias to the attention logits."""
    num_buckets: int = 320
    """Buckets of the relative position bias (half for each direction)."""
    max_distance: int = 1280
    """Distance, in tokens, where the log-spaced buckets end."""
    gru_rel_pos: bool = False
    """Gate the relative position bias per query and head (`grep_linear`, `grep_a`)."""
    finetuned_model: bool = False
    """The checkpoint carries an audio-tagging head (`predictor`)."""
    predictor_dropout: float = 0.1
    """Dropout in front of the tagging head."""
    predictor_class: int = 527
    """Classes of the tagging head (AudioSet: 527)."""

    @classmethod
    def from_dict(cls, cfg: dict) -> BEATsConfig:
        """Config from a checkpoint's `cfg` dict; missing fields take the official defaults.

        Raises ValueError naming any key the official config does not have.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown BEATs config key(s): {', '.join(unknown)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TokenState:
    """What flows between encoder layers; a callback between layers may return a pruned copy."""

    hidden: torch.Tensor
    """`[batch, tokens, dim]` activations."""
    padding_mask: torch.Tensor | None
    """`[batch, tokens]`, True where a token is padding; None when nothing is padded."""
    positions: torch.Tensor
    """Each token's index in the unpruned sequence (long): `[tokens]` shared by the batch or
    `[batch, tokens]`. The relative position bias is computed from these, not from the current order."""


BetweenLayers = Callable[[int, TokenState], TokenState]
"""`callback(layer_index, state) -> state`, called after each layer (0-based) has run."""


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by `scale` backward (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style buckets of `key position − query position` (any shape, long → long).

    Half the buckets per direction; in each half, distances below a quarter of `num_buckets` get their own
    bucket and larger ones share log-spaced buckets up to `max_distance`, beyond which they all share the
    last. Float32 arithmetic and truncation follow the official code, so boundary distances land alike.
    """
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    # clamp only keeps log() finite for the near distances, which take the exact branch anyway.
    log_range = math.log(max_distance / max_exact)
    log_ratio = torch.log(distance.float().clamp(min=max_exact) / max_exact) / log_range
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over every axis but the kernel axis (the official `dim=2`).

    Holds `weight_g` `[1, 1, kernel]` and `weight_v` `[out, in / groups, kernel]` under the names that
    `torch.nn.utils.weight_norm` gave them, so official state dicts load as they are.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel_size // 2, groups
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        channels, _, kernel_size = self.weight_v.shape
        nn.init.normal_(self.weight_v, mean=0.0, std=math.sqrt(4.0 / (kernel_size * channels)))
        nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))  # weight starts equal to v

    def weight(self) -> torch.Tensor:
        """The effective kernel g · v / ‖v‖, norms taken in fp32 (fp16-safe)."""
        v = self.weight_v.float()
        return (v * (self.weight_g.float() / v.norm(dim=(0, 1), keepdim=True))).to(self.weight_v.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, channels, tokens]` → `[batch, channels, tokens + 1 - kernel % 2]`."""
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class _TrimToLength(nn.Module):
    """Drops the extra output step that symmetric padding gives an even kernel (the official `SamePad`)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : x.shape[-1] - self.remove]


class GLULinear(nn.Module):
    """Linear to twice the width, first half gated by swish of the second (the official `GLU_Linear`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * F.silu(gate)


def _gelu_fp32(x: torch.Tensor) -> torch.Tensor:
    # In fp32, as the official code does, so fp16 activations match fp32 ones.
    return F.gelu(x.float()).type_as(x)


def _gelu_tanh_fp32(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float(), approximate="tanh").type_as(x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# Module-level functions rather than lambdas, so that a model pickles. "glu" gates inside fc1 instead.
_ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": _gelu_fp32,
    "gelu_fast": _gelu_tanh_fp32,
    "gelu_accurate": _gelu_tanh_fp32,
    "tanh": torch.tanh,
    "linear": _identity,
    "glu": _identity,
}


def _mean_received_attention(probs: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention each key receives, averaged over heads and real queries: `[batch, heads, q, k]` → `[batch, k]`."""
    if padding_mask is None:
        return probs.mean(dim=(1, 2))
    real = (~padding_mask).to(probs.dtype)  # [batch, queries]
    count = real.sum(dim=1, keepdim=True).clamp(min=1.0) * probs.shape[1]
    return torch.einsum("bhqk,bq->bk", probs, real) / count


class BEATsAttention(nn.Module):
    """Multi-head self-attention with the (optionally gated) relative position bias added to the logits."""

    def __init__(self, cfg: BEATsConfig, owns_relative_bias: bool):
        super().__init__()
        dim, self.num_heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.head_dim = dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        if owns_relative_bias:  # other layers get this module assigned by the encoder (shared weights)
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, self.num_heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(cfg.attention_dropout)
        self.gru_rel_pos = cfg.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))
        self.record_received_attention = False
        """When set, each forward stores `received_attention` (token pruning scores keys by it); off by default."""
        self.received_attention: torch.Tensor | None = None
        """`[batch, tokens]` fp32, detached: the attention each key token received in the last forward, averaged
        over heads and non-padding queries (before dropout). Only written while `record_received_attention`."""

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, tokens, dim]` → `[batch, heads, tokens, head_dim]`."""
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def _position_gate(self, q: torch.Tensor) -> torch.Tensor:
        """Per-query, per-head scale of the relative bias, fp32 `[batch, heads, tokens, 1]`.

        q is the unscaled query projection `[batch, heads, tokens, head_dim]`; its 8 gate logits are summed
        in two groups of four, giving sigmoid gates a and b; the scale is a · (b · grep_a − 1) + 2, which
        lies in (1, 2) while grep_a is near its initial 1: each query chooses how much position matters.
        """
        logits = self.grep_linear(q).unflatten(-1, (2, 4)).sum(-1)  # [batch, heads, tokens, 2]
        gate_a, gate_b = torch.sigmoid(logits.float()).chunk(2, dim=-1)
        return gate_a * (gate_b * self.grep_a.float() - 1.0) + 2.0

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention over `x` `[batch, tokens, dim]` → `[batch, tokens, dim]`.

        Args:
            padding_mask: `[batch, tokens]`, True = padding (never attended to).
            position_bias: ungated relative bias `[1 or batch, heads, tokens, tokens]` (query × key).
        """
        batch, tokens, dim = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        logits = (q * (self.scaling / _FP16_LOGIT_GUARD)) @ k.transpose(-1, -2)
        logits = logits.float() * _FP16_LOGIT_GUARD  # [batch, heads, tokens, tokens], fp32 from here on
        if position_bias is not None:
            gate = self._position_gate(q) if self.gru_rel_pos else 1.0
            logits = logits + gate * position_bias.float()
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.record_received_attention:
            self.received_attention = _mean_received_attention(probs.detach(), padding_mask)
        probs = self.dropout(probs.to(v.dtype))
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.out_proj(out)


class BEATsLayer(nn.Module):
    """One Transformer layer: post-LN with DeepNorm residual scaling, or pre-LN (`layer_norm_first`)."""

    def __init__(self, cfg: BEATsConfig, owns_relative_bias: bool):
        super().__init__()
        dim, ffn_dim = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
        self.self_attn = BEATsAttention(cfg, owns_relative_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = GLULinear(dim, ffn_dim) if cfg.activation_fn == "glu" else nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATION_FNS[cfg.activation_fn]
        self.residual_dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.layer_norm_first = cfg.layer_norm_first
        self.residual_scale = (2.0 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation_dropout(self.activation(self.fc1(x)))
        return self.residual_dropout(self.fc2(x))

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[batch, tokens, dim]` → `[batch, tokens, dim]`; arguments as in `BEATsAttention.forward`."""
        if self.layer_norm_first:
            attn = self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias)
            x = x + self.residual_dropout(attn)
            return x + self._feed_forward(self.final_layer_norm(x))
        attn = self.self_attn(x, padding_mask, position_bias)
        x = self.self_attn_layer_norm(x * self.residual_scale + self.residual_dropout(attn))
        return self.final_layer_norm(x * self.residual_scale + self._feed_forward(x))


class BEATsEncoder(nn.Module):
    """Convolutional positional embedding, then the layers; the official `TransformerEncoder`."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), _TrimToLength(cfg.conv_pos), nn.GELU()
        )
        has_bias = cfg.relative_position_embedding
        self.layers = nn.ModuleList(
            BEATsLayer(cfg, owns_relative_bias=has_bias and i == 0) for i in range(cfg.encoder_layers)
        )
        if has_bias:
            # One table for all layers, registered under every layer's name as in official state dicts.
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)

    def add_positions(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Adds the convolutional positional embedding (and, post-LN, normalises): `[batch, tokens, dim]`.

        Padding is zeroed first, so a clip's tokens see the same zeros the convolution pads with and its
        result does not depend on how much padding the batch gave it.
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        return F.dropout(x, p=self.cfg.dropout, training=self.training)

    def relative_position_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Ungated relative position bias, `[1 or batch, heads, tokens, tokens]` (query × key), table dtype.

        Args:
            positions: original token indices, `[tokens]` (shared) or `[batch, tokens]`.

        Returns None when the config has no relative position embedding.
        """
        if not self.cfg.relative_position_embedding:
            return None
        relative = positions.unsqueeze(-2) - positions.unsqueeze(-1)  # key − query: [(batch,) tokens, tokens]
        buckets = relative_position_bucket(relative, self.cfg.num_buckets, self.cfg.max_distance)
        bias = self.layers[0].self_attn.relative_attention_bias(buckets)  # [(batch,) tokens, tokens, heads]
        bias = bias.movedim(-1, -3)
        return bias if bias.dim() == 4 else bias.unsqueeze(0)

    def _drops_layer(self) -> bool:
        """LayerDrop: in training, skip a layer with probability `encoder_layerdrop`."""
        rate = self.cfg.encoder_layerdrop
        return self.training and rate > 0 and bool(torch.rand(()) < rate)

    def run_layers(self, state: TokenState, between_layers: BetweenLayers | None = None) -> TokenState:
        """Runs every layer on `state`, calling `between_layers(i, state)` after layer i.

        The callback may drop or reorder tokens (returning matching `hidden`, `padding_mask` and
        `positions`); the relative bias is recomputed whenever it returns new positions.
        """
        bias = self.relative_position_bias(state.positions)
        for i, layer in enumerate(self.layers):
            if not self._drops_layer():
                hidden = state.hidden
                if self.cfg.layer_wise_gradient_decay_ratio != 1.0:
                    hidden = _GradMultiply.apply(hidden, self.cfg.layer_wise_gradient_decay_ratio)
                state = dataclasses.replace(state, hidden=layer(hidden, state.padding_mask, bias))
            if between_layers is not None:
                positions = state.positions
                state = between_layers(i, state)
                if state.positions is not positions:
                    bias = self.relative_position_bias(state.positions)
        return state

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        between_layers: BetweenLayers | None = None,
    ) -> TokenState:
        """Encodes `x` `[batch, tokens, dim]` with `padding_mask` `[batch, tokens]` (True = padding).

        Returns the final `TokenState` (hidden `[batch, tokens', dim]`, its mask and original positions).
        """
        x = self.add_positions(x, padding_mask)
        positions = torch.arange(x.shape[1], device=x.device)
        state = self.run_layers(TokenState(x, padding_mask, positions), between_layers)
        if self.cfg.layer_norm_first:
            state = dataclasses.replace(state, hidden=self.layer_norm(state.hidden))
        return state


def downsample_padding_mask(padding_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Padding mask `[batch, n]` → `[batch, length]` the official way (True = padding).

    Drops the trailing n mod length entries, splits the rest into `length` equal runs and marks a run as
    padding only if all of it is. Used for samples → fbank frames and for frames → patches, where it
    treats the time-major patch sequence as if it were evenly spread over the frames.
    """
    extra = padding_mask.shape[1] % length
    if extra:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.reshape(padding_mask.shape[0], length, -1).all(dim=-1)


class BEATs(nn.Module):
    """The BEATs encoder; `extract_features` maps 16 kHz audio to `[batch, patches, encoder_embed_dim]`."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(
            1,
            cfg.embed_dim,
            kernel_size=cfg.input_patch_size,
            stride=cfg.input_patch_size,
            bias=cfg.conv_bias,
        )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        needs_proj = cfg.embed_dim != cfg.encoder_embed_dim
        self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if needs_proj else None
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = BEATsEncoder(cfg)
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        else:
            self.predictor = None
        self._init_encoder_weights()

    def _init_encoder_weights(self) -> None:
        """BERT-style init of the encoder, with DeepNorm's down-scaled value and feed-forward weights."""
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        if self.cfg.deep_norm:
            beta = (8.0 * self.cfg.encoder_layers) ** -0.25
            for layer in self.encoder.layers:
                attn = layer.self_attn
                for linear, gain in (
                    (attn.k_proj, 1.0),
                    (attn.v_proj, beta),
                    (attn.q_proj, 1.0),
                    (attn.out_proj, beta),
                ):
                    nn.init.xavier_normal_(linear.weight, gain=gain)
                fc1 = layer.fc1.linear if isinstance(layer.fc1, GLULinear) else layer.fc1
                for ffn in (fc1, layer.fc2):
                    nn.init.xavier_normal_(ffn.weight, gain=beta)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> BEATs:
        """Loads an official-layout checkpoint `{"cfg": dict, "model": state_dict}`, strictly, in eval mode.

        Raises ValueError naming the file and every missing or unexpected key, or an alias of the shared
        relative position table that disagrees with layer 0's.
        """
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(checkpoint, dict) or not {"cfg", "model"} <= checkpoint.keys():
            raise ValueError(f"{path}: expected a BEATs checkpoint dict with 'cfg' and 'model'")
        model = cls(BEATsConfig.from_dict(checkpoint["cfg"]))
        state_dict = checkpoint["model"]
        _check_shared_tables(state_dict, path)
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path}: state dict does not match its BEATs config; "
                f"missing keys: {result.missing_keys}; unexpected keys: {result.unexpected_keys}"
            )
        return model.eval()

    def to_checkpoint(self) -> dict:
        """`{"cfg": dict, "model": state_dict}` in the official layout (for `torch.save`)."""
        return {"cfg": self.cfg.to_dict(), "model": self.state_dict()}

    def embed_patches(
        self, fbank: torch.Tensor, fbank_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch embeddings of a normalised fbank, ready for the encoder.

        Args:
            fbank: `[batch, frames, 128]` from `common.fbank.beats_fbank` (10 ms frames).
            fbank_padding_mask: `[batch, frames]`, True = padding, or None.

        Returns:
            `[batch, patches, encoder_embed_dim]` with patches = (frames // 16) · 8, time-major (index =
            160 ms step · 8 + frequency patch), and the `[batch, patches]` padding mask or None.
        """
        patches = self.patch_embedding(fbank.unsqueeze(1))  # [batch, embed, frames // 16, 8]
        patches = patches.flatten(2).transpose(1, 2)  # [batch, patches, embed], time-major
        patches = self.layer_norm(patches)
        if fbank_padding_mask is not None:
            fbank_padding_mask = downsample_padding_mask(fbank_padding_mask, patches.shape[1])
        if self.post_extract_proj is not None:
            patches = self.post_extract_proj(patches)
        return self.dropout_input(patches), fbank_padding_mask

    def encode(
        self,
        fbank: torch.Tensor,
        fbank_padding_mask: torch.Tensor | None = None,
        between_layers: BetweenLayers | None = None,
    ) -> TokenState:
        """Full encoder pass over an fbank `[batch, frames, 128]`, with an optional callback between layers.

        Returns the final `TokenState`: features `[batch, tokens, dim]`, padding mask, original positions.
        """
        patches, padding_mask = self.embed_patches(fbank, fbank_padding_mask)
        return self.encoder(patches, padding_mask, between_layers)

    def forward_fbank(
        self, fbank: torch.Tensor, fbank_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of a precomputed fbank: `[batch, frames, 128]` → `[batch, patches, dim]`, mask or None."""
        state = self.encode(fbank, fbank_padding_mask)
        return state.hidden, state.padding_mask

    def extract_features(
        self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of 16 kHz audio, as the official `extract_features` (SALMONN's `feature_only=True`).

        Args:
            wav: `[batch, samples]` float audio in [-1, 1], 16 kHz. The fbank is computed in fp32 whatever
                the model's dtype (power spectra overflow fp16), then cast to it.
            padding_mask: `[batch, samples]`, True = padding, or None.

        Returns:
            features `[batch, patches, encoder_embed_dim]`, one patch per 16 frequency bins × 160 ms, and
            the `[batch, patches]` padding mask (None if none was given).
        """
        fbank = beats_fbank(wav.float()).to(self.patch_embedding.weight.dtype)
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask, fbank.shape[1])
        return self.forward_fbank(fbank, padding_mask)

    forward = extract_features

    def predict(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Clip-level class probabilities `[batch, predictor_class]` from features `[batch, patches, dim]`.

        The official head: per-token logits, averaged over non-padding tokens, then a sigmoid.
        Only for fine-tuned checkpoints (`finetuned_model`).
        """
        if self.predictor is None:
            raise RuntimeError("this BEATs has no predictor head (finetuned_model is false)")
        logits = self.predictor(self.predictor_dropout(features))  # [batch, patches, classes]
        if padding_mask is None:
            return torch.sigmoid(logits.mean(dim=1))
        keep = (~padding_mask).unsqueeze(-1).to(logits.dtype)
        return torch.sigmoid((logits * keep).sum(dim=1) / keep.sum(dim=1))


def _validate(cfg: BEATsConfig) -> None:
    if cfg.input_patch_size <= 0:
        raise ValueError(f"input_patch_size must be positive, got {cfg.input_patch_size}")
    if cfg.deep_norm and cfg.layer_norm_first:
        raise ValueError("deep_norm applies to post-LN layers; it cannot be combined with layer_norm_first")
    if cfg.activation_fn not in _ACTIVATION_FNS:
        raise ValueError(f"activation_fn {cfg.activation_fn!r} is not one of {sorted(_ACTIVATION_FNS)}")
    if cfg.encoder_embed_dim % cfg.encoder_attention_heads:
        raise ValueError("encoder_embed_dim must be divisible by encoder_attention_heads")
    if FBANK_BINS % cfg.input_patch_size:
        raise ValueError(f"input_patch_size must divide the {FBANK_BINS} fbank bins")


def _check_shared_tables(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Every layer's `relative_attention_bias` key is an alias of layer 0's; refuse ones that disagree."""
    owner = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    suffix = ".self_attn.relative_attention_bias.weight"
    for key, tensor in state_dict.items():
        if key.endswith(suffix) and key != owner and owner in state_dict:
            if not torch.equal(tensor, state_dict[owner]):
                raise ValueError(f"{path}: {key} differs from {owner}, which every layer shares")
