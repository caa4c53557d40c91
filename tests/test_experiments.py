"""The ablation runner's planning and statistics, and the figures' Pareto front (no training here; the smoke
pipeline test runs the whole ablation at smoke size)."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from experiments.ablation import plan_row, row_seeds
from experiments.ablation_config import JobConfig, Row, StageRun
from experiments.figures import loss_terms, pareto_front
from experiments.table import RATIOS, mean_std, write_tables


def write_preset(tmp_path):
    root = tmp_path / "configs"
    (root / "p").mkdir(parents=True)
    (root / "p" / "distill.yaml").write_text("job: distill.train\nloop:\n  max_steps: 3\n")
    (root / "p" / "prune.yaml").write_text("job: prune.structured\n")
    (root / "p" / "data.yaml").write_text("job: toybench.generate\n")
    return JobConfig(preset="p", configs_root=str(root), output_dir=str(tmp_path / "out"), runs_dir="runs/x",
                     config_path="ablation.yaml")


def write_ablation(tmp_path, cfg, body: str) -> Path:
    """An ablation YAML over `write_preset`'s preset, its tables under tmp_path; `body` adds keys and the rows."""
    config = tmp_path / "ablation.yaml"
    config.write_text(f"job: experiments.ablation\npreset: p\nconfigs_root: {cfg.configs_root}\n"
                      f"output_dir: {cfg.output_dir}\ntable_dir: {tmp_path}\n{body}")
    return config


def test_plan_chains_prev_and_seed_and_shares_identical_stages(tmp_path):
    cfg = write_preset(tmp_path)
    kd = StageRun(config="distill", overrides=["kd.loss=forward_kl"])
    row_a = Row(name="a", stages=[kd])
    row_b = Row(name="b", stages=[kd, StageRun(config="prune", overrides=["model={prev}", "ratios.llm_mlp=0.5"])])
    stages_a, model_a = plan_row(cfg, row_a, seed=1)
    stages_b, model_b = plan_row(cfg, row_b, seed=1)
    assert stages_a[0].output_dir == stages_b[0].output_dir  # same job, config, overrides and seed: one run
    assert model_a == stages_a[0].output_dir / "model"
    assert "loop.seed=1" in stages_a[0].overrides and f"log_dir=runs/x/{stages_a[0].output_dir.name}" in \
        stages_a[0].overrides
    assert f"model={model_a}" in stages_b[1].overrides and "seed=1" in stages_b[1].overrides
    assert model_b == stages_b[1].output_dir / "model"
    other_seed, _ = plan_row(cfg, row_a, seed=2)
    assert other_seed[0].output_dir != stages_a[0].output_dir
    # The base config's text is part of the key: editing it cannot silently reuse an old run.
    (tmp_path / "configs" / "p" / "distill.yaml").write_text("job: distill.train\nloop:\n  max_steps: 4\n")
    assert plan_row(cfg, row_a, seed=1)[0][0].output_dir != stages_a[0].output_dir
    assert stages_a[0].command[:5] == ["python", "-m", "distill.train", "--config",
                                       str(tmp_path / "configs" / "p" / "distill.yaml")]


def test_a_row_may_run_more_seeds_than_the_table(tmp_path):
    from common.config import load_job_config

    config = tmp_path / "ablation.yaml"
    config.write_text("job: experiments.ablation\nseeds: [0, 1, 2]\nrows:\n"
                      "  - {name: teacher, path: t/model, seeds: [5, 6]}\n"
                      "  - {name: close call, stages: [{config: distill}], seeds: [0, 1, 2, 3, 4]}\n"
                      "  - {name: plain, stages: [{config: distill}]}\n")
    cfg = load_job_config(config)
    assert [row_seeds(cfg, row) for row in cfg.rows] == [[5], [0, 1, 2, 3, 4], [0, 1, 2]]


def test_plan_rejects_bad_rows(tmp_path):
    cfg = write_preset(tmp_path)
    with pytest.raises(SystemExit, match="does not exist"):
        plan_row(cfg, Row(name="x", stages=[StageRun(config="nope")]), 0)
    with pytest.raises(SystemExit, match="cannot chain"):
        plan_row(cfg, Row(name="x", stages=[StageRun(config="data")]), 0)
    with pytest.raises(SystemExit, match="first stage"):
        plan_row(cfg, Row(name="x", stages=[StageRun(config="distill", overrides=["init_from={prev}"])]), 0)
    with pytest.raises(SystemExit, match="neither"):
        plan_row(cfg, Row(name="x"), 0)
    stages, model = plan_row(cfg, Row(name="t", path="teacher/model"), 0)
    assert stages == [] and str(model) == "teacher/model"


