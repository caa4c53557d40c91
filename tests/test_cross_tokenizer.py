"""Cross-tokenizer KD: alignment and vocabulary map on hand-built tokenizers; losses against written-out formulas."""

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from distill.cross_tokenizer import (
    VocabMap,
    align_spans,
    aligned_fraction,
    cross_tokenizer_kd,
    sequence_kd_records,
    token_surfaces,
    uld_distance,
    vocab_overlap,
)
from distill.losses import KINDS, SparseTeacher, logit_kd, topk_sparse

LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
BYTE_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
# Merges chosen so that "the cat sat on a mat" tokenizes as
#   teacher: ▁the ▁cat ▁s at ▁ o n ▁a ▁mat
#   student: the Ġcat Ġsat Ġon Ġa Ġmat
TEACHER_MERGES = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "c"), ("▁c", "a"), ("▁ca", "t"), ("a", "t"),
                  ("▁", "s"), ("▁", "a"), ("▁", "m"), ("▁m", "at"), ("t", "h"), ("th", "e")]
STUDENT_MERGES = [("a", "t"), ("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "s"), ("Ġs", "at"),
                  ("Ġ", "o"), ("Ġo", "n"), ("Ġ", "a"), ("Ġ", "m"), ("Ġm", "at")]
TEXT = "the cat sat on a mat"


def hand_bpe(chars, merges, specials, pre_tokenizer=None, normalizer=None, post_processor=None):
    vocab = {}
    for token in [*specials.values(), *chars, *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer, tok.normalizer, tok.post_processor = pre_tokenizer, normalizer, post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def teacher_tokenizer(prepend_scheme="first"):
    """LLaMA style: `▁` word markers from a Metaspace pre-tokenizer (offsets include the leading space)."""
    return hand_bpe(list("▁thecasonmé"), TEACHER_MERGES, LLAMA_SPECIALS,
                    pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme))


def student_tokenizer(trim_offsets=False):
    """Byte-level style: `Ġ` markers; with `trim_offsets` the offsets exclude the leading space."""
    return hand_bpe(["Ġ", *"thecasonm", "Ã", "©"], STUDENT_MERGES, BYTE_SPECIALS,
                    pre_tokenizers.ByteLevel(add_prefix_space=False),
                    post_processor=processors.ByteLevel(trim_offsets=trim_offsets))


def gemma_like_tokenizer():
    """SentencePiece-BPE as Gemma's: spaces become `▁` in a normalizer, no pre-tokenizer, no prefix space."""
    return hand_bpe(list("▁thecasonm"), TEACHER_MERGES, {"bos_token": "<bos>", "eos_token": "<eos>",
                                                        "unk_token": "<unk>"},
                    normalizer=normalizers.Replace(" ", "▁"))


def tokens(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_hand_tokenizers_split_as_designed():
    assert tokens(teacher_tokenizer(), TEXT) == ["▁the", "▁cat", "▁s", "at", "▁", "o", "n", "▁a", "▁mat"]
    assert tokens(student_tokenizer(), TEXT) == ["the", "Ġcat", "Ġsat", "Ġon", "Ġa", "Ġmat"]


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_align_spans_pairs_tokens_with_the_same_span_and_space(trim_offsets):
    # "▁the"/"the" share characters but not the leading space; "▁s at" vs "Ġsat" and "▁ o n" vs "Ġon" split
    # differently. Left: cat, a, mat.
    pairs = align_spans(TEXT, teacher_tokenizer(), student_tokenizer(trim_offsets))
    assert pairs == [(1, 1), (7, 4), (8, 5)]
    assert align_spans(TEXT, teacher_tokenizer(), student_tokenizer(trim_offsets), with_eos=True)[-1] == (9, 6)


def test_align_spans_first_word_aligns_when_neither_adds_a_prefix_space():
    pairs = align_spans(TEXT, teacher_tokenizer(prepend_scheme="never"), student_tokenizer())
    assert pairs == [(0, 0), (1, 1), (7, 4), (8, 5)]


def test_align_spans_with_a_normalizer_based_sentencepiece_tokenizer():
    # Same merges as the teacher, but no prefix space: everything aligns except the first word and the lone "▁".
    gemma = gemma_like_tokenizer()
    assert tokens(gemma, TEXT) == ["the", "▁cat", "▁s", "at", "▁", "o", "n", "▁a", "▁mat"]
    assert align_spans(TEXT, teacher_tokenizer(), gemma) == [(1, 1), (2, 2), (3, 3), (5, 5), (6, 6), (7, 7), (8, 8)]


def test_align_spans_leaves_out_split_characters_double_spaces_and_unknown_tokens():
    # "é" is one teacher token but two byte-level student tokens sharing its span; "f" is <unk> on both sides;
    # the double space gives the teacher a lone "▁" and the student a lone "Ġ" (whitespace only).
    text = "a  cat café"
    assert tokens(teacher_tokenizer(), text) == ["▁a", "▁", "▁cat", "▁ca", "<unk>", "é"]
    assert tokens(student_tokenizer(), text) == ["a", "Ġ", "Ġcat", "Ġc", "a", "<unk>", "Ã", "©"]
    assert align_spans(text, teacher_tokenizer(), student_tokenizer()) == [(2, 2)]


def test_aligned_fraction_over_a_corpus():
    fractions = aligned_fraction([TEXT, "cat"], teacher_tokenizer(prepend_scheme="never"), student_tokenizer())
    # TEXT: 4 pairs of 9 teacher / 6 student tokens; "cat": "c", "at" on both sides → 2 pairs.
    assert fractions == {"student": 6 / 8, "teacher": 6 / 11}


def test_token_surfaces_normalise_markers_and_bytes():
    llama = hand_bpe(["▁", "A", "<0x41>", "<0xC3>"], [("▁", "A")], LLAMA_SPECIALS)
    surfaces = dict(zip(llama.convert_ids_to_tokens(list(range(len(llama)))), token_surfaces(llama), strict=True))
    assert surfaces == {"<s>": None, "</s>": None, "<unk>": None, "▁": b" ", "A": b"A", "<0x41>": b"A",
                        "<0xC3>": b"\xc3", "▁A": b" A"}
    byte_level = student_tokenizer()
    surfaces = dict(zip(byte_level.convert_ids_to_tokens(list(range(len(byte_level)))), token_surfaces(byte_level),
                        strict=True))
    assert surfaces["Ġcat"] == b" cat" and surfaces["Ã"] == b"\xc3" and surfaces["©"] == b"\xa9"
    assert surfaces["<pad>"] is None


def test_byte_level_table_covers_the_alphabet():
    from distill.cross_tokenizer import _byte_level_decoder

    table = _byte_level_decoder()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n")


def test_vocab_map_matches_normalised_strings():
    teacher, student = teacher_tokenizer(), student_tokenizer()
    vocab_map = VocabMap.build(teacher, student)
    pairs = set(zip(teacher.convert_ids_to_tokens(vocab_map.teacher_ids.tolist()),
                    student.convert_ids_to_tokens(vocab_map.student_ids.tolist()), strict=True))
    assert pairs == {("▁", "Ġ"), *((c, c) for c in "thecasonm"), ("▁c", "Ġc"), ("▁cat", "Ġcat"), ("at", "at"),
                     ("▁s", "Ġs"), ("▁a", "Ġa"), ("▁m", "Ġm"), ("▁mat", "Ġmat"), ("th", "th"), ("the", "the"),
                     ("</s>", "<eos>")}
    # Teacher: 11 characters + 13 merges, 19 matched (not é, ▁t, ▁th, ▁the, ▁ca).
    # Student: 12 characters + 12 merges, 19 matched (not Ã, ©, Ġsat, Ġo, Ġon). Specials count nowhere.
    assert vocab_overlap(vocab_map) == {"teacher": 19 / 24, "student": 19 / 24}
    assert vocab_map.to_student[teacher.convert_tokens_to_ids("▁the")] == -1
    assert VocabMap.build(teacher, student, map_eos=False).teacher_ids.numel() == 19


def test_vocab_map_many_to_one_and_prefers_regular_tokens():
    teacher = hand_bpe(["A", "<0x41>", "B"], [], LLAMA_SPECIALS)
    student = hand_bpe(["<0x41>", "A", "C"], [], LLAMA_SPECIALS)
    vocab_map = VocabMap.build(teacher, student, map_eos=False)
    to_student = {teacher.convert_ids_to_tokens(t): student.convert_ids_to_tokens(s)
                  for t, s in zip(vocab_map.teacher_ids.tolist(), vocab_map.student_ids.tolist(), strict=True)}
    assert to_student == {"A": "A", "<0x41>": "A"}
    assert vocab_map.support.tolist() == [student.convert_tokens_to_ids("A")]


# --- losses ------------------------------------------------------------------------------------------------------


def manual_map(pairs, teacher_size):
    ids = torch.tensor(pairs, dtype=torch.long)
    return VocabMap(teacher_ids=ids[:, 0], student_ids=ids[:, 1], teacher_size=teacher_size, teacher_overlap=1.0,
                    student_overlap=1.0)


def logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(*shape, generator=g, dtype=torch.float64)


def test_uld_hand_example():
    p_s = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    p_t = torch.tensor([0.1, 0.1, 0.6, 0.2], dtype=torch.float64)
    # sorted: S = .5 .3 .2 0 (padded), T = .6 .2 .1 .1 → .1 + .1 + .1 + .1
    torch.testing.assert_close(uld_distance(p_s, p_t), torch.tensor(0.4, dtype=torch.float64))
    torch.testing.assert_close(uld_distance(p_t, p_s), torch.tensor(0.4, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_identity_map_and_alignment_give_the_same_tokenizer_loss(kind):
    student, teacher = logits(2, 4, 6).requires_grad_(), logits(2, 4, 6, seed=1)
    alignments = [[(i, i) for i in range(4)], [(0, 0), (2, 2)]]
    mask = torch.tensor([[True] * 4, [True, False, True, False]])
    out = cross_tokenizer_kd(student, teacher, alignments, manual_map([(v, v) for v in range(6)], 6), kind, 1.5,
                             beta=0.3, alpha=0.2)
    torch.testing.assert_close(out["kd"], logit_kd(kind, student, teacher, mask, 1.5, beta=0.3, alpha=0.2))
    assert out["carried_mass"] == pytest.approx(1.0)
    assert out["aligned_fraction"] == 6 / 8


def test_carrying_follows_the_map_direction():
    """A student whose vocabulary is the teacher's permuted, with the permuted logits, matches exactly."""
    perm = torch.tensor([3, 0, 4, 1, 2])  # teacher id v ↔ student id perm[v]
    teacher = logits(1, 3, 5)
    student = torch.empty_like(teacher)
    student[..., perm] = teacher
    vocab_map = manual_map([(v, int(perm[v])) for v in range(5)], 5)
    for kind in KINDS:
        out = cross_tokenizer_kd(student, teacher, [[(0, 0), (1, 1), (2, 2)]], vocab_map, kind, uld_weight=1.0)
        assert abs(out["loss"].item()) < 1e-12


def partial_map_reference(kind, student_row, teacher_row, temperature):
    """Teacher V=5 → student V=4 through {0→2, 1→2, 3→0}: support {0, 2}, written out."""
    p_t = torch.softmax(teacher_row / temperature, -1)
    p_s = torch.softmax(student_row / temperature, -1)
    carried = torch.stack([p_t[3], p_t[0] + p_t[1]])
    q = carried / carried.sum()
    s = torch.stack([p_s[0], p_s[2]])
    if kind == "forward_kl":
        return (q * (q.log() - s.log())).sum(), carried.sum()
    s = s / s.sum()
    return (s * (s.log() - q.log())).sum(), carried.sum()  # reverse KL


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_partial_map_against_the_written_out_formula(kind):
    student, teacher = logits(1, 2, 4).requires_grad_(), logits(1, 3, 5, seed=1)
    vocab_map = manual_map([(0, 2), (1, 2), (3, 0)], 5)
    out = cross_tokenizer_kd(student, teacher, [[(2, 0), (0, 1)]], vocab_map, kind, 2.0, uld_weight=0.5)
    (grad,) = torch.autograd.grad(out["loss"], student)
    terms = [partial_map_reference(kind, student[0, s], teacher[0, t], 2.0) for t, s in [(2, 0), (0, 1)]]
    kd = (terms[0][0] + terms[1][0]) / 2
    uld = sum(uld_distance(torch.softmax(student[0, s], -1), torch.softmax(teacher[0, t], -1))
              for t, s in [(2, 0), (0, 1)]) / 2
    (expected_grad,) = torch.autograd.grad(kd + 0.5 * uld, student)
    torch.testing.assert_close(out["kd"], kd)
    torch.testing.assert_close(out["uld"], uld)
    torch.testing.assert_close(out["loss"], kd + 0.5 * uld)
    torch.testing.assert_close(grad, expected_grad)
    assert out["carried_mass"] == pytest.approx(((terms[0][1] + terms[1][1]) / 2).item())


@pytest.mark.parametrize("kind", KINDS)
def test_topk_cache_with_full_k_equals_dense_teacher(kind):
    student, teacher = logits(2, 3, 4).requires_grad_(), logits(2, 4, 5, seed=1)
    vocab_map = manual_map([(0, 2), (1, 2), (3, 0), (4, 1)], 5)
    alignments = [[(0, 0), (3, 2)], [(1, 1)]]
    sparse = SparseTeacher(*topk_sparse(teacher, 5), "topk")
    dense = cross_tokenizer_kd(student, teacher, alignments, vocab_map, kind, 1.5, uld_weight=0.7)
    cached = cross_tokenizer_kd(student, sparse, alignments, vocab_map, kind, 1.5, uld_weight=0.7, chunk_size=1)
    for key in ("loss", "kd", "uld"):
        torch.testing.assert_close(cached[key], dense[key])
    torch.testing.assert_close(*(torch.autograd.grad(out["loss"], student)[0] for out in (cached, dense)))


def test_chunking_and_unaligned_rows():
    student, teacher = logits(2, 5, 6).requires_grad_(), logits(2, 4, 7, seed=1)
    vocab_map = manual_map([(0, 0), (1, 1), (2, 1), (5, 3), (6, 5)], 7)
    alignments = [[(0, 0), (1, 2), (3, 4)], [(2, 1), (3, 3)]]
    whole = cross_tokenizer_kd(student, teacher, alignments, vocab_map, "generalized_jsd", uld_weight=1.0)
    (whole_grad,) = torch.autograd.grad(whole["loss"], student)
    chunked = cross_tokenizer_kd(student, teacher, alignments, vocab_map, "generalized_jsd", uld_weight=1.0,
                                 chunk_size=2)
    (chunked_grad,) = torch.autograd.grad(chunked["loss"], student)
    torch.testing.assert_close(chunked["loss"], whole["loss"])
    torch.testing.assert_close(chunked_grad, whole_grad)
    unaligned = torch.ones(2, 5, dtype=torch.bool)
    unaligned[0, [0, 2, 4]] = unaligned[1, [1, 3]] = False
    assert torch.all(whole_grad[unaligned] == 0)


def test_no_alignment_gives_zero_and_sampled_cache_raises():
    student, teacher = logits(1, 3, 4).requires_grad_(), logits(1, 3, 5, seed=1)
    vocab_map = manual_map([(0, 0)], 5)
    out = cross_tokenizer_kd(student, teacher, [[]], vocab_map, uld_weight=1.0)
    out["loss"].backward()
    assert out["loss"].item() == 0 and out["aligned_fraction"] == 0 and torch.all(student.grad == 0)
    ids, weights = topk_sparse(teacher, 2)
    with pytest.raises(ValueError, match="sampled"):
        cross_tokenizer_kd(student, SparseTeacher(ids, weights, "sampled"), [[(0, 0)]], vocab_map)
    with pytest.raises(ValueError, match="outside"):
        cross_tokenizer_kd(student, teacher, [[(0, 3)]], vocab_map)


def test_end_to_end_on_hand_tokenizers_a_student_matching_the_carried_teacher_scores_zero():
    teacher_tok, student_tok = teacher_tokenizer(), student_tokenizer()
    vocab_map = VocabMap.build(teacher_tok, student_tok)
    pairs = align_spans(TEXT, teacher_tok, student_tok, with_eos=True)
    teacher = logits(1, 10, len(teacher_tok))
    # The student's ideal distribution at each aligned position: the carried, renormalised teacher; ~0 elsewhere.
    p_t = torch.softmax(teacher[0], -1)
    carried = torch.zeros(10, len(student_tok), dtype=torch.float64)
    carried.index_add_(1, vocab_map.student_ids, p_t[:, vocab_map.teacher_ids])
    carried = carried / carried.sum(-1, keepdim=True)
    student = torch.full((1, 7, len(student_tok)), -1e4, dtype=torch.float64)
    for t, s in pairs:
        student[0, s] = torch.where(carried[t] > 0, carried[t].log(), -1e4)
    out = cross_tokenizer_kd(student, teacher, [pairs], vocab_map, "forward_kl",
                             student_mask=torch.ones(1, 7, dtype=torch.bool))
    assert abs(out["kd"].item()) < 1e-9
    assert out["aligned_fraction"] == 4 / 7
    assert 0 < out["carried_mass"] < 1


def test_sequence_kd_records_swap_in_the_teacher_text():
    records = [{"path": "a.wav", "text": "ref one", "task": "asr"}, {"path": "b.wav", "text": "ref two", "task": "aac"}]
    out = sequence_kd_records(records, ["hyp one", "hyp two"])
    assert out[1] == {"path": "b.wav", "text": "hyp two", "task": "aac", "reference_text": "ref two"}
    assert records[0]["text"] == "ref one"
    with pytest.raises(ValueError):
        sequence_kd_records(records, ["only one"])
