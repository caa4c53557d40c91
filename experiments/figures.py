"""The paper's figures, drawn from training logs and ablation results (nothing is re-measured here).

    python -m experiments figures [--preset toy] [--out paper/figures]

Reads `runs/<preset>/<run>/metrics.jsonl` (every training run's scalars, written by common.tracking), the
ablation's rows (from `python -m experiments ablation --config configs/<preset>/ablation.yaml`: its
`outputs/<preset>/ablation/rows.json`, or in a clone without it the `paper/tables/ablation_rows.json` kept beside
the table) and
`outputs/<preset>/bench/token_pruning.json` (from `python -m student.token_pruning_bench --out ...`), and writes:

- `loss_<run>.png`: every loss term of a training run, one panel each, against the step (the logged values faint,
  their exponential moving average solid);
- `eval_<run>.png`: every `eval/` metric the run logged (WER, CIDEr-D, ...) against the training step;
- `compare.png` (with `--compare RUN RUN ...`): the runs' shared loss terms and eval metrics, every run one line on
  the same axes (e.g. the CE-only and the KD student);
- `pareto.png`: WER and CIDEr-D against the parameter ratio to the teacher, every ablation row a point in its own
  colour with its name beside it (mean ± std over seeds), the Pareto front drawn through the rows no other row beats
  on both axes;
- `token_keep.png`: BEATs token keep ratio against caption quality (SPIDEr where it was computed, else
  CIDEr-D, as the axis says) and against BEATs latency and FLOPs ratios;
- `pruning.png`: structured pruning ratio against WER and CIDEr-D, without and with KD recovery.

A figure whose inputs are missing is skipped with a line saying which file would make it.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import csv
import json
import math
import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from common.cli import run
from common.config import load_config  # noqa: E402
from common.tracking import read_metrics  # noqa: E402
from experiments.ablation_config import JobConfig  # noqa: E402
from experiments.table import QUALITY, RATIOS, mean_std  # noqa: E402

NOT_LOSSES = ("lr", "grad_norm", "tokens_per_s", "memory_mb", "skipped_steps", "aligned_fraction", "carried_mass")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps a key placed below the axes
    plt.close(fig)
    return path


def latest_run(records: list[dict]) -> list[dict]:
    """The records of the run that wrote last into a log folder, which keeps what earlier runs appended there.

    Where the step goes back, a run started again: back to the first step logged (a `--force` rerun) discards all
    earlier records; back to a later step (a resume from a checkpoint) discards the earlier records from that step
    on, which the resumed run logs again."""
    kept: list[dict] = []
    for record in records:
        if kept and record["step"] < kept[-1]["step"]:
            first = min(r["step"] for r in kept)
            kept = [] if record["step"] <= first else [r for r in kept if r["step"] < record["step"]]
        kept.append(record)
    return kept


def scalar_series(records: list[dict], prefix: str, leave_out=()) -> dict[str, tuple[list[int], list[float]]]:
    """`<prefix><name>` series of a run's latest records as {name: (steps, values)}, without the names in
    `leave_out` and without missing values."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in latest_run(records):
        for key, value in record.items():
            if not key.startswith(prefix) or key[len(prefix):] in leave_out or value is None:
                continue
            steps, values = series.setdefault(key[len(prefix):], ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return series


def loss_terms(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """`train/<term>` series of a run (steps, values), leaving out what is not a loss (lr, grad norm, ...)."""
    return scalar_series(records, "train/", NOT_LOSSES)


def eval_metrics(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """`eval/<metric>` series of a run (steps, values): what the training job scored on its valid clips."""
    return scalar_series(records, "eval/")


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average of a curve, debiased as TensorBoard's smoothing slider is: point i is
    Σ_j≤i w^(i−j)·v_j / Σ_j≤i w^(i−j), so the first point is the first value, not pulled towards 0.
    `weight` in [0, 1): 0 returns the values; 0.9 averages over about the last 10 points. Non-finite values
    (a NaN loss) are passed through and left out of the average."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"ema: weight must be in [0, 1), got {weight}")
    out, total, norm = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        total = weight * total + value
        norm = weight * norm + 1.0
        out.append(total / norm)
    return out


def smoothing_weight(n_points: int) -> float:
    """An EMA weight for a curve of n points: none under 20 points, else a window of about n/30 points (≥ 0.6)."""
    if n_points < 20:
        return 0.0
    return min(0.98, max(0.6, 1.0 - 30.0 / n_points))


def plot_curve(ax, steps: list[int], values: list[float], color=None, label: str | None = None) -> None:
    """A training curve as the logged values, faint, under their EMA, solid. Short curves keep their markers."""
    weight = smoothing_weight(len(values))
    if weight == 0.0:
        ax.plot(steps, values, lw=1.2, marker="o", ms=3, color=color, label=label)
        return
    (raw,) = ax.plot(steps, values, lw=0.8, alpha=0.25, color=color)
    ax.plot(steps, ema(values, weight), lw=1.5, color=raw.get_color(), label=label)


def log_scale_if_wide(ax, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / max(min(finite), 1e-12) > 20:
        ax.set_yscale("log")


def panel_grid(n: int, width: float = 4.2, height: float = 3.0):
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def plot_series(series: dict[str, tuple[list[int], list[float]]], kind: str, title: str, path: Path) -> Path | None:
    """One panel per series against the step; `kind` ("loss", "eval") names the y axes."""
    if not series:
        return None
    fig, axes = panel_grid(len(series))
    for ax, (name, (steps, values)) in zip(axes, sorted(series.items()), strict=True):
        plot_curve(ax, steps, values)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{name} ({kind})" if kind == "loss" else name)
        log_scale_if_wide(ax, values)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def run_name(run_dir: Path) -> str:
    return "_".join(run_dir.parts[-2:])


def plot_losses(run_dir: Path, out: Path) -> Path | None:
    series = loss_terms(read_metrics(run_dir))
    note = ", faint: as logged, solid: EMA" if any(smoothing_weight(len(v)) for _, v in series.values()) else ""
    return plot_series(series, "loss", f"loss terms: {run_dir}{note}", out / f"loss_{run_name(run_dir)}.png")


def plot_eval(run_dir: Path, out: Path) -> Path | None:
    """The run's eval metrics over its training steps (each logged point is one evaluation)."""
    series = eval_metrics(read_metrics(run_dir))
    title = f"eval metrics during training: {run_dir}"
    return plot_series(series, "eval", title, out / f"eval_{run_name(run_dir)}.png")


def plot_compare(run_dirs: list[Path], out: Path) -> Path | None:
    """The loss terms and eval metrics that at least two of the runs logged, every run one line on shared axes,
    e.g. the CE-only and the KD student of a preset (a run's name is its last two folder names)."""
    runs = {run_name(d): read_metrics(d) for d in run_dirs}
    per_run = {name: {**{f"train/{k}": v for k, v in loss_terms(records).items()},
                      **{f"eval/{k}": v for k, v in eval_metrics(records).items()}} for name, records in runs.items()}
    shared = sorted({k for series in per_run.values() for k in series
                     if sum(k in other for other in per_run.values()) >= 2})
    if not shared:
        return None
    colors = distinct_colors(len(runs))
    fig, axes = panel_grid(len(shared), width=4.8, height=3.4)
    for ax, key in zip(axes, shared, strict=True):
        everything = []
        for color, (name, series) in zip(colors, per_run.items(), strict=True):
            if key in series:
                plot_curve(ax, *series[key], color=color, label=name)
                everything += series[key][1]
        ax.set_title(key)
        ax.set_xlabel("training step")
        ax.set_ylabel(key.split("/", 1)[1])
        log_scale_if_wide(ax, everything)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("runs compared on the same axes (faint: as logged, solid: EMA)")
    return _save(fig, out / "compare.png")


# A table's CSV column (`<column>_mean`, `<column>_std`) for each per-seed key of rows.json.
TABLE_COLUMNS = {**{k: k for k in QUALITY}, **{f"{k}_ratio": k for k in RATIOS}}


def rows_from_table(path: Path) -> list[dict]:
    """The rows of a table's CSV (written by `python -m experiments ablation`) for a clone that has no rows.json:
    mean and std of each value, the seed count, and the tags that the config named in the row's command gives it."""
    rows = []
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            if "command" not in line or "seeds" not in line:
                raise SystemExit(f"figures: {path} is not a table written by python -m experiments ablation (it "
                                 "has no 'seeds' and 'command' columns)")
            summary = {key: tuple(float(line[f"{col}_{part}"]) if line.get(f"{col}_{part}") else None
                                  for part in ("mean", "std")) for key, col in TABLE_COLUMNS.items()}
            command = shlex.split(line["command"])
            config = Path(command[command.index("--config") + 1]) if "--config" in command else None
            tags = {}
            if config is not None and config.is_file():
                tags = next((r.tags for r in load_config(JobConfig, config).rows if r.name == line["row"]), {})
            rows.append({"name": line["row"], "tags": tags, "summary": summary, "n_seeds": int(line["seeds"])})
    return rows


def load_rows(path: Path) -> list[dict]:
    """An ablation's rows from its rows.json (per-seed values) or its table's CSV (mean ± std per row)."""
    if path.suffix == ".csv":
        return rows_from_table(path)
    return list(json.loads(path.read_text()).values())


def stat(row: dict, key: str) -> tuple[float | None, float | None]:
    """(mean, std) of a per-seed value of a row, from its seeds or, for a row read from a table, its summary."""
    if "summary" in row:
        return row["summary"].get(key, (None, None))
    return mean_std([s.get(key) for s in row["seeds"]])


def n_seeds(row: dict) -> int:
    return row["n_seeds"] if "n_seeds" in row else len(row["seeds"])


def row_points(rows: list[dict], x: str, y: str) -> list[tuple[str, float, float, float | None]]:
    """(name, x mean, y mean, y std) of every row with both values."""
    points = []
    for row in rows:
        xm, _ = stat(row, x)
        ym, ys = stat(row, y)
        if xm is not None and ym is not None:
            points.append((row["name"], xm, ym, ys))
    return points


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller x; smaller y, or larger y), sorted by x."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def distinct_colors(n: int) -> list[tuple[float, float, float, float]]:
    """n colours, no two alike: matplotlib's tab10 / tab20 where they suffice, else n hues spread over a cyclic
    colormap (so a 16-row table does not reuse a 10-colour cycle)."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        # tab20 holds 10 dark/light pairs; dark ones first keeps the first rows the most readable.
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return [plt.get_cmap("tab20")(i) for i in order[:n]]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def spread(positions: list[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Label positions (axes fraction) as close as possible to `positions`, at least `gap` apart and within
    [low, high], order kept: pushed up where they crowd, then pulled back down from the top. Where n labels do
    not fit at `gap`, the gap shrinks to what fits."""
    if not positions:
        return []
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    gap = min(gap, (high - low) / max(len(positions) - 1, 1))
    placed = [min(max(positions[i], low), high) for i in order]
    for k in range(1, len(placed)):
        placed[k] = max(placed[k], placed[k - 1] + gap)
    placed[-1] = min(placed[-1], high)
    for k in range(len(placed) - 2, -1, -1):
        placed[k] = min(placed[k], placed[k + 1] - gap)
    out = [0.0] * len(positions)
    for k, i in enumerate(order):
        out[i] = placed[k]
    return out


def label_points(ax, points: list[tuple[float, float, str, tuple]], fontsize: float = 7.0) -> None:
    """Each point's name beside it, in the point's colour, joined to it by a thin line. Points in the right third
    of the axes get their label on their left, the others in one column right of them; each column is spread
    vertically so that no two labels overlap."""
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits that transData below depends on
    to_axes = ax.transAxes.inverted()
    located = []
    for x, y, name, color in points:
        ax_x, ax_y = to_axes.transform(ax.transData.transform((x, y)))
        located.append((ax_x, ax_y, x, y, name, color))
    gap = fontsize * 1.35 / (ax.get_window_extent().height or 1.0)  # one text line, in axes fraction
    for right_side in (True, False):
        group = [p for p in located if (p[0] > 0.67) != right_side]
        if not group:
            continue
        column = (max(p[0] for p in group) + 0.04) if right_side else (min(p[0] for p in group) - 0.04)
        ys = spread([p[1] for p in group], gap, low=0.02, high=0.98)
        for (_, _, x, y, name, color), label_y in zip(group, ys, strict=True):
            text_color = tuple(0.8 * c for c in mcolors.to_rgb(color))  # a shade darker: tab20's light half is pale
            ax.annotate(name, (x, y), xytext=(column, label_y), textcoords="axes fraction", fontsize=fontsize,
                        color=text_color, ha="left" if right_side else "right", va="center",
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6})


def plot_pareto(rows: list[dict], out: Path) -> Path | None:
    """Each row a point in its own colour and marker, its name beside it (spread so that names of rows of one
    size do not overlap)."""
    panels = [("wer", "WER (lower is better)", False), ("cider_d", "CIDEr-D (higher is better)", True)]
    if not any(row_points(rows, "params_ratio", key) for key, _, _ in panels):
        return None
    drawn = [row for row in rows if stat(row, "params_ratio")[0] is not None]
    colors = distinct_colors(len(drawn))
    markers = "osD^v<>p"
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, (key, label, higher) in zip(axes, panels, strict=True):
        points, labelled = [], []
        for number, row in enumerate(drawn):
            (x, _), (y, std) = stat(row, "params_ratio"), stat(row, key)
            if y is None:
                continue
            ax.errorbar(x, y, yerr=std or 0.0, linestyle="none", capsize=3, color=colors[number],
                        marker=markers[number % len(markers)])
            points.append((x, y))
            labelled.append((x, y, row["name"], colors[number]))
        front = pareto_front(points, higher)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), "k--", lw=1)  # named in the title: a legend box would cover labels
        ax.set_xscale("log")  # the students sit within 0.15–0.3 of the teacher's size
        if points:
            low, high = min(x for x, _ in points) / 1.12, max(x for x, _ in points) * 1.12
            ticks = [t for t in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0) if low <= t <= high]
            ax.set_xlim(low, high)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.set_xticks([], minor=True)
        ax.set_xlabel("parameters / teacher's (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        label_points(ax, labelled)  # after the limits are set: labels are placed in axes fractions
    fig.suptitle("quality against size, every ablation row (mean ± std over seeds; dashed: the Pareto front)")
    return _save(fig, out / "pareto.png")


def tagged(rows: list[dict], tag: str) -> list[dict]:
    return [row for row in rows if tag in row.get("tags", {})]


def plot_token_keep(rows: list[dict], bench: dict | None, out: Path) -> Path | None:
    keep_rows = tagged(rows, "keep_ratio")
    if not keep_rows and not bench:
        return None
    fig, (ax_q, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    if keep_rows:
        metric = "spider" if all(stat(r, "spider")[0] is not None for r in keep_rows) else "cider_d"
        pts = sorted((r["tags"]["keep_ratio"], *stat(r, metric)) for r in keep_rows)
        ax_q.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], fmt="o-",
                      capsize=3)
        ax_q.set_ylabel("SPIDEr" if metric == "spider" else "CIDEr-D (SPICE unavailable, so no SPIDEr)")
    else:
        ax_q.text(0.5, 0.5, "no ablation rows tagged keep_ratio", ha="center", transform=ax_q.transAxes)
        ax_q.set_ylabel("caption quality")
    ax_q.set_xlabel("BEATs patch tokens kept")
    ax_q.set_title("caption quality")
    ax_q.grid(alpha=0.3)
    if bench:
        bench_rows = sorted(bench["rows"], key=lambda r: r["keep_ratio"])
        ax_c.plot([r["keep_ratio"] for r in bench_rows], [r["latency_ratio"] for r in bench_rows], "o-",
                  label="latency (median)")
        ax_c.plot([r["keep_ratio"] for r in bench_rows], [r["flops_ratio"] for r in bench_rows], "s--", label="FLOPs")
        ax_c.legend(fontsize=8)
        settings = bench.get("settings", {})
        ax_c.set_title(f"BEATs cost, {settings.get('seconds', '?')} s clip, batch 1, {settings.get('device', 'cpu')}")
    else:
        ax_c.text(0.5, 0.5, "no token-pruning bench JSON", ha="center", transform=ax_c.transAxes)
    ax_c.set_xlabel("BEATs patch tokens kept")
    ax_c.set_ylabel("ratio to keeping every token")
    ax_c.grid(alpha=0.3)
    return _save(fig, out / "token_keep.png")


