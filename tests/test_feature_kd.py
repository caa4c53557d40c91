"""Feature KD (Q-Former outputs, encoder hidden states) against hand-written MSE / L1 / cosine."""

import pytest
import torch
from torch import nn

from distill.feature_kd import FeatureKD, HiddenStateKD


def features(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def hand_terms(student, teacher, mask):
    """Loops over (batch, window) vectors: mean squared error, mean absolute error, 1 − cosine."""
    mse, l1, cos, n = 0.0, 0.0, 0.0, 0
    for b in range(student.shape[0]):
        for w in range(student.shape[1]):
            if mask is None or mask[b, w]:
                s, t = student[b, w], teacher[b, w]
                mse += ((s - t) ** 2).sum() / len(s)
                l1 += (s - t).abs().sum() / len(s)
                cos += 1 - (s @ t) / (s.norm() * t.norm())
                n += 1
    return mse / n, l1 / n, cos / n


def test_feature_kd_same_width_has_no_projection_and_matches_formula():
    kd = FeatureKD(8, 8, mse_weight=0.7, cos_weight=2.0)
    assert isinstance(kd.proj, nn.Identity) and not list(kd.parameters())
    student, teacher = features(2, 5, 8).requires_grad_(), features(2, 5, 8, seed=1)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    out = kd(student, teacher, mask)
    mse, _, cos = hand_terms(student, teacher, mask)
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["cos"], cos)
    torch.testing.assert_close(out["loss"], 0.7 * mse + 2.0 * cos)
    (grad,) = torch.autograd.grad(out["loss"], student)
    (expected,) = torch.autograd.grad(0.7 * mse + 2.0 * cos, student)
    torch.testing.assert_close(grad, expected)
    assert torch.all(grad[~mask] == 0)


def test_feature_kd_different_widths_learn_a_linear_map():
    kd = FeatureKD(6, 10).double()
    assert isinstance(kd.proj, nn.Linear) and kd.proj.weight.shape == (10, 6)
    student, teacher = features(3, 4, 6), features(3, 4, 10, seed=1).requires_grad_()
    out = kd(student, teacher)
    mse, _, cos = hand_terms(student @ kd.proj.weight.T + kd.proj.bias, teacher, None)
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["cos"], cos)
    out["loss"].backward()
    assert kd.proj.weight.grad is not None and teacher.grad is None  # the teacher is a target


def test_feature_kd_fully_masked_is_zero_and_shapes_are_checked():
    kd = FeatureKD(4, 4)
    out = kd(features(1, 3, 4), features(1, 3, 4, seed=1), torch.zeros(1, 3, dtype=torch.bool))
    assert out["loss"].item() == 0
    with pytest.raises(ValueError, match="shape"):
        kd(features(1, 3, 4), features(1, 2, 4))


def test_feature_kd_is_zero_on_identical_features():
    teacher = features(2, 3, 4)
    out = FeatureKD(4, 4)(teacher.clone(), teacher)
    assert out["mse"].item() == 0 and abs(out["cos"].item()) < 1e-12


def test_hidden_state_kd_pairs_the_right_layers():
    student_hidden = [features(2, 7, 5, seed=i) for i in range(3)]  # embeddings + 2 layers
    teacher_hidden = [features(2, 7, 5, seed=10 + i) for i in range(5)]  # embeddings + 4 layers
    kd = HiddenStateKD([(1, 2), (2, 4)], student_dim=5, teacher_dim=5, l1_weight=0.5, cos_weight=3.0)
    assert not list(kd.parameters())
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padded frames
    out = kd(student_hidden, teacher_hidden, mask)
    terms = [hand_terms(student_hidden[s], teacher_hidden[t], mask) for s, t in [(1, 2), (2, 4)]]
    l1 = (terms[0][1] + terms[1][1]) / 2
    cos = (terms[0][2] + terms[1][2]) / 2
    torch.testing.assert_close(out["l1"], l1)
    torch.testing.assert_close(out["cos"], cos)
    torch.testing.assert_close(out["loss"], 0.5 * l1 + 3.0 * cos)


def test_hidden_state_kd_one_map_per_pair_when_widths_differ():
    kd = HiddenStateKD([(1, 1), (2, 3)], student_dim=4, teacher_dim=6).double()
    assert [type(p) for p in kd.projs] == [nn.Linear, nn.Linear] and kd.projs[0] is not kd.projs[1]
    student_hidden = [features(1, 3, 4, seed=i) for i in range(3)]
    teacher_hidden = [features(1, 3, 6, seed=10 + i) for i in range(4)]
    out = kd(student_hidden, teacher_hidden)
    projected = [student_hidden[s] @ p.weight.T + p.bias for s, p in zip([1, 2], kd.projs, strict=True)]
    terms = [hand_terms(projected[0], teacher_hidden[1], None), hand_terms(projected[1], teacher_hidden[3], None)]
    torch.testing.assert_close(out["l1"], (terms[0][1] + terms[1][1]) / 2)
    with pytest.raises(ValueError, match="pair"):
        HiddenStateKD([], 4, 6)
