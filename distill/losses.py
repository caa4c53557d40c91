"""Logit knowledge-distillation losses for a student and a teacher that share a tokenizer.

Every loss compares, at each answer position, the student's next-token distribution with the teacher's and returns
the mean over the positions where `mask` is True (0, not NaN, when there are none). Conventions shared by all:

- p = softmax(z / T) for both models, in fp32 (fp64 inputs stay fp64), whatever dtype the logits arrive in.
- `scale_by_t2=True` multiplies the loss by T² (Hinton et al. 2015), which keeps the gradient's size roughly
  independent of T; off by default.
- Only masked positions are computed at all, `chunk_size` of them at a time (None, the default: all in one chunk).
  With more than one chunk each chunk's forward is recomputed in backward (activation checkpointing), so the fp32
  softmax temporaries never exist for more than one chunk at a time: that is what keeps a 256k vocabulary
  affordable (e.g. chunk_size=64 holds a few 64 × 256k fp32 buffers, ~64 MB each), at the cost of one more
  forward of the loss math.
- The teacher is given either as dense logits [batch, seq, vocab] or as a `SparseTeacher` read from the teacher
  cache (see there for the "topk" and "sampled" conventions). `topk_sparse` / `sampled_sparse` build the cache
  entries from dense teacher logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from teacher.sparse import sampled_sparse, topk_sparse  # noqa: F401  (the cache builders, re-exported)

KINDS = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl")
SPARSE_MODES = ("topk", "sampled")

# Finite stand-in for log 0: exp() of it is exactly 0 in fp32, and unlike -inf it never produces inf - inf = NaN
# in a logsumexp backward.
LOG_ZERO = -1e9


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher next-token distribution kept at k vocabulary entries per position (the teacher cache's format).

    mode "topk": `values` are the teacher's probabilities softmax(z)[ids] at T = 1 for its k most likely tokens
        (not renormalised; entries with value 0 are padding and ignored). ids must be distinct within a position.
    mode "sampled": `ids` are k draws (with replacement) from a proposal q and `values` the importance weights
        w = p_T(id) / (k q(id)), so that Σ_j w_j f(id_j) is an unbiased estimate of Σ_v p_T(v) f(v) at T = 1.
    """

    ids: Tensor
    """[batch, seq, k] long vocabulary ids."""
    values: Tensor
    """[batch, seq, k] probabilities (topk) or importance weights (sampled)."""
    mode: Literal["topk", "sampled"]

    def __post_init__(self):
        if self.mode not in SPARSE_MODES:
            raise ValueError(f"sparse teacher mode {self.mode!r} is not one of {SPARSE_MODES}")
        if self.ids.shape != self.values.shape or self.ids.dim() != 3:
            raise ValueError(f"sparse teacher ids {tuple(self.ids.shape)} and values {tuple(self.values.shape)} "
                             "must both be [batch, seq, k]")
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ValueError(f"sparse teacher ids must be integer, got {self.ids.dtype}")


# --- divergences between rows of log-probabilities [rows, vocab] -----------------------------------------------


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) per row; entries with p(v) = 0 contribute 0 (0 log 0 = 0)."""
    p = log_p.exp()
    # `where` rather than a product with p alone, so a -inf in log_p never meets a 0 and makes NaN.
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w a + (1 − w) b), computed in log space for stability."""
    if weight == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _divergence_rows(kind: str, log_s: Tensor, log_t: Tensor, beta: float, alpha: float) -> Tensor:
    """The divergence `kind` between student and teacher rows of log-probabilities → [rows]."""
    if kind == "forward_kl":
        return _kl_rows(log_t, log_s)
    if kind == "reverse_kl":
        return _kl_rows(log_s, log_t)
    if kind == "generalized_jsd":
        log_m = _log_mixture(log_t, log_s, beta)
        return beta * _kl_rows(log_t, log_m) + (1 - beta) * _kl_rows(log_s, log_m)
    if kind == "skew_forward_kl":
        return _kl_rows(log_t, _log_mixture(log_t, log_s, alpha))
    if kind == "skew_reverse_kl":
        return _kl_rows(log_s, _log_mixture(log_s, log_t, alpha))
    raise ValueError(f"unknown KD loss {kind!r}; expected one of {KINDS}")


