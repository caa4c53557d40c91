"""`results.json`: one model's quality and efficiency numbers, the settings that produced them, and
why any metric is missing.

Layout (extra keys, e.g. `model` or the full efficiency report, are allowed and kept):

    {
      "wer": 0.0634, "cer": 0.031, "cider_d": 0.41, "spice": null, "spider": null,
      "params": 62224, "weight_bytes": 248896, "peak_memory_mb": 0.47, "ttft_ms": 3.3, "tpot_ms": 0.86,
      "settings": {"wer": {"normalizer": "whisper_english"}, "efficiency": {"protocol": "careful", ...}},
      "unavailable": {"spice": "Java runtime not found", "spider": "needs spice"},
      "data": {"entries": 120, "kept": 117, "skipped": {"duplicate_entry": 1}, "dropped": {"silent": 2},
               "skipped_entries": [{"source": "test.json#7", "reason": "duplicate_entry", "problem": "..."}],
               "dropped_entries": [{"source": "test.json#40", "reason": "silent"}, ...], ...}
    }

`data` (written by `evaluation.run`) is the test split's data report (`common.annotations.DataReport`): how many
annotation entries were read, kept, skipped for an error and dropped by a rule, per reason, and which ones.

A metric that could not run is null, with its reason under `unavailable`; a null without a reason,
or a reason beside a number, is an error. Units: `wer`/`cer` fractions, `params` elements,
`weight_bytes` bytes, `peak_memory_mb` MiB, `ttft_ms`/`tpot_ms` milliseconds.

Beside the measured numbers, where the model's shapes allow (`evaluation.analytic`), the analytic ones
(`ANALYTIC_KEYS`): `decode_flops` and `decode_bytes` per output token (weights + KV cache at the timed steps'
mean context), `prefill_flops` and `prefill_bytes` per clip (encoders + LLM prefill), and `tpot_floor_ms`,
decode bytes over the machine's measured memory bandwidth. They do not move between runs; their ratios
explain the measured ones.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

QUALITY_KEYS = ("wer", "cer", "cider_d", "spice", "spider")
EFFICIENCY_KEYS = ("params", "weight_bytes", "peak_memory_mb", "ttft_ms", "tpot_ms")
METRIC_KEYS = QUALITY_KEYS + EFFICIENCY_KEYS
"""Keys every results.json has (a number, or null with a reason)."""
ANALYTIC_KEYS = ("decode_flops", "decode_bytes", "prefill_flops", "prefill_bytes", "tpot_floor_ms")
"""Keys a results.json has when the analytic costs were computed (older files and models without an HF LLM lack
them)."""


def build_results(metrics: Mapping[str, float | int | None], settings: Mapping[str, Any],
                  unavailable: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """Assemble a validated results dict.

    Args:
        metrics: metric name → value; every key of `METRIC_KEYS` must be here or in `unavailable`.
        settings: how the metrics were computed (normalizer, tokenizers, efficiency protocol, ...).
        unavailable: metric name → why it could not run; these metrics are stored as null.
        extra: further top-level entries (e.g. `model="student"`, `efficiency=report`).
    """
    unavailable = dict(unavailable or {})
    clashes = sorted(key for key in unavailable if metrics.get(key) is not None)
    if clashes:
        raise ValueError(f"metrics given both a value and an unavailable reason: {clashes}")
    missing = sorted(set(METRIC_KEYS) - set(metrics) - set(unavailable))
    if missing:
        raise ValueError(f"metrics missing (give a value or an unavailable reason): {missing}")
    values = {key: metrics.get(key) for key in METRIC_KEYS}
    values.update({key: value for key, value in metrics.items() if key not in values})
    values.update({key: None for key in unavailable})
    results = {**values, "settings": dict(settings), "unavailable": unavailable, **extra}
    validate_results(results)
    return results


def efficiency_metrics(report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """From an `evaluation.efficiency` model report: (`EFFICIENCY_KEYS` → value, unavailable reasons)."""
    values = {key: report[key] for key in EFFICIENCY_KEYS}
    values.update({key: report[key] for key in ANALYTIC_KEYS if report.get(key) is not None})
    if values["peak_memory_mb"] is not None:
        return values, {}
    # Only peak memory can be missing: CPU memory needs /proc (see PeakMemoryMeter).
    del values["peak_memory_mb"]
    return values, {"peak_memory_mb": report["peak_memory"]["method"]}


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ValueError unless `results` has every metric key (a finite number, or null with a
    reason), a `settings` dict and an `unavailable` dict of non-empty reasons for null metrics only."""
    if not isinstance(results.get("settings"), Mapping):
        raise ValueError("results need a 'settings' dict")
    unavailable = results.get("unavailable")
    if not isinstance(unavailable, Mapping):
        raise ValueError("results need an 'unavailable' dict (empty if every metric ran)")
    missing = [key for key in METRIC_KEYS if key not in results]
    if missing:
        raise ValueError(f"results are missing metrics: {missing}")
    for key in METRIC_KEYS:
        _check_metric(key, results[key], unavailable)
    for key, reason in unavailable.items():
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"unavailable reason for '{key}' must be a non-empty string")
        if key not in results or results[key] is not None:
            raise ValueError(f"'{key}' has an unavailable reason but is not null")


