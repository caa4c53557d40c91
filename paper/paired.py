"""Every two-row comparison that paper.md states, paired by seed, with the standard error of the mean difference.

    python paper/paired.py            # writes paper/tables/paired.md (run from the repository root)

Nothing is re-measured. The per-seed values come from the rows files committed beside the tables
(`tables/ablation_rows.json`, `tables/kd_tasks_rows.json`, `tables/quick_kd_rows.json`,
`tables/quick_pruning_rows.json`, full precision) or, for
the first machine's tables whose rows files were never committed, from the per-seed values printed in paper.md
itself (§4.2's first table and the transfer table's per-seed list, 3 decimals; differences of those carry up to
±0.001 of rounding).

For each comparison and metric: the per-seed differences (second row − first), their mean, sample standard
deviation (sd) and standard error of the mean (se = sd / √n), on how many seeds the second row is better (lower WER,
higher CIDEr-D), and the verdict the paper may state: "differs" only when |mean| > 2 se, else "no measured
difference". With 3 seeds the 2-se rule is lenient (a two-sided 5 % paired t on 2 df needs |t| > 4.30); the column
t and the verdict also say where the stricter test passes. Same numbers as `python -m experiments compare` (which
prints sd, not se).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLES = HERE / "tables"
LOWER_IS_BETTER = {"wer"}
NAMES = {"wer": "WER", "cider_d": "CIDEr-D"}
# Two-sided 5 % critical values of Student's t by degrees of freedom (n − 1), for the seed counts used here.
T_CRITICAL_5PCT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}

# First machine, paper.md §4.2's first table ("WER per seed", "CIDEr-D per seed"), seeds 0, 1, 2 (feature KD: 0, 1).
FIRST_MACHINE = {
    "CE only (4.2)": {"wer": [0.958, 0.942, 0.912], "cider_d": [1.173, 1.159, 1.299]},
    "the recipe (4.2)": {"wer": [0.854, 1.072, 0.865], "cider_d": [1.173, 1.103, 1.172]},
    "Q-Former feature KD only (4.2)": {"wer": [0.822, 0.787], "cider_d": [1.053, 1.034]},
    # paper.md §4.2, "Per seed (0, 1, 2), WER / CIDEr-D" under the transfer table.
    "CE only, 750 clips": {"wer": [0.900, 0.898, 0.886], "cider_d": [1.088, 1.191, 1.023]},
    "the recipe, 750 clips": {"wer": [0.853, 0.845, 0.845], "cider_d": [1.167, 1.119, 1.232]},
    "CE only, 250 clips": {"wer": [0.918, 0.966, 0.938], "cider_d": [1.113, 1.010, 1.088]},
    "the recipe, 250 clips": {"wer": [0.882, 0.849, 0.877], "cider_d": [1.046, 1.073, 1.088]},
}

# (source, first row, second row); a source is a rows file in tables/ or "paper.md" for FIRST_MACHINE.
COMPARISONS = [
    ("paper.md", "CE only (4.2)", "the recipe (4.2)"),
    ("paper.md", "CE only (4.2)", "Q-Former feature KD only (4.2)"),
    ("paper.md", "CE only, 750 clips", "the recipe, 750 clips"),
    ("paper.md", "CE only, 250 clips", "the recipe, 250 clips"),
    ("paper.md", "CE only (4.2)", "CE only, 750 clips"),
    ("quick_kd_rows.json", "student, CE only", "the recipe"),
    ("quick_kd_rows.json", "student, CE only", "the recipe, not annealed"),
    ("quick_kd_rows.json", "the recipe", "the recipe, not annealed"),
    ("quick_kd_rows.json", "the recipe, not annealed", "logit KD only, not annealed"),
    ("quick_kd_rows.json", "the recipe, not annealed", "Q-Former feature KD only, not annealed"),
    ("quick_kd_rows.json", "student, CE only", "logit KD only, not annealed"),
    ("quick_kd_rows.json", "student, CE only", "Q-Former feature KD only, not annealed"),
    ("quick_kd_rows.json", "the recipe", "Q-Former feature KD only, not annealed"),
    ("quick_kd_rows.json", "student, CE only", "the recipe, KD temperature 2"),
    ("quick_kd_rows.json", "the recipe", "the recipe, KD temperature 2"),
    ("quick_kd_rows.json", "student, CE only", "the recipe, logit KD weight 0.25"),
    ("quick_kd_rows.json", "the recipe", "the recipe, logit KD weight 0.25"),
    ("quick_kd_rows.json", "student, CE only", "the recipe, KD on transcripts only"),
    ("quick_kd_rows.json", "the recipe", "the recipe, KD on transcripts only"),
    ("quick_kd_rows.json", "student, CE only", "student, CE only, the teacher's tokenizer"),
    ("quick_kd_rows.json", "student, CE only, the teacher's tokenizer",
     "logit KD only, not annealed, the teacher's tokenizer"),
    ("quick_kd_rows.json", "logit KD only, not annealed", "logit KD only, not annealed, the teacher's tokenizer"),
    ("quick_kd_rows.json", "student, CE only, the teacher's tokenizer", "the recipe, the teacher's tokenizer"),
    ("quick_kd_rows.json", "the recipe", "the recipe, the teacher's tokenizer"),
    ("quick_pruning_rows.json", "the recipe's student", "pruned 25 %, no recovery"),
    ("quick_pruning_rows.json", "pruned 25 %, no recovery", "pruned 25 % + KD recovery"),
    ("quick_pruning_rows.json", "pruned 25 % + KD recovery", "pruned 25 % + KD recovery, int8"),
    ("quick_pruning_rows.json", "the recipe's student", "pruned 50 %, no recovery"),
    ("quick_pruning_rows.json", "pruned 50 %, no recovery", "pruned 50 % + KD recovery"),
    ("quick_pruning_rows.json", "the recipe's student", "pruned 25 % + KD recovery, int8"),
    ("quick_pruning_rows.json", "the recipe's student", "pruned 50 % + KD recovery"),
    ("kd_tasks_rows.json", "student, CE only", "the recipe (forward KL + Q-Former feature KD, every task)"),
    ("kd_tasks_rows.json", "student, CE only", "the recipe, KD on transcripts only"),
    ("kd_tasks_rows.json", "the recipe (forward KL + Q-Former feature KD, every task)",
     "the recipe, KD on transcripts only"),
    ("ablation_rows.json", "student, CE only", "+ forward KL (cross-tokenizer aligned)"),
    ("ablation_rows.json", "student, CE only", "+ reverse KL"),
    ("ablation_rows.json", "student, CE only", "+ generalized JSD (β 0.5)"),
    ("ablation_rows.json", "student, CE only", "sequence-level KD"),
    ("ablation_rows.json", "student, CE only", "+ forward KL + Q-Former feature KD"),
    ("ablation_rows.json", "+ forward KL (cross-tokenizer aligned)", "+ forward KL + Q-Former feature KD"),
    ("ablation_rows.json", "+ forward KL + Q-Former feature KD", "the same without teacher annealing"),
    ("ablation_rows.json", "+ forward KL + Q-Former feature KD", "+ hidden-state KD"),
    ("ablation_rows.json", "BEATs keep 1.0", "BEATs keep 0.25"),
    ("ablation_rows.json", "BEATs keep 1.0", "+ forward KL + Q-Former feature KD"),
    ("ablation_rows.json", "BEATs keep 0.25", "+ forward KL + Q-Former feature KD"),
    ("ablation_rows.json", "+ forward KL + Q-Former feature KD", "pruned 25 %, no recovery"),
    ("ablation_rows.json", "pruned 25 %, no recovery", "pruned 25 % + KD recovery"),
    ("ablation_rows.json", "+ forward KL + Q-Former feature KD", "pruned 50 %, no recovery"),
    ("ablation_rows.json", "pruned 50 %, no recovery", "pruned 50 % + KD recovery"),
    ("ablation_rows.json", "+ forward KL + Q-Former feature KD", "pruned 50 % + KD recovery"),
    ("ablation_rows.json", "pruned 50 % + KD recovery", "pruned 50 % + KD recovery + int8"),
]


def per_seed(source: str, row: str) -> dict[str, dict[int, float]]:
    """{metric: {seed: value}} for one row."""
    if source == "paper.md":
        return {m: dict(enumerate(values)) for m, values in FIRST_MACHINE[row].items()}
    seeds = json.loads((TABLES / source).read_text())[row]["seeds"]
    return {m: {s["seed"]: s[m] for s in seeds if s.get(m) is not None} for m in NAMES}


def paired(a: dict[int, float], b: dict[int, float], metric: str) -> dict:
    """Differences b − a over the seeds both have; mean, sd, se = sd/√n, t = mean/se, seeds where b is better."""
    seeds = sorted(set(a) & set(b))
    diffs = [b[s] - a[s] for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else math.nan
    se = sd / math.sqrt(n) if n > 1 else math.nan
    better = sum((d < 0) if metric in LOWER_IS_BETTER else (d > 0) for d in diffs)
    t = mean / se if n > 1 and se > 0 else math.nan
    verdict = "no measured difference"
    if n > 1 and abs(mean) > 2 * se:
        verdict = "differs (> 2 se; also 5 % paired t)" if abs(t) > T_CRITICAL_5PCT[n - 1] else "differs (> 2 se)"
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd, "se": se, "t": t, "better": better,
            "verdict": verdict}


def main() -> None:
    lines = [
        "# Paired comparisons behind paper.md's claims",
        "",
        "Written by `python paper/paired.py` from the per-seed values in `tables/ablation_rows.json`,",
        "`tables/kd_tasks_rows.json`, `tables/quick_kd_rows.json`, `tables/quick_pruning_rows.json` and, for the",
        "first machine (paper.md §4.2's first",
        "table and its transfer per-seed list; 3 decimals), paper.md itself. Difference = second row − first,",
        "paired by seed (same seed: same initialisation and data order). se = sd / √n. \"differs\" only when",
        "|mean| > 2 se; with 3 seeds a two-sided 5 % paired t test needs |t| > 4.30 (2 df), with 5 seeds |t| > 2.78",
        "(4 df).",
        "",
        "| source | first row | second row | metric | seeds | per-seed difference | mean ± se | sd | t | "
        "second better on | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source, first, second in COMPARISONS:
        a, b = per_seed(source, first), per_seed(source, second)
        for metric, name in NAMES.items():
            r = paired(a[metric], b[metric], metric)
            diffs = ", ".join(f"{d:+.3f}" for d in r["diffs"])
            lines.append(f"| {source} | {first} | {second} | {name} | {len(r['seeds'])} | {diffs} | "
                         f"{r['mean']:+.3f} ± {r['se']:.3f} | {r['sd']:.3f} | {r['t']:.2f} | "
                         f"{r['better']} of {len(r['seeds'])} | {r['verdict']} |")
    (TABLES / "paired.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