def support_divergence_rows(kind: str, log_s_full: Tensor, ids: Tensor, log_t_weights: Tensor, valid: Tensor,
                            beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """A divergence between the student and a teacher known only on a support of k ids per row → [rows].

    log_s_full [rows, V]: student log-probabilities over its whole vocabulary.
    ids [rows, k]: the support (student vocabulary ids); log_t_weights [rows, k]: unnormalised teacher
    log-probabilities on it; valid [rows, k]: which entries belong to the support (padding is False).

    The teacher is renormalised over the support. For forward KL the student is *not*: its log-probabilities come
    from the full softmax, so Σ_S p_T (log p_T − log p_S) ≥ 0 keeps pushing student mass off tokens outside the
    support (the usual top-k KD; renormalising would make the loss blind to that mass). Every other divergence
    needs two distributions on one support, so the student is renormalised over it too: the result is the exact
    divergence between both distributions conditioned on the support. Rows with an empty support give 0.
    """
    log_t = torch.where(valid, log_t_weights, LOG_ZERO).log_softmax(-1)
    log_s = log_s_full.gather(-1, ids)
    if kind == "forward_kl":
        rows = _kl_rows(log_t, log_s)
    else:
        rows = _divergence_rows(kind, torch.where(valid, log_s, LOG_ZERO).log_softmax(-1), log_t, beta, alpha)
    return rows * valid.any(-1)


# --- chunked, masked reduction ---------------------------------------------------------------------------------


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 → fp32 for the loss math; fp32 and fp64 unchanged (fp64 keeps gradcheck exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _select_and_reduce(row_loss: Callable[..., Tensor], index: Sequence[Tensor], *tables: Tensor) -> Tensor:
    return row_loss(*[table.index_select(0, i) for table, i in zip(tables, index, strict=True)]).sum(0)


def sum_over_rows(row_loss: Callable[..., Tensor], tables: Sequence[Tensor], index: Sequence[Tensor],
                  chunk_size: int | None) -> Tensor:
    """Σ over selected rows of `row_loss(*rows)`, `chunk_size` rows at a time.

    tables: tensors [rows_i, ...]; index: one long tensor [n] per table, the rows to take from it (row r of the
    reduction uses tables[i][index[i][r]]). row_loss maps the selected rows to [n] or [n, m]; the result is its
    sum over rows ([] or [m]). With several chunks each chunk is checkpointed (recomputed in backward), so peak
    memory is one chunk's temporaries rather than all of them.
    """
    n = index[0].numel()
    size = n if chunk_size is None else chunk_size
    chunked = n > size and torch.is_grad_enabled()
    total = None
    for start in range(0, max(n, 1), max(size, 1)):
        part_index = [i[start:start + size] for i in index]
        if chunked:
            part = checkpoint(_select_and_reduce, row_loss, part_index, *tables, use_reentrant=False)
        else:
            part = _select_and_reduce(row_loss, part_index, *tables)
        total = part if total is None else total + part
    return total


def _check_dense(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [batch, seq, vocab], got {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must have the same shape (same tokenizer, aligned positions)")
    _check_mask(mask, student_logits)


def _check_mask(mask: Tensor, student_logits: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = answer token), got {mask.dtype}")
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} must be [batch, seq] = {tuple(student_logits.shape[:2])}")


def check_kd_args(kind: str, temperature: float, beta: float, alpha: float, chunk_size: int | None) -> None:
    """Raise ValueError for an unknown loss or a parameter outside its range."""
    if kind not in KINDS:
        raise ValueError(f"unknown KD loss {kind!r}; expected one of {KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < beta < 1:
        raise ValueError(f"generalized_jsd needs 0 < beta < 1, got {beta}; for 0 / 1 use forward_kl / reverse_kl")
    if not 0 <= alpha < 1:
        raise ValueError(f"skew KL needs 0 <= alpha < 1, got {alpha} (alpha = 1 makes the loss identically 0)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")


def logit_kd(kind: str, student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, mask: Tensor,
             temperature: float = 1.0, *, beta: float = 0.5, alpha: float = 0.1, scale_by_t2: bool = False,
             chunk_size: int | None = None) -> Tensor:
    """Any of the KD losses by name (`KINDS`); see the named functions for the formulas. Returns a scalar."""
    check_kd_args(kind, temperature, beta, alpha, chunk_size)
    if isinstance(teacher_logits, SparseTeacher):
        total, count = _sparse_sum(kind, student_logits, teacher_logits, mask, temperature, beta, alpha, chunk_size)
    else:
        _check_dense(student_logits, teacher_logits, mask)

        def row_loss(s: Tensor, t: Tensor) -> Tensor:
            log_s = (upcast(s) / temperature).log_softmax(-1)
            log_t = (upcast(t) / temperature).log_softmax(-1)
            return _divergence_rows(kind, log_s, log_t, beta, alpha)

        rows = mask.reshape(-1).nonzero().squeeze(-1)
        vocab = student_logits.shape[-1]
        tables = [student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)]
        total, count = sum_over_rows(row_loss, tables, [rows, rows], chunk_size), rows.numel()
    loss = total / max(count, 1)
    return loss * temperature**2 if scale_by_t2 else loss


def _sparse_sum(kind: str, student_logits: Tensor, teacher: SparseTeacher, mask: Tensor, temperature: float,
                beta: float, alpha: float, chunk_size: int | None) -> tuple[Tensor, int]:
    """Σ over masked positions of the loss against a cached sparse teacher, and the number of positions."""
    if student_logits.dim() != 3 or teacher.ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"sparse teacher ids {tuple(teacher.ids.shape)} must be [batch, seq, k] with the batch and "
                         f"seq of student_logits {tuple(student_logits.shape)}")
    _check_mask(mask, student_logits)
    if teacher.mode == "sampled":
        if kind != "forward_kl":
            raise ValueError(f"{kind} cannot be estimated from a sampled teacher cache: the samples give unbiased "
                             "sums weighted by p_T only (forward KL's cross-entropy); use a 'topk' cache")
        if temperature != 1:
            raise ValueError("a sampled teacher cache holds draws from the teacher at T = 1 and cannot be re-tempered "
                             f"without the teacher's normaliser; use temperature = 1 (got {temperature}) or 'topk'")

    def row_loss(s: Tensor, ids: Tensor, values: Tensor) -> Tensor:
        log_s_full = (upcast(s) / temperature).log_softmax(-1)
        values = upcast(values)
        if teacher.mode == "sampled":
            return -(values * log_s_full.gather(-1, ids)).sum(-1)
        valid = values > 0
        # Re-temper the cached T = 1 probabilities: p^(1/T) renormalised over the support equals
        # softmax(z / T) restricted to the support, exactly.
        log_t = torch.where(valid, values.log() / temperature, LOG_ZERO)
        return support_divergence_rows(kind, log_s_full, ids, log_t, valid, beta, alpha)

    rows = mask.reshape(-1).nonzero().squeeze(-1)
    k = teacher.ids.shape[-1]
    tables = [student_logits.reshape(-1, student_logits.shape[-1]), teacher.ids.reshape(-1, k).long(),
              teacher.values.reshape(-1, k)]
    return sum_over_rows(row_loss, tables, [rows] * 3, chunk_size), rows.numel()


# --- the named losses --------------------------------------------------------------------------------------------


def forward_kl(student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, mask: Tensor, temperature: float = 1.0,
               *, scale_by_t2: bool = False, chunk_size: int | None = None) -> Tensor:
    """Forward KL(p_T ‖ p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v)), p = softmax(z / T), mean over masked positions.

    student_logits [batch, seq, vocab]; teacher_logits the same shape, or a `SparseTeacher`; mask [batch, seq]
    bool (True = answer token). Returns a scalar (× T² when `scale_by_t2`).

    Sparse "topk": Σ_{v∈S} p̂_T(v) (log p̂_T(v) − log p_S(v)) over the cached support S, with p̂_T the cached
    probabilities re-tempered and renormalised over S (p^(1/T) / Σ_S p^(1/T)) and log p_S from the student's full
    softmax, not renormalised (see `support_divergence_rows`); with k = vocab it equals the dense loss.
    Sparse "sampled" (T = 1 only): Σ_j w_j (−log p_S(x_j)), an unbiased estimate of the cross-entropy
    Σ_v p_T(v) (−log p_S(v)). It differs from forward KL by the teacher entropy, a constant with no gradient, so its
    gradient is an unbiased estimate of forward KL's.
    """
    return logit_kd("forward_kl", student_logits, teacher_logits, mask, temperature, scale_by_t2=scale_by_t2,
                    chunk_size=chunk_size)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, mask: Tensor, temperature: float = 1.0,
               *, scale_by_t2: bool = False, chunk_size: int | None = None) -> Tensor:
    """Reverse KL(p_S ‖ p_T) = Σ_v p_S(v) (log p_S(v) − log p_T(v)), p = softmax(z / T), mean over masked positions.

    Shapes as in `forward_kl`. Sparse "topk": both distributions restricted to the cached support and renormalised
    there (a reverse KL against a teacher that is 0 outside the support would be infinite); "sampled": ValueError.
    """
    return logit_kd("reverse_kl", student_logits, teacher_logits, mask, temperature, scale_by_t2=scale_by_t2,
                    chunk_size=chunk_size)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, mask: Tensor,
                    temperature: float = 1.0, *, beta: float = 0.5, scale_by_t2: bool = False,
                    chunk_size: int | None = None) -> Tensor:
    """Generalized JSD(β) = β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m), m = β p_T + (1 − β) p_S, 0 < β < 1.

    The convention of GKD (Agarwal et al. 2024) as TRL's `GKDTrainer.generalized_jsd_loss` and DistiLLM implement it;
    β = 0.5 is the symmetric Jensen–Shannon divergence. TRL maps β = 0 / 1 to forward / reverse KL; here those
    endpoints raise (the formula itself is 0 there): call `forward_kl` / `reverse_kl`. Shapes as in `forward_kl`.
    Sparse "topk": both distributions restricted to the cached support and renormalised; "sampled": ValueError.
    """
    return logit_kd("generalized_jsd", student_logits, teacher_logits, mask, temperature, beta=beta,
                    scale_by_t2=scale_by_t2, chunk_size=chunk_size)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, mask: Tensor,
                    temperature: float = 1.0, *, alpha: float = 0.1, scale_by_t2: bool = False,
                    chunk_size: int | None = None) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024) = KL(p_T ‖ α p_T + (1 − α) p_S), 0 ≤ α < 1 (α = 0: forward KL).

    Shapes as in `forward_kl`. Sparse "topk": both distributions restricted to the cached support and renormalised;
    "sampled": ValueError.
    """
    return logit_kd("skew_forward_kl", student_logits, teacher_logits, mask, temperature, alpha=alpha,
                    scale_by_t2=scale_by_t2, chunk_size=chunk_size)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, mask: Tensor,
                    temperature: float = 1.0, *, alpha: float = 0.1, scale_by_t2: bool = False,
                    chunk_size: int | None = None) -> Tensor:
    """Skew reverse KL (DistiLLM) = KL(p_S ‖ α p_S + (1 − α) p_T), 0 ≤ α < 1 (α = 0: reverse KL).

    Shapes as in `forward_kl`. Sparse "topk": both distributions restricted to the cached support and renormalised;
    "sampled": ValueError.
    """
    return logit_kd("skew_reverse_kl", student_logits, teacher_logits, mask, temperature, alpha=alpha,
                    scale_by_t2=scale_by_t2, chunk_size=chunk_size)


class LogitKDLoss(nn.Module):
    """One of the KD losses as a module, its settings fixed at construction (e.g. from the recipe config).

    forward(student_logits [batch, seq, vocab], teacher_logits [batch, seq, vocab] | SparseTeacher,
    mask [batch, seq] bool) → scalar. `kind` is one of `KINDS`; beta is used by generalized_jsd, alpha by the skew
    losses.
    """

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, *, beta: float = 0.5, alpha: float = 0.1,
                 scale_by_t2: bool = False, chunk_size: int | None = None):
        super().__init__()
        check_kd_args(kind, temperature, beta, alpha, chunk_size)
        self.kind, self.temperature, self.beta, self.alpha = kind, temperature, beta, alpha
        self.scale_by_t2, self.chunk_size = scale_by_t2, chunk_size

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, mask: Tensor) -> Tensor:
        return logit_kd(self.kind, student_logits, teacher_logits, mask, self.temperature, beta=self.beta,
                        alpha=self.alpha, scale_by_t2=self.scale_by_t2, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, temperature={self.temperature}, beta={self.beta}, alpha={self.alpha}"

