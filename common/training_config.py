"""The `optim:` and `loop:` sections of every training job's config (teacher, distillation, recovery), read by
`common.training.fit` and by the process setup in `common.distributed`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.errors import ConfigError


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

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "eval_every", "save_every"):
            value = getattr(self, name)
            if value < 1:
                hint = (" (to evaluate or save only at the end, set it to max_steps)"
                        if name in ("eval_every", "save_every") else "")
                raise ConfigError(f"{name} must be at least 1, got {value}{hint}")
