"""Stage state: whether a stage's output folder holds a finished run of exactly this work, so that it is skipped.

Every stage (teacher, cache, distill, prune, quantize, export, evaluate) and the ablation runner keep their state the
same way: when a run has written all its outputs, it writes a **marker** file, last, holding a **key** of what
decided the result; a later run whose key equals the marker's is skipped. Two kinds of key:

- `stage_key(cfg, inputs)`: the resolved config's hash (`common.config.config_hash`), then one `input_stamp` per
  input folder or file the stage read (a retrained teacher, a rebuilt cache make it stale). `mark_stage_done` also
  writes the resolved config beside the marker;
- a command line (`shlex.join`): the ablation runner's record that the stage process it planned ran to the end (its
  folder is already named by a hash of everything that decides the result).

Marker names, one per kind of folder:

    DONE            a stage's model or output folder (`stage_key`); in an ablation evaluation folder, the command
    EVALUATED       an `evaluation.run` output folder (`stage_key`): not DONE, which the ablation writes there
    ABLATION_DONE   an ablation stage folder (the command)

`stage_lock` serialises two runs (threads or processes) that would write one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common.config import config_hash, save_resolved

DONE = "DONE"
EVALUATED = "EVALUATED"
ABLATION_DONE = "ABLATION_DONE"
BOOKKEEPING = (DONE, EVALUATED, ABLATION_DONE, "ADOPTED_FROM", "config.yaml")
"""Files a stamp leaves out: they record how a folder was made, not what it holds."""


def file_stamps(path: str | Path) -> list[tuple[str, int, int]]:
    """(name relative to `path`, size in bytes, mtime in ns) of every file under `path` (or of the file itself),
    without the `BOOKKEEPING` files: cheap even for 26 GB of weights, and it changes when a stage rewrites its
    outputs."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [(str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in files if p.name not in BOOKKEEPING]


def input_stamp(path: str | Path) -> str:
    """A short hash of `file_stamps(path)`; `missing` when the path does not exist."""
    if not Path(path).exists():
        return "missing"
    return hashlib.sha256(repr(file_stamps(path)).encode()).hexdigest()[:16]


def stage_key(cfg: Any, inputs: Sequence[str | Path] = ()) -> str:
    """The key of a stage run: its resolved config's hash, then one stamp per input it read (empty paths skipped)."""
    return " ".join([config_hash(cfg), *(input_stamp(p) for p in inputs if p)])


def is_marked(out_dir: str | Path, key: str, marker: str = DONE) -> bool:
    """True when `out_dir/marker` exists and holds `key` (surrounding whitespace aside)."""
    path = Path(out_dir) / marker
    return path.is_file() and path.read_text().strip() == key.strip()


def write_marker(out_dir: str | Path, key: str, marker: str = DONE) -> None:
    """Write `key` to `out_dir/marker`: call it last, once every output is in place."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / marker).write_text(key)


def clear_marker(out_dir: str | Path, marker: str = DONE) -> bool:
    """Remove `out_dir/marker` before a run rewrites the folder (an interrupted run then is not taken as finished);
    returns whether there was one."""
    path = Path(out_dir) / marker
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed


def stage_is_current(cfg: Any, out_dir: str | Path, marker: str = DONE, inputs: Sequence[str | Path] = ()) -> bool:
    """True when `out_dir` holds a finished run of exactly this resolved config on these very inputs (so the stage
    can be skipped)."""
    return is_marked(out_dir, stage_key(cfg, inputs), marker)


def mark_stage_done(cfg: Any, out_dir: str | Path, marker: str = DONE, inputs: Sequence[str | Path] = ()) -> None:
    """Record that `out_dir` holds a finished run of this config on these inputs: the resolved config
    (`config.yaml`), then the marker, last."""
    save_resolved(cfg, out_dir)
    write_marker(out_dir, stage_key(cfg, inputs), marker)


@contextlib.contextmanager
def stage_lock(locks_dir: str | Path, path: str | Path) -> Iterator[None]:
    """Hold the lock of one folder `path` (an flock on a file under `locks_dir`, named by the hash of its resolved
    path): a second run that would write the same folder waits, whether it is a thread of this process or another
    process, and then finds the folder finished."""
    locks = Path(locks_dir)
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    with open(locks / f"{name}.lock", "w") as handle:  # an open file description of its own: threads exclude too
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
