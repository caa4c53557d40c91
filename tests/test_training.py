"""The shared training loop: exact resume after a crash, schedule, non-finite steps, checkpoint pruning."""

import math

import pytest
import torch
from torch import nn

from common.dataset import DurationBucketSampler
from common.tracking import MetricLogger, read_metrics
from common.training import LoopConfig, OptimConfig, fit, seed_everything, warmup_cosine

torch.set_num_threads(1)


class TinyRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x):
        return self.net(self.frozen(x))


def make_data(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True)
    items = [{"x": x[i], "y": y[i]} for i in range(n)]
    durations = torch.rand(n, generator=g).tolist()
    return items, durations


def collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


def mse(model, batch):
    pred = model(batch["x"])
    loss = ((pred - batch["y"]) ** 2).mean()
    return {"loss": loss, "mse": loss.detach()}


def run(tmp, loss_fn=mse, max_steps=10, run_key="", warmup_steps=2, log_dir=None, **loop_kw):
    seed_everything(0)
    model = TinyRegressor()
    items, durations = make_data()
    sampler = DurationBucketSampler(durations, batch_size=8, pool_batches=2, seed=0)
    loop = LoopConfig(max_steps=max_steps, log_every=1, eval_every=100, save_every=3, keep_last=2, **loop_kw)
    with MetricLogger(log_dir or tmp / "logs", backends=("jsonl",), owner=tmp) as logger:
        fit(model, items, sampler, collate, loss_fn, loop, OptimConfig(lr=1e-2, warmup_steps=warmup_steps), tmp, logger,
            run_key=run_key)
    return model


def test_resume_after_crash_gives_identical_weights(tmp_path):
    reference = run(tmp_path / "straight")

    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # during step 8, after the checkpoint at step 6
            raise KeyboardInterrupt
        return mse(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash", loss_fn=crashing)
    assert sorted(p.name for p in (tmp_path / "crash/checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    resumed = run(tmp_path / "crash")
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    steps = [r["step"] for r in read_metrics(tmp_path / "crash/logs")]
    assert steps == list(range(1, 11))  # step 7, logged before the crash, was dropped when the run resumed at 6
    assert sorted(p.name for p in (tmp_path / "crash/checkpoints").iterdir()) == ["step_0000009", "step_0000010"]


def test_checkpoints_of_another_run_key_are_not_resumed(tmp_path, capsys):
    """A stage rerun after its config or inputs changed must train anew, not resume the old run's weights."""
    half = lambda model, batch: {"loss": 0.5 * mse(model, batch)["loss"]}
    reference = run(tmp_path / "straight", run_key="a")
    run(tmp_path / "reused", loss_fn=half, run_key="b")  # another run left its checkpoints, up to the last step
    rerun = run(tmp_path / "reused", run_key="a")
    assert "starting over" in capsys.readouterr().out
    for (name, a), b in zip(reference.state_dict().items(), rerun.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    steps = [r["step"] for r in read_metrics(tmp_path / "reused/logs")]
    assert steps == list(range(1, 11))  # trained all ten steps again; the other run's records are gone

    same = run(tmp_path / "reused", run_key="a")  # the same key resumes: nothing left to train
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "reused/logs")] == steps
    for a, b in zip(rerun.state_dict().values(), same.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_into_another_outputs_log_folder_keeps_that_runs_curve(tmp_path):
    """Two runs with different output folders and one log folder (e.g. an `output_dir=` override beside a fixed
    `log_dir=`): the second starts at step 0 but must not delete the first's records."""
    shared = tmp_path / "runs"
    run(tmp_path / "first", max_steps=4, log_dir=shared)
    first = read_metrics(shared)
    run(tmp_path / "second", loss_fn=lambda m, b: {"loss": 2 * mse(m, b)["loss"]}, max_steps=3, log_dir=shared)
    assert read_metrics(next(shared.glob("previous-*"))) == first
    assert [r["step"] for r in read_metrics(shared)] == [1, 2, 3]
    run(tmp_path / "second", max_steps=3, log_dir=shared)  # the second's own rerun: resumes, nothing moves
    assert len(list(shared.glob("previous-*"))) == 1 and [r["step"] for r in read_metrics(shared)] == [1, 2, 3]


def test_logs_every_term_and_lr(tmp_path):
    run(tmp_path, max_steps=4)
    records = read_metrics(tmp_path / "logs")
    assert {"train/loss", "train/mse", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(records[0])
    assert records[0]["train/lr"] == pytest.approx(1e-2)  # after warm-up step 1 of 2 the next lr is the peak
    assert records[-1]["train/loss"] < records[0]["train/loss"] * 2


def test_a_run_no_longer_than_its_warmup_is_warned_about(tmp_path, capsys):
    run(tmp_path / "a", max_steps=4, warmup_steps=4)  # the lr would end at its peak, never decaying
    assert "optim.warmup_steps=4 >= loop.max_steps=4" in capsys.readouterr().err
    run(tmp_path / "b", max_steps=4, warmup_steps=3)
    assert "warmup_steps" not in capsys.readouterr().err


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
    def sometimes_nan(model, batch):
        out = mse(model, batch)
        return {"loss": out["loss"] * float("nan")}

    with pytest.raises(RuntimeError, match="non-finite steps"):
        run(tmp_path, loss_fn=sometimes_nan, max_bad_steps=3)
    records = read_metrics(tmp_path / "logs")
    assert records[-1]["train/skipped_steps"] == 3


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup=4, total=14, min_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
