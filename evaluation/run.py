"""Evaluate one or more model stages on the same test clips: quality, efficiency, one results.json each.

    python -m evaluation.run --config configs/toy/evaluate.yaml

Every model is loaded by a `module:function` loader from a folder, so any stage (teacher, student, pruned,
int8) plugs in through the `AudioLanguageModel` interface. Efficiency is measured for all models in one
process, interleaved, and the ratios to the first model (the reference, normally the teacher) are written
to `comparison.json`: on a noisy CPU only ratios taken in one run mean something.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common.audio import SAMPLE_RATE, load_audio
from common.cli import run
from common.config import mark_stage_done, parse_cli, save_resolved, stage_is_current
from common.dataset import AudioTextCollator, DataConfig, scan_split
from common.decode import GenerationConfig
from common.decode import decode as decode_clips
from common.device import InferenceDtype
from common.feature_store import with_feature_store
from common.features import AudioFeaturizer, FeatureConfig
from common.model import AudioLanguageModel
from common.results import (
    QUALITY_KEYS,
    build_results,
    efficiency_metrics,
    format_summary,
    load_results,
    write_results,
)
from common.scoring import score_clips, select_clips
from evaluation.efficiency import EfficiencyConfig, compare, ratios, release_memory
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


def quality(model: AudioLanguageModel, dataset, cfg: JobConfig, out_dir: Path,
            cache_dir: Path | None) -> tuple[dict, dict, dict]:
    """`common.scoring.score_clips` with this job's clip limit, batch size and generation settings."""
    return score_clips(model, dataset, out_dir, cache_dir, cfg.max_clips_per_task, cfg.batch_size, cfg.generation)


def decode(model: AudioLanguageModel, dataset, indices: list[int], cfg: JobConfig) -> list[str]:
    return decode_clips(model, dataset, indices, cfg.batch_size, cfg.generation)


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


def comparison_table(results: dict[str, dict], ratios: dict[str, dict], reference: str) -> str:
    """Markdown: one line per model, quality and efficiency, ratios to `reference` (measured in one process)."""
    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = ["| model | WER | CIDEr-D | params | weight MB | params × | weight bytes × | peak memory × | TTFT × | "
             "TPOT × | prefill FLOPs × | decode bytes × | TPOT / floor |", "|---" * 13 + "|"]
    for name, r in results.items():
        q = ratios[name]
        floor = r.get("tpot_floor_ms")
        over = None if floor is None else r["tpot_ms"] / floor
        lines.append(f"| {name} | {fmt(r['wer'], '.3f')} | {fmt(r['cider_d'], '.3f')} | {r['params']:,} | "
                     f"{r['weight_bytes'] / 2**20:.1f} | {fmt(q['params'], '.3f')} | "
                     f"{fmt(q['weight_bytes'], '.3f')} | "
                     f"{fmt(q['peak_memory_mb'], '.3f')} | {fmt(q['ttft_ms'], '.3f')} | {fmt(q['tpot_ms'], '.3f')} | "
                     f"{fmt(q.get('prefill_flops'), '.3f')} | {fmt(q.get('decode_bytes'), '.3f')} | "
                     f"{fmt(over, '.1f')} |")
    return "\n".join([f"Ratios (×) are to `{reference}`, measured in the same process; prefill FLOPs and decode bytes "
                      "(per output token: weights + KV cache) are analytic, from the models' shapes; TPOT / floor is "
                      "the measured TPOT over decode bytes / the machine's measured memory bandwidth.", "", *lines])


DONE_MARKER = "EVALUATED"
"""The file that marks a finished evaluation in its output folder, with the key of its config and inputs (not `DONE`:
`experiments.ablation` keeps its own marker of that name in the evaluation folders it plans)."""


def evaluation_inputs(cfg: JobConfig) -> list[str]:
    """What an evaluation reads besides its config: every model's folder and the test annotation files, so that a
    retrained stage or regenerated data makes a finished evaluation stale."""
    return [ref.path for ref in cfg.models] + list(cfg.data.test)


def main(argv: list[str] | None = None) -> dict:
    cfg, force = parse_cli(JobConfig, argv)
    if not cfg.models:
        raise SystemExit("config error: `models` is empty; list at least one {name, loader, path}")
    out_root = Path(cfg.output_dir)
    inputs = evaluation_inputs(cfg)
    if stage_is_current(cfg, out_root, DONE_MARKER, inputs) and not force:
        print(f"evaluation up to date: {out_root} (use --force to evaluate again)")
        print((out_root / "table.md").read_text(), end="")
        return {ref.name: load_results(out_root / ref.name / "results.json") for ref in cfg.models}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    (out_root / DONE_MARKER).unlink(missing_ok=True)  # written again, last, when every result is in place
    save_resolved(cfg, out_root)
    dataset = load_test_split(cfg)
    cache_dir = Path(cfg.caption_cache_dir) if cfg.caption_cache_dir else None
    clips = efficiency_clips(dataset, cfg)
    if cfg.load == "together":
        models = {ref.name: load_model(ref, cfg.device, cfg.dtype) for ref in cfg.models}
        report = compare(models, clips, cfg.efficiency, reference=cfg.models[0].name)
    else:  # one model in memory at a time: efficiency from separate runs, ratios formed afterwards
        models, report = {}, {"models": {}}
    all_results = {}
    for ref in cfg.models:
        if cfg.load == "one_at_a_time":
            models[ref.name] = load_model(ref, cfg.device, cfg.dtype)
            alone = compare({ref.name: models[ref.name]}, clips, cfg.efficiency)
            report["settings"] = alone["settings"]
            report["models"][ref.name] = alone["models"][ref.name]
        model = models[ref.name]
        if ref.quality:
            metrics, settings, unavailable = quality(model, dataset, cfg, out_root / ref.name, cache_dir)
        else:
            metrics, settings = {}, {}
            unavailable = {key: "quality not scored in this run (models[].quality: false)" for key in QUALITY_KEYS}
        eff_values, eff_unavailable = efficiency_metrics(report["models"][ref.name])
        settings["efficiency"] = report["settings"]
        settings["placement"] = {"device": str(model.device), "dtype": cfg.dtype, "load": cfg.load}
        results = build_results({**metrics, **eff_values}, settings, {**unavailable, **eff_unavailable},
                                model=ref.name, path=ref.path, efficiency=report["models"][ref.name],
                                data=dataset.report.to_dict())
        write_results(out_root / ref.name / "results.json", results)
        summary = format_summary(results)
        (out_root / ref.name / "summary.txt").write_text(summary + "\n")
        print(summary)
        all_results[ref.name] = results
        if cfg.load == "one_at_a_time":
            del models[ref.name], model
            release_memory()
    if cfg.load == "one_at_a_time":
        reference = cfg.models[0].name
        report["reference"] = reference
        report["ratios"] = {name: ratios(r, report["models"][reference]) for name, r in report["models"].items()}
    comparison = {"reference": report["reference"], "ratios": report["ratios"],
                  "quality": {name: {k: r.get(k) for k in ("wer", "cer", "cider_d", "spider")}
                              for name, r in all_results.items()}}
    (out_root / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    table = comparison_table(all_results, report["ratios"], report["reference"])
    (out_root / "table.md").write_text(table + "\n")
    print(table)
    mark_stage_done(cfg, out_root, DONE_MARKER, inputs)
    return all_results


if __name__ == "__main__":
    run(main)
