"""The training loop every recipe shares (toy teacher, distillation, recovery after pruning).

A recipe builds its model and data, then calls `fit` with a `loss_fn(model, batch) -> {"loss": ..., terms}`
and an `evaluate(model, step) -> {"eval/...": value}`. `fit` does the rest: accelerate (devices, DDP, fp16
autocast with a GradScaler on GPUs without bf16), AdamW with warm-up + cosine, gradient accumulation and
clipping, skipping non-finite steps, logging every term, and atomic checkpoints that resume exactly
(model, optimizer, scheduler, scaler, RNG and data position).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from common.tracking import MetricLogger


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW); not applied to biases, norms and 1-D parameters."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    """The cosine schedule ends at lr × this."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass
class LoopConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Clips per forward pass and process; the global batch is batch_size × grad_accum × processes."""
    grad_accum: int = 1
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """fp16 = autocast + GradScaler on CUDA (V100); ignored on CPU, which trains in fp32."""
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    save_every: int = 250
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    best_metric: str = ""
    """An `eval/...` metric that picks the best checkpoint; empty keeps no best."""
    best_mode: Literal["min", "max"] = "min"
    max_bad_steps: int = 20
    """Abort after this many non-finite losses or gradients (each one is skipped and counted)."""
    resume: bool = True
    """Resume from the newest checkpoint in the output folder, if there is one."""


@dataclass
class TrainState:
    """Where training is: optimizer steps done and the data position (epoch, batches consumed in it)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_steps: int = 0
    best_value: float | None = None
    best_step: int | None = None


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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (all that a checkpoint needs: frozen parts are rebuilt from their sources)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    """Every RNG as tensors and lists, so the file loads with `weights_only=True`."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, scaler, state: TrainState) -> Path:
    """Write `folder/step_<7-digit step>/` atomically: weights (safetensors), optimizer/scheduler/scaler/RNG, state."""
    final = folder / f"step_{state.step:07d}"
    tmp = folder / f".tmp_step_{state.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state()},
               tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler) -> TrainState:
    """Restore a checkpoint written by `save_checkpoint` (weights, optimizer, scheduler, scaler, RNG)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{path}: checkpoint holds parameters the model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    blob = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return TrainState(**json.loads((path / "state.json").read_text()))


def prune_checkpoints(folder: Path, keep_last: int, best_step: int | None) -> None:
    found = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    if best_step is not None:
        keep.add(folder / f"step_{best_step:07d}")
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _batches_from(sampler, state: TrainState):
    """Yield (epoch, batch index list) forever, starting at the saved data position."""
    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        sampler.set_epoch(epoch)
        for i, batch in enumerate(sampler):
            if i >= skip:
                yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())


LossFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]
EvalFn = Callable[[nn.Module, int], dict[str, float]]


def fit(model: nn.Module, dataset, sampler, collate, loss_fn: LossFn, loop: LoopConfig, optim: OptimConfig,
        out_dir: Path, logger: MetricLogger, evaluate: EvalFn | None = None, accelerator=None,
        before_step: Callable[[nn.Module, int], None] | None = None) -> TrainState:
    """Train `model` for `loop.max_steps` optimizer steps; returns the final TrainState.

    Args:
        dataset / sampler / collate: items by index; a batch sampler with `set_epoch` (e.g. DurationBucketSampler,
            already sharded for this process); the collator.
        loss_fn: `(model, batch) -> {"loss": scalar to minimise, "<term>": scalar, ...}`; every entry is logged
            as `train/<name>` (the total as `train/loss`).
        evaluate: called every `eval_every` steps and at the end; returns `eval/...` metrics.
        before_step: called as `(model, step)` before each optimizer step, e.g. to change which parts train
            (a function of the step alone, so resuming reproduces it).
        out_dir: checkpoints go to `out_dir/checkpoints/`.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(
        mixed_precision=loop.precision if torch.cuda.is_available() and loop.precision != "fp32" else "no",
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas))
    scheduler = warmup_cosine(optimizer, optim.warmup_steps, loop.max_steps, optim.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    scaler = accelerator.scaler
    ckpt_dir = out_dir / "checkpoints"
    state = TrainState()
    latest = latest_checkpoint(ckpt_dir) if loop.resume else None
    if latest is not None:
        state = load_checkpoint(latest, accelerator.unwrap_model(model), optimizer, scheduler, scaler)
        print(f"resumed from {latest} at step {state.step}")
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _batches_from(sampler, state)
    bar = tqdm(total=loop.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    window = {"tokens": 0, "time": time.time()}
    while state.step < loop.max_steps:
        model.train()
        if before_step is not None:
            before_step(accelerator.unwrap_model(model), state.step)
        terms_sum: dict[str, float] = {}
        for _ in range(loop.grad_accum):
            epoch, index, ids = next(batches)
            state.epoch, state.batch_in_epoch = epoch, index + 1
            batch = _to_device(collate([dataset[i] for i in ids]), device)
            with accelerator.autocast():
                terms = loss_fn(model, batch)
            accelerator.backward(terms["loss"] / loop.grad_accum)
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + float(value.detach()) / loop.grad_accum
            if "labels" in batch:
                window["tokens"] += int((batch["labels"] != -100).sum())
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = _grad_norm(params)
        finite = math.isfinite(terms_sum["loss"]) and bool(torch.isfinite(grad_norm))
        if finite:
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        else:
            state.bad_steps += 1
            if scaler is not None:
                scaler.update()  # lowers the loss scale, which is what usually caused the overflow
            if state.bad_steps > loop.max_bad_steps:
                raise RuntimeError(
                    f"{state.bad_steps} non-finite steps (last at step {state.step}): lower optim.lr, check the data "
                    "report, or use precision=fp32; raise loop.max_bad_steps to tolerate more")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        bar.update(1)
        if state.step % loop.log_every == 0 or state.step == loop.max_steps:
            elapsed = max(1e-9, time.time() - window["time"])
            metrics = {f"train/{k}": v for k, v in terms_sum.items()}
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                            "train/tokens_per_s": window["tokens"] / elapsed, "train/skipped_steps": state.bad_steps,
                            "train/memory_mb": _memory_mb()})
            logger.log(state.step, metrics)
            window = {"tokens": 0, "time": time.time()}
        last = state.step == loop.max_steps
        if evaluate is not None and (state.step % loop.eval_every == 0 or last):
            model.eval()
            results = evaluate(accelerator.unwrap_model(model), state.step)
            logger.log(state.step, results)
            _track_best(state, results, loop)
        if accelerator.is_main_process and (state.step % loop.save_every == 0 or last):
            save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, scheduler, scaler, state)
            prune_checkpoints(ckpt_dir, loop.keep_last, state.best_step)
    bar.close()
    return state


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


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
