"""The metric logger writes JSONL (read back here), TensorBoard events and stdout."""

import math
import time

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


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("owner", [None, "out"])
def test_a_resumed_or_restarted_run_leaves_one_curve(tmp_path, owner):
    owner = owner and tmp_path / owner  # the same output folder each time: its own logs, kept or restarted
    with MetricLogger(tmp_path, stdout_every=100, owner=owner) as log:  # a run killed after step 5, checkpoint at 3
        log.log(0, {"data/clips": 7.0})  # what a run logs before training (dataset sizes, vocabulary overlap)
        for step in range(1, 6):
            log.log(step, {"train/loss": float(step)})
    # TensorBoard reads event files in name order and the names carry whole seconds; a resumed run is a later
    # process, so its file sorts after the old one. Within one second the names would tie on the time.
    time.sleep(1.1)
    with MetricLogger(tmp_path, stdout_every=100, owner=owner) as log:  # the resumed run
        log.log(0, {"data/clips": 7.0})  # logged again before it knows it resumes: one point, not two
        log.continue_after(3)
        for step in (4, 5, 6):
            log.log(step, {"train/loss": 10.0 * step})
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    records = read_metrics(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in records if "train/loss" in r] == expected
    assert scalars(tmp_path, "train/loss") == expected
    assert scalars(tmp_path, "data/clips") == [(0, 7.0)]

    with MetricLogger(tmp_path, stdout_every=100, owner=owner) as log:  # a rerun from scratch (changed config, --force)
        log.continue_after(0)
        log.log(1, {"train/loss": -1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert scalars(tmp_path, "train/loss") == [(1, -1.0)] and len(list(tmp_path.glob("events.out.*"))) == 1
    assert not list(tmp_path.glob("previous-*"))


def test_a_run_of_another_output_folder_moves_the_logs_aside_instead_of_deleting_them(tmp_path, capsys):
    logs = tmp_path / "runs"
    with MetricLogger(logs, stdout_every=100, owner=tmp_path / "first") as log:
        log.continue_after(0)
        for step in (1, 2):
            log.log(step, {"train/loss": float(step)})
    first_events = sorted(logs.glob("events.out.*"))
    time.sleep(1.1)  # event file names carry whole seconds
    with MetricLogger(logs, stdout_every=100, owner=tmp_path / "second") as log:
        log.continue_after(0)  # a run that starts over, but of another output folder
        log.log(1, {"train/loss": -1.0})
    assert "moved them to" in capsys.readouterr().out
    aside = next(logs.glob("previous-*"))
    assert [r["train/loss"] for r in read_metrics(aside)] == [1.0, 2.0]
    assert sorted(p.name for p in aside.glob("events.out.*")) == [p.name for p in first_events]
    assert scalars(aside, "train/loss") == [(1, 1.0), (2, 2.0)]
    assert [r["train/loss"] for r in read_metrics(logs)] == [-1.0] and scalars(logs, "train/loss") == [(1, -1.0)]
    assert (logs / "LOG_OWNER").read_text().strip() == "../second"


@pytest.mark.parametrize("resume", [True, False])
def test_logs_without_an_owner_are_kept_by_a_resume_and_moved_aside_by_a_fresh_start(tmp_path, resume):
    with MetricLogger(tmp_path, stdout_every=100) as log:  # written before owners were recorded
        for step in (1, 2, 3):
            log.log(step, {"train/loss": float(step)})
    time.sleep(1.1)
    with MetricLogger(tmp_path, stdout_every=100, owner=tmp_path / "out") as log:
        log.continue_after(2 if resume else 0)
        log.log(3, {"train/loss": 30.0})
    aside = list(tmp_path.glob("previous-*"))
    if resume:
        assert not aside and scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]
        assert [r["train/loss"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 30.0]
    else:
        assert [r["train/loss"] for r in read_metrics(aside[0])] == [1.0, 2.0, 3.0]
        assert scalars(aside[0], "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
        assert scalars(tmp_path, "train/loss") == [(3, 30.0)]
        assert [r["train/loss"] for r in read_metrics(tmp_path)] == [30.0]
    assert (tmp_path / "LOG_OWNER").read_text().strip() == "out"