def pruning_points(rows: list[dict], key: str, recovery: int) -> list[tuple[float, float, float | None]]:
    """(pruning ratio, mean, std) of `key` for the rows without int8 that have this recovery tag, by ratio. An
    unpruned row (ratio 0) starts both curves: it has nothing to recover. Where several rows (e.g. from several
    rows.json files) share a ratio, the one with the most seeds is drawn."""
    best: dict[float, dict] = {}
    for r in tagged(rows, "prune_ratio"):
        ratio = float(r["tags"]["prune_ratio"])
        if (ratio and int(r["tags"].get("recovery", 0)) != recovery) or r["tags"].get("int8"):
            continue
        if ratio not in best or n_seeds(r) > n_seeds(best[ratio]):
            best[ratio] = r
    pts = [(ratio, *stat(r, key)) for ratio, r in sorted(best.items())]
    return [p for p in pts if p[1] is not None]


def plot_pruning(rows: list[dict], out: Path) -> Path | None:
    if not tagged(rows, "prune_ratio"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in zip(axes, ("wer", "cider_d"), ("WER", "CIDEr-D"), strict=True):
        for recovery, style in ((0, "o--"), (1, "s-")):
            pts = pruning_points(rows, key, recovery)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], fmt=style,
                            capsize=3, label="KD recovery" if recovery else "no recovery")
        ax.set_xlabel("structured pruning ratio")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("structured pruning of the distilled student, with and without KD recovery")
    return _save(fig, out / "pruning.png")


