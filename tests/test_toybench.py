"""toybench: deterministic files, clean splits, valid annotation JSON, captions that say what the audio holds.

The smoke benchmark is generated twice per session (two workers, then one) and shared by the tests.
Caption checks use cue words written out here, independent of the caption grammar's own tables.
"""

import json
import re
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from toybench.captions import sample_captions
from toybench.generate import ToyBenchConfig, generate, preset, verify_manifest
from toybench.grammar import sample_sentence_in_split, vocabulary
from toybench.pipeline import existing_summary
from toybench.scenes import ALL_EVENTS, recipe_key, sample_recipe_in_split
from toybench.splits import SPLITS, item_rng
from toybench.tts import check_tools, voice_pool

SMOKE = preset("smoke", seed=7)

# A word only the phrases of that event use; a caption's event order is read from where these occur.
CUES = {
    "tone:low": r"\b(low|deep)\b",
    "tone:high": r"\b(high|shrill)\b",
    "sweep:rising": r"\b(rising|rises|upward)\b",
    "sweep:falling": r"\b(falling|falls|downward)\b",
    "beeps:2": r"\btwo\b",
    "beeps:3": r"\bthree\b",
    "beeps:4": r"\bfour\b",
    "beeps:5": r"\bfive\b",
    "noise:white": r"\b(white|hissing)\b",
    "noise:pink": r"\b(pink|rushing)\b",
    "noise:brown": r"\b(brown|rumbling|rumble)\b",
    "clicks:slow": r"\bslow\b",
    "clicks:fast": r"\b(rapid|fast|quick)\b",
    "siren": r"\bsiren\b",
    "babble": r"\b(talking|voices|babble|chatting)\b",
}
# Captions that name the later event first must say so.
REVERSED = re.compile(r"\b(comes? after|follows?|preceded by)\b")


