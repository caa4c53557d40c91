"""Logit distillation across tokenizers (Vicuna's 32k SentencePiece vocabulary → Gemma's 256k one; on the toy, a
`▁`-style BPE → a byte-level `Ġ` BPE).

Three pieces:

1. Position alignment (`align_spans`). Both tokenizers split the same target text; a teacher token and a student
   token are aligned when they cover the same characters *and* agree on a leading space. Tokenizers disagree on
   whether a token's offsets include its leading space (Metaspace / SentencePiece include it, a ByteLevel
   post-processor with `trim_offsets` drops it), so spans are compared with surrounding whitespace stripped and the
   space is compared separately, from the token's own string. Two aligned tokens therefore spell the same bytes,
   and both models predict them from the same text prefix: their next-token distributions are comparable.
2. Vocabulary map (`VocabMap`). Teacher id → student id for tokens that spell the same bytes once `▁` is read
   as a space, byte-level characters as their bytes and `<0xNN>` byte-fallback tokens as byte NN. At an aligned
   position the teacher distribution is carried onto the student vocabulary through it and any `distill.losses`
   divergence is applied there.
3. ULD (Boizard et al. 2024, Universal Logit Distillation) for what the map cannot carry: at the same aligned
   positions, Σ_i |sort(p_S)_i − sort(p_T)_i| over both *full* distributions sorted descending, the shorter padded
   with zeros. It needs no vocabulary correspondence, so it also sees the teacher mass on tokens the student
   vocabulary lacks. ULD is computed at T = 1 (the paper's setting), whatever the KD temperature.

Sequence-level KD (training on the teacher's generated text) needs no loss: `sequence_kd_records` turns the
teacher's outputs into annotation records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from distill.losses import LOG_ZERO, SparseTeacher, check_kd_args, sum_over_rows, support_divergence_rows, upcast

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --- token surfaces ----------------------------------------------------------------------------------------------


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted: the character a byte-level vocabulary uses → the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's vocabulary is written in byte-level characters (`Ġ` = space)."""
    backend = tokenizer.backend_tokenizer
    parts = [backend.pre_tokenizer, backend.decoder]
    return any(p is not None and b'"ByteLevel"' in p.__getstate__() for p in parts)