def default_rows(preset: str) -> Path:
    """The preset's ablation rows: those run on this machine (`<output_dir>/rows.json`), else the ones kept beside
    its table (`<table_dir>/<table_name>_rows.json`, in git)."""
    config = Path("configs", preset, "ablation.yaml")
    cfg = load_config(JobConfig, config) if config.is_file() else JobConfig()
    local = Path(cfg.output_dir, "rows.json")
    kept = Path(cfg.table_dir, f"{cfg.table_name}_rows.json")
    return kept if kept.is_file() and not local.is_file() else local


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments figures", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--runs", nargs="*", help="run folders with metrics.jsonl (default: runs/<preset>/* "
                        "except the ablation's)")
    parser.add_argument("--rows", nargs="*", help="ablation rows.json files or table CSVs, their rows drawn together "
                        "(default: outputs/<preset>/ablation/rows.json, else the table's <table_name>_rows.json)")
    parser.add_argument("--bench", help="token-pruning bench JSON (default: outputs/<preset>/bench/token_pruning.json)")
    parser.add_argument("--compare", nargs="*", default=[], help="run folders drawn together on shared axes "
                        "(compare.png), e.g. runs/toy/student runs/toy/student-ce")
    parser.add_argument("--out", default="paper/figures")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    run_dirs = [Path(r) for r in args.runs] if args.runs is not None else sorted(
        p.parent for p in Path("runs", args.preset).glob("*/metrics.jsonl"))
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise SystemExit(f"figures: {run_dir}/metrics.jsonl does not exist; name run folders written by a "
                             "training job (runs/<preset>/<run>/)")
        written += [plot_losses(run_dir, out), plot_eval(run_dir, out)]
    for run_dir in map(Path, args.compare):
        if not (run_dir / "metrics.jsonl").is_file():
            raise SystemExit(f"figures: --compare {run_dir}: {run_dir}/metrics.jsonl does not exist; name run folders "
                             "written by a training job (runs/<preset>/<run>/)")
    if len(args.compare) == 1:
        raise SystemExit("figures: --compare needs two or more run folders (e.g. the CE-only and the KD student)")
    if args.compare:
        written.append(plot_compare([Path(d) for d in args.compare], out))
    rows_paths = [Path(r) for r in args.rows] if args.rows else [default_rows(args.preset)]
    bench_path = Path(args.bench or Path("outputs", args.preset, "bench", "token_pruning.json"))
    missing = [str(r) for r in rows_paths if not r.is_file()]
    if args.rows and missing:
        raise SystemExit(f"figures: {', '.join(missing)} does not exist; name rows.json files or table CSVs written by "
                         "python -m experiments ablation")
    rows = [row for r in rows_paths if r.is_file() for row in load_rows(r)]
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    if not rows:
        print(f"figures: no ablation rows at {rows_paths[0]} (python -m experiments ablation makes them); "
              "pareto and pruning figures skipped")
    if bench is None:
        print(f"figures: no {bench_path} (python -m student.token_pruning_bench --out {bench_path} makes it)")
    written += [plot_pareto(rows, out), plot_token_keep(rows, bench, out), plot_pruning(rows, out)]
    for path in written:
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run(main)
