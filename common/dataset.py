"""Datasets, the collator and the duration-bucketing batch sampler shared by every stage.

A split is read once up front (`AudioTextDataset.scan`): every clip is decoded, checked and measured, so a
bad file stops the run (or is counted as skipped) before training starts rather than in the middle of it,
and the sampler knows every clip's duration.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from common.annotations import DataError, DataReport, Example, HFDatasetOptions, read_examples
from common.audio import SAMPLE_RATE, AudioError, load_audio, peak_dbfs
from common.augment import AugmentConfig
from common.cleaning import CleanConfig, Cleaner
from common.config import added_option
from common.fbank import BEATS_SILENT_FRAME
from common.features import AudioFeaturizer, FeatureConfig

ENCODER_OUTPUTS = ("speech_encoder_out", "audio_encoder_out")
"""Item keys of cached frozen-encoder outputs (`common.feature_store.with_encoder_outputs`), `[frames, dim]` each:
the Whisper encoder's and BEATs' raw outputs for the clip's own audio. The collator right-pads them with zeros."""

DEFAULT_PROMPTS = {
    "asr": "Recognize the speech and give me the transcription.",
    "audiocaption": "Please describe the audio.",
}


@dataclass
class DataConfig:
    """Where the data is and which clips are used."""

    train: list[str] = field(default_factory=list)
    """Annotation JSON files, saved HF dataset folders, or hub datasets `owner/name[@revision][:split]` (`common.hub`)
    for training."""
    valid: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["asr", "audiocaption"])
    """Tasks this job accepts; an entry with another task is an error (or a counted skip)."""
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    """Instruction per task, used when an entry has no `Q` of its own."""
    on_error: Literal["raise", "skip"] = "raise"
    """raise: a bad entry or file stops the run with its name; skip: it is counted in the data report."""
    min_seconds: float = 0.05
    """Clips shorter than this are dropped (BEATs needs at least one 25 ms frame; zero-length clips always go)."""
    max_seconds: float = 30.0
    """Clips longer than this are dropped (Whisper hears 30 s at most)."""
    silence_dbfs: float = -60.0
    """Clips whose peak is below this level (dB full scale) are dropped as silent."""
    max_captions_per_clip: int = 0
    """Keep only the first N reference captions of each captioning clip (0 = all). Training may cap this to
    balance tasks; evaluation keeps all, since CIDEr-D and SPICE score against every reference."""
    max_clips_per_task: int = 0
    """Use only the first N distinct clips of each task, in file order (0 = all); a kept captioning clip keeps
    its captions. For short runs whose per-clip work (e.g. cached encoder outputs) should not cover the whole split."""
    bucket_pool_batches: int = 50
    """Duration bucketing sorts pools of this many batches by length; 1 gives random batches."""
    hf_subset: str = added_option("")
    """Hub datasets: the configuration (`load_dataset`'s `name`), e.g. `clean`; empty: the dataset's default."""
    hf_columns: dict[str, str] = added_option({})
    """HF datasets (folders and hub ids): the column holding each of smolt's fields `audio`, `text`, `task`, `Q`
    where its name differs, e.g. `{text: sentence}`."""
    hf_task: str = added_option("")
    """HF datasets without a task column: the task of every row (e.g. `asr`)."""

    def hf_options(self) -> HFDatasetOptions:
        return HFDatasetOptions(self.hf_subset, dict(self.hf_columns), self.hf_task)
    clean: CleanConfig = added_option(CleanConfig())
    """VAD trimming, loudness normalisation and a caption filter, applied when the split is scanned
    (`common.cleaning`); counts under `cleaning` in the data report."""
    augment: AugmentConfig = added_option(AugmentConfig())
    """Training-time augmentation of the training split (`common.augment`): speed perturbation, additive noise,
    SpecAugment masks; off by default, deterministic per (seed, epoch, item)."""


def _drop_reason(wav: np.ndarray, cfg: DataConfig) -> str | None:
    seconds = len(wav) / SAMPLE_RATE
    if len(wav) == 0:
        return "zero_length"
    if seconds < cfg.min_seconds:
        return "too_short"
    if seconds > cfg.max_seconds:
        return "too_long"
    if peak_dbfs(wav) < cfg.silence_dbfs:
        return "silent"
    return None


def first_clip_indices(examples: list[Example], limit: int) -> list[int]:
    """Indices of the entries that belong to the first `limit` distinct clips (audio paths) of each task, in order;
    a kept captioning clip keeps all its entries."""
    kept_paths: dict[str, set[str]] = {}
    kept = []
    for i, ex in enumerate(examples):
        paths = kept_paths.setdefault(ex.task, set())
        if ex.path not in paths and len(paths) >= limit:
            continue
        paths.add(ex.path)
        kept.append(i)
    return kept


def _first_clips(examples: list[Example], limit: int, report: DataReport) -> list[Example]:
    kept = first_clip_indices(examples, limit)
    if len(kept) < len(examples):
        report.dropped["beyond_max_clips_per_task"] += len(examples) - len(kept)  # entries, i.e. captions too
    return [examples[i] for i in kept]


