"""Data loading: annotation formats, every kind of bad input, drop rules, the collator and the sampler."""

import json
import statistics

import numpy as np
import pytest
import soundfile as sf
import torch

from common.annotations import DataError
from common.audio import AudioError, load_audio
from common.dataset import (
    AudioTextCollator,
    AudioTextDataset,
    DataConfig,
    DurationBucketSampler,
    pad_sequences,
)
from common.features import FeatureConfig

FEAT = FeatureConfig(whisper_n_mels=80, whisper_chunk_seconds=2)


def tone(seconds, sr=16000, amp=0.3, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_json(path, entries):
    path.write_text(json.dumps({"annotation": entries}))
    return path


@pytest.fixture
def clips(tmp_path):
    """A small folder of valid clips and an annotation JSON with relative paths."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", tone(1.0), 16000)
    sf.write(audio / "b.flac", tone(0.5), 16000)
    stereo = np.stack([tone(0.7, sr=44100), tone(0.7, sr=44100, amp=0.1)], axis=1)
    sf.write(audio / "c.wav", stereo, 44100)  # stereo, 44.1 kHz
    entries = [
        {"path": "audio/a.wav", "text": "hello world", "task": "asr"},
        {"path": "audio/b.flac", "text": "a tone", "task": "audiocaption", "Q": "What do you hear?"},
        {"path": "audio/c.wav", "text": "stereo tone", "task": "audiocaption"},
    ]
    return tmp_path, entries


def scan(path, **kw):
    return AudioTextDataset.scan([str(path)], DataConfig(**kw), FEAT)


def test_reads_salmonn_json_with_relative_paths(clips):
    root, entries = clips
    ds = scan(write_json(root / "train.json", entries))
    assert len(ds) == 3 and ds.report.kept == 3
    item = ds[1]
    assert item["mel"].shape == (80, 200)
    assert item["fbank"].shape == (48, 128)  # 0.5 s: 1 + (8000 - 400) // 160 frames
    assert item["prompt"] == "What do you hear?" and ds[0]["prompt"] == DataConfig().prompts["asr"]
    assert ds.durations[2] == pytest.approx(0.7, abs=1e-3)  # resampled to 16 kHz


def test_load_audio_resamples_and_downmixes(clips):
    root, _ = clips
    wav = load_audio(root / "audio/c.wav")
    assert wav.dtype == np.float32 and wav.ndim == 1 and len(wav) == pytest.approx(11200, abs=2)
    assert np.max(np.abs(wav)) == pytest.approx(0.2, abs=0.01)  # mean of 0.3 and 0.1 amplitude


def test_reads_hf_dataset_saved_to_disk(clips):
    datasets = pytest.importorskip("datasets")
    root, _ = clips
    ds = datasets.Dataset.from_dict({
        "audio": [{"bytes": (root / "audio/a.wav").read_bytes(), "path": "a.wav"}],
        "text": ["hello"], "task": ["asr"],
    }).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(root / "hf"))
    loaded = scan(root / "hf")
    assert len(loaded) == 1 and loaded[0]["text"] == "hello" and loaded[0]["mel"].shape == (80, 200)


BAD_ENTRIES = [
    ({"path": "audio/missing.wav", "text": "x", "task": "asr"}, "missing_audio", "audio file not found"),
    ({"path": "audio/a.wav", "text": "  ", "task": "asr"}, "empty_text", "field 'text' is empty"),
    ({"path": "audio/a.wav", "text": "x", "task": "translate"}, "unknown_task", "unknown task 'translate'"),
    ({"path": "audio/a.wav", "text": 3, "task": "asr"}, "wrong_type", "field 'text' must be a string, got int"),
    ({"path": "audio/a.wav", "task": "asr"}, "missing_field", "missing field 'text'"),
    ({"path": "audio/junk.wav", "text": "x", "task": "asr"}, "unreadable_audio", "cannot decode audio"),
    ({"path": "audio/trunc.wav", "text": "x", "task": "asr"}, "truncated_audio", "truncated"),
    ({"path": "audio/trunc.flac", "text": "x", "task": "asr"}, "unreadable_audio", "cannot decode audio"),
    ({"path": "audio/nan.wav", "text": "x", "task": "asr"}, "nonfinite_audio", "NaN or infinite"),
]


@pytest.fixture
def bad_files(clips):
    root, entries = clips
    (root / "audio/junk.wav").write_bytes(b"this is not audio at all")
    for ext in ("wav", "flac"):
        sf.write(root / f"audio/full.{ext}", tone(1.0), 16000)
        data = (root / f"audio/full.{ext}").read_bytes()
        (root / f"audio/trunc.{ext}").write_bytes(data[: len(data) // 2])
    nan = tone(0.5)
    nan[100] = np.nan
    sf.write(root / "audio/nan.wav", nan, 16000, subtype="FLOAT")
    return root, entries


BAD_IDS = [b[1] + "-" + str(i) for i, b in enumerate(BAD_ENTRIES)]


@pytest.mark.parametrize("bad,reason,message", BAD_ENTRIES, ids=BAD_IDS)
def test_bad_entry_raises_naming_file_and_entry(bad_files, bad, reason, message):
    root, entries = bad_files
    path = write_json(root / "bad.json", entries + [bad])
    with pytest.raises(DataError) as exc:
        scan(path)
    assert exc.value.reason == reason
    assert message in str(exc.value) and "bad.json" in str(exc.value) and "3" in str(exc.value)


@pytest.mark.parametrize("bad,reason,message", BAD_ENTRIES, ids=BAD_IDS)
def test_bad_entry_is_counted_skip(bad_files, bad, reason, message):
    root, entries = bad_files
    ds = scan(write_json(root / "bad.json", entries + [bad]), on_error="skip")
    report = ds.report.to_dict()
    assert len(ds) == 3 and report["entries"] == 4 and report["skipped"] == {reason: 1}
    assert report["skipped_entries"][0]["source"].endswith("bad.json#3")
    assert message in report["skipped_entries"][0]["problem"]


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"annotation": [\n {"path": "a.wav", "text": "x",}\n]}')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2"):
        scan(path)
    path.write_text('[{"path": "a.wav"}]')
    with pytest.raises(DataError, match=r"expected a top-level object"):
        scan(path)
    with pytest.raises(DataError, match=r"annotation file not found"):
        scan(tmp_path / "nope.json")


def test_drop_rules_are_counted(clips):
    root, entries = clips
    sf.write(root / "audio/empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "audio/quiet.wav", tone(1.0, amp=1e-4), 16000)
    sf.write(root / "audio/long.wav", tone(3.0), 16000)
    extra = [{"path": f"audio/{n}.wav", "text": "x", "task": "asr"} for n in ("empty", "quiet", "long")]
    ds = scan(write_json(root / "d.json", entries + extra), max_seconds=2.0, silence_dbfs=-60.0)
    assert len(ds) == 3
    assert ds.report.to_dict()["dropped"] == {"silent": 1, "too_long": 1, "zero_length": 1}
    assert "dropped silent=1, too_long=1, zero_length=1" in ds.report.summary()


def test_audio_error_is_clear_for_direct_use(tmp_path):
    with pytest.raises(AudioError, match="audio file not found"):
        load_audio(tmp_path / "x.wav")


class ToyTokenizer:
    """Word-level tokenizer with the attributes the collator uses."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + len(w) for w in text.split()]}


def test_collator_pads_features_and_labels(clips):
    root, entries = clips
    ds = scan(write_json(root / "train.json", entries))
    batch = AudioTextCollator(ToyTokenizer())([ds[0], ds[1]])
    assert batch["mel"].shape == (2, 80, 200)
    assert batch["fbank"].shape == (2, 98, 128)
    assert batch["fbank_padding_mask"].sum(1).tolist() == [0, 98 - 48]
    assert torch.all(batch["fbank"][1, 48:] == 0)
    # "hello world" -> [7, 7] + eos ; "a tone" -> [3, 6] + eos
    assert batch["target_ids"].tolist() == [[7, 7, 1], [3, 6, 1]]
    batch = AudioTextCollator(ToyTokenizer())([ds[0], ds[2]])  # "stereo tone" vs "hello world": same length
    short = AudioTextCollator(ToyTokenizer())([{**ds[0], "text": "hi"}, ds[2]])
    assert short["labels"].tolist() == [[4, 1, -100], [8, 6, 1]]
    assert short["target_ids"].tolist() == [[4, 1, 0], [8, 6, 1]]


def test_pad_sequences_mask():
    out, mask = pad_sequences([torch.ones(2, 3), torch.ones(4, 3)])
    assert out.shape == (2, 4, 3) and mask.tolist() == [[False, False, True, True], [False] * 4]


def test_bucket_sampler_groups_lengths_and_saves_padding():
    rng = np.random.default_rng(0)
    durations = rng.uniform(1, 8, size=1000).tolist()
    sampler = DurationBucketSampler(durations, batch_size=16, pool_batches=20, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == len(sampler) == 63
    spread = statistics.mean(max(durations[i] for i in b) - min(durations[i] for i in b) for b in batches)
    assert spread < 0.5  # random batches of 16 from U(1, 8) spread about 5.6 s
    report = sampler.padding_report()
    assert report["padded_fraction_random"] > 0.3 and report["padded_fraction_bucketed"] < 0.05
    assert report["padding_saved"] > 0.85


def test_bucket_sampler_is_deterministic_per_epoch_and_shards():
    durations = list(np.linspace(1, 8, 101))
    a = DurationBucketSampler(durations, 8, seed=1)
    b = DurationBucketSampler(durations, 8, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    ranks = [list(DurationBucketSampler(durations, 8, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))
    no_bucket = DurationBucketSampler(durations, 8, pool_batches=1, shuffle=False)
    assert list(no_bucket)[0] == list(range(8))


def test_caption_limit_keeps_first_captions(clips):
    root, entries = clips
    extra = [{"path": "audio/b.flac", "text": f"caption {i}", "task": "audiocaption"} for i in range(3)]
    ds = scan(write_json(root / "c.json", entries + extra), max_captions_per_clip=2)
    texts = [ex.text for ex in ds.examples if ex.path.endswith("b.flac")]
    assert texts == ["a tone", "caption 0"]
    assert ds.report.to_dict()["dropped"] == {"captions_beyond_limit": 2}


def test_exact_duplicates_are_refused_naming_both_entries(clips):
    root, entries = clips
    again = {"path": "./audio/a.wav", "text": "hello world ", "task": "asr"}  # the same entry, spelled differently
    path = write_json(root / "dup.json", entries + [again])
    with pytest.raises(DataError, match=r"dup.json: entry 3 repeats entry 0 exactly .* delete one") as exc:
        scan(path)
    assert exc.value.reason == "duplicate_entry"
    other = write_json(root / "other.json", [entries[1]])  # the same entry in a second file
    first = write_json(root / "train.json", entries)
    with pytest.raises(DataError, match=r"other.json: entry 0 repeats entry 1 of .*train.json"):
        AudioTextDataset.scan([str(first), str(other)], DataConfig(), FEAT)


def test_exact_duplicates_are_skipped_and_listed_captions_are_not_duplicates(clips):
    root, entries = clips
    captions = [{"path": "audio/b.flac", "text": "another caption", "task": "audiocaption"},  # a second reference
                {"path": "audio/b.flac", "text": "a tone", "task": "audiocaption"}]  # no Q: another prompt
    dup = dict(entries[1])
    ds = scan(write_json(root / "dup.json", entries + captions + [dup]), on_error="skip")
    report = ds.report.to_dict()
    assert len(ds) == 5 and report["entries"] == 6 and report["kept"] == 5
    assert report["skipped"] == {"duplicate_entry": 1}
    assert report["skipped_entries"][0]["source"].endswith("dup.json#5")
    assert "repeats entry 1 exactly" in report["skipped_entries"][0]["problem"]
    assert [ex.text for ex in ds.examples if ex.path.endswith("b.flac")] == ["a tone", "another caption", "a tone"]


def test_a_directory_is_not_reported_as_a_missing_file(clips):
    root, entries = clips
    (root / "audio/folder.wav").mkdir()
    bad = {"path": "audio/folder.wav", "text": "x", "task": "asr"}
    with pytest.raises(DataError, match="is a directory, not an audio file") as exc:
        scan(write_json(root / "dir.json", entries + [bad]))
    assert exc.value.reason == "audio_is_directory" and "dir.json#3" in str(exc.value)
    ds = scan(write_json(root / "dir.json", entries + [bad]), on_error="skip")
    assert ds.report.to_dict()["skipped"] == {"audio_is_directory": 1}


def test_scan_split_writes_the_report_with_dropped_entries(clips, tmp_path):
    from common.dataset import scan_split

    root, entries = clips
    sf.write(root / "audio/quiet.wav", tone(1.0, amp=1e-4), 16000)
    extra = [{"path": "audio/quiet.wav", "text": "x", "task": "asr"},
             {"path": "audio/gone.wav", "text": "y", "task": "asr"}]
    cfg = DataConfig(test=[str(write_json(root / "t.json", entries + extra))], on_error="skip")
    ds = scan_split(cfg, FEAT, "test", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "data_report_test.json").read_text())
    assert len(ds) == 3 and report["kept"] == 3 and report["entries"] == 5
    assert report["dropped"] == {"silent": 1} and report["skipped"] == {"missing_audio": 1}
    assert [e["source"].rsplit("/", 1)[-1] for e in report["dropped_entries"]] == ["t.json#3"]
    assert report["skipped_entries"][0]["source"].endswith("t.json#4")