def _check_metric(key: str, value: Any, unavailable: Mapping[str, str]) -> None:
    if value is None:
        if key not in unavailable:
            raise ValueError(f"'{key}' is null without a reason under 'unavailable'")
        return
    # bool is an int subclass, but True is no metric value.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"'{key}' must be a finite number or null, got {value!r}")


def write_results(path: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Validate and write `results` as JSON, atomically: a temporary file in the same folder, then
    `os.replace`, so a reader never sees half a file. Returns the path."""
    validate_results(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results.json and validate it (ValueError if keys are missing or malformed)."""
    with open(path) as handle:
        results = json.load(handle)
    validate_results(results)
    return results


def format_summary(results: Mapping[str, Any]) -> str:
    """A short table, one metric per line: name, value with unit, and the reason if unavailable."""
    title = f"results for {results['model']}" if "model" in results else "results"
    lines = [title, f"{'metric':<16}{'value':>18}  note"]
    for key in METRIC_KEYS:
        value = results[key]
        note = f"unavailable: {results['unavailable'][key]}" if value is None else ""
        lines.append(f"{key:<16}{_format_value(key, value):>18}  {note}".rstrip())
    for key in ANALYTIC_KEYS:
        if results.get(key) is not None:
            lines.append(f"{key:<16}{_format_value(key, results[key]):>18}  analytic (model shapes)")
    if isinstance(results.get("data"), Mapping):
        data = results["data"]
        lost = {f"{kind} {reason}": n for kind in ("skipped", "dropped") for reason, n in data.get(kind, {}).items()}
        detail = "; " + ", ".join(f"{k}={v}" for k, v in lost.items()) if lost else ""
        lines.append(f"test entries: {data.get('kept')}/{data.get('entries')} kept{detail}")
    return "\n".join(lines)


def _format_value(key: str, value: float | int | None) -> str:
    if value is None:
        return "—"
    if key == "params":
        return f"{value:,}"
    if key == "weight_bytes":
        return f"{value / 2**20:,.2f} MiB"
    if key == "peak_memory_mb":
        return f"{value:,.2f} MiB"
    if key in ("ttft_ms", "tpot_ms", "tpot_floor_ms"):
        return f"{value:,.2f} ms" if key != "tpot_floor_ms" else f"{value:,.4f} ms"
    if key.endswith("_flops"):
        return f"{value / 1e6:,.2f} MFLOP"
    if key.endswith("_bytes"):
        return f"{value / 2**20:,.2f} MiB"
    return f"{value:.4f}"