def _cap_captions(examples: list[Example], limit: int, report: DataReport) -> list[Example]:
    seen: dict[str, int] = {}
    kept = []
    for ex in examples:
        if ex.task == "audiocaption":
            seen[ex.path] = seen.get(ex.path, 0) + 1
            if seen[ex.path] > limit:
                report.dropped["captions_beyond_limit"] += 1
                continue
        kept.append(ex)
    return kept


class AudioTextDataset(Dataset):
    """Clips with their target text and prompt; items carry Whisper log-mel and BEATs fbank features.

    Build it with `AudioTextDataset.scan(sources, data_cfg, feature_cfg)`, which reads, checks and measures
    every clip and fills `report` (kept / dropped by rule / skipped for errors).
    """

    def __init__(self, examples: list[Example], durations: list[float], data_cfg: DataConfig,
                 feature_cfg: FeatureConfig, report: DataReport, cleaner: Cleaner | None = None):
        self.examples = examples
        self.durations = durations
        self.data_cfg = data_cfg
        self.featurizer = AudioFeaturizer(feature_cfg)
        self.report = report
        self.cleaner = cleaner if cleaner is not None else Cleaner(data_cfg.clean)

    @classmethod
    def scan(cls, sources: list[str], data_cfg: DataConfig, feature_cfg: FeatureConfig,
             desc: str = "scan") -> AudioTextDataset:
        report = DataReport()
        if not sources:
            raise DataError("no data sources given: set data.train / data.valid / data.test", "no_sources")
        examples = read_examples(sources, data_cfg.tasks, data_cfg.on_error, report, data_cfg.hf_options())
        if data_cfg.max_captions_per_clip:
            examples = _cap_captions(examples, data_cfg.max_captions_per_clip, report)
        if data_cfg.max_clips_per_task:
            examples = _first_clips(examples, data_cfg.max_clips_per_task, report)
        kept, durations = [], []
        cleaner = Cleaner(data_cfg.clean)
        for ex in tqdm(examples, desc=desc, unit="clip", leave=False, disable=None):
            try:
                wav = load_audio(ex.path, data=ex.audio_bytes)
            except AudioError as err:
                if data_cfg.on_error != "skip":
                    raise DataError(f"{ex.source}: {err} — fix or remove the entry, or set data.on_error=skip to "
                                    "skip (and count) clips that cannot be read", err.reason) from None
                report.skip(DataError(str(err), err.reason), ex.source)
                continue
            wav = cleaner(ex, wav, count=True)  # VAD trimming, loudness (common.cleaning); `wav` itself when off
            reason = "vad_no_speech" if wav is None else _drop_reason(wav, data_cfg)
            if reason:
                report.drop(reason, ex.source)
                continue
            kept.append(ex)
            durations.append(len(wav) / SAMPLE_RATE)
        kept, durations = cleaner.filter_captions(
            kept, durations, lambda i: cleaner(kept[i], load_audio(kept[i].path, data=kept[i].audio_bytes)), report)
        cleaner.save()
        report.cleaning.update(cleaner.report())
        report.kept = len(kept)
        report.kept_seconds = float(sum(durations))
        return cls(kept, durations, data_cfg, feature_cfg, report, cleaner)

    def __len__(self) -> int:
        return len(self.examples)

    def prompt(self, ex: Example) -> str:
        return ex.prompt if ex.prompt else self.data_cfg.prompts[ex.task]

    def load_wav(self, index: int) -> np.ndarray:
        """Item `index`'s audio `[samples]` (float32, 16 kHz), cleaned as the scan cleaned it."""
        ex = self.examples[index]
        return self.cleaner(ex, load_audio(ex.path, data=ex.audio_bytes))

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        wav = self.load_wav(index)
        item = self.featurizer(wav)
        item.update(text=ex.text, task=ex.task, prompt=self.prompt(ex), path=ex.path,
                    duration=self.durations[index], index=index)
        return item


def scan_split(data_cfg: DataConfig, feature_cfg: FeatureConfig, split: str, report_dir: str | Path,
               sources: list[str] | None = None) -> AudioTextDataset:
    """Scan one split (`data_cfg.train` / `valid` / `test`, or `sources`) and write its data report.

    Every stage that reads data goes through here, so each leaves `<report_dir>/data_report_<split>.json` (kept,
    dropped and skipped entries, per reason, and which ones) beside its outputs and prints the one-line summary.
    """
    sources = getattr(data_cfg, split) if sources is None else sources
    dataset = AudioTextDataset.scan(sources, data_cfg, feature_cfg, desc=f"scan {split}")
    path = Path(report_dir) / f"data_report_{split}.json"
    dataset.report.save(path)
    print(f"{split}: {dataset.report.summary()} (report: {path})")
    return dataset


