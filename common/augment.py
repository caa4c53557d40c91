"""Training-time augmentation of the encoders' inputs: speed perturbation, additive noise, SpecAugment masks.

All off by default. `with_augmentation` wraps a training split only (teacher.train's `load_split` does this for
`train`); valid and test splits are never augmented. Each item draws its randomness from
`numpy.random.default_rng([seed, epoch, index])`, so the same seed gives the same augmented batch at the same
step, an exact resume reproduces it, and another seed or epoch gives a different one.

- Speed perturbation (Ko et al., 2015): resample the waveform by a factor drawn from {1 - s, 1, 1 + s}, which
  changes tempo and pitch; the clip's duration changes with it.
- Additive noise at `noise_snr_db` dB below the clip's mean power, with probability `noise_prob`: white Gaussian
  noise, or a random stretch of a random recording from `noise_dir` (e.g. MUSAN's noise folder), looped if short.
- SpecAugment (Park et al., 2019): `time_masks` time spans and `freq_masks` frequency bands of Whisper's log-mel are
  set to the clip's mean level; BEATs' fbank gets the same time spans (both use 10 ms frames) and the same bands
  scaled to its 128 bins. Masks fall inside the clip's audio, never on Whisper's padding.

Waveform augmentations need the audio, so with a feature store the clip is read and featurized again (the store's
features are of the unaugmented clip); SpecAugment alone works on the stored features.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass
from math import ceil
from pathlib import Path

import numpy as np
import soxr

from common.audio import SAMPLE_RATE, load_audio
from common.config import added_option
from common.views import DatasetView


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of the training split (`data.augment.*`); all off by default."""

    speed_perturb: float = 0.0
    """s > 0: resample each clip by a factor drawn uniformly from {1 - s, 1, 1 + s} (0.1 is the usual choice)."""
    noise_snr_db: float | None = None
    """Add white Gaussian noise at this signal-to-noise ratio (dB); null: no noise."""
    noise_prob: float = 0.5
    """Probability that a clip gets noise (with `noise_snr_db` set)."""
    noise_dir: str = ""
    """Folder of noise recordings (any file soundfile reads; subfolders too) to draw the noise from; empty: white
    Gaussian noise."""
    time_masks: int = 0
    """SpecAugment time masks per clip."""
    time_mask_frames: int = 40
    """Longest time mask in 10 ms frames; a mask never covers more than a fifth of the clip."""
    freq_masks: int = 0
    """SpecAugment frequency masks per clip."""
    freq_mask_bins: int = 15
    """Widest frequency mask in Whisper mel bins (of `features.whisper_n_mels`); BEATs' fbank gets the same share
    of its 128 bins."""
    stored_copies: int = added_option(0)
    """With frozen encoders whose outputs are stored (`teacher.train`'s `encoder_store`): store their outputs for K
    augmented copies of every training clip, copy c drawn as epoch c draws it, each computed once; epoch e then
    reads copy e mod K (offline augmentation, as Kaldi's speed perturbation keeps its copies). 0: augmentation and
    an encoder store are refused together, since the store holds the unaugmented clips' outputs."""

    @property
    def changes_waveform(self) -> bool:
        return self.speed_perturb > 0 or self.noise_snr_db is not None

    @property
    def active(self) -> bool:
        return self.changes_waveform or self.time_masks > 0 or self.freq_masks > 0

    def check(self) -> None:
        """Raise ValueError naming the setting when a value is out of range."""
        if not 0.0 <= self.speed_perturb < 1.0:
            raise ValueError(f"data.augment.speed_perturb must be in [0, 1), got {self.speed_perturb}")
        if not 0.0 <= self.noise_prob <= 1.0:
            raise ValueError(f"data.augment.noise_prob must be in [0, 1], got {self.noise_prob}")
        for name in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins", "stored_copies"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.augment.{name} must be ≥ 0, got {getattr(self, name)}")


