"""The distillation recipe: a student learns from the teacher's logits and Q-Former features.

    python -m distill.train --config configs/toy/distill.yaml [key=value ...]

setup: data (the same split and keys as the teacher cache), the teacher (its cache, or the model itself when
`kd.teacher=online`), the student (built from the teacher, or `init_from` an existing student, e.g. a pruned
one for recovery), and the KD terms → fit (the shared loop) → the student saved in the official layouts.

loss = w_ce · CE + w_kd · logit KD + w_feat · Q-Former feature KD (+ w_hidden · Whisper hidden-state KD, online).
The pieces and the run itself live in `distill.distiller` (the library); this module is the command.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

from dataclasses import dataclass

from common.cli import run
from common.config import parse_cli
from distill.distiller import DistillConfig, run_distillation


@dataclass
class JobConfig(DistillConfig):
    """Distil a student from a SALMONN teacher."""


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    return run_distillation(cfg, force)


if __name__ == "__main__":
    run(main)
