"""The ablation table: its columns and statistics, shared by the runner (`experiments.ablation`), the seed-by-seed
comparison (`experiments.compare`) and the figures (`experiments.figures`), and the files the runner writes from its
rows (`write_tables`: Markdown, CSV, LaTeX, the commands, the per-seed rows)."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

from experiments.ablation_config import JobConfig

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


def summarise(row: dict) -> dict[str, tuple[float | None, float | None]]:
    cells = {k: mean_std([s[k] for s in row["seeds"]]) for k in QUALITY}
    cells.update({k: mean_std([s[f"{k}_ratio"] for s in row["seeds"]]) for k in RATIOS})
    scale = {"params_m": ("params", 1e6), "weight_mb": ("weight_bytes", 2**20)}
    cells.update({k: mean_std([None if s.get(src) is None else s[src] / div for s in row["seeds"]])
                  for k, (src, div) in scale.items()})
    return cells


def _cell(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def row_command(cfg: JobConfig, name: str) -> str:
    return f"python -m experiments ablation --config {cfg.config_path} only={shlex.quote(json.dumps([name]))}"


def write_tables(cfg: JobConfig, rows: list[dict], missing: list[str] | None = None) -> list[Path]:
    """`<table_name>.md`, `.csv`, `.tex`, `_commands.md` and `_rows.json` under `table_dir`; returns the paths.
    `missing` names the config's rows not run yet: the Markdown table says so under it."""
    out = Path(cfg.table_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = (*QUALITY, *SIZES, *RATIOS)
    summaries = [summarise(r) for r in rows]

    md = [f"| row | {' | '.join(HEADERS[k] for k in keys)} | seeds |", "|---" * (len(keys) + 2) + "|"]
    for row, cells in zip(rows, summaries, strict=True):
        md.append(f"| {row['name']} | " + " | ".join(_cell(*cells[k]) for k in keys) + f" | {len(row['seeds'])} |")
    unavailable = {k: v for r in rows for k, v in r["unavailable"].items()}
    notes = [f"- {HEADERS[k]} n/a: {reason}" for k, reason in sorted(unavailable.items())]
    if missing:
        notes.insert(0, f"- **Incomplete:** {len(missing)} of the config's {len(rows) + len(missing)} rows have not "
                        f"run yet ({'; '.join(missing)}); `status=true` tells what is left.")
    md_text = "\n".join([
        f"# {cfg.table_name.capitalize()} ({cfg.preset} preset)", "",
        "Quality on the test split; the × columns are ratios to the teacher measured in the same process as the",
        "row's model (× < 1 is smaller / faster). Mean ± sample std over the seeds; rows without stages (a finished",
        "model) run once.", "", *md, "", *notes, "",
        f"Regenerate everything: `python -m experiments ablation --config {cfg.config_path}`; one row: the command in",
        f"`{cfg.table_name}.csv`; every stage command: `{cfg.table_name}_commands.md`.", ""])
    md_path = out / f"{cfg.table_name}.md"
    md_path.write_text(md_text)

    csv_path = out / f"{cfg.table_name}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *[f"{k}_{s}" for k in keys for s in ("mean", "std")], "seeds", "command"])
        for row, cells in zip(rows, summaries, strict=True):
            values = [("" if v is None else f"{v:.6g}") for k in keys for v in cells[k]]
            writer.writerow([row["name"], *values, len(row["seeds"]), row_command(cfg, row["name"])])

    def tex_escape(text: str) -> str:
        return text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")

    tex = [r"\begin{tabular}{l" + "r" * len(keys) + "}", r"\toprule",
           "Row & " + " & ".join(tex_escape(HEADERS[k]).replace("×", r"$\times$") for k in keys) + r" \\",
           r"\midrule"]
    for row, cells in zip(rows, summaries, strict=True):
        tex.append(tex_escape(row["name"]) + " & "
                   + " & ".join(_cell(*cells[k]).replace("±", r"$\pm$") for k in keys) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}", ""]
    tex_path = out / f"{cfg.table_name}.tex"
    tex_path.write_text("\n".join(tex))

    lines = [f"# Commands behind {cfg.table_name}.md", ""]
    for row in rows:
        lines += [f"## {row['name']}", "", f"    {row_command(cfg, row['name'])}", ""]
        for entry in row["commands"]:
            lines.append(f"seed {entry['seed']}:")
            lines += ["", *[f"    {c}" for c in entry["stages"]], f"    {entry['evaluate']}", ""]
    commands_path = out / f"{cfg.table_name}_commands.md"
    commands_path.write_text("\n".join(lines))
    rows_path = out / f"{cfg.table_name}_rows.json"
    rows_path.write_text(json.dumps({row["name"]: row for row in rows}, indent=1) + "\n")
    return [md_path, csv_path, tex_path, commands_path, rows_path]