def speed_perturb(wav: np.ndarray, factor: float) -> np.ndarray:
    """`wav` [samples] (16 kHz) played `factor` times faster: len(wav) / factor samples."""
    if factor == 1.0 or len(wav) == 0:
        return wav
    # Reading the clip as if it were recorded at factor × 16 kHz and resampling to 16 kHz speeds it up by factor.
    return soxr.resample(wav, SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ").astype(np.float32)


NOISE_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def noise_files(folder: str) -> list[Path]:
    """The audio files under `folder`, sorted (so a seed picks the same file on every machine)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in NOISE_SUFFIXES)
    if not files:
        raise ValueError(f"data.augment.noise_dir {folder}: no audio files ({', '.join(NOISE_SUFFIXES)}) in it; "
                         "point it at a folder of noise recordings or set it to '' for white noise")
    return files


def add_noise(wav: np.ndarray, snr_db: float, rng: np.random.Generator,
              noise: np.ndarray | None = None) -> np.ndarray:
    """`wav` [samples] plus noise whose power is `snr_db` dB below the clip's mean power: a random stretch of
    `noise` [samples] (looped when shorter than the clip), or white Gaussian noise when `noise` is None."""
    power = float(np.mean(wav.astype(np.float64) ** 2)) if len(wav) else 0.0
    if power == 0.0:
        return wav
    if noise is None or not np.any(noise):
        noise = rng.standard_normal(len(wav))
    else:
        start = int(rng.integers(0, len(noise)))
        noise = np.resize(np.roll(noise, -start), len(wav)).astype(np.float64)  # np.resize repeats the stretch
    noise = noise * np.sqrt(power / 10.0 ** (snr_db / 10.0) / np.mean(noise**2))
    return (wav + noise).astype(np.float32)


def _spans(rng: np.random.Generator, count: int, widest: int, length: int) -> list[tuple[int, int]]:
    spans = []
    for _ in range(count):
        width = int(rng.integers(0, min(widest, length) + 1))
        start = int(rng.integers(0, length - width + 1))
        spans.append((start, start + width))
    return spans


def spec_augment(item: dict, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[int, int]:
    """Mask `item["mel"]` [n_mels, frames] and, if present, `item["fbank"]` [frames, 128] in place (copies);
    `item["duration"]` (seconds) bounds the time masks. Returns (time masks, frequency masks) drawn."""
    mel = item["mel"].clone()
    n_mels, frames = mel.shape
    frames = min(frames, max(1, ceil(item["duration"] * 100)))  # mel frames holding audio, as the collator counts
    times = _spans(rng, cfg.time_masks, min(cfg.time_mask_frames, frames // 5), frames)
    bands = _spans(rng, cfg.freq_masks, cfg.freq_mask_bins, n_mels)
    # The clip's mean level stands in for the masked values: Whisper's log-mel has no zero level meaning "nothing".
    fill = mel[:, :frames].mean()
    for start, end in times:
        mel[:, start:end] = fill
    for start, end in bands:
        mel[start:end, :frames] = fill
    item["mel"] = mel
    if "fbank" in item:
        fbank = item["fbank"].clone()
        bins = fbank.shape[1]
        fill = fbank.mean()
        for start, end in times:
            fbank[start:end] = fill
        for start, end in bands:
            fbank[:, start * bins // n_mels : ceil(end * bins / n_mels)] = fill
        item["fbank"] = fbank
    return len(times), len(bands)


class AugmentedDataset(DatasetView):
    """A training split whose items are augmented per (seed, epoch, index); `set_epoch` is called by
    `common.training.fit`. Wraps an `AudioTextDataset` or a feature-store view of one (same item indices);
    `examples`, `durations`, `report` and `prompt` pass through. `counts` tallies what was drawn."""

    def __init__(self, dataset, cfg: AugmentConfig, seed: int):
        self.dataset = dataset
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.counts: Counter = Counter()
        root = dataset
        while not hasattr(root, "load_wav") and hasattr(root, "dataset"):
            root = root.dataset
        if cfg.changes_waveform and (not hasattr(root, "load_wav") or len(root) != len(dataset)):
            raise ValueError("waveform augmentation (data.augment.speed_perturb / noise_snr_db) needs an "
                             "AudioTextDataset or a feature-store view of one with the same items")
        self.root = root
        self.noise_files = noise_files(cfg.noise_dir) if cfg.noise_dir and cfg.noise_snr_db is not None else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, self.epoch, index])
        self.counts["items"] += 1
        if cfg.changes_waveform:
            wav = self.root.load_wav(index)
            if cfg.speed_perturb > 0:
                factor = float(rng.choice([1.0 - cfg.speed_perturb, 1.0, 1.0 + cfg.speed_perturb]))
                wav = speed_perturb(wav, factor)
                self.counts["speed_changed"] += factor != 1.0
            if cfg.noise_snr_db is not None and rng.random() < cfg.noise_prob:
                noise = None
                if self.noise_files:
                    noise = load_audio(self.noise_files[int(rng.integers(len(self.noise_files)))])
                wav = add_noise(wav, cfg.noise_snr_db, rng, noise)
                self.counts["noise_added"] += 1
            item.update(self.root.featurizer(wav))
            item["duration"] = len(wav) / SAMPLE_RATE
        if cfg.time_masks or cfg.freq_masks:
            times, bands = spec_augment(item, cfg, rng)
            self.counts["time_masks"] += times
            self.counts["freq_masks"] += bands
        return item


def with_augmentation(dataset, cfg: AugmentConfig, seed: int):
    """`dataset` (a training split) augmented as `cfg` says, or itself when augmentation is off. The settings go
    into the split's data report (`cleaning.augment`)."""
    if not cfg.active:
        return dataset
    cfg.check()
    dataset.report.cleaning["augment"] = {**dataclasses.asdict(cfg), "seed": seed}
    return AugmentedDataset(dataset, cfg, seed)


def augmentation_key(dataset: AugmentedDataset) -> str:
    """A short hash of what the augmented items depend on besides the clips: the settings and the seed."""
    settings = {k: v for k, v in dataclasses.asdict(dataset.cfg).items() if k != "stored_copies"}
    return hashlib.sha256(repr((sorted(settings.items()), dataset.seed)).encode()).hexdigest()[:12]


class StoredCopies(DatasetView):
    """Training items from K views of the same split (stored encoder outputs of K augmented copies, `stored_copies`):
    epoch e reads copy e mod K (`set_epoch`, called by `common.training.fit`)."""

    def __init__(self, copies: list):
        if not copies or any(len(c) != len(copies[0]) for c in copies):
            raise ValueError("StoredCopies needs one or more views of the same split")
        self.copies = copies
        self.dataset = copies[0]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        return self.copies[self.epoch % len(self.copies)][index]
