"""toybench.listen: buckets and per-bucket WER on hand-made metadata, the predictions.jsonl path, the Whisper path
on a tiny random Whisper folder, and the LISTENER.md report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from test_convert_ctranslate2 import EOT, SOT, VOCAB, write_ct2_folder
from transformers import WhisperConfig, WhisperForConditionalGeneration

from convert.ctranslate2_whisper import convert_ct2_whisper
from toybench import listen

SNR = (5.0, 25.0)


def record(index: int, text: str, voice: str, rate: float = 0.5, pitch: float = 0.5, noise: str | None = None,
           snr_db: float | None = None) -> dict:
    return {"task": "asr", "split": "test", "index": index, "path": f"audio/asr/test/{index:05d}.flac",
            "text": text, "voice": voice, "rate": rate, "pitch": pitch, "noise": noise, "snr_db": snr_db,
            "duration_s": 1.0}


# Four clips, 4 + 2 + 3 + 5 = 14 reference words; errors by hand: clip 0 none, clip 1 one substitution,
# clip 2 one deletion, clip 3 everything wrong (4 substitutions + 1 deletion).
RECORDS = [
    record(0, "the red ball is here", "espeak:en-us+m6", rate=0.1, pitch=0.9),
    record(1, "go home", "espeak:en-gb+m6", rate=0.5, pitch=0.2, noise="pink", snr_db=6.0),
    record(2, "a blue box", "espeak:en-us+f2", rate=0.9, pitch=0.5, noise="white", snr_db=24.0),
    record(3, "she sees the green cat", "flite:rms", rate=0.9, pitch=0.1),
]
RECORDS[0]["text"] = "the red ball here"  # 4 words
HYPOTHESES = ["the red ball here", "go house", "a box", "xx yy zz ww"]


def test_buckets_name_family_voice_prosody_and_noise():
    b = listen.buckets(RECORDS[1], SNR)
    assert b["family"] == "espeak-ng" and b["espeak-ng base"] == "en-gb" and b["espeak-ng variant"] == "m6"
    assert b["rate"].startswith("mid (espeak-ng 147-168 wpm")
    assert b["pitch"].startswith("low (espeak-ng pitch 25-42")
    assert b["noise"] == "SNR 5-12 dB" and b["noise colour"] == "pink"
    flite = listen.buckets(RECORDS[3], SNR)
    # rms ignores the F0 setting, so it has no pitch bucket; a clean clip has no colour.
    assert flite == {"family": "flite", "flite voice": "rms", "rate": listen.rate_label(2), "noise": "clean"}
    assert listen.buckets(RECORDS[2], SNR)["noise"] == "SNR 18-25 dB"


def test_bucket_wer_is_the_corpus_wer_of_its_clips():
    scores = listen.bucket_scores(RECORDS, HYPOTHESES, SNR)
    assert scores["overall"]["wer"] == pytest.approx(7 / 14)
    b = scores["buckets"]
    assert b["family"]["espeak-ng"] == pytest.approx(
        {"clips": 3, "wer": 2 / 9, "ref_words": 9, "substitutions": 1, "deletions": 1, "insertions": 0,
         "cer": b["family"]["espeak-ng"]["cer"]})
    assert b["family"]["flite"]["wer"] == pytest.approx(1.0)
    assert b["espeak-ng base"]["en-us"]["wer"] == pytest.approx(1 / 7)  # clips 0 and 2
    assert b["espeak-ng variant"]["m6"]["wer"] == pytest.approx(1 / 6)  # clips 0 and 1
    assert b["noise"]["clean"]["wer"] == pytest.approx(5 / 9)  # clips 0 and 3
    assert list(b["noise"]) == ["clean", "SNR 5-12 dB", "SNR 18-25 dB"]
    assert b["rate"][listen.rate_label(2)]["wer"] == pytest.approx(6 / 8)  # clips 2 and 3
    assert b["rate"][listen.rate_label(2)]["clips"] == 2
    assert set(b["pitch"]) == {listen.pitch_label(0), listen.pitch_label(1), listen.pitch_label(2)}
    assert listen.unheard([{"scores": scores}]) == ["family: flite", "flite voice: rms"]


def write_benchmark(root: Path, records: list[dict]) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "asr_test.json").write_text(json.dumps(records))
    rng = np.random.default_rng(0)
    for r in records:
        (root / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / r["path"], (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    return root


def test_predictions_path_scores_and_reports_idempotently(tmp_path):
    data = write_benchmark(tmp_path / "toy", RECORDS)
    run = tmp_path / "eval" / "teacher"
    run.mkdir(parents=True)
    lines = [{"task": "asr", "path": str(data / r["path"]), "prediction": h, "references": [r["text"]]}
             for r, h in zip(RECORDS, HYPOTHESES, strict=True)]
    lines.insert(1, {"task": "audiocaption", "path": "/x/audio/aac/test/00000.flac", "prediction": "a beep",
                     "references": ["a beep"]})
    (run / "predictions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = listen.main(["--predictions", str(run / "predictions.jsonl"), "--data", str(data)])
    assert result["name"] == "teacher"
    assert result["scores"]["overall"]["wer"] == pytest.approx(7 / 14)
    report = (data / "LISTENER.md").read_text()
    assert "| **all** | | **0.500 (4)** |" in report and "Heard by no listener (WER >= 0.9): family: flite" in report
    assert f"python -m toybench.listen --predictions {run / 'predictions.jsonl'}" in report
    listen.write_report(data)
    assert (data / "LISTENER.md").read_text() == report
    # A second listener adds a column; rerunning the first replaces its column rather than adding one.
    listen.main(["--predictions", str(run / "predictions.jsonl"), "--data", str(data), "--name", "other"])
    listen.main(["--predictions", str(run / "predictions.jsonl"), "--data", str(data)])
    assert "| bucket |  | other | teacher |" in (data / "LISTENER.md").read_text()


def test_prediction_of_a_clip_outside_the_split_is_named(tmp_path):
    data = write_benchmark(tmp_path / "toy", RECORDS[:1])
    bad = tmp_path / "predictions.jsonl"
    bad.write_text(json.dumps({"task": "asr", "path": "audio/asr/valid/00000.flac", "prediction": "x"}) + "\n")
    with pytest.raises(listen.ListenError, match="line 1: clip 'audio/asr/valid/00000.flac' is not an ASR clip"):
        listen.read_predictions(bad, RECORDS[:1])
    with pytest.raises(listen.ListenError, match="no clip metadata"):
        listen.load_clips(data, "valid")


def write_tiny_whisper(folder: Path) -> Path:
    """A random Whisper with the tiny vocabulary of test_convert_ctranslate2, converted the way provision does,
    so the folder has the tokenizer, feature extractor and generation config of a real one. It reads Whisper's
    3000 mel frames (max_source_positions 1500) but is 16 wide."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(VOCAB), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=24, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
        decoder_start_token_id=SOT, begin_suppress_tokens=[EOT])
    ct2 = write_ct2_folder(folder.parent / "ct2", WhisperForConditionalGeneration(config).eval())
    return convert_ct2_whisper(ct2, folder)


def test_whisper_path_gives_one_transcript_per_clip(tmp_path):
    data = write_benchmark(tmp_path / "toy", RECORDS[:3])
    folder = write_tiny_whisper(tmp_path / "whisper-hf")
    texts = listen.transcribe_whisper(folder, [data / r["path"] for r in RECORDS[:3]], batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    result = listen.main(["--whisper", str(folder), "--data", str(data), "--max-clips", "2", "--no-report"])
    assert result["name"] == "whisper" and result["scores"]["overall"]["utterances"] == 2
    assert result["settings"]["no_repeat_ngram_size"] == 4
    assert not (data / "LISTENER.md").exists()