def test_mean_std_is_the_sample_statistic():
    values = [0.31, 0.27, 0.35]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values)) and std == pytest.approx(statistics.stdev(values))
    assert mean_std([0.5, None]) == (0.5, None)
    assert mean_std([None]) == (None, None)


def test_pareto_front():
    points = [(1.0, 0.30), (0.5, 0.28), (0.25, 0.20), (0.5, 0.10), (0.3, 0.29), (0.9, 0.25)]
    assert pareto_front(points, higher_is_better=True) == [(0.25, 0.20), (0.3, 0.29), (1.0, 0.30)]
    wer = [(1.0, 0.1), (0.5, 0.2), (0.25, 0.15), (0.2, 0.5)]
    assert pareto_front(wer, higher_is_better=False) == [(0.2, 0.5), (0.25, 0.15), (1.0, 0.1)]


def test_loss_terms_leave_out_non_losses():
    records = [{"step": 10, "train/ce": 2.0, "train/kd": 1.0, "train/lr": 1e-3, "eval/wer": 0.5},
               {"step": 20, "train/ce": 1.5, "train/grad_norm": 3.0}]
    assert loss_terms(records) == {"ce": ([10, 20], [2.0, 1.5]), "kd": ([10], [1.0])}


def test_tables_hold_mean_and_std_per_row(tmp_path):
    cfg = JobConfig(preset="p", table_dir=str(tmp_path), table_name="t", config_path="configs/p/ablation.yaml")
    seeds = [{"seed": s, "wer": w, "cider_d": c, "spice": None, "spider": None, "params": 5_000_000,
              "weight_bytes": 20 * 2**20, "params_ratio": 0.25,
              "weight_bytes_ratio": 0.25, "peak_memory_mb_ratio": 0.3, "ttft_ms_ratio": 0.6, "tpot_ms_ratio": 0.2}
             for s, w, c in ((0, 0.2, 0.30), (1, 0.4, 0.34))]
    rows = [{"name": "kd & co", "tags": {}, "seeds": seeds, "commands": [{"seed": 0, "stages": ["python -m x"],
             "evaluate": "python -m evaluation.run"}], "unavailable": {"spice": "no SPICE jar"}}]
    md, csv_path, tex, commands, kept = write_tables(cfg, rows)
    text = md.read_text()
    wer_std, cider_std = math.sqrt(0.02), math.sqrt(0.0008)
    assert (f"| kd & co | 0.300 ± {wer_std:.3f} | 0.320 ± {cider_std:.3f} | n/a | n/a | 5.000 ± 0.000 | "
            "20.000 ± 0.000 | 0.250 ± 0.000 |") in text
    assert "SPICE n/a: no SPICE jar" in text
    header, line = list(csv.reader(csv_path.open()))
    assert header[:4] == ["row", "wer_mean", "wer_std", "cider_d_mean"] and line[:3] == ["kd & co", "0.3", "0.141421"]
    assert line[-1].endswith(f"only='{json.dumps(['kd & co'])}'")  # the row's own command
    assert r"kd \& co" in tex.read_text() and r"$\pm$" in tex.read_text()
    assert "python -m x" in commands.read_text()
    assert json.loads(kept.read_text()) == {"kd & co": rows[0]}  # the per-seed values, kept for the figures
    assert "Incomplete" not in text
    md = write_tables(cfg, rows, missing=["pruned 50 %", "int8"])[0]  # a table some of whose rows have not run
    assert "**Incomplete:** 2 of the config's 3 rows have not run yet (pruned 50 %; int8)" in md.read_text()


def test_a_typo_in_any_row_stops_before_anything_runs(tmp_path):
    from experiments.ablation import main

    cfg = write_preset(tmp_path)
    config = write_ablation(tmp_path, cfg, (
        "rows:\n"
        "  - name: fine\n    stages: [{config: distill, overrides: [kd.loss=reverse_kl]}]\n"
        "  - name: typo\n    stages: [{config: distill, overrides: [kd.los=reverse_kl]}]\n"))
    with pytest.raises(SystemExit, match=r"row 'typo'.*kd.los.*did you mean 'loss'"):
        main(["--config", str(config)])
    assert not (tmp_path / "out").exists()


