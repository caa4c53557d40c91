"""Two rows of an ablation table compared seed by seed (nothing is re-measured here).

    python -m experiments compare paper/tables/kd_tasks_rows.json "student, CE only" "the recipe"

Rows run with the same seed share everything the seed decides (initialisation, data order), so the difference of
the two rows on one seed is a sharper measure than the difference of their means: this prints, for each quality
metric, the per-seed differences (second row minus first), their mean ± standard error (sample std / √seeds; the
std too), on how many seeds the second row is better (lower WER, higher CIDEr-D / SPICE / SPIDEr) and the paired t
statistic with its degrees of freedom (|t| above about 2.8 on 4 df, 4.3 on 2 df, is a two-sided p below 0.05). Only
seeds both rows ran are paired.

A row is named in full or by a prefix that only it starts with. The rows file is `<table>_rows.json` beside a
table in `paper/tables/`, or an ablation's `<output_dir>/rows.json`.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import json
import math
import statistics
from pathlib import Path

from common.cli import run
from experiments.table import HEADERS, QUALITY

LOWER_IS_BETTER = {"wer"}


def find_row(rows: dict[str, dict], name: str, path: Path) -> dict:
    if name in rows:
        return rows[name]
    matches = [n for n in rows if n.startswith(name)]
    if len(matches) != 1:
        what = "no row starts with" if not matches else f"{len(matches)} rows start with"
        raise SystemExit(f"compare: {path}: {what} '{name}'; rows: {list(rows)}")
    return rows[matches[0]]


def paired(first: dict, second: dict, metric: str) -> dict | None:
    """The per-seed differences second − first on `metric`, over the seeds both rows have a value for."""
    a = {s["seed"]: s.get(metric) for s in first["seeds"] if s.get(metric) is not None}
    b = {s["seed"]: s.get(metric) for s in second["seeds"] if s.get(metric) is not None}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [b[s] - a[s] for s in seeds]
    better = sum((d < 0) if metric in LOWER_IS_BETTER else (d > 0) for d in diffs)
    result = {"metric": metric, "seeds": seeds, "diffs": diffs, "mean": statistics.fmean(diffs), "std": None,
              "se": None, "t": None, "df": len(diffs) - 1, "better": better}
    if len(diffs) > 1:
        result["std"] = statistics.stdev(diffs)
        result["se"] = result["std"] / math.sqrt(len(diffs))
        if result["se"] > 0:
            result["t"] = result["mean"] / result["se"]
    return result


def describe(result: dict) -> str:
    n = len(result["seeds"])
    direction = "lower" if result["metric"] in LOWER_IS_BETTER else "higher"
    spread = "" if result["se"] is None else f" ± {result['se']:.3f} (standard error; std {result['std']:.3f})"
    t = "" if result["t"] is None else f"; paired t {result['t']:.2f} on {result['df']} df"
    return (f"{HEADERS[result['metric']]}: {result['mean']:+.3f}{spread} "
            f"(per seed {', '.join(f'{d:+.3f}' for d in result['diffs'])}); {direction} on {result['better']} of "
            f"{n} seeds{t}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments compare", description=__doc__.split("\n")[0])
    parser.add_argument("rows", help="a table's <table>_rows.json (paper/tables/) or an ablation's rows.json")
    parser.add_argument("first", help="the reference row (name or unique prefix)")
    parser.add_argument("second", help="the row compared with it")
    parser.add_argument("--metrics", nargs="*", default=list(QUALITY), choices=QUALITY)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    path = Path(args.rows)
    if not path.is_file():
        raise SystemExit(f"compare: {path} does not exist; name a <table>_rows.json from paper/tables/ or an "
                         "ablation's rows.json (python -m experiments ablation writes both)")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"compare: {path} is not JSON ({err}); name a rows.json written by the ablation") from None
    if not isinstance(rows, dict) or not all(isinstance(r, dict) and "seeds" in r for r in rows.values()):
        raise SystemExit(f"compare: {path} does not hold ablation rows (name → {{'seeds': [...]}}); name a "
                         "<table>_rows.json, not the table's .csv")
    first, second = find_row(rows, args.first, path), find_row(rows, args.second, path)
    results = [r for m in args.metrics if (r := paired(first, second, m)) is not None]
    if args.json:
        print(json.dumps({"first": first["name"], "second": second["name"], "results": results}, indent=1))
        return 0
    print(f"'{second['name']}' − '{first['name']}', paired by seed ({path}):")
    for result in results:
        print("  " + describe(result))
    skipped = [HEADERS[m] for m in args.metrics if m not in {r["metric"] for r in results}]
    if skipped:
        print(f"  not compared (no seed with a value in both rows): {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    run(main)
