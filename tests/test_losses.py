"""Same-tokenizer logit KD losses against their formulas written out independently, in float64."""

import pytest
import torch

from distill.losses import (
    KINDS,
    LogitKDLoss,
    SparseTeacher,
    forward_kl,
    generalized_jsd,
    logit_kd,
    reverse_kl,
    sampled_sparse,
    skew_forward_kl,
    skew_reverse_kl,
    topk_sparse,
)

BETA, ALPHA = 0.3, 0.2
VALUE_TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout: only rounding separates the two computations


def softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(z / temperature - (z / temperature).max())
    return e / e.sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(len(p)) if p[v] > 0)


def divergence(kind: str, p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    if kind == "forward_kl":
        return kl(p_t, p_s)
    if kind == "reverse_kl":
        return kl(p_s, p_t)
    if kind == "generalized_jsd":
        m = BETA * p_t + (1 - BETA) * p_s
        return BETA * kl(p_t, m) + (1 - BETA) * kl(p_s, m)
    if kind == "skew_forward_kl":
        return kl(p_t, ALPHA * p_t + (1 - ALPHA) * p_s)
    return kl(p_s, ALPHA * p_s + (1 - ALPHA) * p_t)


def reference(kind, student, teacher, mask, temperature):
    """Loop over the masked positions; explicit softmax; mean of the per-position divergence."""
    terms = [divergence(kind, softmax(student[b, i], temperature), softmax(teacher[b, i], temperature))
             for b in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[b, i]]
    return sum(terms) / len(terms)


def run(kind, student, teacher, mask, temperature=1.0, **kw):
    return logit_kd(kind, student, teacher, mask, temperature, beta=BETA, alpha=ALPHA, **kw)


def inputs(batch=2, seq=5, vocab=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(batch, seq, vocab, generator=g, dtype=dtype)).requires_grad_()
    teacher = 2 * torch.randn(batch, seq, vocab, generator=g, dtype=dtype)
    mask = torch.rand(batch, seq, generator=g) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_value_and_gradient_match_formula(kind, temperature):
    student, teacher, mask = inputs()
    ours = run(kind, student, teacher, mask, temperature)
    (ours_grad,) = torch.autograd.grad(ours, student)
    expected = reference(kind, student, teacher, mask, temperature)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(ours, expected, **VALUE_TOL)
    torch.testing.assert_close(ours_grad, expected_grad, **VALUE_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    student, teacher, mask = inputs(batch=1, seq=3, vocab=4, seed=1)
    mask[:] = True
    assert torch.autograd.gradcheck(lambda s: run(kind, s, teacher, mask, 1.5, chunk_size=2), (student,))


def test_named_functions_are_the_formulas():
    student, teacher, mask = inputs()
    for fn, kind, kw in [(forward_kl, "forward_kl", {}), (reverse_kl, "reverse_kl", {}),
                         (generalized_jsd, "generalized_jsd", {"beta": BETA}),
                         (skew_forward_kl, "skew_forward_kl", {"alpha": ALPHA}),
                         (skew_reverse_kl, "skew_reverse_kl", {"alpha": ALPHA})]:
        torch.testing.assert_close(fn(student, teacher, mask, 2.0, **kw), reference(kind, student, teacher, mask, 2.0),
                                   **VALUE_TOL)
        module = LogitKDLoss(kind, 2.0, beta=BETA, alpha=ALPHA)
        torch.testing.assert_close(module(student, teacher, mask), fn(student, teacher, mask, 2.0, **kw))


def test_low_precision_inputs_use_fp32_math():
    student, teacher, mask = inputs(vocab=50)
    student_bf16, teacher_bf16 = student.detach().bfloat16(), teacher.bfloat16()
    ours = forward_kl(student_bf16, teacher_bf16, mask)
    assert ours.dtype == torch.float32
    expected = reference("forward_kl", student_bf16.double(), teacher_bf16.double(), mask, 1.0)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_change_nothing(kind):
    student, teacher, mask = inputs()
    before = run(kind, student, teacher, mask)
    (grad,) = torch.autograd.grad(before, student)
    noisy_student = torch.where(mask[..., None], student, 1e4 * torch.randn_like(student))
    noisy_teacher = torch.where(mask[..., None], teacher, torch.nan)
    torch.testing.assert_close(run(kind, noisy_student, noisy_teacher, mask), before, rtol=0, atol=0)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_gives_zero_without_nan(kind):
    student, teacher, mask = inputs()
    loss = run(kind, student, teacher, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(student.grad == 0)


def test_t2_scaling():
    student, teacher, mask = inputs()
    plain = forward_kl(student, teacher, mask, 3.0)
    torch.testing.assert_close(forward_kl(student, teacher, mask, 3.0, scale_by_t2=True), 9 * plain, **VALUE_TOL)
    assert not torch.isclose(plain, forward_kl(student, teacher, mask, 1.0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunking_matches_unchunked(kind, dtype):
    student, teacher, mask = inputs(batch=3, seq=6, vocab=11, dtype=dtype)
    whole = run(kind, student, teacher, mask, 1.7)
    (whole_grad,) = torch.autograd.grad(whole, student)
    chunked = run(kind, student, teacher, mask, 1.7, chunk_size=4)  # several chunks, the last one partial
    (chunked_grad,) = torch.autograd.grad(chunked, student)
    tol = VALUE_TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked, whole, **tol)
    torch.testing.assert_close(chunked_grad, whole_grad, **tol)


def saved_storage_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("kind", KINDS)
def test_chunking_keeps_no_per_position_temporaries_for_backward(kind):
    student = torch.randn(2, 32, 300, requires_grad=True)
    teacher = torch.randn(2, 32, 300)
    mask = torch.ones(2, 32, dtype=torch.bool)
    inputs_bytes = 2 * student.numel() * student.element_size()
    assert saved_storage_bytes(lambda: run(kind, student, teacher, mask, chunk_size=8)) <= inputs_bytes
    assert saved_storage_bytes(lambda: run(kind, student, teacher, mask)) > inputs_bytes


def test_identical_distributions_give_zero_and_jsd_half_is_symmetric():
    student, teacher, mask = inputs()
    for kind in KINDS:
        assert abs(run(kind, teacher, teacher.clone(), mask).item()) < 1e-12
    a = generalized_jsd(student, teacher, mask, beta=0.5)
    torch.testing.assert_close(a, generalized_jsd(teacher, student, mask, beta=0.5), **VALUE_TOL)


def test_skew_with_alpha_zero_is_plain_kl():
    student, teacher, mask = inputs()
    torch.testing.assert_close(skew_forward_kl(student, teacher, mask, alpha=0.0), forward_kl(student, teacher, mask))
    torch.testing.assert_close(skew_reverse_kl(student, teacher, mask, alpha=0.0), reverse_kl(student, teacher, mask))


def test_teacher_minus_inf_logits_give_no_nan():
    student, teacher, mask = inputs()
    teacher[..., -2:] = -torch.inf  # e.g. padded vocabulary rows
    for kind in ["forward_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl"]:
        loss = run(kind, student, teacher, mask)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert run("reverse_kl", student, teacher, mask).item() == torch.inf  # the student puts mass where p_T = 0
    torch.testing.assert_close(forward_kl(student, teacher, mask), reference("forward_kl", student, teacher, mask, 1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="generalized_jsd", beta=0.0), "beta"), (dict(kind="skew_forward_kl", alpha=1.0), "alpha"),
    (dict(kind="forward_kl", temperature=0.0), "temperature"), (dict(kind="kl", chunk_size=None), "unknown"),
    (dict(kind="forward_kl", chunk_size=0), "chunk_size")])
def test_invalid_settings_raise(kwargs, message):
    student, teacher, mask = inputs()
    with pytest.raises(ValueError, match=message):
        logit_kd(kwargs.pop("kind"), student, teacher, mask, kwargs.pop("temperature", 1.0), **kwargs)


def test_bad_shapes_and_mask_raise():
    student, teacher, mask = inputs()
    with pytest.raises(TypeError, match="bool"):
        forward_kl(student, teacher, mask.long())
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(student, teacher, mask[:, :-1])


# --- sparse teacher ----------------------------------------------------------------------------------------------


def test_topk_sparse_returns_teacher_probabilities():
    _, teacher, _ = inputs()
    ids, probs = topk_sparse(teacher, 3)
    full = torch.softmax(teacher, -1)
    torch.testing.assert_close(probs, full.gather(-1, ids), **VALUE_TOL)
    torch.testing.assert_close(probs[..., 0], full.max(-1).values, **VALUE_TOL)
    assert torch.all(probs[..., :-1] >= probs[..., 1:])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_vocab_is_the_dense_loss(kind, temperature):
    student, teacher, mask = inputs()
    ids, probs = topk_sparse(teacher, teacher.shape[-1])
    dense = run(kind, student, teacher, mask, temperature)
    (dense_grad,) = torch.autograd.grad(dense, student)
    sparse = run(kind, student, SparseTeacher(ids, probs, "topk"), mask, temperature, chunk_size=3)
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse, dense, **VALUE_TOL)
    torch.testing.assert_close(sparse_grad, dense_grad, **VALUE_TOL)


def sparse_reference(kind, student, ids, probs, mask, temperature):
    """Top-k conventions written out: teacher p^(1/T) renormalised over the support; the student's full softmax
    for forward KL, the student renormalised over the support for the rest."""
    terms = []
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[b, i]:
                p_t = probs[b, i] ** (1 / temperature)
                p_t = p_t / p_t.sum()
                p_s = softmax(student[b, i], temperature)[ids[b, i]]
                if kind != "forward_kl":
                    p_s = p_s / p_s.sum()
                terms.append(divergence(kind, p_s, p_t))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_small_k_matches_its_formula(kind):
    student, teacher, mask = inputs(vocab=9)
    ids, probs = topk_sparse(teacher, 3)
    ours = run(kind, student, SparseTeacher(ids, probs, "topk"), mask, 1.5)
    (ours_grad,) = torch.autograd.grad(ours, student)
    expected = sparse_reference(kind, student, ids, probs, mask, 1.5)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(ours, expected, **VALUE_TOL)
    torch.testing.assert_close(ours_grad, expected_grad, **VALUE_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_padding_entries_are_ignored(kind):
    student, teacher, mask = inputs(vocab=9)
    ids, probs = topk_sparse(teacher, 3)
    padded_ids = torch.cat([ids, torch.zeros_like(ids[..., :2])], -1)  # id 0 may even be in the support
    padded = torch.cat([probs, torch.zeros_like(probs[..., :2])], -1)
    torch.testing.assert_close(run(kind, student, SparseTeacher(padded_ids, padded, "topk"), mask),
                               run(kind, student, SparseTeacher(ids, probs, "topk"), mask), **VALUE_TOL)


def test_sampled_weights_are_one_over_k_for_the_teacher_proposal():
    _, teacher, _ = inputs()
    ids, weights = sampled_sparse(teacher, 4, torch.Generator().manual_seed(0))
    assert ids.shape == (*teacher.shape[:2], 4)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 4), **VALUE_TOL)


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
def test_sampled_estimator_is_unbiased(proposal_temperature):
    """Mean over 4000 seeded draws of the sampled estimate vs the exact cross-entropy Σ_v p_T(v)(−log p_S(v)), value
    and gradient; tolerance 4 standard errors of the mean (estimated from the draws themselves)."""
    draws, seq, vocab, k = 4000, 3, 12, 4
    g = torch.Generator().manual_seed(3)
    student = (2 * torch.randn(seq, vocab, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 2 * torch.randn(seq, vocab, generator=g, dtype=torch.float64)
    ids, weights = sampled_sparse(teacher.expand(draws, -1, -1), k, g, proposal_temperature=proposal_temperature)
    mask = torch.ones(draws, seq, dtype=torch.bool)
    estimate = forward_kl(student.expand(draws, -1, -1), SparseTeacher(ids, weights, "sampled"), mask)
    (estimate_grad,) = torch.autograd.grad(estimate, student)

    exact = -(torch.softmax(teacher, -1) * torch.log_softmax(student, -1)).sum(-1).mean()
    (exact_grad,) = torch.autograd.grad(exact, student)
    log_p_s = torch.log_softmax(student.detach(), -1).expand(draws, -1, -1)
    per_draw = -(weights * log_p_s.gather(-1, ids)).sum(-1).mean(-1)
    standard_error = per_draw.std() / draws**0.5
    assert standard_error < 0.02 * exact.item()  # the check below is tight enough to mean something
    assert abs(estimate.item() - exact.item()) < 4 * standard_error
    # Per-draw gradient w.r.t. the student logits of position i: (Σ_j w_j p_S − Σ_j w_j e_{x_j}) / seq.
    per_draw_grad = (weights.sum(-1, keepdim=True) * log_p_s.exp()
                     - torch.zeros(draws, seq, vocab, dtype=weights.dtype).scatter_add(-1, ids, weights)) / seq
    grad_error = per_draw_grad.std(0) / draws**0.5
    assert torch.all((estimate_grad - exact_grad).abs() <= 4 * grad_error + 1e-12)


def test_sampled_cache_rejects_what_it_cannot_estimate():
    student, teacher, mask = inputs()
    sparse = SparseTeacher(*sampled_sparse(teacher, 3, torch.Generator().manual_seed(0)), "sampled")
    for kind in KINDS[1:]:
        with pytest.raises(ValueError, match="sampled"):
            run(kind, student, sparse, mask)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student, sparse, mask, 2.0)


def test_sparse_teacher_validates_itself():
    with pytest.raises(ValueError, match="mode"):
        SparseTeacher(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3), "top")
    with pytest.raises(ValueError, match="integer"):
        SparseTeacher(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), "topk")
    with pytest.raises(ValueError, match="k"):
        SparseTeacher(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 4), "topk")
