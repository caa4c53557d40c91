"""BEATs token pruning for the student: fewer patch tokens in the later layers, the same features interface.

After each layer named in `TokenPruningConfig.prune_after_layers`, every sample's patch tokens are scored (mean
attention received, or L2 norm) and a fixed number of them is kept, best first — optionally the same fraction
within every time segment, so no stretch of audio loses all its tokens. The rest are fused into one extra token
(EViT), averaged into their most similar kept token (ToMe) or dropped. Kept tokens carry their original positions,
so the relative position bias still measures true distances.

SALMONN joins BEATs' time-major tokens with Whisper's frames index by index (token i ↔ frame i, both about 20 ms
apart on average), so a shorter token sequence would shift audio events against speech. The pruned tokens live
only inside the encoder: after the last layer every original patch position is filled again with the output of
the token that absorbed it, and the Q-Former sees a sequence of the original length and timing.

`PrunedBEATs` is a `teacher.beats.BEATs` with exactly its parameters (its state dict is an official BEATs
checkpoint); the pruning settings sit beside it in `pruning_config`. `beats_cost` counts FLOPs analytically;
`python -m student.token_pruning_bench` (`student.token_pruning_bench`) prints FLOPs and measured latency against
the keep ratio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from teacher.beats import FBANK_BINS, BEATs, BEATsConfig, BEATsEncoder, TokenState

FRAME_SHIFT_SECONDS = 0.010
"""Hop of BEATs' fbank frames; a patch spans `input_patch_size` frames (160 ms for 16)."""
SAMPLE_RATE = 16_000
FRAME_LENGTH_SAMPLES = 400
"""25 ms Kaldi window; with `snip_edges` a clip of n samples gives 1 + (n − 400) // 160 frames."""



@dataclass
class TokenPruningConfig:
    """Where and how BEATs drops patch tokens. The defaults prune nothing."""

    keep_ratio: float = 1.0
    """Fraction of the patch tokens kept after the last pruning layer, in (0, 1]; 1.0 = plain BEATs, exactly."""
    prune_after_layers: list[int] = field(default_factory=list)
    """0-based layers after which tokens are pruned. With several, the keep ratio is split geometrically:
    after the j-th of m pruning layers, ceil(N · keep_ratio^(j/m)) of the N patch tokens remain."""
    score: Literal["attention", "norm"] = "attention"
    """Which tokens matter: "attention" = mean attention the token received in that layer (over heads and
    non-padding queries); "norm" = L2 norm of its output. In post-LN BEATs (SALMONN's) every layer ends in a
    LayerNorm, so the norm mostly reflects that norm's learned gain and bias: prefer "attention" there."""
    segment_seconds: float = 0.0
    """0 = keep the best tokens of the whole clip; > 0 = keep the same fraction within every segment of this
    length (rounded to whole 160 ms patch steps), so every stretch of time keeps tokens."""
    merge: Literal["fuse", "tome", "drop"] = "fuse"
    """What happens to pruned tokens: "fuse" = score-weighted mean of all of a sample's pruned tokens becomes one
    extra token that stays in the sequence (EViT); "tome" = each is averaged into its most cosine-similar kept
    token, weighted by how many patches each holds (ToMe); "drop" = discarded."""

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.score not in ("attention", "norm"):
            raise ValueError(f"score must be 'attention' or 'norm', got {self.score!r}")
        if self.merge not in ("fuse", "tome", "drop"):
            raise ValueError(f"merge must be 'fuse', 'tome' or 'drop', got {self.merge!r}")
        if self.segment_seconds < 0:
            raise ValueError(f"segment_seconds must be ≥ 0, got {self.segment_seconds}")
        layers = self.prune_after_layers
        if len(set(layers)) != len(layers) or any(layer < 0 for layer in layers):
            raise ValueError(f"prune_after_layers must be distinct layer indices ≥ 0, got {layers}")
        if self.keep_ratio < 1.0 and not layers:
            raise ValueError("keep_ratio < 1 needs at least one layer in prune_after_layers")

    @property
    def prunes(self) -> bool:
        """Whether any token is ever pruned."""
        return self.keep_ratio < 1.0