def test_a_retrained_teacher_gets_new_stage_folders(tmp_path):
    cfg = write_preset(tmp_path)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "llm.safetensors").write_bytes(b"1234")
    cfg.teacher.path = str(teacher)
    row = Row(name="a", stages=[StageRun(config="distill")])
    before = plan_row(cfg, row, 0)[0][0].output_dir
    assert plan_row(cfg, row, 0)[0][0].output_dir == before
    (teacher / "llm.safetensors").write_bytes(b"123456")
    assert plan_row(cfg, row, 0)[0][0].output_dir != before


def test_only_the_latest_run_of_a_log_folder_is_plotted():
    from experiments.figures import latest_run

    old = [{"step": s, "train/ce": 9.0} for s in (10, 20, 30)]
    fresh = [{"step": s, "train/ce": 1.0} for s in (10, 20)]
    assert latest_run(old + fresh) == fresh  # a --force rerun replaces the old curve
    resumed = [{"step": s, "train/ce": 2.0} for s in (20, 30, 40)]
    assert [r["step"] for r in latest_run(old + resumed)] == [10, 20, 30, 40]  # a resume continues it
    assert latest_run(old + resumed)[1]["train/ce"] == 2.0


def test_a_stage_started_from_an_outside_model_reruns_when_that_model_changes(tmp_path):
    cfg = write_preset(tmp_path)
    student = tmp_path / "student" / "model"
    student.mkdir(parents=True)
    (student / "weights.bin").write_bytes(b"1")
    row = Row(name="p", stages=[StageRun(config="prune", overrides=[f"model={student}"])])
    first = plan_row(cfg, row, 0)[0][0].output_dir
    assert plan_row(cfg, row, 0)[0][0].output_dir == first
    (student / "weights.bin").write_bytes(b"22")  # the student was retrained
    assert plan_row(cfg, row, 0)[0][0].output_dir != first


def test_rows_finished_by_another_process_meanwhile_are_kept(tmp_path, monkeypatch):
    """Two ablation processes on different rows (`only=`) share rows.json: each reads it again before writing."""
    import experiments.ablation as ablation

    cfg = write_preset(tmp_path)
    config = write_ablation(tmp_path, cfg, (
        "rows:\n"
        "  - name: mine\n    stages: [{config: distill}]\n"
        "  - name: theirs\n    stages: [{config: distill, overrides: [kd.loss=reverse_kl]}]\n"))
    rows_json = tmp_path / "out" / "rows.json"

    def run_row(cfg, row):  # the other process finishes its row while this one trains
        rows_json.parent.mkdir(parents=True, exist_ok=True)
        rows_json.write_text(json.dumps({"theirs": {"name": "theirs", "seeds": []}}))
        return {"name": row.name, "seeds": []}

    def write_tables(cfg, rows, missing):
        (tmp_path / f"{cfg.table_name}.md").write_text(" ".join(row["name"] for row in rows))
        return []

    monkeypatch.setattr(ablation, "run_row", run_row)
    monkeypatch.setattr(ablation, "write_tables", write_tables)
    assert ablation.main(["--config", str(config), 'only=["mine"]']) == 0
    assert set(json.loads(rows_json.read_text())) == {"mine", "theirs"}