def _surface(token: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for: `▁` → space, byte-level characters → their bytes, `<0xNN>` → NN."""
    if byte_level:
        decoder = _byte_level_decoder()
        if all(c in decoder for c in token):
            return bytes(decoder[c] for c in token)
        return token.encode()
    fallback = _BYTE_FALLBACK.fullmatch(token)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return token.replace("▁", " ").encode()


def token_surfaces(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """id → the bytes the token spells (see `_surface`); None for special and added tokens (`<s>`, `[PAD]`, ...)."""
    vocab = tokenizer.get_vocab()
    skip = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    surfaces: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for token, idx in vocab.items():
        if idx not in skip:
            surfaces[idx] = _surface(token, byte_level)
    return surfaces


# --- vocabulary map ----------------------------------------------------------------------------------------------


@dataclass
class VocabMap:
    """Teacher id → student id for tokens spelling the same bytes (plus teacher eos → student eos).

    Several teacher ids may map to one student id (e.g. `A` and its byte-fallback twin `<0x41>`); their
    probabilities add up when the teacher distribution is carried over. When several student tokens spell the same
    bytes, the regular token is chosen over a byte-fallback one, then the lowest id.
    """

    teacher_ids: Tensor
    """[pairs] long: teacher ids that have a student counterpart."""
    student_ids: Tensor
    """[pairs] long: their student ids."""
    teacher_size: int
    """Teacher id table size (largest id + 1)."""
    teacher_overlap: float
    """Fraction of regular (non-special) teacher tokens with an exact student match."""
    student_overlap: float
    """Fraction of regular student tokens whose bytes some regular teacher token spells."""
    support: Tensor = field(init=False)
    """[distinct] the distinct student ids the map reaches, ascending."""
    group: Tensor = field(init=False)
    """[pairs] index into `support` of each pair's student id."""
    to_student: Tensor = field(init=False)
    """[teacher_size] student id of each teacher id, −1 where there is none."""

    def __post_init__(self):
        self.support, self.group = torch.unique(self.student_ids, return_inverse=True)
        self.to_student = torch.full((self.teacher_size,), -1, dtype=torch.long)
        self.to_student[self.teacher_ids] = self.student_ids

    @classmethod
    def build(cls, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase, *,
              map_eos: bool = True) -> VocabMap:
        """Match both vocabularies by surface bytes; `map_eos` also maps the teacher's eos to the student's, so the
        end of the answer is distilled too."""
        teacher, student = token_surfaces(teacher_tokenizer), token_surfaces(student_tokenizer)
        fallback = {idx for token, idx in student_tokenizer.get_vocab().items() if _BYTE_FALLBACK.fullmatch(token)}
        by_surface: dict[bytes, int] = {}
        for regular_pass in (True, False):  # a regular token wins over its byte-fallback twin
            for sid, surface in enumerate(student):
                if surface is not None and regular_pass == (sid not in fallback):
                    by_surface.setdefault(surface, sid)
        pairs = [(tid, by_surface[s]) for tid, s in enumerate(teacher) if s is not None and s in by_surface]
        if map_eos and teacher_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id is not None:
            pairs.append((teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id))
        teacher_spelled = {s for s in teacher if s is not None}
        regular_teacher = sum(s is not None for s in teacher)
        regular_student = sum(s is not None for s in student)
        matched_teacher = sum(s is not None and s in by_surface for s in teacher)
        matched_student = sum(s is not None and s in teacher_spelled for s in student)
        ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        return cls(teacher_ids=ids[:, 0], student_ids=ids[:, 1], teacher_size=len(teacher),
                   teacher_overlap=matched_teacher / max(regular_teacher, 1),
                   student_overlap=matched_student / max(regular_student, 1))


def vocab_overlap(vocab_map: VocabMap) -> dict[str, float]:
    """{"teacher": fraction of the teacher vocabulary with an exact normalised match in the student's,
    "student": the same the other way}. Special and added tokens count in neither numerator nor denominator."""
    return {"teacher": vocab_map.teacher_overlap, "student": vocab_map.student_overlap}


# --- position alignment ------------------------------------------------------------------------------------------


def _span_keys(text: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int, bool] | None]:
    """Per token of `text`: (first, end) character span with surrounding whitespace stripped, and whether the token
    starts with a space; None for whitespace-only, special and added tokens."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    byte_level = _is_byte_level(tokenizer)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    keys = []
    for idx, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        if idx in special:  # e.g. <unk>: the vocabulary map has no counterpart for it
            keys.append(None)
            continue
        token = tokenizer.convert_ids_to_tokens(idx)
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        keys.append((start, end, _surface(token, byte_level).startswith(b" ")) if start < end else None)
    return keys


def align_spans(text: str, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase,
                *, with_eos: bool = False) -> list[tuple[int, int]]:
    """One-to-one aligned (teacher index, student index) pairs over the tokens of `text` (no special tokens).

    A pair is a teacher token and a student token with the same whitespace-stripped character span and the same
    leading-space flag, each the only token of its tokenization with that key (two halves of one multi-byte
    character share a span and are left out). `with_eos` appends (teacher token count, student token count): the
    positions of the end symbol the recipe appends after the text. Pairs come in increasing order on both sides.
    """
    teacher_keys = _span_keys(text, teacher_tokenizer)
    student_keys = _span_keys(text, student_tokenizer)
    teacher_unique = _unique_positions(teacher_keys)
    student_unique = _unique_positions(student_keys)
    pairs = [(teacher_unique[key], sid) for key, sid in student_unique.items() if key in teacher_unique]
    pairs.sort(key=lambda pair: pair[1])
    if with_eos:
        pairs.append((len(teacher_keys), len(student_keys)))
    return pairs


def _unique_positions(keys: list) -> dict:
    positions: dict = {}
    repeated = set()
    for i, key in enumerate(keys):
        if key is not None:
            if key in positions:
                repeated.add(key)
            positions[key] = i
    return {key: i for key, i in positions.items() if key not in repeated}


def aligned_fraction(texts: Sequence[str], teacher_tokenizer: PreTrainedTokenizerBase,
                     student_tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """Over a corpus: {"student": aligned pairs / student tokens, "teacher": aligned pairs / teacher tokens}."""
    pairs = teacher_tokens = student_tokens = 0
    for text in texts:
        pairs += len(align_spans(text, teacher_tokenizer, student_tokenizer))
        teacher_tokens += len(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
        student_tokens += len(student_tokenizer(text, add_special_tokens=False)["input_ids"])
    return {"student": pairs / max(student_tokens, 1), "teacher": pairs / max(teacher_tokens, 1)}


# --- losses ------------------------------------------------------------------------------------------------------


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """ULD: Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|, the shorter vector padded with zeros.

    student_probs [..., Vs], teacher_probs [..., Vt] → [...]. Ranks beyond the shorter vocabulary compare against
    the zero padding, so they contribute the longer distribution's tail mass.
    """
    student = student_probs.sort(-1, descending=True).values
    teacher = teacher_probs.sort(-1, descending=True).values
    n = min(student.shape[-1], teacher.shape[-1])
    head = (student[..., :n] - teacher[..., :n]).abs().sum(-1)
    return head + student[..., n:].sum(-1) + teacher[..., n:].sum(-1)


def _merge_duplicate_ids(ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the values of repeated ids in each row: ids, values [rows, k] → the same shapes, each distinct id once
    (in ascending order), the leftover slots with value 0."""
    ids, order = ids.sort(-1)
    values = values.gather(-1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = first.long().cumsum(-1) - 1
    return torch.zeros_like(ids).scatter(-1, slot, ids), torch.zeros_like(values).scatter_add(-1, slot, values)


def _alignment_index(alignments: Sequence[Sequence[tuple[int, int]]], student_len: int,
                     teacher_len: int) -> tuple[Tensor, Tensor]:
    """Flat row indices into [batch * len, ...] tables for every aligned pair: (student rows, teacher rows)."""
    rows = [(b, t, s) for b, pairs in enumerate(alignments) for t, s in pairs]
    for b, t, s in rows:
        if not (0 <= t < teacher_len and 0 <= s < student_len):
            raise ValueError(f"alignment pair (teacher {t}, student {s}) of sample {b} is outside the logits "
                             f"(teacher length {teacher_len}, student length {student_len})")
    index = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return index[:, 0] * student_len + index[:, 2], index[:, 0] * teacher_len + index[:, 1]


def cross_tokenizer_kd(student_logits: Tensor, teacher_logits: Tensor | SparseTeacher,
                       alignments: Sequence[Sequence[tuple[int, int]]], vocab_map: VocabMap,
                       loss: str = "forward_kl", temperature: float = 1.0, uld_weight: float = 0.0, *,
                       beta: float = 0.5, alpha: float = 0.1, scale_by_t2: bool = False,
                       chunk_size: int | None = None, student_mask: Tensor | None = None) -> dict:
    """KD between a teacher and a student with different tokenizers, at the aligned positions.

    student_logits [batch, Ls, Vs] and teacher_logits [batch, Lt, Vt] (or a "topk" `SparseTeacher` with teacher
    vocabulary ids [batch, Lt, k]): row j is the distribution that predicts target token j of that model.
    alignments: per sample, (teacher index, student index) pairs from `align_spans`. `loss` is any of
    `distill.losses.KINDS`, with its temperature, beta, alpha and T² scaling.

    At each aligned position the teacher distribution p_T = softmax(z_T / T) (a topk cache: its probabilities
    re-tempered over its support) is carried onto the student vocabulary, p̃(s) = Σ_{t→s} p_T(t), renormalised over
    the carried support and compared with the student as in `support_divergence_rows` (forward KL: full student
    softmax; other divergences: student renormalised over the support). The teacher mass that is not carried is
    reported as 1 − `carried_mass`; ULD on the full distributions at T = 1 (topk cache: over the top k ranks only,
    the tail being unknown) is what sees it.

    Returns {"loss": kd + uld_weight · uld, "kd", "uld": scalar tensors (means over aligned positions, 0 without
    any), "aligned_fraction": aligned positions / student target positions (`student_mask` [batch, Ls] bool marks
    them; without it all batch · Ls rows count), "carried_mass": mean carried teacher probability}.
    A "sampled" cache raises: importance weights on ids the map drops no longer estimate a normalised distribution.
    """
    check_kd_args(loss, temperature, beta, alpha, chunk_size)
    _check_cross_inputs(student_logits, teacher_logits, alignments, vocab_map)
    batch, student_len, student_vocab = student_logits.shape
    sparse = isinstance(teacher_logits, SparseTeacher)
    teacher_len = teacher_logits.ids.shape[1] if sparse else teacher_logits.shape[1]
    student_rows, teacher_rows = (i.to(student_logits.device)
                                  for i in _alignment_index(alignments, student_len, teacher_len))
    student_table = student_logits.reshape(-1, student_vocab)
    with_uld = uld_weight != 0
    if sparse:
        k = teacher_logits.ids.shape[-1]
        tables = [student_table, teacher_logits.ids.reshape(-1, k).long(), teacher_logits.values.reshape(-1, k)]
        row_loss = _sparse_rows(vocab_map, loss, temperature, beta, alpha, with_uld)
        index = [student_rows, teacher_rows, teacher_rows]
    else:
        tables = [student_table, teacher_logits.reshape(-1, teacher_logits.shape[-1])]
        row_loss = _dense_rows(vocab_map, loss, temperature, beta, alpha, with_uld)
        index = [student_rows, teacher_rows]
    kd, uld, carried = sum_over_rows(row_loss, tables, index, chunk_size) / max(student_rows.numel(), 1)

    kd = kd * temperature**2 if scale_by_t2 else kd
    targets = student_mask.sum().item() if student_mask is not None else batch * student_len
    return {"loss": kd + uld_weight * uld, "kd": kd, "uld": uld,
            "aligned_fraction": student_rows.numel() / max(targets, 1), "carried_mass": carried.item()}


def _check_cross_inputs(student_logits: Tensor, teacher_logits: Tensor | SparseTeacher,
                        alignments: Sequence[Sequence[tuple[int, int]]], vocab_map: VocabMap) -> None:
    if isinstance(teacher_logits, SparseTeacher):
        if teacher_logits.mode != "topk":
            raise ValueError("cross-tokenizer KD needs dense teacher logits or a 'topk' cache: a 'sampled' cache's "
                             "weights stop being an unbiased estimate once the vocabulary map drops some of its ids")
        teacher_batch = teacher_logits.ids.shape[0]
    else:
        if teacher_logits.dim() != 3 or vocab_map.teacher_size > teacher_logits.shape[-1]:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be [batch, Lt, Vt] with Vt >= the "
                             f"vocabulary map's {vocab_map.teacher_size} teacher ids")
        teacher_batch = teacher_logits.shape[0]
    if student_logits.dim() != 3 or not len(alignments) == teacher_batch == student_logits.shape[0]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} must be [batch, Ls, Vs], with one alignment "
                         f"list per sample ({len(alignments)}) and the teacher's batch ({teacher_batch})")
    if vocab_map.support.numel() and int(vocab_map.support.max()) >= student_logits.shape[-1]:
        raise ValueError(f"the vocabulary map reaches student id {int(vocab_map.support.max())}, beyond the "
                         f"student logits' {student_logits.shape[-1]}")


