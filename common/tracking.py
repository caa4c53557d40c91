"""One metric logger for every stage: TensorBoard, stdout and a JSONL file, with `train/` and `eval/` tags.

The JSONL file (`metrics.jsonl`, one object per `log` call: `{"step": N, "time": s, "train/loss": x, ...}`)
is what tests and scripts read back; TensorBoard is what people look at.

A log folder belongs to one output folder (its owner, named in `LOG_OWNER`). A rerun or resume of the same output
keeps or restarts its own curve; a run of another output that lands in the folder moves the logs it finds there to
`previous-<time>/` instead of deleting them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

TAG_PREFIXES = ("train/", "eval/", "data/", "bench/")
LOG_OWNER = "LOG_OWNER"
"""The file in a log folder naming the output folder whose run logs there (its path relative to the log folder, so
moving both together keeps the pair)."""


class MetricLogger:
    """Log scalar metrics to any of TensorBoard, stdout and JSONL.

    Args:
        log_dir: folder for `metrics.jsonl` and the TensorBoard event files (`runs/<experiment>/` by convention).
        backends: any of "tensorboard", "stdout", "jsonl".
        stdout_every: print to stdout only every N-th call to `log` (TensorBoard and JSONL get every call).
        owner: the output folder of the run that logs here (where its checkpoints are). Logs of another owner found
            in `log_dir` are moved to `<log_dir>/previous-<time>/` before anything is written; logs without an
            owner (written before owners were recorded) are kept by a resume and moved aside by a run that starts
            over (`continue_after(0)`). None: no ownership, the folder is this run's.
    """

    def __init__(self, log_dir: str | Path, backends=("tensorboard", "stdout", "jsonl"), stdout_every: int = 1,
                 owner: str | Path | None = None):
        unknown = set(backends) - {"tensorboard", "stdout", "jsonl"}
        if unknown:
            raise ValueError(f"unknown logger backend(s) {sorted(unknown)}; use tensorboard, stdout, jsonl")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.backends = tuple(backends)
        self.stdout_every = max(1, stdout_every)
        self._calls = 0
        self._writer = None
        # A process that writes nothing (a DDP rank > 0) claims nothing.
        self.owner = Path(owner) if owner is not None and {"tensorboard", "jsonl"} & set(self.backends) else None
        self._unclaimed = False  # earlier logs here without an owner: continue_after decides whose they are
        if self.owner is not None:
            held = _owner_of(self.log_dir)
            if held is not None and held != self.owner.resolve():
                self._move_aside(f"another output folder's ({held})", _log_files(self.log_dir))
            self._unclaimed = _owner_of(self.log_dir) is None and bool(_log_files(self.log_dir))
            if not self._unclaimed:
                self._claim()
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
        the data/ scalars of step 0). TensorBoard gets a purge marker at N + 1 (at 0 the old event files go).

        Earlier logs of no recorded owner are kept by a resume (they are taken as this output's) and moved aside,
        not deleted, by a run that starts over: they may be another run's."""
        if self._unclaimed:
            if step == 0:
                self._move_aside("a run of unknown output folder's", self._earlier_events, self._earlier_lines)
            self._claim()
            self._unclaimed = False
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

    def _claim(self) -> None:
        target = os.path.relpath(self.owner.resolve(), self.log_dir.resolve())
        (self.log_dir / LOG_OWNER).write_text(target + "\n")

    def _move_aside(self, whose: str, files: list[Path], earlier_lines: list[str] = ()) -> None:
        """Move `files` (earlier event files, metrics.jsonl, the owner file) to `previous-<time>/`, and the
        `earlier_lines` of a metrics.jsonl this run has opened already (`continue_after` then drops them here)."""
        aside = self.log_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        while aside.exists():
            aside = aside.with_name(aside.name + "-")
        aside.mkdir()
        for path in files:
            shutil.move(str(path), aside / path.name)
        if earlier_lines:
            (aside / "metrics.jsonl").write_text("".join(line + "\n" for line in earlier_lines))
        print(f"{self.log_dir}: held the logs of {whose} run; moved them to {aside} (set log_dir= to give each run its "
              f"own log folder)", flush=True)

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


def _owner_of(log_dir: Path) -> Path | None:
    """The output folder `LOG_OWNER` names, resolved; None without one."""
    marker = log_dir / LOG_OWNER
    if not marker.is_file() or not marker.read_text().strip():
        return None
    return (log_dir / marker.read_text().strip()).resolve()


def _log_files(log_dir: Path) -> list[Path]:
    """What a MetricLogger leaves directly in `log_dir` (sub-folders are other loggers')."""
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    return files + [log_dir / name for name in ("metrics.jsonl", LOG_OWNER) if (log_dir / name).is_file()]


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
