"""Validation during training: decode part of the valid split and score it (WER, CIDEr-D), as the teacher's and the
student's training loops log it (`eval/wer`, `eval/cider_d`, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.decode import GenerationConfig
from common.scoring import score_clips


@dataclass
class ValidationConfig:
    max_clips_per_task: int = 48
    """Valid clips decoded per task at each evaluation (the valid split is small; the test split is for the end)."""
    max_new_tokens: int = 40
    batch_size: int = 24


def validator(v: ValidationConfig, valid, out_dir: Path):
    """A loop's `evaluate(model, step)`: decode part of `valid` and score it with the evaluation code (WER, CIDEr-D);
    predictions under `<out_dir>/step_<step>/`."""
    generation = GenerationConfig(max_new_tokens=v.max_new_tokens)

    def evaluate(model, step: int) -> dict[str, float]:
        metrics, _, _ = score_clips(model, valid, out_dir / f"step_{step:07d}", None, v.max_clips_per_task,
                                    v.batch_size, generation)
        return {f"eval/{k}": float(metrics[k]) for k in ("wer", "cer", "cider_d", "bleu_4") if k in metrics}

    return evaluate