def _dense_rows(vocab_map: VocabMap, kind: str, temperature: float, beta: float, alpha: float, with_uld: bool):
    """Row function for dense teacher logits: (student [n, Vs], teacher [n, Vt]) → [n, 3] = (kd, uld, carried)."""

    def rows(student: Tensor, teacher: Tensor) -> Tensor:
        student, teacher = upcast(student), upcast(teacher)
        teacher_ids = vocab_map.teacher_ids.to(teacher.device)
        log_t = (teacher / temperature).log_softmax(-1)
        carried = torch.zeros(len(teacher), len(vocab_map.support), dtype=log_t.dtype, device=teacher.device)
        carried.index_add_(1, vocab_map.group.to(teacher.device), log_t.index_select(1, teacher_ids).exp())
        valid = carried > 0
        ids = vocab_map.support.to(student.device).expand(len(student), -1)
        log_s = (student / temperature).log_softmax(-1)
        kd = support_divergence_rows(kind, log_s, ids, torch.where(valid, carried.log(), LOG_ZERO), valid,
                                     beta, alpha)
        uld = uld_distance(student.softmax(-1), teacher.softmax(-1)) if with_uld else torch.zeros_like(kd)
        return torch.stack([kd, uld, carried.sum(-1).detach()], -1)

    return rows


