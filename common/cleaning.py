"""Data cleaning applied when a split is scanned: VAD trimming, loudness normalisation and a caption filter hook.

- VAD trimming (`silero-vad`, whose model ships inside its wheel) cuts the leading and trailing non-speech of ASR
  clips, keeping `vad_pad_ms` around the speech; a clip in which it finds no speech is dropped and counted.
- Loudness normalisation (ITU-R BS.1770 integrated loudness, `pyloudnorm`) scales every clip to `loudness_lufs`,
  with the gain capped so the peak stays below full scale (a clipped clip would be a different clip).
- A caption filter (`caption_filter: module:function`) scores captioning entries, e.g. with a CLAP model a user has
  on disk, and drops those it rejects.

What cleaning does to a clip is a `ClipPlan` (keep samples [start, end), multiply by gain): a few numbers, computed
once per clip when the split is scanned and kept in memory (and, with `cache_dir`, on disk), so reading the clip
again in every epoch, in the feature store's workers or in a later stage costs a slice and a multiply.
Plans are keyed by the clip's path, size and modification time (as `common.feature_store.store_key` keys clips)
and the cleaning options, so an edited file or a changed option computes a new plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.audio import SAMPLE_RATE, load_audio


@dataclass(frozen=True)
class CleanConfig:
    """Cleaning options of a split (`data.clean.*`); all off by default."""

    vad: bool = False
    """Trim leading and trailing non-speech of ASR clips (task `asr`) with silero-vad; clips without speech are
    dropped (`dropped.vad_no_speech` in the data report)."""
    vad_threshold: float = 0.5
    """Speech probability above which a 32 ms window counts as speech (silero-vad's default)."""
    vad_pad_ms: int = 100
    """Audio kept before the first and after the last speech window, in milliseconds."""
    loudness_lufs: float | None = None
    """Normalise every clip's integrated loudness (ITU-R BS.1770) to this level in LUFS (e.g. -23.0, EBU R128);
    null leaves levels alone. The gain is capped so the peak stays below 0 dBFS."""
    caption_filter: str = ""
    """`module:function` called with a list of (audio `[samples]` float32 16 kHz, caption) pairs of captioning
    entries, returning one bool per pair (True = keep), e.g. a CLAP similarity above a threshold. Empty: keep all."""
    caption_filter_batch: int = 32
    """Pairs per call of the caption filter."""
    cache_dir: str = ""
    """Folder for the clips' cleaning plans, so a later stage reading the same split does not run VAD and loudness
    metering again. Empty: plans live in memory for the run only."""

    @property
    def changes_audio(self) -> bool:
        return self.vad or self.loudness_lufs is not None


@dataclass(frozen=True)
class ClipPlan:
    """Keep samples [start, end) of the 16 kHz clip and multiply them by `gain` (linear); `loudness` says how the
    gain came about (`loudness_gain`'s outcome, empty without loudness normalisation)."""

    start: int
    end: int
    gain: float = 1.0
    loudness: str = ""

    def apply(self, wav: np.ndarray) -> np.ndarray:
        out = wav[self.start : self.end]
        return out if self.gain == 1.0 else (out * np.float32(self.gain)).astype(np.float32)


def clip_identity(path: str, audio_bytes: bytes | None) -> str:
    """`path|size|mtime_ns` of a clip on disk, `path|size|0` for audio stored inside a dataset."""
    if audio_bytes is not None:
        return f"{path}|{len(audio_bytes)}|0"
    stat = Path(path).stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def options_key(cfg: CleanConfig) -> str:
    """Hash of the options that change the audio (not of the filter or the cache folder)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith(("vad", "loudness"))}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


_VAD_MODEL = {}


def _vad_model():
    if "model" not in _VAD_MODEL:
        from silero_vad import load_silero_vad

        with warnings.catch_warnings():  # its loader's importlib.resources.path and torch.jit.load deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            _VAD_MODEL["model"] = load_silero_vad()
    return _VAD_MODEL["model"]


def speech_span(wav: np.ndarray, threshold: float, pad_ms: int) -> tuple[int, int] | None:
    """(first, last + 1) sample of the speech silero-vad finds in `wav` [samples] (16 kHz), padded by `pad_ms`
    and cut to the clip; None when it finds none."""
    from silero_vad import get_speech_timestamps

    spans = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(wav)), _vad_model(), threshold=threshold,
                                  sampling_rate=SAMPLE_RATE, speech_pad_ms=pad_ms)
    if not spans:
        return None
    return max(0, spans[0]["start"]), min(len(wav), spans[-1]["end"])


def loudness_gain(wav: np.ndarray, target_lufs: float) -> tuple[float, str]:
    """(linear gain bringing `wav` to `target_lufs`, outcome) where outcome is `normalised`, `peak_limited` (gain
    cut so the peak stays at -0.1 dBFS), `too_short` (under BS.1770's 0.4 s block: gain 1) or `silent` (gain 1)."""
    import pyloudnorm

    if len(wav) < int(0.4 * SAMPLE_RATE):
        return 1.0, "too_short"
    loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(wav.astype(np.float64))
    if not np.isfinite(loudness):
        return 1.0, "silent"
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    peak = float(np.max(np.abs(wav)))
    ceiling = 10.0 ** (-0.1 / 20.0)
    if peak * gain > ceiling:
        return ceiling / peak, "peak_limited"
    return gain, "normalised"


def load_function(spec: str, what: str) -> Callable:
    """The function named by `module:function`; errors name the setting and the fix."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"{what}: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{what}: module {module_name!r} has no function {name!r}")
    return fn


class Cleaner:
    """Applies a `CleanConfig` to clips, planning each clip once; counts what it did (`stats`)."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.plans: dict[str, ClipPlan | None] = {}
        self.stats: Counter = Counter()
        self._cache_file = None
        if cfg.cache_dir and cfg.changes_audio:
            self._cache_file = Path(cfg.cache_dir) / f"clean-{options_key(cfg)}.json"
            if self._cache_file.is_file():
                stored = json.loads(self._cache_file.read_text())
                self.plans = {k: ClipPlan(*v) if v is not None else None for k, v in stored.items()}

    def plan(self, path: str, audio_bytes: bytes | None, task: str, wav: np.ndarray | None = None) -> ClipPlan | None:
        """The clip's plan (None: VAD found no speech), from the cache or computed from its audio `wav` [samples]
        (read from `path` / `audio_bytes` when not given)."""
        key = clip_identity(path, audio_bytes) + f"|{task == 'asr'}"
        if key in self.plans:
            return self.plans[key]
        if wav is None:
            wav = load_audio(path, data=audio_bytes)
        start, end = 0, len(wav)
        if self.cfg.vad and task == "asr" and len(wav):
            span = speech_span(wav, self.cfg.vad_threshold, self.cfg.vad_pad_ms)
            if span is None:
                self.plans[key] = None
                return None
            start, end = span
        gain, outcome = 1.0, ""
        if self.cfg.loudness_lufs is not None:
            gain, outcome = loudness_gain(wav[start:end], self.cfg.loudness_lufs)
        self.plans[key] = ClipPlan(start, end, float(gain), outcome)
        return self.plans[key]

    def __call__(self, ex, wav: np.ndarray, count: bool = False) -> np.ndarray | None:
        """`wav` [samples] of example `ex` cleaned (itself when cleaning is off); None when VAD found no speech.
        With `count`, adds to `stats` (the scan counts each entry once)."""
        if not self.cfg.changes_audio:
            return wav
        plan = self.plan(ex.path, ex.audio_bytes, ex.task, wav)
        if count:
            self._count(ex, wav, plan)
        return None if plan is None else plan.apply(wav)

    def _count(self, ex, wav: np.ndarray, plan: ClipPlan | None) -> None:
        if self.cfg.vad and ex.task == "asr":
            self.stats["vad_clips"] += 1
            if plan is None:
                self.stats["vad_emptied"] += 1
                self.stats["vad_trimmed_seconds"] += len(wav) / SAMPLE_RATE
            elif plan.end - plan.start < len(wav):
                self.stats["vad_trimmed"] += 1
                self.stats["vad_trimmed_seconds"] += (len(wav) - (plan.end - plan.start)) / SAMPLE_RATE
        if self.cfg.loudness_lufs is not None and plan is not None:
            self.stats["loudness_clips"] += 1
            self.stats[f"loudness_{plan.loudness}"] += 1
            self.stats["loudness_gain_db_sum"] += 20.0 * np.log10(plan.gain)

    def save(self) -> None:
        """Write the plans to `cache_dir` (atomically) when it is set."""
        if self._cache_file is None:
            return
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        data = {k: None if p is None else dataclasses.astuple(p) for k, p in self.plans.items()}
        tmp = self._cache_file.with_suffix(f".tmp{id(self)}")
        tmp.write_text(json.dumps(data))
        tmp.replace(self._cache_file)

    def report(self) -> dict:
        """Counts for the data report (`cleaning`): entries trimmed and emptied by VAD, seconds trimmed,
        loudness-normalised entries and their mean gain, caption-filter counts."""
        out = {}
        s = self.stats
        if self.cfg.vad:
            out["vad"] = {"asr_entries": s["vad_clips"], "trimmed": s["vad_trimmed"], "emptied": s["vad_emptied"],
                          "trimmed_seconds": round(s["vad_trimmed_seconds"], 3)}
        if self.cfg.loudness_lufs is not None:
            n = s["loudness_clips"]
            out["loudness"] = {"target_lufs": self.cfg.loudness_lufs, "entries": n,
                               "mean_gain_db": round(s["loudness_gain_db_sum"] / n, 2) if n else 0.0,
                               "peak_limited": s["loudness_peak_limited"],
                               "left_alone_too_short": s["loudness_too_short"],
                               "left_alone_silent": s["loudness_silent"]}
        if self.cfg.caption_filter:
            out["caption_filter"] = {"function": self.cfg.caption_filter, "scored": s["filter_scored"],
                                     "dropped": s["filter_dropped"]}
        return out

    def filter_captions(self, examples: list, durations: list[float], load: Callable[[int], np.ndarray],
                        report) -> tuple[list, list[float]]:
        """Drop the captioning entries that `caption_filter` rejects (`dropped.caption_filter` in `report`).

        `load(i)` gives entry i's cleaned audio `[samples]`. Other tasks pass untouched."""
        if not self.cfg.caption_filter:
            return examples, durations
        fn = load_function(self.cfg.caption_filter, "data.clean.caption_filter")
        rows = [i for i, ex in enumerate(examples) if ex.task == "audiocaption"]
        keep = [True] * len(examples)
        size = max(1, self.cfg.caption_filter_batch)
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            verdicts = list(fn([(load(i), examples[i].text) for i in chunk]))
            if len(verdicts) != len(chunk):
                raise ValueError(f"data.clean.caption_filter {self.cfg.caption_filter}: returned {len(verdicts)} "
                                 f"verdicts for {len(chunk)} (audio, caption) pairs; return one bool per pair")
            for i, verdict in zip(chunk, verdicts, strict=True):
                keep[i] = bool(verdict)
        dropped = keep.count(False)
        self.stats["filter_scored"] += len(rows)
        self.stats["filter_dropped"] += dropped
        if dropped:
            report.dropped["caption_filter"] += dropped
        return ([ex for ex, k in zip(examples, keep, strict=True) if k],
                [d for d, k in zip(durations, keep, strict=True) if k])
