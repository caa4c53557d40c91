"""Hub ids for model and data paths (`common.hub`), resolved from a hub cache the tests lay out, offline.

The cache has the layout huggingface_hub writes (`models--owner--name/blobs/<sha256>`, `snapshots/<commit>/<file>`
as links to the blobs, `refs/main` holding the commit); `HF_HUB_CACHE` and `HF_HUB_OFFLINE=1` are set per test, and
the code under test reads them when it runs (huggingface_hub itself reads them once, at import).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from common.annotations import DataError, DataReport, HFDatasetOptions, read_examples
from common.config import load_config, save_resolved
from common.hub import RESOLVED, parse_hub_id
from teacher.build import CheckpointError, LLMConfig, build_llm, load_tokenizer, load_whisper_encoder
from tests.tiny_salmonn import write_llama, write_whisper

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache: Path, repo: str, write, commit: str = COMMIT, repo_type: str = "model") -> Path:
    """Lay out `repo` in the hub cache as huggingface_hub does; `write(folder)` writes the files. Returns the
    snapshot folder."""
    storage = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    staging = storage / "staging"
    write(staging)
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.move(file, blob)
        link = snapshot / file.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.rmtree(staging)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    RESOLVED.clear()
    return cache


def test_hub_id_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here" / "whisper").mkdir(parents=True)
    assert parse_hub_id("openai/whisper-large-v2") == ("openai/whisper-large-v2", None)
    assert parse_hub_id("lmsys/vicuna-13b-v1.1@" + COMMIT) == ("lmsys/vicuna-13b-v1.1", COMMIT)
    assert parse_hub_id("owner/name@refs/pr/3") == ("owner/name", "refs/pr/3")
    assert parse_hub_id("checkpoints/whisper") == ("checkpoints/whisper", None)  # missing: could be either
    for local in ("here/whisper",  # exists on disk
                  "./owner/name", "/owner/name", "~/owner/name",  # spelled as paths
                  "a/b/c", "gpt2", "", "owner--x/name", "owner/na..me", "owner/name.git", "-owner/name",
                  "owner/name@", "owner/name with space"):
        assert parse_hub_id(local) is None, local


def test_whisper_and_llm_load_from_hub_ids_and_the_commit_is_recorded(hub_cache, tmp_path):
    whisper_folder = cache_repo(hub_cache, "openai/whisper-tiny-test", write_whisper)
    cache_repo(hub_cache, "lmsys/vicuna-tiny-test", write_llama)
    write_whisper(tmp_path / "reference_whisper")

    encoder = load_whisper_encoder("openai/whisper-tiny-test")
    reference = load_whisper_encoder(tmp_path / "reference_whisper")
    for (name, a), (_, b) in zip(encoder.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    llm_cfg = LLMConfig(path="lmsys/vicuna-tiny-test@" + COMMIT)
    tokenizer = load_tokenizer(llm_cfg)
    llm = build_llm(llm_cfg, tokenizer)
    assert llm.config.hidden_size == 32 and tokenizer.pad_token == "[PAD]"

    snap = RESOLVED["openai/whisper-tiny-test"]
    assert (snap.repo, snap.revision, snap.commit) == ("openai/whisper-tiny-test", "main", COMMIT)
    assert Path(snap.folder) == whisper_folder.resolve()

    from teacher.train import JobConfig

    cfg = JobConfig()
    cfg.model.whisper.path = "openai/whisper-tiny-test"
    cfg.model.llm.path = "lmsys/vicuna-tiny-test@" + COMMIT
    saved = yaml.safe_load(save_resolved(cfg, tmp_path / "run").read_text())
    assert saved["resolved_from"]["openai/whisper-tiny-test"]["commit"] == COMMIT
    assert saved["resolved_from"]["lmsys/vicuna-tiny-test@" + COMMIT]["repo"] == "lmsys/vicuna-tiny-test"
    assert load_config(JobConfig, tmp_path / "run" / "config.yaml") == cfg  # the record is not a setting

    from teacher.assemble import check_sources  # the official-layout folder links the snapshot's files

    (tmp_path / "salmonn.pth").write_bytes(b"")
    cfg.model.beats.enabled, cfg.model.checkpoint = False, str(tmp_path / "salmonn.pth")
    assert check_sources(cfg.model)["whisper"] == whisper_folder.resolve()


def test_a_revision_not_in_the_cache_names_id_cache_and_fix(hub_cache):
    cache_repo(hub_cache, "openai/whisper-tiny-test", write_whisper)
    with pytest.raises(CheckpointError) as err:
        load_whisper_encoder("openai/whisper-tiny-test@" + OTHER_COMMIT)
    message = str(err.value)
    assert "openai/whisper-tiny-test" in message and OTHER_COMMIT in message
    assert str(hub_cache) in message and "HF_HUB_OFFLINE" in message and "hf download" in message


def test_missing_local_folder_that_looks_like_a_hub_id_names_both_readings(hub_cache):
    with pytest.raises(CheckpointError) as err:
        load_whisper_encoder("checkpoints/whisper")
    message = str(err.value)
    # The local reading's message as before, then the hub reading's: the cache looked in and the fix.
    assert message.startswith("checkpoints/whisper: not a Hugging Face Whisper folder (no config.json); "
                              "check whisper.path Read as a hub model id, checkpoints/whisper at revision main")
    assert str(hub_cache) in message and "./checkpoints/whisper" in message
    with pytest.raises(CheckpointError) as err:
        load_whisper_encoder("./checkpoints/whisper")  # a path only: the old message alone
    assert str(err.value) == ("checkpoints/whisper: not a Hugging Face Whisper folder (no config.json); "
                              "check whisper.path")


def test_an_unreachable_hub_reads_the_cache_at_once(hub_cache, monkeypatch):
    import huggingface_hub

    asked = []

    def no_network(self, repo_id, **kwargs):
        asked.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    cache_repo(hub_cache, "openai/whisper-tiny-test", write_whisper)
    assert load_whisper_encoder("openai/whisper-tiny-test").config.d_model == 32
    assert asked == ["openai/whisper-tiny-test"]  # one question, then the cache (no retries, no download)
    with pytest.raises(CheckpointError, match="the hub is not reachable"):
        load_whisper_encoder("openai/not-cached")


def write_audio_parquet(folder: Path, clips: list[np.ndarray], texts: list[str]) -> None:
    """A hub dataset repository as the hub's parquet converter writes it: `data/<split>-00000-of-00001.parquet` with
    an Audio column (encoded bytes + file name) and a text column named `sentence`, no task column."""
    import datasets

    rows = []
    for i, wav in enumerate(clips):
        buffer = io.BytesIO()
        sf.write(buffer, wav, 8000, format="FLAC")  # 8 kHz on purpose: the reader resamples to 16 kHz
        rows.append({"bytes": buffer.getvalue(), "path": f"clip{i}.flac"})
    ds = datasets.Dataset.from_dict({"audio": rows, "sentence": texts})
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    (folder / "data").mkdir(parents=True)
    ds.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))


def test_hub_dataset_reads_offline_with_renamed_columns_and_a_given_task(hub_cache, tmp_path, monkeypatch):
    from common.audio import load_audio

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    rng = np.random.default_rng(0)
    clips = [rng.uniform(-0.5, 0.5, 8000 * (i + 1)).astype(np.float32) for i in range(3)]
    texts = ["the cat sat", "hello world", "a dog runs"]
    cache_repo(hub_cache, "someone/tiny-speech", lambda f: write_audio_parquet(f, clips, texts),
               repo_type="dataset")
    options = HFDatasetOptions(columns={"text": "sentence"}, task="asr")
    report = DataReport()
    examples = read_examples(["someone/tiny-speech:test"], ["asr"], "raise", report, options)
    assert [ex.text for ex in examples] == texts and {ex.task for ex in examples} == {"asr"}
    assert report.entries == 3 and report.sources == ["someone/tiny-speech:test"]
    durations = [len(load_audio(ex.path, data=ex.audio_bytes)) / 16000 for ex in examples]
    assert durations == [1.0, 2.0, 3.0]  # 8 kHz FLAC decoded at 16 kHz: same seconds
    assert RESOLVED["someone/tiny-speech"].commit == COMMIT
    only_split = read_examples(["someone/tiny-speech"], ["asr"], "raise", DataReport(), options)
    assert [ex.text for ex in only_split] == texts  # no `:split` needed when the dataset has one

    with pytest.raises(DataError, match="data.hf_columns"):  # the text column has another name
        read_examples(["someone/tiny-speech:test"], ["asr"], "raise", DataReport(), HFDatasetOptions(task="asr"))
    with pytest.raises(DataError, match="someone/other-speech"):
        read_examples(["someone/other-speech:test"], ["asr"], "raise", DataReport(), options)
    with pytest.raises(DataError, match="annotation file not found"):  # .json is always a local annotation file
        read_examples(["data/test.json"], ["asr"], "raise", DataReport(), options)


def test_model_downloads_skip_other_frameworks_and_pickles_beside_safetensors():
    from common.hub import _ignored

    whisper = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"]
    vicuna = ["config.json", "pytorch_model-00001-of-00003.bin", "pytorch_model.bin.index.json", "tokenizer.model"]
    assert {"*.bin", "*.h5", "*.msgpack"} <= set(_ignored(whisper, "model"))
    assert "*.bin" not in _ignored(vicuna, "model")  # its only weights
    assert _ignored(whisper, "dataset") == []  # a dataset repository is data, all of it