def _sparse_rows(vocab_map: VocabMap, kind: str, temperature: float, beta: float, alpha: float, with_uld: bool):
    """Row function for a topk cache: (student [n, Vs], teacher ids [n, k], probs [n, k]) → [n, 3]."""

    def rows(student: Tensor, ids: Tensor, values: Tensor) -> Tensor:
        student, values = upcast(student), upcast(values)
        valid = values > 0
        # Re-temper the T = 1 cache over its own support first, then carry what the map can carry.
        teacher = torch.where(valid, values.log() / temperature, LOG_ZERO).softmax(-1) * valid
        to_student = vocab_map.to_student.to(ids.device)
        known = ids < len(to_student)
        student_ids = torch.where(known, to_student[ids.clamp(max=len(to_student) - 1)], -1)
        mapped = student_ids >= 0
        merged_ids, carried = _merge_duplicate_ids(torch.where(mapped, student_ids, 0), teacher * mapped)
        carried_valid = carried > 0
        log_s = (student / temperature).log_softmax(-1)
        kd = support_divergence_rows(kind, log_s, merged_ids, torch.where(carried_valid, carried.log(), LOG_ZERO),
                                     carried_valid, beta, alpha)
        if with_uld:
            top_student = student.softmax(-1).topk(min(values.shape[-1], student.shape[-1]), dim=-1).values
            uld = uld_distance(top_student, values)
        else:
            uld = torch.zeros_like(kd)
        return torch.stack([kd, uld, carried.sum(-1)], -1)

    return rows


def sequence_kd_records(records: Sequence[dict], teacher_texts: Sequence[str]) -> list[dict]:
    """Annotation records for sequence-level KD: each record's `text` replaced by the teacher's generated text, the
    reference kept under `reference_text`. records are SALMONN annotation entries ({"path", "text", "task", ...})."""
    if len(records) != len(teacher_texts):
        raise ValueError(f"{len(records)} records but {len(teacher_texts)} teacher texts")
    return [{**record, "text": text, "reference_text": record["text"]}
            for record, text in zip(records, teacher_texts, strict=True)]
