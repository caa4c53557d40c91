"""Generate the toy benchmark: python -m toybench.generate --config configs/toy/data.yaml [key=value ...]

Prints a short summary as JSON; see toybench/pipeline.py for the output layout. Generation is skipped when
the folder already holds a finished run of the same settings (`--force` regenerates).
"""

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.cli import run
from common.config import parse_cli
from toybench.config import PRESETS, ToyBenchConfig, preset
from toybench.pipeline import generate, verify_manifest

# The public API in one import: from toybench.generate import ToyBenchConfig, generate, preset
__all__ = ["PRESETS", "JobConfig", "ToyBenchConfig", "generate", "main", "preset", "verify_manifest"]


@dataclass
class JobConfig:
    """Generate the toy ASR + audio-captioning benchmark."""

    out_dir: str = "data/toy"
    size: Literal["default", "smoke"] = "default"
    """Size preset: default (3000/300/300 clips per task) or smoke (48/12/12)."""
    seed: int = 0
    """Master seed; the same seed gives byte-identical files."""
    workers: int = 2
    """Worker processes; the output does not depend on it."""


def main(argv: list[str] | None = None) -> dict:
    cfg, force = parse_cli(JobConfig, argv)
    bench = preset(cfg.size, seed=cfg.seed, workers=cfg.workers)
    summary = generate(bench, Path(cfg.out_dir), force=force)
    keys = ("out_dir", "skipped", "seconds", "clips", "hours", "bytes")
    print(json.dumps({key: summary[key] for key in keys}, indent=1, default=str))
    return summary


if __name__ == "__main__":
    run(main)
