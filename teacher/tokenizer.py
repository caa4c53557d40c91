"""The LLM tokenizer, and LLaMA's tokenized exactly as the official SALMONN tokenizes it.

SALMONN (transformers 4.28) used the sentencepiece ("slow") `LlamaTokenizer`, whose ids equal
`sentencepiece.encode`. transformers 5 instead converts `tokenizer.model` into a `tokenizers` BPE that always
byte-falls back and never normalizes: on a model without byte pieces it drops characters missing from the
vocabulary (`<`, `</`, `>` in `<Speech>`) instead of emitting `<unk>`, and it ignores the model's normalizer
(sentencepiece's default `nmt_nfkc` turns `\\n` into `▁`). So a LLaMA-family folder with a `tokenizer.model` is
loaded as `SentencePieceTokenizer`, a transformers tokenizer whose ids are sentencepiece's, and at load every
LLaMA-family tokenizer is checked against sentencepiece on the prompt and a few probe texts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SP_MODEL = "tokenizer.model"
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")
"""`tokenizer_class` values of LLaMA-family folders (Vicuna's says `LlamaTokenizer`)."""

PROBE_TEXTS = [
    "the cat sat on the mat",
    "Hello, World! 1234.5 naïve café — 日本語 ✓",
    "two  spaces, a\ttab and\na newline\n",
    " leading space <tag> </tag> a<b>c",
    "Transcribe the speech into text.",
]
"""Texts beside the prompt that a tokenizer must encode as sentencepiece does: markup characters, unknown and
non-ASCII characters, newlines and repeated whitespace (where converted tokenizers depart)."""


class SentencePieceTokenizer(SentencePieceBackend):
    """A LLaMA `tokenizer.model` with sentencepiece's own semantics: `ids == SentencePieceProcessor.encode(text)`.

    As transformers 4.28's `LlamaTokenizer` (which SALMONN used): the model's normalizer, dummy prefix, `<unk>` for
    characters outside the vocabulary and byte fallback all apply; added tokens (SALMONN's `[PAD]`) and special
    tokens in a text are split out first; `add_special_tokens=True` prepends BOS.
    """

    vocab_files_names = {"vocab_file": SP_MODEL}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, vocab_file: str, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs):
        # legacy=True keeps the model's dummy prefix on every piece, as 4.28 did (newer "legacy=False" configs
        # strip it after special tokens, which the released SALMONN never saw).
        kwargs.pop("legacy", None)
        kwargs.setdefault("special_tokens_pattern", "bos")
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         legacy=True, **kwargs)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # Pieces of sentencepiece's ids, so an unknown character becomes the `<unk>` piece (its surface string
        # could happen to be some other piece).
        return [self.sp_model.id_to_piece(i) for i in self.sp_model.encode(text)]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # sentencepiece's decoder joins byte-fallback pieces (`<0x0A>`) back into characters.
        return self.sp_model.decode_pieces(tokens)


def is_llama_folder(folder: Path) -> bool:
    """A folder with a sentencepiece `tokenizer.model` whose `tokenizer_config.json` names a LLaMA tokenizer (or
    none, as in early LLaMA conversions), or one this module saved."""
    if not (folder / SP_MODEL).is_file():
        return False
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return True
    name = json.loads(config.read_text()).get("tokenizer_class") or ""
    return name in (*LLAMA_CLASSES, SentencePieceTokenizer.__name__) or not name


def sentencepiece_disagreements(tokenizer, sp_model_file: str | Path, texts: Sequence[str]) -> list[str]:
    """Texts (with both encodings) on which `tokenizer(text, add_special_tokens=False)` differs from
    `sentencepiece.encode(text)`; empty when they agree on all."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    problems = []
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        ref = sp.encode(text)
        if ours != ref:
            problems.append(f"{text!r}: tokenizer {ours} vs sentencepiece {ref}")
    return problems


def load_llm_tokenizer(folder: str | Path, probe_texts: Sequence[str] = ()):
    """The tokenizer of an LLM folder: `SentencePieceTokenizer` for a LLaMA-family `tokenizer.model`, else
    transformers' `AutoTokenizer`.

    A LLaMA-family tokenizer is then checked against sentencepiece on `probe_texts` (the prompt pieces) and
    `PROBE_TEXTS`; a disagreement stops with the texts and both encodings.
    """
    from transformers import AutoTokenizer

    from teacher.official import CheckpointError

    folder = Path(folder)
    if not is_llama_folder(folder):
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = SentencePieceTokenizer.from_pretrained(folder)
    problems = sentencepiece_disagreements(tokenizer, folder / SP_MODEL, [*probe_texts, *PROBE_TEXTS])
    if problems:
        raise CheckpointError(
            f"{folder / SP_MODEL}: the loaded tokenizer does not encode as sentencepiece does (the official SALMONN "
            f"tokenizes with sentencepiece), so prompts and targets would get other token ids: "
            + "; ".join(problems[:3]) + ". Check tokenizer_config.json (tokenizer_class) in that folder.")
    return tokenizer


def encoding_identity(tokenizer, texts: Sequence[str] = ()) -> str:
    """Hash of the class and of the ids the tokenizer gives `PROBE_TEXTS` and `texts`: two tokenizers with the same
    vocabulary that encode differently (a converted fast one and sentencepiece) get different identities."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in [*texts, *PROBE_TEXTS]]
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, ids]).encode()).hexdigest()[:16]