def test_figures_draw_the_rows_of_several_ablation_files_together(tmp_path):
    from experiments.figures import main as figures_main

    def seeds(wer, cider):
        return [{"seed": s, "wer": wer + 0.01 * s, "cider_d": cider, "spice": None, "spider": None,
                 "params_ratio": 0.2} for s in (0, 1)]

    pruning, ablation = tmp_path / "pruning.json", tmp_path / "ablation.json"
    pruning.write_text(json.dumps({"pruned": {"name": "pruned", "tags": {"prune_ratio": 0.5, "recovery": 1},
                                              "seeds": seeds(0.9, 0.3)}}))
    ablation.write_text(json.dumps({"keep": {"name": "keep", "tags": {"keep_ratio": 0.25},
                                             "seeds": seeds(0.8, 0.4)}}))
    args = ["--runs", "--bench", str(tmp_path / "none.json")]
    assert figures_main([*args, "--rows", str(pruning), "--out", str(tmp_path / "one")]) == 0
    assert not (tmp_path / "one" / "token_keep.png").exists()
    assert figures_main([*args, "--rows", str(pruning), str(ablation), "--out", str(tmp_path / "both")]) == 0
    assert {p.name for p in (tmp_path / "both").iterdir()} >= {"pruning.png", "token_keep.png", "pareto.png"}
    with pytest.raises(SystemExit, match="nope.json does not exist"):
        figures_main([*args, "--rows", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")])


def test_pruning_figure_draws_one_point_per_ratio_the_row_with_most_seeds():
    from experiments.figures import pruning_points

    def row(ratio, recovery, wers, int8=0):
        return {"tags": {"prune_ratio": ratio, "recovery": recovery, "int8": int8},
                "seeds": [{"seed": i, "wer": w} for i, w in enumerate(wers)]}

    rows = [row(0.5, 0, [1.4]), row(0.5, 0, [1.0, 1.2, 1.4]), row(0.25, 0, [0.8]), row(0.5, 1, [0.9]),
            row(0.5, 0, [9.0, 9.0, 9.0, 9.0], int8=1)]
    assert pruning_points(rows, "wer", 0) == [(0.25, 0.8, None), (0.5, pytest.approx(1.2), pytest.approx(0.2))]
    assert pruning_points(rows, "wer", 1) == [(0.5, 0.9, None)]
    # the unpruned student, however tagged, starts the curve with recovery too
    rows.append(row(0.0, 0, [0.7]))
    assert pruning_points(rows, "wer", 1) == [(0.0, 0.7, None), (0.5, 0.9, None)]
    assert pruning_points(rows, "wer", 0)[0] == (0.0, 0.7, None)


def test_figures_fall_back_to_the_rows_kept_beside_the_table(tmp_path, monkeypatch):
    """A clone has no outputs/: the figures read the per-seed values written (and committed) beside the table."""
    from experiments.figures import default_rows

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "p").mkdir(parents=True)
    (tmp_path / "configs" / "p" / "ablation.yaml").write_text(
        "job: experiments.ablation\npreset: p\noutput_dir: out/abl\ntable_dir: tables\ntable_name: t\n")
    assert default_rows("p") == Path("out/abl/rows.json")  # neither exists: the one the message names
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t_rows.json").write_text("{}")
    assert default_rows("p") == Path("tables/t_rows.json")
    (tmp_path / "out" / "abl").mkdir(parents=True)
    (tmp_path / "out" / "abl" / "rows.json").write_text("{}")
    assert default_rows("p") == Path("out/abl/rows.json")  # rows run here win


def test_figures_read_a_tables_csv_as_the_rows_json_it_came_from(tmp_path, monkeypatch):
    """Mean ± std and seed counts from the CSV equal those computed from the per-seed values; tags come from the
    config named in each row's command."""
    from experiments.figures import load_rows, n_seeds, pruning_points, stat
    from experiments.figures import main as figures_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text(
        "job: experiments.ablation\nrows:\n  - name: pruned\n    tags: {prune_ratio: 0.5, recovery: 1}\n"
        "    stages: [{config: distill}]\n  - name: plain\n    stages: [{config: distill}]\n")
    cfg = JobConfig(preset="p", table_dir="tables", table_name="t", config_path="configs/a.yaml")

    def seeds(wers):
        ratios = {f"{k}_ratio": 0.25 + 0.01 * i for i, k in enumerate(RATIOS)}
        return [{"seed": i, "wer": w, "cider_d": 1.0 + w, "spice": None, "spider": None, **ratios,
                 "params": 5, "weight_bytes": 20} for i, w in enumerate(wers)]

    rows = [{"name": "pruned", "tags": {"prune_ratio": 0.5, "recovery": 1}, "seeds": seeds([0.2, 0.4, 0.9]),
             "commands": [], "unavailable": {}},
            {"name": "plain", "tags": {}, "seeds": seeds([0.3]), "commands": [], "unavailable": {}}]
    write_tables(cfg, rows)
    from_csv = load_rows(Path("tables/t.csv"))
    assert [r["name"] for r in from_csv] == ["pruned", "plain"]
    assert from_csv[0]["tags"] == {"prune_ratio": 0.5, "recovery": 1} and from_csv[1]["tags"] == {}
    for csv_row, json_row in zip(from_csv, load_rows(Path("tables/t_rows.json")), strict=True):
        assert n_seeds(csv_row) == n_seeds(json_row)
        for key in ("wer", "cider_d", "spice", *(f"{k}_ratio" for k in RATIOS)):
            for got, want in zip(stat(csv_row, key), stat(json_row, key), strict=True):  # mean, std (None: n/a)
                assert got == (None if want is None else pytest.approx(want, rel=1e-5)), key
    assert pruning_points(from_csv, "wer", 1) == [(0.5, pytest.approx(0.5), pytest.approx(math.sqrt(0.13)))]
    assert figures_main(["--runs", "--rows", "tables/t.csv", "--out", "figs"]) == 0
    assert (tmp_path / "figs" / "pareto.png").is_file() and (tmp_path / "figs" / "pruning.png").is_file()
    with pytest.raises(SystemExit, match="is not a table written by"):
        Path("other.csv").write_text("a,b\n1,2\n")
        load_rows(Path("other.csv"))


def test_status_tells_done_started_and_left_without_running_anything(tmp_path, monkeypatch, capsys):
    import shlex

    import experiments.ablation as ablation

    cfg = write_preset(tmp_path)
    (tmp_path / "configs" / "p" / "evaluate.yaml").write_text("job: evaluation.run\n")
    config = write_ablation(tmp_path, cfg, (
        "seeds: [0, 1]\n"
        "rows:\n"
        "  - name: kd\n    stages: [{config: distill}]\n"
        "  - name: kd pruned\n    stages: [{config: distill}, {config: prune, overrides: ['model={prev}']}]\n"))
    from common.config import load_job_config

    loaded = load_job_config(config)
    kd, pruned = loaded.rows
    (seed0, ), model0 = plan_row(loaded, kd, 0)
    seed0.output_dir.mkdir(parents=True)
    (seed0.output_dir / "ABLATION_DONE").write_text(shlex.join(seed0.command))  # seed 0 finished
    model0.mkdir()
    eval_dir, eval_command = ablation.plan_eval(loaded, kd, model0, is_teacher=False)
    eval_dir.mkdir(parents=True)
    (eval_dir / "DONE").write_text(shlex.join(eval_command))  # and scored
    (seed1, ), _ = plan_row(loaded, kd, 1)
    (seed1.output_dir / "checkpoints").mkdir(parents=True)  # seed 1 interrupted mid-training

    def must_not_run(*args):
        raise AssertionError("status=true ran a row")

    monkeypatch.setattr(ablation, "run_row", must_not_run)
    assert ablation.main(["--config", str(config), "status=true"]) == 0
    out = capsys.readouterr().out
    assert f"seed 0: {seed0.output_dir.name} done · evaluation done" in out
    assert f"seed 1: {seed1.output_dir.name} started · evaluation to run" in out
    prune_name = plan_row(loaded, pruned, 0)[0][1].output_dir.name
    assert f"seed 0: {seed0.output_dir.name} done · {prune_name} to run · evaluation to run" in out
    # 2 distill runs shared by both rows + 2 prunes; 4 row-seed evaluations
    assert "stages: 1 of 4 done, 1 started; evaluations: 1 of 4 done" in out
    assert not (tmp_path / "out" / "rows.json").exists()


def test_compare_pairs_rows_by_seed(tmp_path, capsys):
    from experiments.compare import main as compare

    def seeds(values):
        return [{"seed": s, "wer": w, "cider_d": c, "spice": None} for s, (w, c) in values.items()]

    rows = {"student, CE only": {"name": "student, CE only", "seeds": seeds({0: (0.9, 1.0), 1: (1.0, 1.2),
                                                                             2: (0.8, 1.1), 7: (0.5, 2.0)})},
            "the recipe": {"name": "the recipe", "seeds": seeds({0: (0.8, 1.1), 1: (0.8, 1.1), 2: (0.9, 1.3)})},
            "the recipe, no annealing": {"name": "the recipe, no annealing", "seeds": seeds({0: (1.0, 0.7)})}}
    path = tmp_path / "t_rows.json"
    path.write_text(json.dumps(rows))
    assert compare([str(path), "student", "the recipe", "--json"]) == 0
    result = {r["metric"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    wer = result["wer"]
    assert wer["seeds"] == [0, 1, 2]  # seed 7 only in the first row: not paired
    assert wer["diffs"] == pytest.approx([-0.1, -0.2, 0.1])
    assert wer["better"] == 2  # lower WER is better
    d = [-0.1, -0.2, 0.1]
    assert wer["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3))  # the ± is the standard error
    assert wer["t"] == pytest.approx(statistics.mean(d) / (statistics.stdev(d) / math.sqrt(3)))
    assert result["cider_d"]["better"] == 2 and "spice" not in result  # higher CIDEr-D is better; no SPICE values
    assert compare([str(path), "student", "the recipe"]) == 0
    se = statistics.stdev(d) / math.sqrt(3)
    assert f"WER: {statistics.mean(d):+.3f} ± {se:.3f} (standard error; std {statistics.stdev(d):.3f})" in \
        capsys.readouterr().out
    assert compare([str(path), "student", "the recipe, no"]) == 0
    out = capsys.readouterr().out
    assert "WER: +0.100 (per seed +0.100); lower on 0 of 1 seeds" in out
    assert "not compared (no seed with a value in both rows): SPICE, SPIDEr" in out
    with pytest.raises(SystemExit, match="2 rows start with 'the rec'"):
        compare([str(path), "student", "the rec"])
    table_csv = tmp_path / "t.csv"
    table_csv.write_text("row,wer_mean\nteacher,0.7\n")
    with pytest.raises(SystemExit, match="t.csv is not JSON"):
        compare([str(table_csv), "a", "b"])


def test_a_stage_finished_for_another_table_is_adopted_not_rerun(tmp_path, monkeypatch):
    import dataclasses
    import shlex

    import experiments.ablation as ablation
    from common.config import load_job_config, save_resolved
    from common.stages import mark_stage_done, stage_is_current

    monkeypatch.chdir(tmp_path)
    cfg = write_preset(tmp_path)
    other = dataclasses.replace(cfg, output_dir=str(tmp_path / "other"), runs_dir="runs/other")  # another table
    row = Row(name="kd", stages=[StageRun(config="distill")], seeds=[0])
    (source, ), _ = plan_row(other, row, 0)
    source_cfg = load_job_config(source.config, source.overrides)  # a finished run, bookkept as distill.train does
    (source.output_dir / "model").mkdir(parents=True)
    (source.output_dir / "model" / "weights.bin").write_bytes(b"trained")
    (tmp_path / "cache.bin").write_bytes(b"c")
    mark_stage_done(source_cfg, source.output_dir / "model", inputs=[tmp_path / "cache.bin"])
    save_resolved(source_cfg, source.output_dir)
    (source.output_dir / "ABLATION_DONE").write_text(shlex.join(source.command))
    (tmp_path / "runs" / "other" / source.output_dir.name).mkdir(parents=True)
    (tmp_path / "runs" / "other" / source.output_dir.name / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "runs" / "other" / source.output_dir.name / "LOG_OWNER").write_text("../../../other-output\n")

    ran = []

    def run_logged(command, log, what):  # a stage trained here: its folder appears
        ran.append(command)
        log.with_suffix("").mkdir(parents=True)

    monkeypatch.setattr(ablation, "run_logged", run_logged)
    monkeypatch.setattr(ablation, "evaluate_model", lambda cfg, row, model, is_teacher: ({}, {}, ["eval"]))
    cfg.reuse_from = [other.output_dir]
    ablation.run_row(cfg, row)
    assert ran == []  # adopted, not trained again
    (mine, ), model = plan_row(cfg, row, 0)
    assert mine.output_dir.name == source.output_dir.name and mine.output_dir != source.output_dir
    assert (model / "weights.bin").read_bytes() == b"trained"
    assert (mine.output_dir / "ADOPTED_FROM").read_text().strip() == str(source.output_dir)
    assert (mine.output_dir / "ABLATION_DONE").read_text() == shlex.join(mine.command)
    my_cfg = load_job_config(mine.config, mine.overrides)
    assert stage_is_current(my_cfg, model, inputs=[tmp_path / "cache.bin"])  # its DONE speaks of this folder now
    assert f"output_dir: {mine.output_dir}" in (mine.output_dir / "config.yaml").read_text()
    assert (tmp_path / "runs" / "x" / mine.output_dir.name / "metrics.jsonl").is_file()  # its curves came along
    assert not (tmp_path / "runs" / "x" / mine.output_dir.name / "LOG_OWNER").exists()  # the source's owner did not

    # Another seed has no finished twin there, and a twin whose command differs beyond its folders is not one.
    (seed1, ), _ = plan_row(other, row, 1)
    seed1.output_dir.mkdir(parents=True)
    (seed1.output_dir / "ABLATION_DONE").write_text(shlex.join([*seed1.command, "kd.loss=reverse_kl"]))
    ablation.run_row(cfg, Row(name="kd", stages=[StageRun(config="distill")], seeds=[1]))
    assert len(ran) == 1 and "loop.seed=1" in ran[0]


def test_two_jobs_run_seeds_side_by_side_and_a_shared_stage_once(tmp_path, monkeypatch):
    import threading
    import time

    import experiments.ablation as ablation

    cfg = write_preset(tmp_path)
    config = write_ablation(tmp_path, cfg, (
        "seeds: [0, 1]\njobs: 2\n"
        "rows:\n"
        "  - name: kd\n    stages: [{config: distill}]\n"
        "  - name: kd pruned\n    stages: [{config: distill}, {config: prune, overrides: ['model={prev}']}]\n"))
    ran, running, most = [], [0], [0]
    guard = threading.Lock()

    def run_logged(command, log, what):
        with guard:
            ran.append(command)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)
        log.with_suffix("").mkdir(parents=True)
        with guard:
            running[0] -= 1

    monkeypatch.setattr(ablation, "run_logged", run_logged)
    monkeypatch.setattr(ablation, "evaluate_model", lambda cfg, row, model, is_teacher: ({"wer": 0.5}, {}, ["eval"]))
    environ = {k: v for k, v in ablation.os.environ.items() if k != "OMP_NUM_THREADS"}
    monkeypatch.setattr(ablation.os, "environ", environ)  # what the stage processes would inherit
    assert ablation.main(["--config", str(config)]) == 0
    jobs = [" ".join(c[2:3] + [a for a in c if a.startswith(("loop.seed=", "seed="))]) for c in ran]
    assert sorted(jobs) == ["distill.train loop.seed=0", "distill.train loop.seed=1", "prune.structured seed=0",
                            "prune.structured seed=1"]  # the students both rows share trained once per seed
    assert most[0] == 2  # two seeds trained side by side
    assert environ["OMP_NUM_THREADS"] == str(max(1, (ablation.os.cpu_count() or 1) // 2))
    rows = json.loads((tmp_path / "out" / "rows.json").read_text())
    assert [s["seed"] for s in rows["kd"]["seeds"]] == [0, 1] and [s["seed"] for s in rows["kd pruned"]["seeds"]] \
        == [0, 1]
    assert (tmp_path / "ablation.md").is_file()


def test_with_two_jobs_a_failed_stage_stops_the_table_and_keeps_finished_rows(tmp_path, monkeypatch):
    import experiments.ablation as ablation

    cfg = write_preset(tmp_path)
    config = write_ablation(tmp_path, cfg, (
        "seeds: [0]\njobs: 2\n"
        "rows:\n"
        "  - name: kd\n    stages: [{config: distill}]\n"
        "  - name: broken\n    stages: [{config: distill, overrides: [kd.loss=reverse_kl]}]\n"))

    def run_logged(command, log, what):
        if "kd.loss=reverse_kl" in command:
            raise SystemExit(f"ablation: {what} failed (exit 1)")
        log.with_suffix("").mkdir(parents=True)

    monkeypatch.setattr(ablation, "run_logged", run_logged)
    monkeypatch.setattr(ablation, "evaluate_model", lambda cfg, row, model, is_teacher: ({"wer": 0.5}, {}, ["eval"]))
    monkeypatch.setattr(ablation.os, "environ", {})
    with pytest.raises(SystemExit, match="row 'broken' seed 0 failed"):
        ablation.main(["--config", str(config)])
    assert list(json.loads((tmp_path / "out" / "rows.json").read_text())) == ["kd"]
    assert not (tmp_path / "ablation.md").exists()  # no table from a run that failed


def test_a_stage_lock_holds_against_another_process(tmp_path):
    """Two ablation processes (`only=` on rows that share a stage) cannot run one stage folder at once."""
    import subprocess
    import sys

    from experiments.ablation import _lock

    cfg = JobConfig(output_dir=str(tmp_path / "out"))
    try_lock = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'w'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    with _lock(cfg, tmp_path / "stages" / "distill-1"):
        (lock_file, ) = (tmp_path / "out" / "locks").glob("*.lock")
        assert subprocess.run([sys.executable, "-c", try_lock, str(lock_file)], capture_output=True).returncode != 0
    assert subprocess.run([sys.executable, "-c", try_lock, str(lock_file)]).returncode == 0  # released
