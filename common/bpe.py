"""BPE tokenizers trained on the toy benchmark's texts, in the two styles the real models use.

The toy teacher gets a LLaMA-style tokenizer (SentencePiece-like `▁` word markers, `<s>`/`</s>`, no pad token,
so SALMONN's `[PAD]` gets added as with Vicuna); the toy student a different one (byte-level `Ġ` markers,
`<bos>`/`<eos>`/`<pad>`), so cross-tokenizer distillation faces the same problem as Vicuna → Gemma.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = {
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "bytelevel": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
}


def train_bpe(texts: Iterable[str], vocab_size: int, style: Literal["llama", "bytelevel"]) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer."""
    specials = SPECIALS[style]
    if style == "llama":
        tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder
