"""Print a SALMONN's parameters per part and the checkpoint key report; exit 1 if a trained key is missing.

    python -m teacher.inspect --config configs/teacher/salmonn-13b.yaml
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import sys
from dataclasses import dataclass, field

from common.cli import run
from common.config import parse_cli
from evaluation.efficiency import count_parameters, weight_bytes
from teacher.build import CheckpointError, SalmonnConfig, build_salmonn


@dataclass
class JobConfig:
    """Inspect a SALMONN built from local checkpoints."""

    model: SalmonnConfig = field(default_factory=SalmonnConfig)


def describe(model) -> str:
    parts = model.parts()
    counts = count_parameters(model, parts)
    sizes = weight_bytes(model, parts)
    lines = [f"{'part':<20}{'params':>16}{'weight MB':>12}"]
    for name, n in counts["per_part"].items():
        lines.append(f"{name:<20}{n:>16,}{sizes['per_part'].get(name, 0) / 2**20:>12.1f}")
    lines.append(f"{'total':<20}{counts['total']:>16,}{sizes['total'] / 2**20:>12.1f}")
    lines.append(f"{'trainable':<20}{counts['trainable']:>16,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(JobConfig, argv)
    try:
        model, report = build_salmonn(cfg.model)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(model))
    if report is None:
        print("no SALMONN checkpoint configured (model.checkpoint): the Q-Former, projection and LoRA are fresh")
        return 0
    print(report.summary())
    return 1 if report.missing_trained else 0


if __name__ == "__main__":
    run(main)
