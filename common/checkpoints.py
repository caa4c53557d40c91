"""Training checkpoints on disk: `step_<7-digit step>/` folders, written atomically and restored exactly (the trainable
weights as safetensors; optimizer, scheduler, fp16 scaler and every RNG in `training_state.pt`; `TrainState` in
`state.json`; a DeepSpeed engine's own partitions under `deepspeed/`). `common.training.fit` saves and resumes them.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

DEEPSPEED_DIR = "deepspeed"
"""Folder of a checkpoint that holds the DeepSpeed engine's own checkpoint (module and optimizer partitions)."""
DEEPSPEED_TAG = "engine"


@dataclass
class TrainState:
    """Where training is: optimizer steps done and the data position (epoch, batches consumed in it)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_steps: int = 0
    best_value: float | None = None
    best_step: int | None = None
    run_key: str = ""
    """What the run was started from (e.g. `common.stages.stage_key`): a checkpoint of another key is not resumed."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (all that a checkpoint needs: frozen parts are rebuilt from their sources)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> dict:
    """Every RNG as tensors and lists, so the file loads with `weights_only=True`."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, scaler, state: TrainState,
                    rank_files: Path | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `folder/step_<7-digit step>/` atomically: weights (safetensors), optimizer/scheduler/scaler/RNG, state.

    `optimizer` None leaves it out (a DeepSpeed engine saves its own partitions); `rank_files` is a folder of files
    the other processes wrote (their RNG, the engine's checkpoint), moved in before the folder is published;
    `weights` replaces `trainable_state(model)` (ZeRO-3, whose parameters live sharded across ranks).
    """
    final = folder / f"step_{state.step:07d}"
    tmp = folder / f".tmp_step_{state.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    if rank_files is not None:
        rank_files.rename(tmp)
    else:
        tmp.mkdir(parents=True)
    save_file(trainable_state(model) if weights is None else weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": capture_rng()},
               tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler, rank: int = 0,
                    engine=None) -> TrainState:
    """Restore a checkpoint written by `save_checkpoint` (weights, optimizer, scheduler, scaler, RNG).

    `rank` picks this process's RNG file when several processes wrote one; with a DeepSpeed `engine` the weights
    and optimizer partitions come from its own checkpoint inside the folder.
    """
    if engine is not None:
        engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise ValueError(f"{path}: checkpoint holds parameters the model lacks: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
    blob = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    if engine is None:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    rng_file = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else blob["rng"]
    restore_rng(rng)
    return TrainState(**json.loads((path / "state.json").read_text()))


def prune_checkpoints(folder: Path, keep_last: int, best_step: int | None) -> None:
    found = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    if best_step is not None:
        keep.add(folder / f"step_{best_step:07d}")
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_key(path: Path) -> str:
    return json.loads((path / "state.json").read_text()).get("run_key", "")
