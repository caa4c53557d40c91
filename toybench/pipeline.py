"""Generating the toy benchmark: running every clip, then writing annotations, data card and manifest.

Writes, under the output folder:
    audio/{asr,aac}/{train,valid,test}/NNNNN.flac   16 kHz mono 16-bit clips
    asr_{split}.json, aac_{split}.json               SALMONN annotation JSON, one task each
    {split}.json                                     both tasks of a split
    meta/{task}_{split}.json                         the generation record of every clip
    DATACARD.md                                      how it was made, sizes, voices, events, captions
    manifest.json                                    sha256 of every file, config, tool versions, stats
"""

import hashlib
import json
import os
import shutil
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from toybench.config import ToyBenchConfig
from toybench.datacard import compute_stats, render_datacard
from toybench.items import Job, make_item
from toybench.splits import SPLITS, TASKS
from toybench.tts import check_tools, tool_versions

GENERATOR_VERSION = "1.0.0"
"""Bumped whenever the same config would produce different files."""

MANIFEST = "manifest.json"
INCOMPLETE_MARKER = ".toybench_incomplete"
# Clips handed to a worker at once: large enough to amortize inter-process traffic,
# small enough that the two workers finish together.
CHUNK_SIZE = 8


def generate(cfg: ToyBenchConfig, out_dir: Path, force: bool = False, progress: bool = True) -> dict:
    """Generate the benchmark into `out_dir` and return its summary.

    Skipped (summary["skipped"] is True) when `out_dir` already holds a complete benchmark of the same
    config and generator version, unless `force`. The summary holds the statistics written to the
    manifest plus out_dir, skipped and seconds (wall time of this call).
    """
    out_dir = Path(out_dir)
    check_tools()
    if not force:
        summary = existing_summary(out_dir, cfg)
        if summary is not None:
            return {**summary, "out_dir": str(out_dir), "skipped": True, "seconds": 0.0}
    start = time.perf_counter()
    _prepare_out_dir(out_dir)
    records = _make_all(cfg, out_dir, progress)
    stats = _write_outputs(cfg, out_dir, records)
    (out_dir / INCOMPLETE_MARKER).unlink()
    return {**stats, "out_dir": str(out_dir), "skipped": False,
            "seconds": round(time.perf_counter() - start, 1)}


def existing_summary(out_dir: Path, cfg: ToyBenchConfig) -> dict | None:
    """The stored statistics if `out_dir` holds a complete benchmark of this config, else None.

    Complete means: a finished run (no marker left), the same generator version and data fields,
    and every file of the manifest present with its recorded size. Hashes are not re-checked here,
    as that would read the whole benchmark; `verify_manifest` does it.
    """
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file() or (out_dir / INCOMPLETE_MARKER).exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return None
    if manifest.get("generator_version") != GENERATOR_VERSION or manifest.get("config") != cfg.data_fields():
        return None
    for path, entry in manifest["files"].items():
        file = out_dir / path
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            return None
    return manifest["stats"]


def verify_manifest(out_dir: Path) -> list[str]:
    """Paths whose sha256 or presence disagrees with the manifest (empty when all is well)."""
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    bad = []
    for path, entry in manifest["files"].items():
        file = Path(out_dir) / path
        if not file.is_file() or _sha256(file) != entry["sha256"]:
            bad.append(path)
    return bad


def _prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir`; clear what an earlier toybench run left there, so no stale clip survives
    (a smaller run would otherwise leave the larger run's extra clips beside its own)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier_run = (out_dir / INCOMPLETE_MARKER).exists() or _is_toybench_manifest(out_dir / MANIFEST)
    (out_dir / INCOMPLETE_MARKER).write_text("toybench generation in progress or interrupted\n")
    if earlier_run:
        (out_dir / MANIFEST).unlink(missing_ok=True)
        for folder in ("audio", "meta"):
            shutil.rmtree(out_dir / folder, ignore_errors=True)


def _is_toybench_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("generator") == "toybench"
    except (OSError, ValueError, AttributeError):
        return False


def _make_all(cfg: ToyBenchConfig, out_dir: Path, progress: bool) -> list[dict]:
    """Make every clip; records come back in job order whatever the worker scheduling."""
    counts = cfg.counts()
    jobs = [Job(cfg, task, split, index, str(out_dir))
            for task in TASKS for split in SPLITS for index in range(counts[split])]
    bar = dict(total=len(jobs), disable=None if progress else True, desc="toybench", unit="clip", smoothing=0.05)
    if cfg.workers == 1:
        return list(tqdm(map(make_item, jobs), **bar))
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a forked child would inherit.
    with get_context("spawn").Pool(cfg.workers) as pool:
        return list(tqdm(pool.imap(make_item, jobs, chunksize=CHUNK_SIZE), **bar))


def _write_outputs(cfg: ToyBenchConfig, out_dir: Path, records: list[dict]) -> dict:
    """Write annotation JSON, per-clip metadata, data card and manifest; return the statistics."""
    for split in SPLITS:
        by_task = {task: [r for r in records if r["task"] == task and r["split"] == split] for task in TASKS}
        asr_entries = [{"path": r["path"], "text": r["text"], "task": "asr"} for r in by_task["asr"]]
        aac_entries = [{"path": r["path"], "text": c, "task": "audiocaption"}
                       for r in by_task["aac"] for c in r["captions"]]
        _write_json(out_dir / f"asr_{split}.json", {"annotation": asr_entries})
        _write_json(out_dir / f"aac_{split}.json", {"annotation": aac_entries})
        _write_json(out_dir / f"{split}.json", {"annotation": asr_entries + aac_entries})
        for task in TASKS:
            _write_json(out_dir / "meta" / f"{task}_{split}.json", by_task[task])

    stats = compute_stats(records)
    versions = {**tool_versions(), "libsndfile": soundfile.__libsndfile_version__,
                "numpy": np.__version__, "soxr": soxr.__version__}
    datacard = render_datacard(cfg, stats, versions, GENERATOR_VERSION, records)
    (out_dir / "DATACARD.md").write_text(datacard, encoding="utf-8")

    files = _hash_files(out_dir, records)
    stats["bytes"] = sum(entry["bytes"] for entry in files.values())
    manifest = {"generator": "toybench", "generator_version": GENERATOR_VERSION,
                "config": cfg.data_fields(), "tools": versions, "stats": stats, "files": files}
    # Written last and atomically: its presence is what marks the benchmark complete.
    tmp = out_dir / (MANIFEST + ".tmp")
    _write_json(tmp, manifest)
    os.replace(tmp, out_dir / MANIFEST)
    return stats


def _hash_files(out_dir: Path, records: list[dict]) -> dict[str, dict]:
    paths = [r["path"] for r in records] + [f"{prefix}{split}.json" for split in SPLITS
                                            for prefix in ("asr_", "aac_", "")]
    paths += [f"meta/{task}_{split}.json" for task in TASKS for split in SPLITS] + ["DATACARD.md"]
    return {p: {"sha256": _sha256(out_dir / p), "bytes": (out_dir / p).stat().st_size} for p in sorted(paths)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
