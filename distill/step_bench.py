"""Time a cached-KD training step against a CE-only step of the same student, interleaved in one process.

    python -m distill.step_bench --config configs/toy/distill.yaml [--steps 20] [--threads 2] [key=value ...]

The config is the distillation job's own YAML (and its key=value overrides).

Both variants run forward + backward + AdamW on the same batches, alternating order every repetition so machine
drift cancels; the printed ratio (median cached-KD step / median CE-only step) is what DESIGN.md's
"cached-KD step ≤ 1.15 × CE-only step" refers to. Absolute times only mean something on the machine they ran on.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import dataclasses
import statistics
import time

import torch

from common.cli import run
from common.config import ConfigError, load_job_config
from common.dataset import AudioTextCollator, DurationBucketSampler
from distill.distiller import DistillConfig, build_distiller, load_transfer_set


def timed_step(distiller, batch, optimizer) -> float:
    start = time.perf_counter()
    terms = distiller(batch)
    terms["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _epoch(sampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m distill.step_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a distill.train YAML (configs/toy/distill.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant, after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the distillation config")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = load_job_config(args.config, args.overrides)
    if not isinstance(d, DistillConfig):
        raise ConfigError(f"{args.config}: --config must be a distill.train YAML (with `job: distill.train`)")
    train = load_transfer_set(d)
    distiller, _ = build_distiller(d, train)
    distiller.train()
    ce_cfg = dataclasses.replace(d.kd, kd_weight=0.0, feature_weight=0.0, hidden_weight=0.0)
    kd_cfg = d.kd
    collate = AudioTextCollator(distiller.student.tokenizer)
    sampler = DurationBucketSampler(train.durations, d.loop.batch_size, d.data.bucket_pool_batches, seed=0)
    order = [ids for epoch in range(args.steps + 2) for ids in _epoch(sampler, epoch)][: args.steps + 2]
    batches = [collate([train[i] for i in ids]) for ids in order]
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-5)
    times = {"ce": [], "kd": []}
    for i, batch in enumerate(batches):
        order = ("ce", "kd") if i % 2 == 0 else ("kd", "ce")
        for name in order:
            distiller.cfg = ce_cfg if name == "ce" else kd_cfg
            seconds = timed_step(distiller, batch, optimizer)
            if i >= 2:
                times[name].append(seconds)
    distiller.cfg = kd_cfg
    result = {name: statistics.median(t) * 1000 for name, t in times.items()}
    result["ratio_kd_over_ce"] = result["kd"] / result["ce"]
    print(f"median step: CE-only {result['ce']:.1f} ms, cached KD ({kd_cfg.loss}, feature {kd_cfg.feature_weight}) "
          f"{result['kd']:.1f} ms, ratio {result['ratio_kd_over_ce']:.3f} over {args.steps} interleaved steps each")
    return result


if __name__ == "__main__":
    run(main)
