"""The main job end to end at smoke size: `bash scripts/distill.sh --preset smoke` (a few minutes on 2 cores).

It protects the glue between stages: each stage's outputs exist, the resolved configs are beside them, the
evaluation holds sane numbers for every model, and a second run skips every finished stage.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from common.results import load_results

ROOT = Path(__file__).resolve().parents[1]
# Limits that stop a hung stage, not a slow one: alone on 2 cores the whole suite, these runs included, took about
# 8 min (2026-12-05); with the cores shared (load ~8 on 2 cores, 2026-12-07) the smoke pipeline ran past 15 min and
# the smoke ablation past 20, and the old limits of 900 s and 1200 s failed them.
PIPELINE_LIMIT_S = 2700


def run_smoke(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", "scripts/distill.sh", "--preset", "smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=PIPELINE_LIMIT_S)


@pytest.mark.slow
def test_smoke_pipeline_end_to_end():
    proc = run_smoke("--force")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" not in proc.stdout  # --force trains from scratch, not from old checkpoints
    out = ROOT / "outputs" / "smoke"
    assert (ROOT / "data" / "smoke" / "manifest.json").is_file()
    for stage in ("teacher/model", "cache/train-topk32", "student/model", "pruned/model", "recovered/model",
                  "int8/model"):
        assert (out / stage / "DONE").is_file() or (out / stage.split("/")[0] / "DONE").is_file(), stage
    for part in ("whisper/config.json", "beats.pt", "llm/config.json", "salmonn.pth", "salmonn.yaml"):
        assert (out / "teacher" / "model" / part).exists(), part
    assert (out / "student" / "model" / "token_pruning.yaml").is_file()
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    ratios = comparison["ratios"]
    assert 0 < ratios["student"]["params"] < 1
    assert ratios["pruned"]["params"] < ratios["student"]["params"]  # pruning removed weights
    assert ratios["recovered"]["params"] == ratios["pruned"]["params"]  # recovery trains, does not grow
    assert ratios["int8"]["weight_bytes"] < 0.75 * ratios["recovered"]["weight_bytes"]  # int8 weights
    table = (out / "eval" / "table.md").read_text()
    assert all(f"| {name} |" in table for name in ratios)
    for name in ("teacher", "student", "pruned", "recovered", "int8"):
        results = load_results(out / "eval" / name / "results.json")
        assert 0 <= results["wer"] and results["cider_d"] >= 0 and results["ttft_ms"] > 0 and results["tpot_ms"] > 0
        assert (out / "eval" / name / "predictions.jsonl").stat().st_size > 0
    records = [json.loads(x) for x in (ROOT / "runs" / "smoke" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kd" in r and "train/feature" in r for r in records)
    teacher_runs = ROOT / "runs" / "smoke" / "teacher"
    main = [json.loads(x) for x in (teacher_runs / "metrics.jsonl").read_text().splitlines()]
    finetune = [json.loads(x) for x in (teacher_runs / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/ctc" in r for r in main)  # the aid trains with the SALMONN stage ...
    assert any("train/llm" in r for r in finetune)
    assert all("train/ctc" not in r for r in finetune)  # ... and is off in the finetune stage
    assert max(r["step"] for r in finetune) == 3
    relearn = [json.loads(x) for x in (teacher_runs / "relearn" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in relearn) == 3 and all("train/ctc" not in r for r in relearn)
    # BEATs as the quick preset (the default) trains it: tagged alone, then frozen and its outputs stored once,
    # where the cache stage reads them again instead of running BEATs
    tagging = [json.loads(x) for x in (teacher_runs / "beats_pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in tagging) == 4 and any("eval/tag_map" in r for r in tagging)
    stores = [line.split(" from ", 1)[1] for line in proc.stdout.splitlines()
              if line.startswith("train: cached audio_encoder_out from ")]
    assert len(stores) == 2 and stores[0] == stores[1], stores  # the teacher wrote it, the cache stage read it
    assert (ROOT / stores[0]).is_file() and (ROOT / stores[0]).parent == out / "encoders"

    again = run_smoke()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher up to date" in again.stdout and "student up to date" in again.stdout
    assert "teacher cache up to date" in again.stdout and "evaluation up to date" in again.stdout


@pytest.mark.slow
def test_smoke_ablation_table_and_figures():
    """`bash scripts/ablation.sh --preset smoke` after the smoke pipeline: every row of the table with sane values
    and mean ± std over two seeds, the figures, and a rerun that reuses every finished stage."""
    if not (ROOT / "outputs" / "smoke" / "student" / "model" / "DONE").is_file():
        assert run_smoke().returncode == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(["bash", "scripts/ablation.sh", "--preset", "smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=PIPELINE_LIMIT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = ROOT / "outputs" / "smoke" / "ablation"
    rows = json.loads((out / "rows.json").read_text())
    config = yaml.safe_load((ROOT / "configs" / "smoke" / "ablation.yaml").read_text())
    assert list(rows) == [r["name"] for r in config["rows"]]
    for name, row in rows.items():
        seeds = row["seeds"]
        assert len(seeds) == (1 if name == "teacher" else 2), name
        for s in seeds:
            assert s["wer"] >= 0 and s["cider_d"] >= 0 and s["params_ratio"] > 0 and s["tpot_ms_ratio"] > 0, name
    assert rows["teacher"]["seeds"][0]["params_ratio"] == 1.0
    assert rows["student, CE only"]["seeds"][0]["params_ratio"] < 1
    table = (out / "tables" / "ablation.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and " ± " in table
    assert (out / "tables" / "ablation.csv").is_file() and (out / "tables" / "ablation.tex").is_file()
    assert json.loads((out / "tables" / "ablation_rows.json").read_text()) == rows  # kept beside the table
    figures = ROOT / "outputs" / "smoke" / "figures"
    for png in ("pareto.png", "token_keep.png"):
        assert (figures / png).stat().st_size > 10_000, png

    again = subprocess.run(["bash", "scripts/ablation.sh", "--preset", "smoke"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=PIPELINE_LIMIT_S)
    assert again.returncode == 0 and "reuse" in again.stdout and " -m distill.train " not in again.stdout


@pytest.mark.slow
def test_the_toy_teacher_recipe_still_trains_beats_with_salmonn(tmp_path, monkeypatch):
    """The smoke teacher freezes and stores BEATs, as the quick preset does; the toy preset's teacher (behind paper/)
    trains BEATs with SALMONN and stores nothing. That way, at smoke size, so that it keeps running."""
    from common.config import load_job_config
    from common.training import seed_everything
    from teacher.build import build_salmonn
    from teacher.checkpoint import load_model_folder
    from teacher.train import main as train_main

    if not (ROOT / "data" / "smoke" / "manifest.json").is_file():
        assert run_smoke().returncode == 0
    overrides = [f"output_dir={tmp_path / 'teacher'}", f"log_dir={tmp_path / 'runs'}", "encoder_store=",
                 "model.beats.freeze=false", "model.qformer.trim_to_audio=false", "beats_pretrain.steps=0",
                 "loop.max_steps=4", "loop.eval_every=4", "loop.log_every=2", "finetune.steps=0", "relearn.steps=0"]
    config = ROOT / "configs" / "smoke" / "teacher.yaml"
    monkeypatch.chdir(ROOT)  # the config's data and tokenizer paths are relative to the repository
    assert train_main(["--config", str(config), *overrides]) == 0
    cfg = load_job_config(config, overrides)
    seed_everything(cfg.loop.seed)
    initial = build_salmonn(cfg.model)[0].audio_encoder.state_dict()
    trained = load_model_folder(tmp_path / "teacher" / "model").audio_encoder.state_dict()
    changed = [k for k, v in trained.items() if k in initial and not torch.equal(v, initial[k])]
    assert changed, "BEATs did not train with SALMONN"
    assert not (tmp_path / "teacher" / "beats_pretrain").exists()
    records = [json.loads(x) for x in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4 and any("train/llm" in r for r in records)
