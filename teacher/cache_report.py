"""What a teacher cache's distributions could teach beyond the labels, per task.

    python -m teacher.cache_report outputs/quick/cache/train-topk32 [--json report.json]

Logit KD adds to CE only where the teacher's next-token distribution differs from the one-hot label. For each task
in the cache's sample keys (`<index>|<task>|<path>|<text digest>`) this prints, over every cached target position:
how often the teacher's most likely token is the label (top-1), the mean probability it gives the label (0 where the
label is outside the kept top-k), the mean entropy of its kept distribution (renormalised over the k entries, in
nats: 0 is a one-hot target, which KD turns into CE again), the share of positions where it is at least 0.5 nats
(where the target is visibly soft), and the mean probability mass the top-k keeps. Read-only; a "topk" cache only
(a "sampled" cache holds importance weights, not probabilities).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from teacher.cache_store import CacheError, CacheReader

SOFT_NATS = 0.5
"""A position's kept distribution counts as soft at this entropy or above (one-hot is 0; a 70/30 split is 0.61)."""


@dataclass
class TaskReport:
    task: str
    samples: int
    tokens: int
    top1_is_label: float
    label_prob: float
    entropy_nats: float
    soft_share: float
    kept_mass: float


def task_of(key: str, path: Path) -> str:
    parts = key.split("|")
    if len(parts) < 2 or not parts[1]:
        raise CacheError(f"{path}: sample key {key!r} names no task (expected '<index>|<task>|<path>|<digest>'); "
                         "rebuild the cache with `python -m teacher.cache`")
    return parts[1]


def cache_report(root: str | Path) -> list[TaskReport]:
    """One TaskReport per task, in the order the tasks first appear in the cache."""
    root = Path(root)
    reader = CacheReader(root, expect_teacher=None, expect_tokenizer=None)
    if reader.manifest["mode"] != "topk":
        raise CacheError(f"{root / 'manifest.json'}: mode {reader.manifest['mode']!r} holds importance weights, "
                         "not probabilities; report on a cache built with mode=topk")
    sums: dict[str, dict[str, float]] = {}
    for index, key in enumerate(reader.keys()):
        sample = reader[index]
        probs = sample.sparse_values.float()
        mass = probs.sum(-1)
        renormalised = probs / mass.clamp_min(1e-12).unsqueeze(-1)
        entropy = -(renormalised * renormalised.clamp_min(1e-12).log()).sum(-1)
        is_label = sample.sparse_ids == sample.target_ids.unsqueeze(-1)
        task = sums.setdefault(task_of(key, root), dict.fromkeys(
            ("samples", "tokens", "top1", "label_prob", "entropy", "soft", "mass"), 0.0))
        task["samples"] += 1
        task["tokens"] += len(sample.target_ids)
        task["top1"] += float((sample.sparse_ids[:, 0] == sample.target_ids).sum())
        task["label_prob"] += float((probs * is_label).sum())
        task["entropy"] += float(entropy.sum())
        task["soft"] += float((entropy >= SOFT_NATS).sum())
        task["mass"] += float(mass.sum())
    reports = []
    for name, s in sums.items():
        n = max(s["tokens"], 1.0)
        reports.append(TaskReport(task=name, samples=int(s["samples"]), tokens=int(s["tokens"]),
                                  top1_is_label=s["top1"] / n, label_prob=s["label_prob"] / n,
                                  entropy_nats=s["entropy"] / n, soft_share=s["soft"] / n, kept_mass=s["mass"] / n))
    return reports


def format_report(root: str | Path, reports: list[TaskReport]) -> str:
    lines = [f"{root}: the teacher's kept next-token distributions at the label positions, per task",
             "",
             "| task | samples | tokens | top-1 is the label | p(label) | entropy (nats) "
             f"| positions ≥ {SOFT_NATS} nats | top-k mass |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.task} | {r.samples} | {r.tokens} | {r.top1_is_label:.3f} | {r.label_prob:.3f} "
                     f"| {r.entropy_nats:.3f} | {r.soft_share:.3f} | {r.kept_mass:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teacher.cache_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", help="a finished teacher cache folder (outputs/<preset>/cache/<name>)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    try:
        reports = cache_report(args.cache)
    except CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(args.cache, reports))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
