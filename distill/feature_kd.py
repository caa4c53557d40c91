"""Feature distillation: the student's intermediate representations regress onto the teacher's.

Two places in the audio path are distilled:
- the Q-Former outputs, one vector per audio window (`FeatureKD`: MSE + cosine), as the teacher cache stores them;
- Whisper encoder hidden states, each distilled student layer against the teacher layer it was initialised from
  (`HiddenStateKD`: L1 + cosine).

When the widths differ, a learned linear map takes the student's features into the teacher's width (FitNets'
regressor): the teacher's space is the target, and the map is trained with the student and dropped after
distillation. When they match, no map is created, so the student is pulled onto the teacher's features directly.
Teacher features are detached: they are targets. Math is fp32 (fp64 inputs stay fp64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import upcast


def _projection(student_dim: int, teacher_dim: int) -> nn.Module:
    return nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of values [B, N] over the True entries of mask [B, N] (all entries when None); 0 when none are True."""
    if mask is None:
        return values.mean()
    if mask.dtype != torch.bool or mask.shape != values.shape:
        raise ValueError(f"mask must be bool {tuple(values.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _pair_terms(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-vector distances between projected student and teacher features [B, N, d], averaged over the mask:
    mean squared error, mean absolute error (each averaged over d) and 1 − cosine similarity."""
    student, teacher = upcast(student), upcast(teacher.detach())
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ in shape")
    diff = student - teacher
    mse = _masked_mean(diff.pow(2).mean(-1), mask)
    l1 = _masked_mean(diff.abs().mean(-1), mask)
    cos = _masked_mean(1 - F.cosine_similarity(student, teacher, dim=-1), mask)
    return mse, l1, cos


class FeatureKD(nn.Module):
    """Q-Former output KD: loss = mse_weight · MSE + cos_weight · (1 − cos).

    MSE = mean over windows of (1/dt) Σ_d (W s + b − t)_d², cosine = mean over windows of cos(W s + b, t), where
    W s + b is the learned map when student_dim ≠ teacher_dim and s itself otherwise.

    forward(student [B, W, ds], teacher [B, W, dt], mask [B, W] bool or None (True = a real window)) →
    {"loss", "mse", "cos"}, scalars; "cos" is the 1 − cosine term.
    """

    def __init__(self, student_dim: int, teacher_dim: int, mse_weight: float = 1.0, cos_weight: float = 1.0):
        super().__init__()
        self.proj = _projection(student_dim, teacher_dim)
        self.mse_weight, self.cos_weight = mse_weight, cos_weight

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        mse, _, cos = _pair_terms(self.proj(student), teacher, mask)
        return {"loss": self.mse_weight * mse + self.cos_weight * cos, "mse": mse, "cos": cos}


class HiddenStateKD(nn.Module):
    """Encoder hidden-state KD over (student layer, teacher layer) pairs: loss = mean over pairs of
    l1_weight · L1 + cos_weight · (1 − cos).

    L1 = mean over frames of (1/dt) Σ_d |W_i s + b_i − t|_d, cosine per frame as in `FeatureKD`; one learned map per
    pair when student_dim ≠ teacher_dim. Layer indices are into the `hidden_states` tuples that HF encoders return
    with `output_hidden_states=True` (0 = the embeddings, i = the output of layer i).

    forward(student_hidden: sequence of [B, T, ds], teacher_hidden: sequence of [B, T, dt], mask [B, T] bool or
    None) → {"loss", "l1", "cos"}, each averaged over the pairs.
    """

    def __init__(self, layer_pairs: Sequence[tuple[int, int]], student_dim: int, teacher_dim: int,
                 l1_weight: float = 1.0, cos_weight: float = 1.0):
        super().__init__()
        if not layer_pairs:
            raise ValueError("HiddenStateKD needs at least one (student layer, teacher layer) pair")
        self.layer_pairs = [tuple(pair) for pair in layer_pairs]
        self.projs = nn.ModuleList(_projection(student_dim, teacher_dim) for _ in self.layer_pairs)
        self.l1_weight, self.cos_weight = l1_weight, cos_weight

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor],
                mask: Tensor | None = None) -> dict[str, Tensor]:
        l1_terms, cos_terms = [], []
        for (student_layer, teacher_layer), proj in zip(self.layer_pairs, self.projs, strict=True):
            _, l1, cos = _pair_terms(proj(student_hidden[student_layer]), teacher_hidden[teacher_layer], mask)
            l1_terms.append(l1)
            cos_terms.append(cos)
        l1, cos = torch.stack(l1_terms).mean(), torch.stack(cos_terms).mean()
        return {"loss": self.l1_weight * l1 + self.cos_weight * cos, "l1": l1, "cos": cos}