# ----- the schedule: how many tokens each layer sees ----------------------------------------------------------


def fbank_frames(seconds: float) -> int:
    """Fbank frames of a clip of `seconds` at 16 kHz (Kaldi, `snip_edges`: whole 25 ms windows every 10 ms)."""
    samples = round(seconds * SAMPLE_RATE)
    return 1 + (samples - FRAME_LENGTH_SAMPLES) // round(FRAME_SHIFT_SECONDS * SAMPLE_RATE)


def patch_tokens(cfg: BEATsConfig, seconds: float) -> int:
    """Patch tokens BEATs makes of a clip of `seconds` (frames cut to whole patches, time-major)."""
    return (fbank_frames(seconds) // cfg.input_patch_size) * (FBANK_BINS // cfg.input_patch_size)


def keep_counts(n_tokens: int, pruning: TokenPruningConfig) -> dict[int, int]:
    """Patch tokens kept after each pruning layer (the fused token not counted): `{layer: count}`.

    Counts come from the original `n_tokens` (padding included), not from the previous step, so rounding never
    compounds and the last step keeps exactly ceil(n_tokens · keep_ratio).
    """
    if not pruning.prunes:
        return {}
    layers = sorted(pruning.prune_after_layers)
    # The epsilon keeps float error from rounding an exact product up (0.7 · 10 = 7.000000000000001).
    return {
        layer: max(1, math.ceil(n_tokens * pruning.keep_ratio ** ((step + 1) / len(layers)) - 1e-9))
        for step, layer in enumerate(layers)
    }


def layer_token_counts(n_tokens: int, pruning: TokenPruningConfig, n_layers: int) -> list[int]:
    """Tokens each of the `n_layers` layers runs on (fused token included), as `PrunedBEATs` runs them."""
    keep = keep_counts(n_tokens, pruning)
    counts, patches, fused = [], n_tokens, 0
    for layer in range(n_layers):
        counts.append(patches + fused)
        if layer in keep and keep[layer] < patches:
            patches, fused = keep[layer], int(pruning.merge == "fuse")
    return counts


# ----- the pieces of one pruning step ------------------------------------------------------------------------


def select_tokens(
    scores: torch.Tensor, segments: torch.Tensor, real: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks `keep` tokens of every sample, the same number for all.

    Args:
        scores: `[batch, tokens]`, higher = more worth keeping.
        segments: `[batch, tokens]` long ≥ 0, the time segment of each token (all zeros = one global top-k).
        real: `[batch, tokens]` bool, False for padding.
        keep: tokens to keep, ≤ tokens.

    Returns:
        kept indices `[batch, keep]` in ascending (time) order, and pruned indices `[batch, tokens − keep]`.

    A token's priority is its rank within its segment divided by the segment's real-token count, so every
    segment keeps the same fraction (up to rounding) and the best token of each segment comes before the second
    best of any. Equal priorities go to the higher score. Padding comes after every real token, so it is kept
    only when a sample has fewer than `keep` real tokens.
    """
    batch, tokens = scores.shape
    scores = scores.float().masked_fill(~real, float("-inf"))
    n_segments = int(segments.max()) + 2  # the last bucket collects padding, out of every real segment's count
    segments = torch.where(real, segments, n_segments - 1)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    grouped = by_score.gather(1, segments.gather(1, by_score).argsort(dim=1, stable=True))  # by segment, best first
    grouped_segments = segments.gather(1, grouped)
    counts = torch.zeros(batch, n_segments, dtype=torch.long, device=scores.device)
    counts.scatter_add_(1, segments, torch.ones_like(segments))
    starts = counts.cumsum(dim=1) - counts
    rank = torch.arange(tokens, device=scores.device) - starts.gather(1, grouped_segments)
    priority = torch.empty_like(scores).scatter_(1, grouped, rank / counts.gather(1, grouped_segments))
    priority = priority.masked_fill(~real, float("inf"))
    order = by_score.gather(1, priority.gather(1, by_score).argsort(dim=1, stable=True))
    return order[:, :keep].sort(dim=1).values, order[:, keep:]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[b, index[b, i]]`: `[batch, tokens, ...]` with `[batch, k]` → `[batch, k, ...]`."""
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, index)


def fuse_tokens(pruned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each sample's pruned tokens: `[batch, pruned, dim]`, `[batch, pruned]` → fp32 `[batch, dim]`.

    Zero weights (padding) contribute nothing; a sample whose weights are all zero gets a zero vector.
    """
    weights = weights.float()
    total = weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.einsum("bpd,bp->bd", pruned.float(), weights) / total


def tome_merge(
    kept: torch.Tensor, kept_sizes: torch.Tensor, pruned: torch.Tensor, pruned_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Averages every pruned token into its most cosine-similar kept token, weighted by size (ToMe).

    Args:
        kept: `[batch, k, dim]` tokens that stay; `kept_sizes` `[batch, k]` patches each holds (0 = padding,
            which never receives a merge).
        pruned: `[batch, p, dim]` tokens that go; `pruned_sizes` `[batch, p]` (0 = padding, which adds nothing).

    Returns:
        merged tokens `[batch, k, dim]` (a token that received nothing is returned unchanged), their sizes
        `[batch, k]`, and each pruned token's target index into `kept` `[batch, p]`.
        Σ size · token over real tokens is the same before and after.
    """
    similarity = F.normalize(pruned.float(), dim=-1) @ F.normalize(kept.float(), dim=-1).transpose(1, 2)
    similarity = similarity.masked_fill((kept_sizes == 0).unsqueeze(1), float("-inf"))
    target = similarity.argmax(dim=-1)  # [batch, p]
    weights = pruned_sizes.float()
    received = torch.zeros_like(kept, dtype=torch.float32).scatter_add_(
        1, target.unsqueeze(-1).expand(-1, -1, kept.shape[-1]), pruned.float() * weights.unsqueeze(-1)
    )
    absorbed = torch.zeros_like(kept_sizes, dtype=torch.float32).scatter_add_(1, target, weights)
    sizes = kept_sizes + absorbed
    merged = (kept.float() * kept_sizes.unsqueeze(-1) + received) / sizes.clamp(min=1e-6).unsqueeze(-1)
    merged = torch.where((absorbed > 0).unsqueeze(-1), merged.to(kept.dtype), kept)
    return merged, sizes, target


def restore_positions(hidden: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Encoder outputs back on the original patch grid: `[batch, tokens, dim]` → `[batch, patches, dim]`.

    `owner` `[batch, patches]` holds, per original patch, the index of the token that absorbed it, or -1
    (dropped, or padding that nothing absorbed): those positions get zeros.
    """
    restored = gather_tokens(hidden, owner.clamp(min=0))
    return restored.masked_fill((owner < 0).unsqueeze(-1), 0.0)


# ----- one forward pass --------------------------------------------------------------------------------------


class TokenPruner:
    """The `between_layers` callback of one forward pass: prunes after the configured layers and keeps track of
    which current token holds every original patch (`owner`), so the outputs can be put back in place.

    Use a fresh one per forward pass. For `score="attention"` the pruning layers' `record_received_attention`
    must be on (`PrunedBEATs` does this).
    """

    def __init__(self, pruning: TokenPruningConfig, beats_cfg: BEATsConfig, encoder: BEATsEncoder):
        self.pruning = pruning
        self.encoder = encoder
        self.tokens_per_step = FBANK_BINS // beats_cfg.input_patch_size
        step_seconds = beats_cfg.input_patch_size * FRAME_SHIFT_SECONDS
        self.steps_per_segment = max(1, round(pruning.segment_seconds / step_seconds))
        self.keep: dict[int, int] = {}
        self.owner: torch.Tensor | None = None
        """`[batch, patches]` long: index of the current token holding each original patch, -1 for none."""
        self.sizes: torch.Tensor | None = None
        """`[batch, tokens]` fp32: real patches each current token holds (padding 0; > 1 after merges)."""
        self.has_fused = False
        """Whether the last token is the fused one ("fuse", after the first pruning step)."""
        self.tokens_per_layer: list[int] = []
        """Tokens each layer ran on, in layer order."""

    def __call__(self, layer: int, state: TokenState) -> TokenState:
        if self.owner is None:
            self._start(state)
        self.tokens_per_layer.append(state.hidden.shape[1])
        keep = self.keep.get(layer)
        if keep is None or keep >= state.hidden.shape[1] - int(self.has_fused):
            return state
        return self._prune(layer, state, keep)

    def _start(self, state: TokenState) -> None:
        batch, patches, _ = state.hidden.shape
        self.keep = keep_counts(patches, self.pruning)
        self.owner = torch.arange(patches, device=state.hidden.device).repeat(batch, 1)
        real = torch.ones(batch, patches, dtype=torch.bool, device=state.hidden.device)
        if state.padding_mask is not None:
            real = ~state.padding_mask
        self.sizes = real.float()

    def _scores(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """`[batch, tokens]` fp32 importance of the tokens after `layer` (detached: selection is not learned)."""
        if self.pruning.score == "attention":
            attention = self.encoder.layers[layer].self_attn
            received, attention.received_attention = attention.received_attention, None
            if received is not None:
                return received
            # LayerDrop skipped this layer in training, so it recorded no attention: fall back to the norm.
        return hidden.detach().float().norm(dim=-1)

    def _segments(self, positions: torch.Tensor) -> torch.Tensor:
        """Time segment of each token from its original position (time-major: index // 8 = 160 ms step)."""
        if self.pruning.segment_seconds <= 0:
            return torch.zeros_like(positions)
        return positions // (self.tokens_per_step * self.steps_per_segment)

    def _prune(self, layer: int, state: TokenState, keep: int) -> TokenState:
        """One pruning step: `keep` patch tokens stay (plus the fused token, for "fuse")."""
        batch, tokens, _ = state.hidden.shape
        n_patch = tokens - int(self.has_fused)  # the fused token is never a candidate: it holds what went before
        positions = state.positions.expand(batch, -1) if state.positions.dim() == 1 else state.positions
        scores = self._scores(layer, state.hidden)[:, :n_patch]
        real = self.sizes[:, :n_patch] > 0  # size 0 = padding
        kept, pruned = select_tokens(scores, self._segments(positions[:, :n_patch]), real, keep)
        hidden, sizes = gather_tokens(state.hidden, kept), self.sizes.gather(1, kept)
        pruned_hidden, pruned_sizes = gather_tokens(state.hidden, pruned), self.sizes.gather(1, pruned)
        # Where each current token goes in the new sequence; -1 = nowhere (dropped, or padding nothing absorbs).
        new_index = torch.full((batch, tokens), -1, dtype=torch.long, device=kept.device)
        new_index.scatter_(1, kept, torch.arange(keep, device=kept.device).expand(batch, -1))
        if self.pruning.merge == "tome":
            hidden, sizes, target = tome_merge(hidden, sizes, pruned_hidden, pruned_sizes)
            new_index.scatter_(1, pruned, torch.where(pruned_sizes > 0, target, -1))
        elif self.pruning.merge == "fuse":
            fused, fused_size = self._fuse(state.hidden, pruned_hidden, scores.gather(1, pruned), pruned_sizes)
            new_index.scatter_(1, pruned, torch.where(pruned_sizes > 0, keep, -1))
            if self.has_fused:
                new_index[:, -1] = keep
            hidden = torch.cat([hidden, fused.to(hidden.dtype).unsqueeze(1)], dim=1)
            sizes = torch.cat([sizes, fused_size.unsqueeze(1)], dim=1)
        self.owner = torch.where(self.owner >= 0, new_index.gather(1, self.owner.clamp(min=0)), -1)
        self.sizes = sizes
        positions = positions.gather(1, kept)
        mask = None if state.padding_mask is None else state.padding_mask.gather(1, kept)
        if self.pruning.merge == "fuse":
            self.has_fused = True
            positions = torch.cat([positions, self._fused_position(keep)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, sizes[:, -1:] == 0], dim=1)
        return TokenState(hidden, mask, positions)

    def _fuse(
        self, hidden: torch.Tensor, pruned: torch.Tensor, pruned_scores: torch.Tensor, pruned_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new fused token, fp32 `[batch, dim]`, and the real patches it holds `[batch]`.

        The tokens pruned now are averaged by score × size; what earlier steps fused (the last token of
        `hidden`) joins in, each side weighted by the patches it holds, so no step's tokens count for more.
        """
        fused, size = fuse_tokens(pruned, pruned_scores * pruned_sizes), pruned_sizes.sum(dim=1)
        if not self.has_fused:
            return fused, size
        old, old_size = hidden[:, -1].float(), self.sizes[:, -1]
        total = old_size + size
        return (old * old_size[:, None] + fused * size[:, None]) / total.clamp(min=1e-6)[:, None], total

    def _fused_position(self, index: int) -> torch.Tensor:
        """`[batch, 1]` position of the fused token at `index`: the mean original position of the patches it holds,
        so its relative bias to a kept token reflects where its content was (0 when it holds nothing)."""
        holds = (self.owner == index).float()
        patches = torch.arange(holds.shape[1], device=holds.device, dtype=torch.float32)
        mean = (holds * patches).sum(dim=1) / holds.sum(dim=1).clamp(min=1.0)
        return mean.round().long().unsqueeze(1)


@dataclass
class PrunedEncoding:
    """What `PrunedBEATs.encode_pruned` returns: the pruned tokens and where each original patch went."""

    state: TokenState
    """The tokens after the last layer: hidden `[batch, tokens, dim]`, their padding mask, original positions."""
    owner: torch.Tensor
    """`[batch, patches]` long: index into `state` of the token holding each original patch, -1 for none."""
    padding_mask: torch.Tensor | None
    """`[batch, patches]` original patch padding mask (True = padding), or None."""
    tokens_per_layer: list[int]
    """Tokens each layer ran on."""

    def restored(self) -> torch.Tensor:
        """`[batch, patches, dim]` features on the original patch grid (see `restore_positions`)."""
        return restore_positions(self.state.hidden, self.owner)


@contextlib.contextmanager
def _recording_attention(encoder: BEATsEncoder, layers: Sequence[int]) -> Iterator[None]:
    """Switches on received-attention recording in `layers` for one pass, and frees what was recorded after."""
    modules = [encoder.layers[layer].self_attn for layer in layers]
    for module in modules:
        module.record_received_attention = True
    try:
        yield
    finally:
        for module in modules:
            module.record_received_attention = False
            module.received_attention = None


class PrunedBEATs(BEATs):
    """BEATs whose encoder prunes patch tokens mid-way and restores them at the end (see the module docstring).

    Same parameters and state-dict keys as `BEATs`, so `to_checkpoint()` is an official BEATs checkpoint; the
    pruning settings are `pruning_config`. `forward_fbank` / `extract_features` return features of the original
    length and patch order, so SALMONN's frame-wise join is unchanged; `encode_pruned` gives the pruned tokens
    themselves. The inherited `encode` stays BEATs' unpruned pass with its `between_layers` hook.
    """

    def __init__(self, cfg: BEATsConfig, pruning: TokenPruningConfig | None = None):
        super().__init__(cfg)
        self.pruning_config = pruning or TokenPruningConfig()

    @property
    def pruning_config(self) -> TokenPruningConfig:
        return self._pruning_config

    @pruning_config.setter
    def pruning_config(self, pruning: TokenPruningConfig) -> None:
        last = self.cfg.encoder_layers - 1
        if any(layer >= last for layer in pruning.prune_after_layers):
            raise ValueError(f"prune_after_layers {pruning.prune_after_layers} must be below the last layer "
                             f"({last}): pruning after it saves nothing")
        self._pruning_config = pruning

    @classmethod
    def from_beats(cls, beats: BEATs, pruning: TokenPruningConfig) -> PrunedBEATs:
        """A pruned copy of `beats` (weights copied; same dtype, device and train/eval mode)."""
        weight = beats.patch_embedding.weight
        model = cls(dataclasses.replace(beats.cfg), pruning).to(device=weight.device, dtype=weight.dtype)
        model.load_state_dict(beats.state_dict())
        return model.train(beats.training)

    def encode_pruned(
        self, fbank: torch.Tensor, fbank_padding_mask: torch.Tensor | None = None
    ) -> PrunedEncoding:
        """Full encoder pass with pruning over an fbank `[batch, frames, 128]` (mask `[batch, frames]` or None)."""
        patches, padding_mask = self.embed_patches(fbank, fbank_padding_mask)
        pruning = self.pruning_config
        pruner = TokenPruner(pruning, self.cfg, self.encoder)
        scored_layers = pruning.prune_after_layers if pruning.prunes and pruning.score == "attention" else []
        with _recording_attention(self.encoder, scored_layers):
            state = self.encoder(patches, padding_mask, pruner)
        return PrunedEncoding(state, pruner.owner, padding_mask, pruner.tokens_per_layer)

    def forward_fbank(
        self, fbank: torch.Tensor, fbank_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features `[batch, patches, dim]` on the original patch grid, and the patch padding mask or None.

        A pruned patch position holds the output of the token that absorbed it: the fused token ("fuse"), the
        kept token it merged into ("tome"), or zeros ("drop"). With keep_ratio 1 this is BEATs' own pass.
        """
        if not self.pruning_config.prunes:
            return super().forward_fbank(fbank, fbank_padding_mask)
        encoding = self.encode_pruned(fbank, fbank_padding_mask)
        return encoding.restored(), encoding.padding_mask


# ----- cost: analytic FLOPs --------------------------------------------------------------------------------


def beats_cost(cfg: BEATsConfig, pruning: TokenPruningConfig, seconds: float) -> dict:
    """Analytic FLOPs (2 × multiply-adds) of one clip of `seconds` through `PrunedBEATs`.

    Counts the matrix products: patch embedding (convolution, plus `post_extract_proj` when the widths differ),
    the convolutional positional embedding, and per layer, at the tokens it runs on, the q/k/v/out projections,
    the attention matrix (q·kᵀ and probabilities · v) and the feed-forward block (fc1 twice as wide for GLU).
    Leaves out what grows only linearly with width and is small beside those: layer norms, softmax, biases,
    activations, the position-bias gate, the pruning itself.

    Returns `{"tokens", "tokens_per_layer", "patch_embedding", "positional_conv", "layers" (per layer),
    "total"}`, FLOPs as ints.
    """
    n = patch_tokens(cfg, seconds)
    dim, ffn = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
    embedding = n * cfg.embed_dim * cfg.input_patch_size**2
    if cfg.embed_dim != dim:
        embedding += n * cfg.embed_dim * dim
    positional = n * dim * (dim // cfg.conv_pos_groups) * cfg.conv_pos
    fc1_width = 2 * ffn if cfg.activation_fn == "glu" else ffn
    counts = layer_token_counts(n, pruning, cfg.encoder_layers)
    layers = [2 * (4 * t * dim * dim + 2 * t * t * dim + t * dim * (fc1_width + ffn)) for t in counts]
    total = 2 * (embedding + positional) + sum(layers)
    return {
        "tokens": n,
        "tokens_per_layer": counts,
        "patch_embedding": 2 * embedding,
        "positional_conv": 2 * positional,
        "layers": layers,
        "total": total,
    }


if __name__ == "__main__":  # the benchmark's earlier command (paper/ quotes it): run its recipe, which imports this
    import runpy

    runpy.run_module("student.token_pruning_bench", run_name="__main__", alter_sys=True)
