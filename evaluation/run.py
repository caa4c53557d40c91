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
from pathlib import Path

import torch

from common.cli import run
from common.config import parse_cli, save_resolved
from common.decode import decode as decode_clips
from common.model import AudioLanguageModel
from common.results import (
    QUALITY_KEYS,
    build_results,
    efficiency_metrics,
    format_summary,
    load_results,
    write_results,
)
from common.scoring import score_clips
from common.stages import EVALUATED, clear_marker, mark_stage_done, stage_is_current
from evaluation.efficiency import compare, ratios
from evaluation.job import JobConfig, efficiency_clips, evaluation_inputs, load_model, load_test_split
from evaluation.memory import release_memory


def quality(model: AudioLanguageModel, dataset, cfg: JobConfig, out_dir: Path,
            cache_dir: Path | None) -> tuple[dict, dict, dict]:
    """`common.scoring.score_clips` with this job's clip limit, batch size and generation settings."""
    return score_clips(model, dataset, out_dir, cache_dir, cfg.max_clips_per_task, cfg.batch_size, cfg.generation)


def decode(model: AudioLanguageModel, dataset, indices: list[int], cfg: JobConfig) -> list[str]:
    return decode_clips(model, dataset, indices, cfg.batch_size, cfg.generation)


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


def main(argv: list[str] | None = None) -> dict:
    cfg, force = parse_cli(JobConfig, argv)
    if not cfg.models:
        raise SystemExit("config error: `models` is empty; list at least one {name, loader, path}")
    out_root = Path(cfg.output_dir)
    inputs = evaluation_inputs(cfg)
    if stage_is_current(cfg, out_root, EVALUATED, inputs) and not force:
        print(f"evaluation up to date: {out_root} (use --force to evaluate again)")
        print((out_root / "table.md").read_text(), end="")
        return {ref.name: load_results(out_root / ref.name / "results.json") for ref in cfg.models}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    clear_marker(out_root, EVALUATED)  # written again, last, when every result is in place
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
    mark_stage_done(cfg, out_root, EVALUATED, inputs)
    return all_results


if __name__ == "__main__":
    run(main)
