"""Which inference speed-ups help here: each model's TTFT and TPOT under every option of
`evaluation.inference_options` (eager or SDPA attention, static KV cache, `torch.compile` of the decode step and of
the encoders), as ratios to the baseline (the harness as it runs today) on the same loaded model, in one process.

    python -m evaluation.speedups --config configs/quick/evaluate.yaml
    python -m evaluation.speedups --config configs/quick/evaluate.yaml --models student --options compile_decode

Per model, the options share its weights and are timed round-robin (the order rotated every repetition, so drift on
a shared machine falls on all alike), after warm-ups that also compile; each timed run is the harness's own
(`evaluation.timing.latency_run`: TTFT = encoders + prefill + first argmax, TPOT = each of `efficiency.decode_steps`
cached steps). Medians, and paired ratios (median over repetitions of option / baseline in the same repetition).
Before timing, each option's greedy tokens on every clip are compared with the baseline's: an option must not change
what is generated. An option that fails (e.g. a module `torch.compile` cannot trace) is reported as skipped with the
reason; the others still run. Writes `<out>/speedups.json` and `<out>/speedups.md` (default out: the config's
`output_dir`/speedups). `key=value` after the options overrides the evaluation config (e.g. `efficiency.timed_runs=10`).

An option that helps can then be switched on in the harness itself (every model of `evaluation.run`, `repeatability`,
`gpu_check`): `efficiency.speedups.static_cache=true efficiency.speedups.compile_decode=true`, and so on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError, load_config
from common.model import AudioLanguageModel, Batch, move_batch
from evaluation.efficiency import paired_ratios
from evaluation.inference_options import (
    OPTIONS,
    OptionModel,
    attention_applied,
    greedy_tokens,
    prefill_length,
)
from evaluation.job import JobConfig, efficiency_clips, load_model, load_test_split, ready_for_timing
from evaluation.timing import EfficiencyConfig, Samples, check_clips, evaluating, latency_run, summarize, threads

COMPILE_CACHE_LIMIT = 64
"""Compiled graphs kept per function: one per clip length for the encoders, one per option for the decode step."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.speedups", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an evaluation config (configs/<preset>/evaluate.yaml)")
    parser.add_argument("--models", default="", help="comma-separated model names of the config (default all)")
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help=f"comma-separated, from {', '.join(OPTIONS)} (baseline is always timed)")
    parser.add_argument("--out", default="", help="folder for speedups.json and speedups.md "
                        "(default <output_dir>/speedups)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the evaluation config")
    args = parser.parse_args(argv)
    args.options = ["baseline"] + [o.strip() for o in args.options.split(",") if o.strip() and o.strip() != "baseline"]
    unknown = [o for o in args.options if o not in OPTIONS]
    if unknown:
        parser.error(f"--options: unknown {unknown}; choose from {list(OPTIONS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def job_config(args: argparse.Namespace) -> JobConfig:
    try:
        cfg = load_config(JobConfig, args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"speedups: config error in {args.config}: {err}") from None
    names = [ref.name for ref in cfg.models]
    unknown = [m for m in args.models if m not in names]
    if unknown:
        raise SystemExit(f"speedups: --models {unknown} are not in {args.config} (its models: {names})")
    if args.models:
        cfg.models = [ref for ref in cfg.models if ref.name in args.models]
    return ready_for_timing(cfg, "speedups", args.config)


def failure(err: BaseException) -> str:
    """One line for a skipped option: the error and where in our code or the library it was raised."""
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {message}{where}"[:300]


def bench_model(model: AudioLanguageModel, clips: Sequence[Batch], cfg: EfficiencyConfig,
                option_names: Sequence[str]) -> dict[str, Any]:
    """Every option in `option_names` (the first must be "baseline") on `model`, timed round-robin.

    Returns `{"max_cache_len", "options": {name: row}}`; a row holds the option's fields, `attention` (class →
    implementation actually run), `same_tokens` (its greedy tokens equal the baseline's on every clip),
    `max_logit_diff` (largest |logit − baseline logit| over clips and steps), `ttft`, `tpot` (`summarize`),
    `ttft_ms`, `tpot_ms` (medians), `ratio` (option / baseline: `ttft_ms`, `tpot_ms`, `ttft_ms_paired`,
    `tpot_ms_paired`) and `setup_s` (first run and warm-ups, compilation included); or `skipped` with the reason.
    """
    if option_names[0] != "baseline":
        raise ValueError("the first option must be 'baseline' (the ratios divide by it)")
    check_clips(clips)
    clips = [move_batch(clip, model.device) for clip in clips]
    max_cache_len = max(prefill_length(model, clip, cfg.prompt) for clip in clips) + cfg.decode_steps + 1
    rows: dict[str, dict[str, Any]] = {}
    ready: dict[str, OptionModel] = {}
    reference: list[tuple[list[int], torch.Tensor]] = []
    for name in option_names:
        option = OPTIONS[name]
        rows[name] = {"option": dataclasses.asdict(option)}
        started = time.perf_counter()
        try:
            wrapped = OptionModel(model, option, max_cache_len)
            with attention_applied(model, option.attention) as implementations:
                outputs = [greedy_tokens(wrapped, clip, cfg.prompt, cfg.decode_steps) for clip in clips]
                # compiled options meet every clip's shapes here, so no compilation falls into a timed run
                for repetition in range(max(cfg.warmup_runs, len(clips))):
                    latency_run(wrapped, clips[repetition % len(clips)], cfg)
        except Exception as err:  # one option's failure must not end the others' measurement
            if name == "baseline":
                raise
            rows[name]["skipped"] = failure(err)
            print(f"  {name}: skipped: {rows[name]['skipped']}", flush=True)
            continue
        if name == "baseline":
            reference = outputs
        rows[name]["attention"] = implementations
        rows[name]["same_tokens"] = all(tokens == base for (tokens, _), (base, _) in zip(outputs, reference,
                                                                                        strict=True))
        rows[name]["max_logit_diff"] = max(float((logits - base).abs().max())
                                           for (_, logits), (_, base) in zip(outputs, reference, strict=True))
        rows[name]["setup_s"] = time.perf_counter() - started
        ready[name] = wrapped
        print(f"  {name}: ready in {rows[name]['setup_s']:.1f} s", flush=True)
    samples = time_round_robin(model, ready, clips, cfg, rows)
    base = samples["baseline"]
    for name, runs in samples.items():
        ttft, tpot = summarize(runs.ttft_ms), summarize([ms for run in runs.tpot_ms_by_run for ms in run])
        rows[name].update(ttft=ttft, tpot=tpot, ttft_ms=ttft["median_ms"], tpot_ms=tpot["median_ms"])
    for name in samples:
        rows[name]["ratio"] = {"ttft_ms": rows[name]["ttft_ms"] / rows["baseline"]["ttft_ms"],
                               "tpot_ms": rows[name]["tpot_ms"] / rows["baseline"]["tpot_ms"],
                               **paired_ratios(samples[name], base)}
    return {"max_cache_len": max_cache_len, "options": rows}


def time_round_robin(model: AudioLanguageModel, ready: dict[str, OptionModel], clips: Sequence[Batch],
                     cfg: EfficiencyConfig, rows: dict[str, dict[str, Any]]) -> dict[str, Samples]:
    """`cfg.timed_runs` repetitions; in each, one latency run of every option, the order rotated by one each time.
    An option that fails here is dropped (its row marked skipped) and the others go on."""
    samples = {name: Samples() for name in ready}
    names = list(ready)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as the harness: a collection inside a timed step is noise (collected between repetitions)
    try:
        for repetition in range(cfg.timed_runs):
            gc.collect()
            shift = repetition % len(names)
            for name in names[shift:] + names[:shift]:
                if name not in samples:
                    continue
                try:
                    with attention_applied(model, OPTIONS[name].attention):
                        ttft, tpot = latency_run(ready[name], clips[repetition % len(clips)], cfg)
                except Exception as err:
                    if name == "baseline":
                        raise
                    rows[name] = {"option": rows[name]["option"], "skipped": f"failed while timed: {failure(err)}"}
                    del samples[name]
                    continue
                samples[name].ttft_ms.append(ttft)
                samples[name].tpot_ms_by_run.append(tpot)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def markdown(result: dict[str, Any]) -> str:
    """One table: a row per model × option, medians and ratios to that model's baseline."""
    settings = result["settings"]
    lines = [f"Speed-ups as ratios to each model's baseline (the harness as it runs today), one process, "
             f"{settings['timed_runs']} round-robin repetitions × {settings['decode_steps']} decode steps after "
             f"warm-ups, medians; threads {settings['threads']}, torch {settings['torch']}, "
             f"transformers {settings['transformers']}"
             + (f", load average {settings['load_average'][0]:.1f}." if "load_average" in settings else "."), "",
             f"Command: `{settings['command']}`", "",
             "| model | option | TTFT ms | TPOT ms | TTFT × baseline | TPOT × baseline | paired TTFT | paired TPOT "
             "| same tokens | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for model, block in result["models"].items():
        for name, row in block["options"].items():
            if "skipped" in row:
                lines.append(f"| {model} | {name} | – | – | – | – | – | – | – | skipped: "
                             f"{row['skipped'].replace('|', '/')} |")
                continue
            ratio = row["ratio"]
            note = attention_note(row, block["options"]["baseline"])
            lines.append(f"| {model} | {name} | {row['ttft_ms']:.2f} | {row['tpot_ms']:.3f} | {ratio['ttft_ms']:.3f} "
                         f"| {ratio['tpot_ms']:.3f} | {ratio['ttft_ms_paired']:.3f} | {ratio['tpot_ms_paired']:.3f} "
                         f"| {'yes' if row['same_tokens'] else '**no**'} | {note} |")
    return "\n".join(lines) + "\n"


def attention_note(row: dict[str, Any], baseline: dict[str, Any]) -> str:
    """For an attention option: the parts whose attention differs from the baseline's (or that it could not switch),
    or that none does: the row then repeats the baseline and shows the noise of the ratios."""
    if not row["option"]["attention"]:
        return ""
    changed = [f"{part} {impl}" for part, impl in row["attention"].items() if impl != baseline["attention"].get(part)]
    return ", ".join(changed) if changed else "every part already ran it: a repeat of the baseline"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = job_config(args)
    cfg.efficiency.throughput_runs = 0  # latency only
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_LIMIT)
    clips = efficiency_clips(load_test_split(cfg), cfg)
    import transformers

    result: dict[str, Any] = {"settings": {
        "command": "python -m evaluation.speedups " + " ".join(sys.argv[1:] if argv is None else argv),
        "options": args.options, "clips": len(clips), "warmup_runs": cfg.efficiency.warmup_runs,
        "timed_runs": cfg.efficiency.timed_runs, "decode_steps": cfg.efficiency.decode_steps,
        "threads": cfg.efficiency.threads or torch.get_num_threads(), "device": cfg.device, "dtype": cfg.dtype,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "order": "round-robin, rotated by one option every repetition"}, "models": {}}
    for ref in cfg.models:
        print(f"{ref.name}: {ref.path}", flush=True)
        model = load_model(ref, cfg.device, cfg.dtype)
        with evaluating([model]), threads(cfg.efficiency.threads):
            result["models"][ref.name] = bench_model(model, clips, cfg.efficiency, args.options)
        del model
        torch._dynamo.reset()  # the next model recompiles anyway: drop this one's graphs and their guards
        gc.collect()
    result["settings"]["load_average"] = os.getloadavg()  # other work on a shared CPU, for reading the ratios
    table = markdown(result)
    print("\n" + table)
    out = Path(args.out or Path(cfg.output_dir) / "speedups")
    out.mkdir(parents=True, exist_ok=True)
    (out / "speedups.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (out / "speedups.md").write_text(table)
    print(f"speedups: {len(result['models'])} models × {len(args.options)} options → {out}/speedups.{{json,md}}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
