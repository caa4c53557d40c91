"""The training loop every recipe shares (toy teacher, distillation, recovery after pruning); its checkpoints on disk
are `common.checkpoints`, its process setup (DDP, DeepSpeed) `common.distributed`.

A recipe builds its model and data, then calls `fit` with a `loss_fn(model, batch) -> {"loss": ..., terms}`
and an `evaluate(model, step) -> {"eval/...": value}`. `fit` does the rest: accelerate (devices, DDP, DeepSpeed
ZeRO, fp16 autocast with a GradScaler on GPUs without bf16), AdamW with warm-up + cosine, gradient accumulation
and clipping, skipping non-finite steps, logging every term, and atomic checkpoints that resume exactly
(model, optimizer, scheduler, scaler, RNG and data position).

Several processes (`accelerate launch --config_file configs/accelerate/ddp.yaml ...`, or a DeepSpeed config) each
take every n-th batch of the sampler, so one optimizer step sees `batch_size × grad_accum × processes` clips; the
logged terms are means over all of them. Under DeepSpeed the engine owns backward, fp16 loss scaling, clipping,
accumulation and the optimizer step, and checkpoints hold its per-rank optimizer partitions.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.checkpoints import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    TrainState,
    capture_rng,
    checkpoint_key,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from common.distributed import (
    configure_deepspeed,
    is_deepspeed,
    make_accelerator,
    reduce_terms,
    shard_sampler,
    zero_stage,
)
from common.model import move_batch
from common.tracking import MetricLogger
from common.training_config import LoopConfig, OptimConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with weight decay on matrices only."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the base lr over `warmup` steps, then cosine decay to base × min_ratio at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches_from(sampler, state: TrainState):
    """Yield (epoch, batch index list) forever, starting at the saved data position."""
    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        sampler.set_epoch(epoch)
        count = 0
        for i, batch in enumerate(sampler):
            count += 1
            if i >= skip:
                yield epoch, i, batch
        if count == 0:
            raise ValueError(f"the sampler yields no batch in epoch {epoch} for this process: the data holds fewer "
                             "batches than there are processes; use more data, a smaller batch_size or fewer processes")
        epoch, skip = epoch + 1, 0


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())




def _checkpoint(accelerator, ckpt_dir: Path, model, optimizer, scheduler, scaler, state: TrainState,
                loop: LoopConfig) -> None:
    """Save a checkpoint. With several processes (or DeepSpeed) every rank first writes its RNG state and the
    engine its optimizer partitions into a staging folder; the main process then adds the rest and publishes."""
    deepspeed = is_deepspeed(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.num_processes == 1 and not deepspeed:
        save_checkpoint(ckpt_dir, unwrapped, optimizer, scheduler, scaler, state)
        prune_checkpoints(ckpt_dir, loop.keep_last, state.best_step)
        return
    staging = ckpt_dir / f".rank_files_step_{state.step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(capture_rng(), staging / f"rng_rank{accelerator.process_index}.pt")
    weights = None
    if deepspeed:
        model.save_checkpoint(str(staging / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        if zero_stage(accelerator) == 3:
            trainable = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
            full = accelerator.get_state_dict(model)  # gathers the shards (every rank takes part; rank 0 gets them)
            if full is not None:
                weights = {n: t.detach().cpu().contiguous() for n, t in full.items() if n in trainable}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(ckpt_dir, unwrapped, None if deepspeed else optimizer, scheduler, scaler, state,
                        rank_files=staging, weights=weights)
        prune_checkpoints(ckpt_dir, loop.keep_last, state.best_step)
    accelerator.wait_for_everyone()


LossFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]
EvalFn = Callable[[nn.Module, int], dict[str, float]]


@dataclass
class _Prepared:
    """What `fit` steps: the model and optimizer as accelerate prepared them (the model wrapped for DDP, or a
    DeepSpeed engine), their scheduler and fp16 scaler."""

    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any
    deepspeed: bool


def fit(model: nn.Module, dataset, sampler, collate, loss_fn: LossFn, loop: LoopConfig, optim: OptimConfig,
        out_dir: Path, logger: MetricLogger, evaluate: EvalFn | None = None, accelerator=None,
        before_step: Callable[[nn.Module, int], None] | None = None, run_key: str = "") -> TrainState:
    """Train `model` for `loop.max_steps` optimizer steps; returns the final TrainState.

    Args:
        dataset / sampler / collate: items by index; a batch sampler with `set_epoch` (e.g. DurationBucketSampler;
            with several processes fit sets its `num_replicas`/`rank` so each takes every n-th batch); the collator.
        loss_fn: `(model, batch) -> {"loss": scalar to minimise, "<term>": scalar, ...}`; every entry is logged
            as `train/<name>` (the total as `train/loss`).
        evaluate: called every `eval_every` steps and at the end; returns `eval/...` metrics.
        before_step: called as `(model, step)` before each optimizer step, e.g. to change which parts train
            (a function of the step alone, so resuming reproduces it).
        out_dir: checkpoints go to `out_dir/checkpoints/`.
        run_key: what this run is made of (its config and input stamps). Checkpoints left by a run of another key
            (a changed config, a retrained teacher) are discarded and training starts over, instead of resuming
            someone else's weights; "" resumes whatever is there.
        accelerator: from `make_accelerator(loop)` when the recipe needs it before training (e.g. to prepare a
            teacher); made here otherwise.
    """
    accelerator = accelerator or make_accelerator(loop)
    main = accelerator.is_main_process
    sampler = shard_sampler(sampler, accelerator)
    run = _prepare(model, accelerator, loop, optim)
    ckpt_dir = out_dir / "checkpoints"
    state = _resume(run, ckpt_dir, loop, run_key)
    logger.continue_after(state.step)  # what an earlier run logged past this point would draw a second curve
    params = [p for p in run.model.parameters() if p.requires_grad]
    batches = _batches_from(sampler, state)
    bar = tqdm(total=loop.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if main else True)  # None: no bar when stderr is not a terminal
    window = {"tokens": 0, "time": time.time()}
    while state.step < loop.max_steps:
        run.model.train()
        if before_step is not None:
            before_step(accelerator.unwrap_model(run.model), state.step)
        terms, tokens = _forward_backward(run, dataset, collate, loss_fn, batches, state, loop)
        window["tokens"] += tokens
        grad_norm = _optimizer_step(run, params, terms["loss"], state, loop, optim)
        state.step += 1
        bar.update(1)
        last = state.step == loop.max_steps
        if state.step % loop.log_every == 0 or last:
            _log_train(logger if main else None, state, terms, run.scheduler, grad_norm, window)
            window = {"tokens": 0, "time": time.time()}
        if evaluate is not None and (state.step % loop.eval_every == 0 or last):
            _evaluate(run, evaluate, state, loop, logger)
        if state.step % loop.save_every == 0 or last:
            _checkpoint(accelerator, ckpt_dir, run.model, run.optimizer, run.scheduler, run.scaler, state, loop)
    bar.close()
    return state


def _prepare(model: nn.Module, accelerator, loop: LoopConfig, optim: OptimConfig) -> _Prepared:
    """AdamW over `param_groups` with warm-up + cosine, DeepSpeed's config filled in, model and optimizer prepared
    by accelerate on its device."""
    model.to(accelerator.device)
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas))
    scheduler = warmup_cosine(optimizer, optim.warmup_steps, loop.max_steps, optim.min_lr_ratio)
    if accelerator.is_main_process and optim.warmup_steps >= loop.max_steps:
        # e.g. a short recovery run that kept a long run's warm-up
        print(f"warning: optim.warmup_steps={optim.warmup_steps} >= loop.max_steps={loop.max_steps}: the lr only "
              f"warms up, ends at its peak ({optim.lr:g}) and never decays; set optim.warmup_steps below "
              f"loop.max_steps (e.g. a tenth of it)", file=sys.stderr, flush=True)
    deepspeed = is_deepspeed(accelerator)
    if deepspeed:
        configure_deepspeed(accelerator, loop, optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Prepared(accelerator, model, optimizer, scheduler, accelerator.scaler, deepspeed)


def _resume(run: _Prepared, ckpt_dir: Path, loop: LoopConfig, run_key: str) -> TrainState:
    """The state of the latest checkpoint in `ckpt_dir`, loaded into the model, optimizer, scheduler and scaler; a
    fresh state when there is none, `loop.resume` is off, or the checkpoints come from a run of another key (then
    they are deleted)."""
    accelerator = run.accelerator
    latest = latest_checkpoint(ckpt_dir) if loop.resume else None
    if latest is not None and run_key and checkpoint_key(latest) != run_key:
        if accelerator.is_main_process:
            print(f"{ckpt_dir}: the checkpoints there come from another config or other inputs; starting over")
            for old in ckpt_dir.glob("step_*"):
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        latest = None
    if latest is None:
        return TrainState(run_key=run_key)
    state = load_checkpoint(latest, accelerator.unwrap_model(run.model), run.optimizer, run.scheduler, run.scaler,
                            rank=accelerator.process_index, engine=run.model if run.deepspeed else None)
    print(f"resumed from {latest} at step {state.step}")
    return state


def _forward_backward(run: _Prepared, dataset, collate, loss_fn: LossFn, batches, state: TrainState,
                      loop: LoopConfig) -> tuple[dict[str, float], int]:
    """Forward and backward over `loop.grad_accum` micro-batches: (each loss term's mean over the micro-batches and
    all processes, target tokens seen by all processes)."""
    accelerator, model = run.accelerator, run.model
    terms_sum: dict[str, float] = {}
    tokens = 0
    for micro in range(loop.grad_accum):
        epoch, index, ids = next(batches)
        state.epoch, state.batch_in_epoch = epoch, index + 1
        if hasattr(dataset, "set_epoch"):  # augmentation draws per (seed, epoch, item): common.augment
            dataset.set_epoch(epoch)
        batch = move_batch(collate([dataset[i] for i in ids]), accelerator.device)
        # DDP all-reduces gradients only after the last micro-batch of a step.
        last_micro = micro == loop.grad_accum - 1
        with contextlib.nullcontext() if last_micro or run.deepspeed else accelerator.no_sync(model):
            with accelerator.autocast():
                terms = loss_fn(model, batch)
            if run.deepspeed:
                model.backward(terms["loss"])  # the engine divides by grad_accum and scales fp16 losses
                model.step()  # steps the optimizer (clipping, overflow check) only after the last micro-batch
            else:
                accelerator.backward(terms["loss"] / loop.grad_accum)
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + float(value.detach()) / loop.grad_accum
        if "labels" in batch:
            tokens += int((batch["labels"] != -100).sum())
    return reduce_terms(accelerator, terms_sum, tokens)


def _optimizer_step(run: _Prepared, params: list[torch.Tensor], loss: float, state: TrainState, loop: LoopConfig,
                    optim: OptimConfig) -> torch.Tensor:
    """Clip and step on the accumulated gradients, or skip the step when the loss or the gradient norm is not finite
    (counted in `state.bad_steps`; too many stop the run). DeepSpeed's engine clipped and stepped, or skipped,
    inside `model.step()`. Then zero the gradients and advance the schedule. Returns the gradient norm."""
    optimizer, scaler = run.optimizer, run.scaler
    if run.deepspeed:
        norm = run.model.get_global_grad_norm()
        grad_norm = torch.tensor(float(norm) if norm is not None else float("nan"))
        finite = math.isfinite(loss) and not optimizer.step_was_skipped
    else:
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = _grad_norm(params)
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        if finite:
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        elif scaler is not None:
            scaler.update()  # lowers the loss scale, which is what usually caused the overflow
    if not finite:
        state.bad_steps += 1  # under DeepSpeed the engine skipped the step and lowered its loss scale itself
        if state.bad_steps > loop.max_bad_steps:
            raise RuntimeError(
                f"{state.bad_steps} non-finite steps (last at step {state.step}): lower optim.lr, check the data "
                "report, or use precision=fp32; raise loop.max_bad_steps to tolerate more")
    optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return grad_norm


def _log_train(logger: MetricLogger | None, state: TrainState, terms: dict[str, float], scheduler,
               grad_norm: torch.Tensor, window: dict) -> None:
    """Log every loss term, the lr, gradient norm, throughput since the last log (`window`: tokens, start time),
    skipped steps and peak memory at `state.step`; `logger` None (a process other than the main one) logs nothing."""
    elapsed = max(1e-9, time.time() - window["time"])
    metrics = {f"train/{k}": v for k, v in terms.items()}
    metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                    "train/tokens_per_s": window["tokens"] / elapsed, "train/skipped_steps": state.bad_steps,
                    "train/memory_mb": _memory_mb()})
    if logger is not None:
        logger.log(state.step, metrics)


def _evaluate(run: _Prepared, evaluate: EvalFn, state: TrainState, loop: LoopConfig, logger: MetricLogger) -> None:
    """Run `evaluate` at `state.step`, log its results and track the best step (`loop.best_metric`)."""
    accelerator = run.accelerator
    run.model.eval()
    # The main process evaluates while the others wait; under ZeRO-3 every forward gathers parameters from all
    # ranks, so there every rank runs it (recipes give the other ranks their own output folder).
    if accelerator.is_main_process or zero_stage(accelerator) == 3:
        results = evaluate(accelerator.unwrap_model(run.model), state.step)
        if accelerator.is_main_process:
            logger.log(state.step, results)
            _track_best(state, results, loop)
    accelerator.wait_for_everyone()


def _track_best(state: TrainState, results: dict[str, float], loop: LoopConfig) -> None:
    if not loop.best_metric or loop.best_metric not in results:
        return
    value = results[loop.best_metric]
    if state.best_value is None:
        better = True
    else:
        better = value < state.best_value if loop.best_mode == "min" else value > state.best_value
    if better:
        state.best_value, state.best_step = value, state.step


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
