"""The metric logger writes JSONL (read back here), TensorBoard events and stdout."""

import math

import pytest

from common.tracking import MetricLogger, read_metrics


def test_jsonl_tensorboard_and_stdout(tmp_path, capsys):
    with MetricLogger(tmp_path, stdout_every=2) as log:
        log.log(1, {"train/loss": 2.5, "train/lr": 1e-3})
        log.log(2, {"train/loss": 2.0})
        log.log(3, {"eval/wer": 0.25, "train/kd_loss": float("nan")})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["train/loss"] == 2.5 and records[2]["eval/wer"] == 0.25
    assert records[2]["train/kd_loss"] == "nan"  # JSON has no NaN; kept visible as a string
    out = capsys.readouterr().out
    assert "[step 1] train/loss=2.5" in out and "[step 2]" not in out and "[step 3]" in out
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "eval/wer", "train/kd_loss"}
    assert [e.value for e in acc.Scalars("train/loss")] == [2.5, 2.0]
    assert math.isnan(acc.Scalars("train/kd_loss")[0].value)


def test_rejects_untagged_metrics_and_unknown_backends(tmp_path):
    with MetricLogger(tmp_path, backends=("jsonl",)) as log, pytest.raises(ValueError, match="must start with"):
        log.log(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="unknown logger backend"):
        MetricLogger(tmp_path, backends=("wandb",))
