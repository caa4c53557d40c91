"""`python -m evaluation.run data.test=[file.json]` scores any SALMONN-format annotation JSON a user has on disk:
absolute and relative audio paths (relative to the JSON's folder), other sample rates and stereo, a prompt of the
entry's own (`Q`), clips too long for the model dropped and counted, and a bad entry named with its file."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_salmonn import write_teacher_folder

from common.annotations import DataError
from common.results import load_results
from evaluation.run import main as evaluate_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A user's folder: recordings in one place, the annotation JSON in another."""
    root = tmp_path_factory.mktemp("user")
    write_teacher_folder(root / "models")
    audio = root / "recordings"
    audio.mkdir()
    rng = np.random.default_rng(0)
    sf.write(audio / "speech_44k_stereo.wav", (0.2 * rng.standard_normal((44100, 2))).astype(np.float32), 44100)
    sf.write(audio / "speech_8k.flac", (0.2 * rng.standard_normal(12000)).astype(np.float32), 8000)
    sf.write(audio / "street.wav", (0.2 * rng.standard_normal(20000)).astype(np.float32), 16000)
    sf.write(audio / "park.wav", (0.2 * rng.standard_normal(24000)).astype(np.float32), 16000)
    sf.write(audio / "too_long.wav", (0.2 * rng.standard_normal(16000 * 3)).astype(np.float32), 16000)
    (root / "lists").mkdir()
    entries = [
        {"path": str(audio / "speech_44k_stereo.wav"), "text": "Hello, World!", "task": "asr"},  # absolute
        {"path": "../recordings/speech_8k.flac", "text": "the cat sat", "task": "asr"},  # relative to the JSON
        {"path": "../recordings/street.wav", "text": "cars pass by", "task": "audiocaption",
         "Q": "What do you hear?"},
        {"path": "../recordings/street.wav", "text": "traffic noise", "task": "audiocaption",
         "Q": "What do you hear?"},
        {"path": str(audio / "park.wav"), "text": "birds sing", "task": "audiocaption"},
        {"path": "../recordings/too_long.wav", "text": "a long recording", "task": "asr"},
    ]
    (root / "lists" / "mine.json").write_text(json.dumps({"annotation": entries}))
    return root


def run(root, out, test_json, *extra):
    return evaluate_main([
        f"models=[{{name: teacher, path: {root / 'models' / 'teacher'}}}]", f"data.test=[{test_json}]",
        "data.max_seconds=2.0", "features.whisper_chunk_seconds=2", "efficiency.timed_runs=1",
        "efficiency.warmup_runs=1", "efficiency.decode_steps=1", "efficiency.throughput_runs=1",
        "efficiency.throughput_batch_size=1", "efficiency.max_new_tokens=2", "efficiency_clips=1",
        "generation.max_new_tokens=3", f"output_dir={out}", f"caption_cache_dir={out / 'jars'}", *extra])


def test_scores_a_users_json_with_absolute_and_relative_paths(recordings, tmp_path):
    root = recordings
    results = run(root, tmp_path, root / "lists" / "mine.json", f"feature_store={tmp_path / 'features'}")["teacher"]
    assert results["asr_clips"] == 2 and results["aac_clips"] == 2 and results["wer"] >= 0
    assert results["cider_d"] is not None
    lines = [json.loads(x) for x in (tmp_path / "teacher" / "predictions.jsonl").read_text().splitlines()]
    paths = {str(Path(x["path"]).resolve()): x for x in lines}
    assert set(paths) == {str((root / "recordings" / name).resolve()) for name in
                          ("speech_44k_stereo.wav", "speech_8k.flac", "street.wav", "park.wav")}
    street = paths[str((root / "recordings" / "street.wav").resolve())]
    assert sorted(street["references"]) == ["cars pass by", "traffic noise"]  # grouped by clip
    assert (tmp_path / "config.yaml").is_file()  # the resolved config, for the record
    assert load_results(tmp_path / "teacher" / "results.json")["model"] == "teacher"
    assert list((tmp_path / "features").glob("test-*.safetensors"))  # a store of this file's own clips


def test_clips_longer_than_the_model_hears_are_dropped_and_counted(recordings, tmp_path, capsys):
    root = recordings
    run(root, tmp_path, root / "lists" / "mine.json")
    assert "too_long" in capsys.readouterr().out  # the data report printed at start-up names the drop rule


def test_a_bad_entry_stops_with_the_file_and_entry(recordings, tmp_path):
    root = recordings
    bad = root / "lists" / "bad.json"
    bad.write_text(json.dumps({"annotation": [{"path": "../recordings/missing.wav", "text": "x", "task": "asr"}]}))
    with pytest.raises(DataError, match=r"bad\.json: entry 0|missing\.wav"):
        run(root, tmp_path, bad)