@pytest.fixture(scope="session")
def smoke_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The smoke benchmark generated twice: with two workers and with one."""
    first, second = tmp_path_factory.mktemp("toy_a"), tmp_path_factory.mktemp("toy_b")
    generate(replace(SMOKE, workers=2), first, progress=False)
    generate(replace(SMOKE, workers=1), second, progress=False)
    return first, second


@pytest.fixture(scope="session")
def smoke(smoke_pair: tuple[Path, Path]) -> Path:
    return smoke_pair[0]


def _meta(root: Path, task: str) -> dict[str, list[dict]]:
    return {split: json.loads((root / "meta" / f"{task}_{split}.json").read_text()) for split in SPLITS}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_same_seed_gives_byte_identical_files_for_any_worker_count(smoke_pair: tuple[Path, Path]) -> None:
    first, second = smoke_pair
    assert _files(first) == _files(second)
    for name in sorted(_files(first)):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    manifest = json.loads((first / "manifest.json").read_text())
    assert set(manifest["files"]) == _files(first) - {"manifest.json"}
    assert verify_manifest(first) == []


@pytest.mark.slow
def test_annotation_json_parses_and_every_path_exists(smoke: Path) -> None:
    for split in SPLITS:
        combined = json.loads((smoke / f"{split}.json").read_text())["annotation"]
        asr = json.loads((smoke / f"asr_{split}.json").read_text())["annotation"]
        aac = json.loads((smoke / f"aac_{split}.json").read_text())["annotation"]
        assert combined == asr + aac
        n_clips = SMOKE.counts()[split]
        assert len(asr) == n_clips and len(aac) == 5 * n_clips
        for entry in combined:
            assert set(entry) == {"path", "text", "task"}
            assert (smoke / entry["path"]).is_file()  # relative to the JSON's folder
        assert {e["task"] for e in asr} == {"asr"} and {e["task"] for e in aac} == {"audiocaption"}
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", e["text"]) for e in asr)


@pytest.mark.slow
def test_clips_are_16khz_mono_16bit_within_duration_bounds(smoke: Path) -> None:
    for task in ("asr", "aac"):
        for records in _meta(smoke, task).values():
            for record in records:
                info = sf.info(smoke / record["path"])
                assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
                assert SMOKE.min_duration_s <= info.frames / 16000 <= SMOKE.max_duration_s
                assert info.frames / 16000 == pytest.approx(record["duration_s"], abs=1e-3)


@pytest.mark.slow
def test_no_sentence_or_recipe_is_shared_across_splits(smoke: Path) -> None:
    sentences = {s: {r["text"] for r in records} for s, records in _meta(smoke, "asr").items()}
    recipes = {s: {r["recipe"] for r in records} for s, records in _meta(smoke, "aac").items()}
    for content in (sentences, recipes):
        assert not content["train"] & content["valid"]
        assert not content["train"] & content["test"]
        assert not content["valid"] & content["test"]


def test_content_draws_stay_in_their_split_and_test_scenes_reuse_training_events() -> None:
    sentences = {s: {sample_sentence_in_split(item_rng(0, "asr", s, i), s) for i in range(300)}
                 for s in SPLITS}
    assert not sentences["train"] & (sentences["valid"] | sentences["test"])
    assert not sentences["valid"] & sentences["test"]
    recipes = {s: [sample_recipe_in_split(item_rng(0, "aac", s, i), s) for i in range(n)]
               for s, n in (("train", 3000), ("test", 300))}
    assert not {recipe_key(r) for r in recipes["train"]} & {recipe_key(r) for r in recipes["test"]}
    # Splitting by recipe must leave the events themselves shared: test scenes are new combinations.
    train_events = {e for r in recipes["train"] for e in r}
    assert train_events == set(ALL_EVENTS)


@pytest.mark.slow
def test_held_out_voices_never_speak_in_training(smoke: Path) -> None:
    used = {s: {r["voice"] for r in records} for s, records in _meta(smoke, "asr").items()}
    assert not used["train"] & (used["valid"] | used["test"])
    pools = {s: set(voice_pool(s, "espeak") + voice_pool(s, "flite")) for s in SPLITS}
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["valid"]
    # Held out as whole timbres: a test variant is heard in no accent at all in training.
    variants = {s: {v.name.split("+")[-1] for v in pools[s]} for s in SPLITS}
    assert not variants["train"] & (variants["valid"] | variants["test"])
    assert len(pools["train"]) + len(pools["valid"]) + len(pools["test"]) > 100


@pytest.mark.slow
def test_every_aac_clip_has_five_distinct_captions(smoke: Path) -> None:
    for split, records in _meta(smoke, "aac").items():
        by_path = defaultdict(list)
        for entry in json.loads((smoke / f"aac_{split}.json").read_text())["annotation"]:
            by_path[entry["path"]].append(entry["text"])
        assert set(by_path) == {r["path"] for r in records}
        for record in records:
            assert by_path[record["path"]] == record["captions"]
            assert len(set(record["captions"])) == 5


def _assert_caption_states_order(caption: str, keys: list[str]) -> None:
    positions = []
    for key, cue in CUES.items():
        match = re.search(cue, caption)
        assert (match is not None) == (key in keys), f"{key} in {caption!r} (events {keys})"
        if key in keys:
            positions.append((keys.index(key), match.start()))
    where = [start for _, start in sorted(positions)]
    if REVERSED.search(caption):
        assert len(keys) == 2 and where[1] < where[0], caption
    else:
        assert where == sorted(where), caption


def test_captions_name_exactly_the_events_in_order() -> None:
    for i in range(400):
        rng = item_rng(0, "aac", "train", i)
        recipe = sample_recipe_in_split(rng, "train")
        for caption in sample_captions(recipe, rng):
            _assert_caption_states_order(caption, [e.key for e in recipe])


@pytest.mark.slow
def test_generated_captions_match_their_scene(smoke: Path) -> None:
    for records in _meta(smoke, "aac").values():
        for record in records:
            keys = [f"{e['kind']}:{e['attr']}" if e["attr"] else e["kind"] for e in record["events"]]
            assert ">".join(keys) == record["recipe"]
            for caption in record["captions"]:
                _assert_caption_states_order(caption, keys)


def _dominant_hz(segment: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    return float(np.fft.rfftfreq(len(segment), 1 / 16000)[np.argmax(spectrum)])


def _count_bursts(segment: np.ndarray, frame: int) -> int:
    """Rising edges of the frame-RMS envelope through 30 % of its maximum."""
    frames = segment[: len(segment) // frame * frame].reshape(-1, frame)
    loud = np.sqrt((frames**2).mean(axis=1)) > 0.3 * np.sqrt((frames**2).mean(axis=1)).max()
    return int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))


def _loudest_frame(segment: np.ndarray, frame: int = 160) -> float:
    frames = segment[: len(segment) // frame * frame].reshape(-1, frame)
    return float(np.sqrt((frames**2).mean(axis=1)).max())


def _check_event_audio(event: dict, segment: np.ndarray) -> None:
    """What the caption claims about an event, measured on its samples."""
    kind, attr = event["kind"], event["attr"]
    if kind == "tone":
        hz = _dominant_hz(segment)
        assert hz < 400 if attr == "low" else hz > 1400
    elif kind == "sweep":
        quarter = len(segment) // 4
        start, end = _dominant_hz(segment[:quarter]), _dominant_hz(segment[-quarter:])
        assert start < end if attr == "rising" else start > end
    elif kind == "beeps":
        assert _count_bursts(segment, 160) == int(attr)
    elif kind == "clicks":
        rate = _count_bursts(segment, 80) / event["duration_s"]
        assert rate < 4.5 if attr == "slow" else rate > 6.5


@pytest.mark.slow
def test_aac_audio_holds_the_captioned_events_in_order(smoke: Path) -> None:
    for records in _meta(smoke, "aac").values():
        for record in records:
            audio, _ = sf.read(smoke / record["path"])
            ends = [0.0]
            for event in record["events"]:
                start = int(event["onset_s"] * 16000)
                stop = int((event["onset_s"] + event["duration_s"]) * 16000)
                assert event["onset_s"] >= ends[-1]  # one after another, never overlapping
                segment = audio[start:stop]
                gap = audio[int(ends[-1] * 16000):start]
                # The loudest 10 ms of an event stand 20 dB above the loudest of the silence before it.
                assert _loudest_frame(segment) > 10 * _loudest_frame(gap)
                _check_event_audio(event, segment)
                ends.append(event["onset_s"] + event["duration_s"])


@pytest.mark.slow
def test_complete_benchmark_is_skipped_unless_config_or_files_change(smoke: Path, tmp_path: Path) -> None:
    summary = generate(replace(SMOKE, workers=2), smoke, progress=False)
    assert summary["skipped"] and summary["clips"]["aac"]["train"] == SMOKE.n_train
    assert existing_summary(smoke, replace(SMOKE, workers=1)) is not None  # workers do not change the data
    assert existing_summary(smoke, replace(SMOKE, seed=8)) is None
    copy = tmp_path / "copy"
    shutil.copytree(smoke, copy)
    (copy / "audio" / "aac" / "test" / "00003.flac").unlink()
    assert existing_summary(copy, SMOKE) is None


def test_config_presets_and_validation() -> None:
    assert preset("smoke").counts() == {"train": 48, "valid": 12, "test": 12}
    assert preset("default").counts() == {"train": 3000, "valid": 300, "test": 300}
    assert "workers" not in preset("default").data_fields()
    with pytest.raises(ValueError, match="unknown toybench size"):
        preset("huge")
    with pytest.raises(TypeError):
        preset("smoke", n_tran=3)  # unknown keys fail instead of being ignored
    for bad in ({"min_duration_s": 9.0}, {"noise_prob": 1.5}, {"snr_db_min": 30.0}, {"n_test": 0}):
        with pytest.raises(ValueError):
            ToyBenchConfig(**bad)


def test_vocabulary_is_a_few_hundred_words() -> None:
    assert 200 <= len(vocabulary()) <= 800


def test_missing_synthesizer_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng flite"):
        check_tools()
