"""ASR metrics: error rates pinned on examples worked out by hand; Whisper's normalizer wired correctly."""

import hashlib

import pytest

from common.asr_metrics import ENGLISH_SPELLING_PATH, asr_scores, normalize_transcript


def test_corpus_counts_substitutions_deletions_insertions():
    references = [
        "The quick brown fox jumps.",  # -> the quick brown fox jumps                 (5 words, 25 chars)
        "I can't see the colour red.",  # -> i can not see the color red            (7 words, 27 chars)
        "Mr. Jones has two hundred and fifty sheep",  # -> mister jones has 250 sheep (5 words, 26 chars)
    ]
    predictions = ["the brown fox leaps", "i can not see the color red red", ""]
    scores = asr_scores(predictions, references)

    # Words: 1) "quick" deleted, "jumps" -> "leaps" substituted; 2) a second "red" inserted;
    # 3) empty prediction: all 5 words deleted. S=1, D=1+5, I=1 over N=5+7+5=17.
    assert (scores["substitutions"], scores["deletions"], scores["insertions"]) == (1, 6, 1)
    assert scores["ref_words"] == 17
    assert scores["wer"] == pytest.approx(8 / 17)
    # Characters: 1) "quick " deleted (6) and j,u,m -> l,e,a in "jumps" -> "leaps" (3): 9 errors, and no
    # fewer (LCS "the brown fox " + "ps" = 16 of 25); 2) " red" inserted: 4; 3) all 26 deleted.
    assert scores["cer"] == pytest.approx((9 + 4 + 26) / (25 + 27 + 26))
    # Orthographic, raw words: 1) The->the, quick deleted, jumps.->leaps: 3 of 5; 2) 6 raw words against 8
    # with only "see", "the" matching: at least 8 - 2 = 6 errors (I->i, can't->can, +not, colour->color,
    # red.->red, +red); 3) 8 raw words deleted. (3 + 6 + 8) / (5 + 6 + 8).
    assert scores["wer_ortho"] == pytest.approx(17 / 19)
    assert scores["utterances"] == 3
    assert scores["normalizer"] == "whisper_english"


@pytest.mark.parametrize(
    ("reference", "prediction"),
    [
        ("Mr. Brown met Dr. Green.", "mister brown met doctor green"),  # titles expanded
        ("She paid twenty five dollars.", "she paid $25"),  # spelled numbers and currency -> digits
        ("I have two hundred and fifty apples", "i have 250 apples"),
        ("The colour of the theatre", "the color of the theater"),  # British -> American spelling
        ("Hello, World! How ARE you?", "hello world how are you"),  # punctuation and case
        ("I can't go, he won't", "i can not go he will not"),  # contractions
        ("um so [laughs] we start", "so we start"),  # fillers and bracketed events dropped
    ],
)
def test_normalization_makes_equivalent_transcripts_match(reference, prediction):
    scores = asr_scores([prediction], [reference])
    assert scores["wer"] == 0.0
    assert scores["cer"] == 0.0
    assert scores["wer_ortho"] > 0.0  # the raw strings do differ


def test_normalize_transcript_examples():
    assert normalize_transcript("Mr. Smith's colour TV cost twenty dollars.") == (
        "mister smith is color tv cost $20"
    )
    assert normalize_transcript("  Realise  the HONOUR!  ") == "realize the honor"


def test_empty_prediction_counts_as_deletions():
    scores = asr_scores(["", "a b"], ["x y z", "a b"])
    # 3 deletions over 5 words; characters: "x y z" (5) deleted over 5 + 3.
    assert (scores["deletions"], scores["substitutions"], scores["insertions"]) == (3, 0, 0)
    assert scores["wer"] == pytest.approx(3 / 5)
    assert scores["cer"] == pytest.approx(5 / 8)


@pytest.mark.parametrize("reference", ["", "   ", "Um."])  # "Um." normalizes to "" (filler)
def test_empty_reference_is_an_error(reference):
    with pytest.raises(ValueError, match="reference 1"):
        asr_scores(["hello", "hello"], ["hello", reference])


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        asr_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no utterances"):
        asr_scores([], [])
    with pytest.raises(TypeError):
        asr_scores("a b", "a b")


def test_spelling_map_is_whispers():
    # sha256 of whisper/normalizers/english.json in openai-whisper 20250625 (see common/data/README.md).
    digest = hashlib.sha256(ENGLISH_SPELLING_PATH.read_bytes()).hexdigest()
    assert digest == "6607f948be9824d2e1b2fa2223cd94c06c45afa4e05ea0e3d5e1f2bdffde2465"
