"""SALMONN's window-level Q-Former: one learned query per short window of the joined encoder frames.

The joined features `[batch, frames, speech_dim + audio_dim]` (50 frames per second, Whisper's rate) are cut
into windows of `second_per_window` seconds every `second_stride` seconds (17 frames each at SALMONN's
0.333 s → 88 windows for 30 s). Each window is a separate Q-Former input: the queries attend to the window's
frames by cross-attention, so the LLM gets `windows × num_query_token` audio tokens in time order.

The Q-Former is transformers' `Blip2QFormerModel` (bidirectional self-attention over the queries,
cross-attention to the frames, no text FFN): `BertModel` with cross-attention insists on a causal decoder.
`kind: pool` replaces it with its smallest form, one multi-head cross-attention of the queries over the window's
frames and a layer norm (`WindowAttentionPool`): from scratch it learns to carry speech far faster than a fresh
BERT-initialised Q-Former (paper/notes.md, "a teacher that transcribes"), so the toy teachers use it; SALMONN's
checkpoints need `blip2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

FRAMES_PER_SECOND = 50
"""Whisper encoder output rate (20 ms per frame); BEATs tokens arrive at the same average rate."""


@dataclass
class QFormerConfig:
    """Shape of the window-level Q-Former (SALMONN: BERT-base width, 2 layers, 1 query, 0.333 s windows)."""

    kind: Literal["blip2", "pool"] = "blip2"
    """blip2: SALMONN's Q-Former (BERT layers with cross-attention; `num_hidden_layers`, `intermediate_size`);
    pool: one cross-attention of the queries over each window's frames and a layer norm (`WindowAttentionPool`), the
    toy teachers' choice because a fresh one learns from scratch much faster."""
    num_query_token: int = 1
    num_hidden_layers: int = 2
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    dropout: float = 0.1
    """Hidden and attention dropout (BERT's 0.1)."""
    trim_to_audio: bool = False
    """Read only encoder frames that hold audio: frames past each clip's end are zeroed (BEATs' padding already
    is) and the batch is cut to its longest clip, so the LLM gets the windows over the audio (3 per second)
    instead of the whole chunk's (SALMONN: 88 for 30 s, false). A clip's encoder outputs then depend on that
    clip alone, which lets frozen encoders' outputs be computed once and cached (`common.feature_store`)."""


def window_frames(cfg: QFormerConfig) -> tuple[int, int]:
    """(kernel, stride) in encoder frames, rounded as SALMONN does: 0.333 s → 17 frames."""
    kernel = round(FRAMES_PER_SECOND * cfg.second_per_window)
    stride = round(FRAMES_PER_SECOND * cfg.second_stride)
    return kernel, stride


def num_windows(frames: int, cfg: QFormerConfig) -> int:
    """Windows over `frames` encoder frames (incomplete windows at the end are dropped, as in SALMONN)."""
    kernel, stride = window_frames(cfg)
    return 0 if frames < kernel else (frames - kernel) // stride + 1


def split_windows(features: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """`[batch, frames, dim]` → `[batch × windows, kernel, dim]`, windows in time order within each row."""
    batch, frames, dim = features.shape
    windows = features.unfold(1, kernel, stride)  # [batch, windows, dim, kernel]
    return windows.permute(0, 1, 3, 2).reshape(-1, kernel, dim)


class WindowAttentionPool(nn.Module):
    """Queries `[n, queries, hidden]` attend (multi-head) over frames `[n, kernel, encoder_dim]`; the attended values,
    projected and layer-normed, are the outputs `[n, queries, hidden]` (no residual to the query: each output is
    what the window holds)."""

    def __init__(self, hidden: int, heads: int, encoder_dim: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"qformer.hidden_size {hidden} is not divisible by qformer.num_attention_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(encoder_dim, hidden)
        self.v_proj = nn.Linear(encoder_dim, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        for proj in (self.q_proj, self.k_proj, self.v_proj):  # torch's nn.MultiheadAttention initialisation
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        n, q_len, hidden = queries.shape
        split = lambda x: x.reshape(n, x.shape[1], self.heads, hidden // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(queries)), split(self.k_proj(frames)), split(self.v_proj(frames))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.norm(self.out_proj(out.transpose(1, 2).reshape(n, q_len, hidden)))


class WindowQFormer(nn.Module):
    """Window-level Q-Former: `[batch, frames, encoder_dim]` → `[batch, windows × queries, hidden_size]`."""

    def __init__(self, cfg: QFormerConfig, encoder_dim: int):
        super().__init__()
        self.cfg = cfg
        self.kernel, self.stride = window_frames(cfg)
        if cfg.kind == "pool":
            self.pool = WindowAttentionPool(cfg.hidden_size, cfg.num_attention_heads, encoder_dim, cfg.dropout)
        elif cfg.kind == "blip2":
            self.qformer = Blip2QFormerModel(self.blip2_config(cfg, encoder_dim))
        else:
            raise ValueError(f"qformer.kind: {cfg.kind!r} is not one of blip2, pool")
        # BLIP-2 / SALMONN initialise the queries with BERT's initializer range.
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_token, cfg.hidden_size))
        self.query_tokens.data.normal_(mean=0.0, std=0.02)

    @staticmethod
    def blip2_config(cfg: QFormerConfig, encoder_dim: int) -> Blip2QFormerConfig:
        return Blip2QFormerConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            cross_attention_frequency=1,
            encoder_hidden_size=encoder_dim,
            layer_norm_eps=1e-12,
            use_qformer_text_input=False,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features `[batch, frames, encoder_dim]`. Returns `[batch, windows × queries, hidden_size]`."""
        batch = features.shape[0]
        if features.shape[1] < self.kernel:
            features = F.pad(features, (0, 0, 0, self.kernel - features.shape[1]))
        windows = split_windows(features, self.kernel, self.stride)
        queries = self.query_tokens.expand(windows.shape[0], -1, -1)
        if self.cfg.kind == "pool":
            out = self.pool(queries, windows)
        else:
            out = self.qformer(query_embeds=queries, encoder_hidden_states=windows).last_hidden_state
        return out.reshape(batch, -1, out.shape[-1])
