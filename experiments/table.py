"""The ablation table's columns and statistics, shared by the runner (`experiments.ablation`), the seed-by-seed
comparison (`experiments.compare`) and the figures (`experiments.figures`)."""

from __future__ import annotations

import math

QUALITY = ("wer", "cider_d", "spice", "spider")


RATIOS = ("params", "weight_bytes", "peak_memory_mb", "ttft_ms", "tpot_ms")


SIZES = ("params_m", "weight_mb")


HEADERS = {"wer": "WER", "cider_d": "CIDEr-D", "spice": "SPICE", "spider": "SPIDEr", "params_m": "params (M)",
           "weight_mb": "weights (MiB)", "params": "params ×",
           "weight_bytes": "weight bytes ×", "peak_memory_mb": "peak memory ×", "ttft_ms": "TTFT ×",
           "tpot_ms": "TPOT ×"}


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the non-null values; std is None for fewer than two."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
