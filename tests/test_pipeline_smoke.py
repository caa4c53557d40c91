"""The main job end to end at smoke size: `bash scripts/distill.sh --preset smoke` (about a minute).

It protects the glue between stages: each stage's outputs exist, the resolved configs are beside them, the
evaluation holds sane numbers for every model, and a second run skips every finished stage.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from evaluation.results import load_results

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", "scripts/distill.sh", "--preset", "smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_smoke_pipeline_end_to_end():
    proc = run_smoke("--force")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" not in proc.stdout  # --force trains from scratch, not from old checkpoints
    out = ROOT / "outputs" / "smoke"
    assert (ROOT / "data" / "smoke" / "manifest.json").is_file()
    for stage in ("teacher/model", "cache/train-topk32", "student/model"):
        assert (out / stage / "DONE").is_file() and (out / stage / "config.yaml").is_file(), stage
    for part in ("whisper/config.json", "beats.pt", "llm/config.json", "salmonn.pth", "salmonn.yaml"):
        assert (out / "teacher" / "model" / part).exists(), part
    assert (out / "student" / "model" / "token_pruning.yaml").is_file()
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert 0 < comparison["ratios"]["student"]["params"] < 1
    for name in ("teacher", "student"):
        results = load_results(out / "eval" / name / "results.json")
        assert 0 <= results["wer"] and results["cider_d"] >= 0 and results["ttft_ms"] > 0 and results["tpot_ms"] > 0
        assert (out / "eval" / name / "predictions.jsonl").stat().st_size > 0
    records = [json.loads(x) for x in (ROOT / "runs" / "smoke" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kd" in r and "train/feature" in r for r in records)

    again = run_smoke()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher up to date" in again.stdout and "student up to date" in again.stdout
    assert "teacher cache up to date" in again.stdout
