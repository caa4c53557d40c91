"""Are the time ratios repeatable? Two efficiency evaluations of the same models, back to back in one process, and
their TTFT and TPOT ratios (model / reference) side by side, with the largest disagreement.

    python -m evaluation.repeatability --config configs/quick/evaluate.yaml
    python -m evaluation.repeatability --config configs/smoke/evaluate.yaml efficiency.timed_runs=40 threads=1

A benchmark, not a test: the answer depends on the machine and on what else runs on it. The target is agreement
within ±5 % on every ratio. Both the ratio of the headline statistics and the paired ratio (median over repetitions
of model / reference in the same repetition; see `evaluation.efficiency.compare`) are shown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from common.config import parse_cli
from evaluation.efficiency import compare
from evaluation.job import JobConfig, efficiency_clips, load_model, load_test_split, ready_for_timing

RATIOS = ("ttft_ms", "tpot_ms", "ttft_ms_paired", "tpot_ms_paired")
TOLERANCE = 0.05


def disagreement(first: float, second: float) -> float:
    """|second / first − 1|, the relative change of a ratio between the two evaluations."""
    return abs(second / first - 1)


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_cli(JobConfig, argv, description=__doc__.split("\n\n")[0], prog="evaluation.repeatability")
    ready_for_timing(cfg, "repeatability", "the config")
    cfg.efficiency.throughput_runs = 0  # latency ratios only
    clips = efficiency_clips(load_test_split(cfg), cfg)
    models = {ref.name: load_model(ref, cfg.device, cfg.dtype) for ref in cfg.models}
    reference = cfg.models[0].name
    runs, seconds = [], []
    for _ in range(2):
        started = time.perf_counter()
        runs.append(compare(models, clips, cfg.efficiency, reference=reference)["ratios"])
        seconds.append(time.perf_counter() - started)
    worst = 0.0
    header = f"{'model':<12}" + "".join(f"{key:>28}" for key in RATIOS)
    lines = [f"ratios to {reference}: run 1 → run 2 (relative change)", header]
    for name in models:
        if name == reference:
            continue
        cells = []
        for key in RATIOS:
            first, second = runs[0][name][key], runs[1][name][key]
            change = disagreement(first, second)
            worst = max(worst, change)
            cells.append(f"{first:.3f} → {second:.3f} ({change:+.1%})".replace("+", "±"))
        lines.append(f"{name:<12}" + "".join(f"{cell:>28}" for cell in cells))
    verdict = "agree" if worst <= TOLERANCE else "DISAGREE"
    threads = cfg.efficiency.threads or torch.get_num_threads()
    lines.append(f"largest change {worst:.1%}: the two evaluations {verdict} within ±{TOLERANCE:.0%} "
                 f"({cfg.efficiency.warmup_runs} warm-ups, {cfg.efficiency.timed_runs} timed runs × "
                 f"{cfg.efficiency.decode_steps} steps, threads {threads}, "
                 f"{seconds[0]:.0f} s + {seconds[1]:.0f} s, load average {os.getloadavg()[0]:.1f})")
    print("\n".join(lines))
    result = {"ratios": runs, "largest_change": worst, "seconds": seconds, "load_average": os.getloadavg()}
    out = Path(cfg.output_dir) / "repeatability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
