"""The figures' drawing helpers: smoothing, one colour per row, labels beside points, axis labels on every panel,
runs compared on one set of axes and eval metrics over training steps (tiny logs and rows written here)."""

import json
import math

import matplotlib.colors as mcolors
import pytest

import experiments.figures as figures
from experiments.figures import distinct_colors, ema, eval_metrics, spread


def test_ema_is_debiased_and_keeps_a_constant():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 1.0 + 3.0) / 1.5])
    assert ema([1.0, 5.0, -2.0], 0.0) == [1.0, 5.0, -2.0]
    smooth = ema([0.0] * 10 + [1.0] * 50, 0.8)
    assert smooth[9] == 0.0 and 0.0 < smooth[10] < 1.0 and smooth[-1] == pytest.approx(1.0, abs=1e-4)  # 0.8^50
    assert all(a <= b for a, b in zip(smooth, smooth[1:], strict=False))  # a step is followed monotonically


def test_ema_passes_a_nan_through_and_rejects_a_bad_weight():
    out = ema([1.0, float("nan"), 3.0], 0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx((0.5 * 1.0 + 3.0) / 1.5)
    with pytest.raises(ValueError, match="weight must be in"):
        ema([1.0], 1.0)


@pytest.mark.parametrize("n", [3, 10, 16, 20, 25])
def test_every_row_gets_its_own_colour(n):
    colors = [mcolors.to_hex(c) for c in distinct_colors(n)]
    assert len(colors) == n and len(set(colors)) == n


def test_spread_keeps_order_and_gap_within_bounds():
    placed = spread([0.5, 0.5, 0.5, 0.9], gap=0.1)
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(placed, placed[1:], strict=False))
    assert all(0.0 <= y <= 1.0 for y in placed)
    assert spread([0.1, 0.5, 0.9], gap=0.1) == [0.1, 0.5, 0.9]  # labels with room stay at their points
    crowded = spread([0.5] * 30, gap=0.1, low=0.0, high=1.0)  # 30 labels cannot be 0.1 apart: the gap shrinks
    assert min(crowded) >= 0.0 and max(crowded) <= 1.0 + 1e-9
    assert len({round(y, 6) for y in crowded}) == 30


def test_eval_metrics_over_training_steps():
    records = [{"step": 10, "train/ce": 2.0, "eval/wer": 0.9}, {"step": 20, "train/ce": 1.5},
               {"step": 30, "eval/wer": 0.7, "eval/cider_d": 0.4}]
    assert eval_metrics(records) == {"wer": ([10, 30], [0.9, 0.7]), "cider_d": ([30], [0.4])}


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved during a test, kept open for inspection."""
    figs = {}
    save = figures._save

    def keep(fig, path):
        figs[path.name] = fig
        written = save(fig, path)  # closing the figure keeps its artists, laid out as the file has them
        assert written.is_file()
        return written

    monkeypatch.setattr(figures, "_save", keep)
    return figs


def write_run(folder, ce_offset: float, steps: int = 60):
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "train/ce": ce_offset + 3.0 / step + 0.1 * math.sin(step), "train/lr": 1e-3}
        if ce_offset == 0.0:
            record["train/kd"] = 1.0 / step
        if step % 20 == 0:
            record["eval/wer"] = 1.0 - step / 100 + ce_offset
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_runs_compared_on_one_set_of_axes_with_eval_curves(tmp_path, drawn):
    kd, ce = tmp_path / "runs" / "student", tmp_path / "runs" / "student-ce"
    write_run(kd, 0.0)
    write_run(ce, 0.2)
    assert figures.main(["--runs", str(kd), "--compare", str(kd), str(ce), "--rows", "--bench",
                         str(tmp_path / "none.json"), "--out", str(tmp_path / "figs")]) == 0
    assert {"loss_runs_student.png", "eval_runs_student.png", "compare.png"} <= set(drawn)
    compare = drawn["compare.png"]
    titles = {ax.get_title(): ax for ax in compare.axes if ax.axison}
    assert set(titles) == {"train/ce", "eval/wer"}  # kd was logged by one run only: nothing to compare
    legend = [t.get_text() for t in titles["train/ce"].get_legend().get_texts()]
    assert legend == ["runs_student", "runs_student-ce"]
    # Each run: a faint raw curve and its solid EMA (60 points are smoothed); the eval curve (3 points) is not.
    ce_lines = titles["train/ce"].get_lines()
    assert len(ce_lines) == 4 and sorted(line.get_alpha() or 1.0 for line in ce_lines) == [0.25, 0.25, 1.0, 1.0]
    assert len(titles["eval/wer"].get_lines()) == 2
    for name, fig in drawn.items():
        for ax in fig.axes:
            if ax.axison:
                assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: panel '{ax.get_title()}' lacks an axis label"


def test_pareto_gives_each_row_a_colour_and_its_name_beside_it(tmp_path, drawn):
    rows = {f"row {i}": {"name": f"row {i}", "tags": {}, "seeds": [
        {"seed": s, "wer": 0.8 + 0.01 * i + 0.001 * s, "cider_d": 1.0 + 0.01 * i, "params_ratio": 0.25}
        for s in (0, 1)]} for i in range(16)}  # 16 rows of one size, as the toy ablation has
    rows["teacher"] = {"name": "teacher", "tags": {},
                       "seeds": [{"seed": 0, "wer": 0.7, "cider_d": 1.0, "params_ratio": 1.0}]}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert figures.main(["--runs", "--rows", str(path), "--bench", str(tmp_path / "none.json"),
                         "--out", str(tmp_path / "figs")]) == 0
    fig = drawn["pareto.png"]
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
        labels = {t.get_text(): t for t in ax.texts}
        assert set(rows) <= set(labels)
        colors = {mcolors.to_hex(labels[name].get_color()) for name in rows}
        assert len(colors) == len(rows)  # 17 rows, 17 colours
        # Labels of rows at one size do not overlap each other.
        boxes = sorted((labels[name].get_window_extent() for name in rows if name != "teacher"), key=lambda b: b.y0)
        assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:], strict=False))  # 0.5 px: rounding
