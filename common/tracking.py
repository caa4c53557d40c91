"""One metric logger for every stage: TensorBoard, stdout and a JSONL file, with `train/` and `eval/` tags.

The JSONL file (`metrics.jsonl`, one object per `log` call: `{"step": N, "time": s, "train/loss": x, ...}`)
is what tests and scripts read back; TensorBoard is what people look at.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

TAG_PREFIXES = ("train/", "eval/", "data/", "bench/")


class MetricLogger:
    """Log scalar metrics to any of TensorBoard, stdout and JSONL.

    Args:
        log_dir: folder for `metrics.jsonl` and the TensorBoard event files (`runs/<experiment>/` by convention).
        backends: any of "tensorboard", "stdout", "jsonl".
        stdout_every: print to stdout only every N-th call to `log` (TensorBoard and JSONL get every call).
    """

    def __init__(self, log_dir: str | Path, backends=("tensorboard", "stdout", "jsonl"), stdout_every: int = 1):
        unknown = set(backends) - {"tensorboard", "stdout", "jsonl"}
        if unknown:
            raise ValueError(f"unknown logger backend(s) {sorted(unknown)}; use tensorboard, stdout, jsonl")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.backends = tuple(backends)
        self.stdout_every = max(1, stdout_every)
        self._calls = 0
        self._writer = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._jsonl = open(self.log_dir / "metrics.jsonl", "a") if "jsonl" in self.backends else None
        self._start = time.time()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalars at `step`. Every tag starts with one of TAG_PREFIXES (e.g. `train/kd_loss`)."""
        bad = [tag for tag in metrics if not tag.startswith(TAG_PREFIXES)]
        if bad:
            raise ValueError(f"metric tags {bad} must start with one of {TAG_PREFIXES}")
        values = {tag: float(v) for tag, v in metrics.items()}
        if self._writer is not None:
            for tag, v in values.items():
                self._writer.add_scalar(tag, v, step)
        if self._jsonl is not None:
            record = {"step": step, "time": round(time.time() - self._start, 3)}
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if "stdout" in self.backends and self._calls % self.stdout_every == 0:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"[step {step}] {shown}", flush=True)
        self._calls += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(log_dir: str | Path) -> list[dict]:
    """Read back the JSONL records written by MetricLogger in `log_dir`."""
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
