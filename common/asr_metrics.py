"""ASR quality: corpus WER after Whisper's English text normalizer, CER, and orthographic WER.

Normalized WER is the number smolt reports (as the Whisper paper and the Open ASR Leaderboard do): both
sides go through `transformers`' `EnglishTextNormalizer` with Whisper's British→American spelling map,
then jiwer aligns the word sequences and the error counts are summed over the whole corpus (not an
average of per-utterance rates). CER uses the same normalized text. The orthographic WER scores the raw
strings, case and punctuation included, as the Hugging Face audio course does beside the normalized one.
"""

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import jiwer
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

# Whisper's spelling map, taken verbatim from the openai-whisper package (see data/README.md).
ENGLISH_SPELLING_PATH = Path(__file__).parent / "data" / "english_spelling.json"
NORMALIZER_NAME = "whisper_english"


@cache
def whisper_english_normalizer() -> EnglishTextNormalizer:
    """Whisper's English normalizer with its British→American spelling map loaded (built once)."""
    with ENGLISH_SPELLING_PATH.open(encoding="utf-8") as file:
        spelling = json.load(file)
    return EnglishTextNormalizer(spelling)


def normalize_transcript(text: str) -> str:
    """Lower-case, expand contractions and titles, spell numbers as digits, Americanize, drop punctuation.

    E.g. "Mr. Smith's colour TV cost twenty dollars." -> "mister smith is color tv cost $20".
    """
    # The normalizer can leave a space at either end (e.g. after expanding "mr" to "mister ").
    return whisper_english_normalizer()(text).strip()


def asr_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus error rates of `predictions` against `references` (one string per utterance, same order).

    Returns:
        wer: (S + D + I) / N over all utterances, after `normalize_transcript` on both sides.
        cer: the same over characters (spaces included) of the normalized text.
        wer_ortho: WER of the raw strings, only whitespace collapsed (case and punctuation count).
        substitutions, deletions, insertions, ref_words: the normalized word counts S, D, I, N.
        utterances: how many pairs were scored.
        normalizer: which normalization `wer` and `cer` used.

    An empty prediction counts as deleting every reference word. An empty reference, raw or after
    normalization (e.g. "Um." -> ""), raises ValueError: its errors would have no words to be divided by.
    """
    _check_pairs(predictions, references)
    norm_predictions = [normalize_transcript(text) for text in predictions]
    norm_references = [normalize_transcript(text) for text in references]
    _check_references(references, norm_references)

    words = jiwer.process_words(norm_references, norm_predictions)
    chars = jiwer.process_characters(norm_references, norm_predictions)
    ortho = jiwer.process_words(list(references), list(predictions))
    return {
        "wer": words.wer,
        "cer": chars.cer,
        "wer_ortho": ortho.wer,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "ref_words": words.hits + words.substitutions + words.deletions,
        "utterances": len(references),
        "normalizer": NORMALIZER_NAME,
    }


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Fail early on inputs jiwer would misread (a bare string is a sequence of characters)."""
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"{name} must be a sequence of strings, one per utterance")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no utterances to score")


def _check_references(raw: Sequence[str], normalized: Sequence[str]) -> None:
    """Reject empty references: jiwer would silently score them as pure insertions over zero words."""
    for index, (raw_text, norm_text) in enumerate(zip(raw, normalized, strict=True)):
        if not raw_text.strip():
            raise ValueError(f"reference {index} is empty; drop the utterance or fix its transcript")
        if not norm_text:
            raise ValueError(
                f"reference {index} ({raw_text!r}) is empty after Whisper English normalization; "
                "drop the utterance or fix its transcript"
            )
