"""Sparse next-token distributions for the teacher cache: top-k, or k importance-sampled tokens.

Written by the teacher cache and read back as `distill.losses.SparseTeacher` by the KD losses.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def topk_sparse(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's k most likely tokens and their probabilities at T = 1, for a "topk" cache.

    teacher_logits [..., vocab] → ids [..., k] (long), probs [..., k] (fp32, softmax(z) of those ids, descending).
    """
    logits = _upcast(teacher_logits)
    top, ids = logits.topk(k, dim=-1)
    return ids, (top - logits.logsumexp(-1, keepdim=True)).exp()


@torch.no_grad()
def sampled_sparse(teacher_logits: Tensor, k: int, generator: torch.Generator | None = None, *,
                   proposal_temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """k token ids drawn with replacement per position, with importance weights, for a "sampled" cache.

    Draws x_1..x_k ~ q = softmax(z / proposal_temperature) and returns w_j = p(x_j) / (k q(x_j)) with p = softmax(z),
    so E[Σ_j w_j f(x_j)] = Σ_v p(v) f(v) for any f (Anshumann et al. 2025, "Sparse Logit Sampling"). With the default
    proposal q = p every weight is 1/k; a hotter proposal visits more of the tail at the price of uneven weights.

    teacher_logits [..., vocab] → ids [..., k] (long), weights [..., k] (fp32).
    """
    if proposal_temperature <= 0:
        raise ValueError(f"proposal_temperature must be > 0, got {proposal_temperature}")
    logits = _upcast(teacher_logits)
    log_p = logits.log_softmax(-1)
    log_q = (logits / proposal_temperature).log_softmax(-1)
    flat_q = log_q.reshape(-1, logits.shape[-1]).exp()
    ids = torch.multinomial(flat_q, k, replacement=True, generator=generator).reshape(*logits.shape[:-1], k)
    weights = (log_p.gather(-1, ids) - log_q.gather(-1, ids)).exp() / k
    return ids, weights
