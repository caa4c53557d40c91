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
        self._earlier_events = sorted(self.log_dir.glob("events.out.tfevents.*"))
        self._session: list[tuple[int, dict[str, float]]] | None = []  # this run's records until continue_after
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        jsonl = self.log_dir / "metrics.jsonl"
        self._earlier_lines = jsonl.read_text().splitlines() if "jsonl" in self.backends and jsonl.is_file() else []
        self._jsonl = open(jsonl, "a") if "jsonl" in self.backends else None
        self._start = time.time()

    def continue_after(self, step: int) -> None:
        """Drop what earlier runs in this folder logged after `step`: the training loop calls this once it knows
        where it starts (0 for a run that starts over, N when it resumes a checkpoint of step N), so a rerun or a
        resumed run leaves one curve, not several on top of each other. Records of steps 1..N stay; so does
        everything this run logged already (in TensorBoard, only past N: the earlier event files hold the rest, e.g.
        the data/ scalars of step 0). TensorBoard gets a purge marker at N + 1 (at 0 the old event files go)."""
        if self._jsonl is not None and self._earlier_lines:
            kept = [line for line in self._earlier_lines if 0 < _step_of(line) <= step]
            ours = (self.log_dir / "metrics.jsonl").read_text().splitlines()[len(self._earlier_lines):]
            self._jsonl.close()
            tmp = self.log_dir / "metrics.jsonl.tmp"
            tmp.write_text("".join(line + "\n" for line in kept + ours))
            tmp.replace(self.log_dir / "metrics.jsonl")
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a")
        self._earlier_lines = []
        if self._writer is not None and self._earlier_events:
            from torch.utils.tensorboard import SummaryWriter

            if step == 0:
                for old in self._earlier_events:
                    old.unlink(missing_ok=True)
            else:
                self._writer.close()
                self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step + 1)
            # Records of steps up to a resumed checkpoint (the data/ scalars a run logs before training) are in the
            # earlier event files already: a second copy would draw twice.
            self._write_held(after=step if step else -1)
        self._earlier_events, self._session = [], None

    def _holding_back(self) -> bool:
        """Earlier event files here and no `continue_after` yet: TensorBoard writes wait for it."""
        return bool(self._earlier_events) and self._session is not None

    def _write_held(self, after: int) -> None:
        """Write to TensorBoard the records this run held back, those of steps past `after`."""
        for at, values in self._session or []:
            if at > after:
                for tag, v in values.items():
                    self._writer.add_scalar(tag, v, at)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalars at `step`. Every tag starts with one of TAG_PREFIXES (e.g. `train/kd_loss`)."""
        bad = [tag for tag in metrics if not tag.startswith(TAG_PREFIXES)]
        if bad:
            raise ValueError(f"metric tags {bad} must start with one of {TAG_PREFIXES}")
        values = {tag: float(v) for tag, v in metrics.items()}
        if self._session is not None:
            self._session.append((step, values))
        if self._writer is not None and not self._holding_back():
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
        if self._writer is not None and self._holding_back():  # never told where it starts: keep everything
            self._write_held(after=-1)
            self._session = None
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


def _step_of(line: str) -> int:
    """The step of one JSONL record; -1 for a blank or torn line (a run killed mid-write), which is dropped."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def read_metrics(log_dir: str | Path) -> list[dict]:
    """Read back the JSONL records written by MetricLogger in `log_dir`."""
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
