"""Rebuild Whisper's byte-level BPE tokenizer (tokenizer.json) from a CTranslate2 vocabulary alone.

`ct2-transformers-converter` without `--copy_files tokenizer.json` leaves a folder with only the id → token
list. Whisper's tokenizers are tiktoken BPEs: a token's id is its merge rank, so the merges can be
recovered exactly: a token of rank r was made by the last merge of byte-pair encoding its own bytes with
the tokens of rank < r (the same reconstruction tiktoken → Hugging Face conversions use). Tokens in
GPT-2's printable byte alphabet (`Ġ` for a space) map back to bytes; ids from `<|endoftext|>` on are
special tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from convert import ConversionError

TIMESTAMP = re.compile(r"<\|\d+\.\d+\|>")


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _last_merge(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair encode `token` using only merges of rank < max_rank; returns the final parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def bpe_merges(tokens: list[str], source: Path) -> list[tuple[str, str]]:
    """The merges, in rank order, that produce a rank-ordered byte-level vocabulary `tokens`."""
    decode = _byte_decoder()
    encode = {byte: char for char, byte in decode.items()}
    ranks: dict[bytes, int] = {}
    for rank, token in enumerate(tokens):
        try:
            raw = bytes(decode[c] for c in token)
        except KeyError:
            raise ConversionError(f"{source}: vocabulary token {rank} {token!r} is not in GPT-2's byte alphabet; "
                                  "cannot rebuild a byte-level BPE from it (provide tokenizer.json)") from None
        ranks.setdefault(raw, rank)
    merges = []
    for raw, rank in ranks.items():
        if len(raw) < 2:
            continue
        parts = _last_merge(ranks, raw, rank)
        if len(parts) == 2:  # else no merge sequence reaches this token: BPE never emits it
            merges.append(tuple("".join(encode[b] for b in part) for part in parts))
    return merges


def whisper_tokenizer_json(vocabulary: list[str], source: Path) -> dict:
    """A tokenizer.json (as a dict) equivalent to the Hub's Whisper tokenizer for this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    eot = "<|endoftext|>"
    if eot not in vocabulary:
        raise ConversionError(f"{source}: the vocabulary has no {eot}; not a Whisper vocabulary")
    first_special = vocabulary.index(eot)
    mergeable = vocabulary[:first_special]
    vocab = {token: i for i, token in enumerate(mergeable)}
    vocab[eot] = first_special
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(mergeable, source), fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t in vocabulary[first_special:] if not TIMESTAMP.fullmatch(t)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    sot, no_ts = "<|startoftranscript|>", "<|notimestamps|>"
    if sot in specials and no_ts in specials:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{sot} {no_ts} $A {eot}", pair=f"{sot} {no_ts} $A $B:1 {eot}:1",
            special_tokens=[(t, vocabulary.index(t)) for t in (sot, no_ts, eot)],
        )
    data = json.loads(tokenizer.to_str())
    wrong = [(t["content"], t["id"]) for t in data["added_tokens"] if vocabulary[t["id"]] != t["content"]]
    if wrong:
        raise ConversionError(f"{source}: special tokens are not contiguous after {eot} (e.g. {wrong[:3]}); "
                              "cannot rebuild the tokenizer (provide tokenizer.json)")
    return data
