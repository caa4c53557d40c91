"""An evaluation job's config and its inputs: the model references, the test split and the fixed clips timed at
batch 1. `evaluation.run` (quality and efficiency), `evaluation.gpu_check` (absolute GPU times) and
`evaluation.repeatability` (two runs side by side) all read one `configs/<preset>/evaluate.yaml` through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from common.audio import SAMPLE_RATE, load_audio
from common.dataset import AudioTextCollator, DataConfig, scan_split
from common.decode import GenerationConfig
from common.device import InferenceDtype
from common.feature_store import with_feature_store
from common.features import AudioFeaturizer, FeatureConfig
from common.model import AudioLanguageModel
from common.scoring import select_clips
from evaluation.efficiency import EfficiencyConfig
from evaluation.models import load_model as load_model_folder


@dataclass
class ModelRef:
    name: str = "teacher"
    """Name in the outputs (`<output_dir>/<name>/results.json`)."""
    loader: str = "teacher.checkpoint:load_model_folder"
    """`module:function` taking the path and returning an AudioLanguageModel; empty: chosen from the folder's files
    (`evaluation.models.folder_kind`: any stage's folder)."""
    path: str = ""
    quality: bool = True
    """Decode and score this model; false measures only its efficiency (e.g. the teacher as the reference of
    ratios, when its quality was scored once elsewhere). Its quality metrics are then null with the reason."""


@dataclass
class JobConfig:
    """Evaluate model stages on a test split."""

    job: ClassVar[str] = "evaluation.run"
    """The command that runs this config (its YAML's `job:`); `evaluation.gpu_check` and `evaluation.repeatability`
    read the same YAML."""

    models: list[ModelRef] = field(default_factory=list)
    """The first model is the reference for efficiency ratios."""
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_store: str = ""
    """Folder of precomputed split features (see common.feature_store); empty computes them on the fly."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    efficiency_clips: int = 4
    """Fixed test clips (the first ones of each task) used for TTFT/TPOT at batch 1."""
    max_clips_per_task: int = 0
    """Score only the first N clips of each task (0 = all)."""
    batch_size: int = 16
    threads: int = 0
    """torch CPU threads (0 = leave torch's default); timings are only comparable at equal threads."""
    device: str = "auto"
    """auto (the GPU if there is one), cpu, cuda or cuda:N; every model runs there."""
    dtype: InferenceDtype = "auto"
    """Weights' dtype: auto is float16 on a GPU (V100: no bf16) and float32 on the CPU; int8 weights only move."""
    load: Literal["together", "one_at_a_time"] = "together"
    """together: every model in memory at once, timed interleaved in one run (what a noisy CPU needs for
    ratios); one_at_a_time: each model loaded, timed and scored alone, then freed (a 13B teacher and its students
    do not fit one 32 GB V100 together); the ratios then come from separate runs."""
    caption_cache_dir: str = ""
    """Where the caption metrics' jars are linked (empty: ~/.cache/smolt/caption_metrics)."""
    output_dir: str = "outputs/eval"


def load_model(ref: ModelRef, device: str = "cpu", dtype: InferenceDtype = "float32") -> AudioLanguageModel:
    return load_model_folder(ref.loader, ref.path, device, dtype, where=f"models[{ref.name}].loader")


def ready_for_timing(cfg: JobConfig, command: str, source: str) -> JobConfig:
    """`cfg` checked and settled for a timing benchmark: every model folder exists (else SystemExit naming the missing
    ones, `command` and `source` the config file), a feature store that is not there is computed on the fly instead,
    and `threads` is the efficiency threads when those are unset."""
    if not cfg.models:
        raise SystemExit(f"{command}: {source} lists no models; add {{name, loader, path}} entries to `models`")
    missing = [f"{ref.name}: {ref.path}" for ref in cfg.models if not Path(ref.path).exists()]
    if missing:
        raise SystemExit(f"{command}: model folders of {source} missing ({'; '.join(missing)}); build them with "
                         "`bash scripts/distill.sh --preset <preset>` or pass models=[...]")
    if cfg.feature_store and not Path(cfg.feature_store).exists():
        cfg.feature_store = ""
    if cfg.threads and not cfg.efficiency.threads:
        cfg.efficiency.threads = cfg.threads
    return cfg


def efficiency_clips(dataset, cfg: JobConfig) -> list[dict]:
    """The first `efficiency_clips` clips, alternating tasks, each a batch of one.

    They are padded to a common length (so the throughput harness can stack them into larger batches), which
    every model sees alike.
    """
    chosen, _ = select_clips(dataset, 0)
    per_task = [chosen[t] for t in sorted(chosen)]
    picked = [ids[i] for i in range(cfg.efficiency_clips) for ids in per_task if i < len(ids)]
    picked = picked[: cfg.efficiency_clips]
    seconds = cfg.efficiency.input_seconds
    items = [dataset[i] for i in picked] if seconds is None else [
        fixed_length_item(dataset, i, seconds, cfg.features) for i in picked]
    batch = AudioTextCollator()(items)
    return [{k: v[row : row + 1] for k, v in batch.items()} for row in range(len(batch["texts"]))]


def fixed_length_item(dataset, start: int, seconds: float, features: FeatureConfig) -> dict:
    """An item of exactly `seconds` of audio: test clips from `start` on, concatenated and cut (the hackathon
    evaluator timed 10 s inputs)."""
    if seconds > features.whisper_chunk_seconds:
        raise SystemExit(f"config error: efficiency.input_seconds={seconds} exceeds the Whisper window of "
                         f"{features.whisper_chunk_seconds} s (features.whisper_chunk_seconds)")
    need = int(seconds * SAMPLE_RATE)
    pieces, index = [], start
    while sum(len(p) for p in pieces) < need:
        ex = dataset.examples[index % len(dataset.examples)]
        pieces.append(load_audio(ex.path, data=ex.audio_bytes))
        index += 1
    wav = np.concatenate(pieces)[:need]
    item = AudioFeaturizer(features)(wav)
    ex = dataset.examples[start]
    item.update(text=ex.text, task=ex.task, prompt=dataset.prompt(ex), path=ex.path, duration=seconds, index=start)
    return item


def load_test_split(cfg: JobConfig):
    """The test split, its data report written to `<output_dir>/data_report_test.json`."""
    dataset = scan_split(cfg.data, cfg.features, "test", cfg.output_dir)
    if cfg.feature_store:
        dataset = with_feature_store(dataset, cfg.features, cfg.feature_store, "test")
    return dataset


def evaluation_inputs(cfg: JobConfig) -> list[str]:
    """What an evaluation reads besides its config: every model's folder and the test annotation files, so that a
    retrained stage or regenerated data makes a finished evaluation stale."""
    return [ref.path for ref in cfg.models] + list(cfg.data.test)