class AudioTextCollator:
    """Pads a list of dataset items into a batch.

    Output keys: `mel` [batch, n_mels, frames] and `mel_frames` [batch] (frames holding audio); `fbank`
    [batch, max_frames, 128] with `fbank_padding_mask` [batch, max_frames] (True = padding, BEATs' convention),
    `fbank_tail` [batch, ≤ 4, 128] and `samples` [batch] (each clip's length in 16 kHz samples);
    `texts`, `tasks`, `prompts`, `paths` (lists);
    `index` [batch]; cached encoder outputs (`ENCODER_OUTPUTS`), when the items have them, zero-padded to
    [batch, max_frames, dim]. With a tokenizer also `target_ids` [batch, max_len] (target text + end token, right-padded
    with the pad id) and `labels` (the same with -100 at padding, ignored by the loss).
    """

    def __init__(self, tokenizer=None, max_target_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.max_target_tokens = max_target_tokens

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "mel": torch.stack([it["mel"] for it in items]),
            # Mel frames holding audio (10 ms each), for encoders that cut padding away.
            "mel_frames": torch.tensor([min(it["mel"].shape[-1], ceil(it["duration"] * 100)) for it in items]),
            "texts": [it["text"] for it in items],
            "tasks": [it["task"] for it in items],
            "prompts": [it["prompt"] for it in items],
            "paths": [it["path"] for it in items],
            "index": torch.tensor([it["index"] for it in items]),
        }
        if "fbank" in items[0]:
            batch["fbank"], batch["fbank_padding_mask"] = pad_sequences([it["fbank"] for it in items])
        if "fbank_tail" in items[0]:
            # For the official BEATs padding (`teacher.salmonn.official_fbank_batch`): each clip's tail frames and
            # its length in samples, from which the official padding mask is derived.
            batch["fbank_tail"] = pad_sequences([it["fbank_tail"] for it in items], BEATS_SILENT_FRAME)[0]
            batch["samples"] = torch.tensor([round(it["duration"] * SAMPLE_RATE) for it in items])
        for key in ENCODER_OUTPUTS:
            if key in items[0]:
                batch[key] = pad_sequences([it[key] for it in items])[0]
        if self.tokenizer is not None:
            batch["target_ids"], batch["labels"] = self.tokenize_targets(batch["texts"])
        return batch

    def tokenize_targets(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        if tok.eos_token_id is None or tok.pad_token_id is None:
            raise ValueError("the tokenizer needs an end token and a pad token to build targets")
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if self.max_target_tokens is not None:
            ids = [x[: self.max_target_tokens - 1] for x in ids]
        ids = [x + [tok.eos_token_id] for x in ids]
        length = max(len(x) for x in ids)
        target = torch.full((len(ids), length), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(ids), length), -100, dtype=torch.long)
        for row, x in enumerate(ids):
            target[row, : len(x)] = torch.tensor(x)
            labels[row, : len(x)] = torch.tensor(x)
        return target, labels


def pad_sequences(seqs: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `[length_i, dim]` tensors to `[batch, max_length, dim]`; mask is True at padding."""
    length = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), length, *seqs[0].shape[1:]), value)
    mask = torch.ones(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = False
    return out, mask


class DurationBucketSampler(Sampler[list[int]]):
    """Batches of clips with similar durations, so less of each batch is padding.

    Each epoch: shuffle all indices (seeded by `seed` + epoch), cut them into pools of `pool_batches`
    batches, sort each pool by duration, cut pools into batches and shuffle the batch order. Deterministic
    for a given (seed, epoch), which exact resume relies on. With several processes, each takes every
    `num_replicas`-th batch starting at `rank` (after dropping the tail that does not divide evenly).
    """

    def __init__(self, durations: list[float], batch_size: int, pool_batches: int = 50, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.durations = list(durations)
        self.batch_size = batch_size
        self.pool_batches = max(1, pool_batches)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        order = list(range(len(self.durations)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def _chunk(self, order: list[int]) -> list[list[int]]:
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def all_batches(self) -> list[list[int]]:
        """This epoch's batches for all ranks together."""
        order = self._order()
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: self.durations[i])
            batches.extend(self._chunk(chunk))
        if self.shuffle:
            random.Random(self.seed + self.epoch + 1_000_003).shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.all_batches()
        usable = len(batches) - len(batches) % self.num_replicas if self.num_replicas > 1 else len(batches)
        yield from batches[self.rank : usable : self.num_replicas]

    def __len__(self) -> int:
        n = len(self.durations) // self.batch_size
        if not self.drop_last and len(self.durations) % self.batch_size:
            n += 1
        return n // self.num_replicas if self.num_replicas > 1 else n

    def padding_report(self) -> dict:
        """Fraction of padded audio (seconds of padding / seconds in padded batches), bucketed vs random.

        Random batching is the same epoch's shuffled order cut into batches without sorting.
        """
        def padded_fraction(batches):
            total = sum(max(self.durations[i] for i in b) * len(b) for b in batches)
            real = sum(self.durations[i] for b in batches for i in b)
            return (total - real) / total if total > 0 else 0.0

        bucketed = padded_fraction(self.all_batches())
        rand = padded_fraction(self._chunk(self._order()))
        return {
            "padded_fraction_bucketed": round(bucketed, 4),
            "padded_fraction_random": round(rand, 4),
            "padding_saved": round(1 - bucketed / rand, 4) if rand > 0 else 0.0,
        }
