"""Structured width pruning of a saved student, with an iterative schedule and KD recovery between steps.

    python -m prune.structured --config configs/toy/prune.yaml [key=value ...]

setup: the student folder (`student.build:load_student_folder`), LoRA adapters merged into the LLM → for each
schedule step: (Taylor only) gradients of the calibration loss on a few training clips → prune every layer of
each part to the step's width (`prune.width`) → save the student folder → (between steps, when configured) KD
recovery, which is the distill recipe with `init_from` the pruned folder (`python -m distill.train`) → the
final student at `<output_dir>/model`, a normal student folder that `evaluation.run` and
`distill.train init_from=...` load, plus `pruning_report.json` (widths and parameters per part, per step).

Widths follow the original model: after step s of n, a part keeps `width · (1 − ratio · s / n)` channels (MLP
widths rounded to a multiple of `ratios.round_to`) or heads (whole heads, at least one).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common.cli import run
from common.config import ConfigError, load_job_config, parse_cli, save_resolved
from common.dataset import AudioTextCollator
from common.device import resolve_device
from common.model import move_batch
from common.sizes import count_parameters
from common.stages import mark_stage_done, stage_is_current
from common.training import seed_everything
from distill.distiller import DistillConfig, build_distiller, load_transfer_set, run_distillation
from prune.skeleton import merge_lora, read_salmonn_config
from prune.width import Criterion, DepGraphLog, HeadMode, Widths, kept_channels, kept_units, prune_to, widths
from student.build import load_student_folder, save_student_folder
from teacher.build import SalmonnConfig
from teacher.checkpoint import MODEL_CONFIG


@dataclass
class Ratios:
    """Fraction of every layer's units removed by the end of the schedule, per part (0 = untouched)."""

    llm_mlp: float = 0.0
    """LLM MLP channels (intermediate_size)."""
    llm_heads: float = 0.0
    """LLM attention: of the KV groups (`llm_head_mode: kv_groups`, each with its query heads) or of the query
    heads inside every KV group (`query_heads`)."""
    llm_head_mode: HeadMode = "kv_groups"
    whisper_mlp: float = 0.0
    """Whisper encoder MLP channels (encoder_ffn_dim)."""
    whisper_heads: float = 0.0
    """Whisper encoder heads per layer."""
    beats_mlp: float = 0.0
    """BEATs MLP channels (encoder_ffn_embed_dim)."""
    round_to: int = 8
    """Kept MLP widths are multiples of this (tensor-core-friendly shapes); 1 = the exact ratio."""


@dataclass
class CalibrationConfig:
    """Clips whose loss gradients score units for `importance: taylor`."""

    clips: int = 32
    """Training clips (a seeded random choice of the distill config's train split)."""
    batch_size: int = 8
    loss: Literal["ce", "distill"] = "ce"
    """ce: the student's cross-entropy on the references; distill: the distill recipe's whole loss as
    `distill_config` sets it (CE + logit KD + feature KD, teacher from its cache)."""


@dataclass
class ScheduleConfig:
    steps: int = 1
    """Pruning steps; each removes an equal share of the final ratio."""
    recovery_steps: int = 0
    """Optimizer steps of KD recovery (the distill recipe from the pruned folder) after every pruning step but the
    last; 0 = no recovery in between."""
    recover_last: bool = False
    """Also recover after the last step (otherwise run `python -m distill.train ... init_from=` yourself)."""


@dataclass
class JobConfig:
    """Prune a saved student structurally."""

    model: str = "outputs/toy/student/model"
    """The student folder to prune (written by distill.train or by this job)."""
    output_dir: str = "outputs/toy/pruned-25"
    log_dir: str = "runs/toy/pruned-25"
    """Recovery runs log under `<log_dir>/step<N>`. Follows `output_dir` (`common.config.LOG_DIR_RULE`): when the
    YAML or an override sets `output_dir` without `log_dir` beside it, or `log_dir` is empty, it is
    `<output_dir>/logs`; a preset's `log_dir` belongs to its own `output_dir`."""
    ratios: Ratios = field(default_factory=Ratios)
    importance: Criterion = "magnitude"
    """magnitude (squared L2 norm of a unit's weights), taylor (|w · ∂L/∂w| on the calibration clips), random."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill_config: str = ""
    """The distill recipe's YAML (data, features, teacher cache): needed by Taylor calibration and recovery."""
    distill_overrides: list[str] = field(default_factory=list)
    """`key=value` overrides of that recipe for calibration and recovery (e.g. optim.lr=3.0e-4)."""
    depgraph_timeout_s: float = 120.0
    """Time limit of each torch-pruning dependency build or group query (a hang is an error, not a stuck job)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the calibration pass runs (auto: cuda when available)."""
    seed: int = 0


def validate(cfg: JobConfig) -> None:
    """Stop with a message naming the field and the fix when the config cannot work."""
    r = cfg.ratios
    for name in ("llm_mlp", "llm_heads", "whisper_mlp", "whisper_heads", "beats_mlp"):
        value = getattr(r, name)
        if not 0.0 <= value < 1.0:
            raise SystemExit(f"config error: ratios.{name} must be in [0, 1), got {value}")
    if r.round_to < 1:
        raise SystemExit(f"config error: ratios.round_to must be ≥ 1, got {r.round_to}")
    if cfg.schedule.steps < 1:
        raise SystemExit(f"config error: schedule.steps must be ≥ 1, got {cfg.schedule.steps}")
    needs_recipe = cfg.importance == "taylor" or cfg.schedule.recovery_steps > 0
    if needs_recipe and not Path(cfg.distill_config).is_file():
        raise SystemExit(f"config error: distill_config {cfg.distill_config!r} is not a file; Taylor "
                         "importance and recovery read data and the teacher cache from the distill recipe's YAML "
                         "(e.g. distill_config=configs/toy/distill.yaml)")
    check_recovery_warmup(cfg)
    if not (Path(cfg.model) / MODEL_CONFIG).is_file():
        raise SystemExit(f"config error: model {cfg.model!r} is not a student folder (no {MODEL_CONFIG}); "
                         "run the distill stage first or point `model=` at one")


def check_recovery_warmup(cfg: JobConfig) -> None:
    """Stop when the recovery between steps would end inside its warm-up (the lr only climbing, ending at its peak)."""
    if cfg.schedule.recovery_steps <= 0:
        return
    recipe = load_job_config(cfg.distill_config, cfg.distill_overrides)
    if recipe.optim.warmup_steps >= cfg.schedule.recovery_steps:
        raise SystemExit(
            f"config error: schedule.recovery_steps={cfg.schedule.recovery_steps}, but the recovery runs "
            f"{cfg.distill_config} whose optim.warmup_steps is {recipe.optim.warmup_steps}: the lr would only "
            "climb and each recovery end at its peak. Add a shorter warm-up to distill_overrides, e.g. "
            f"optim.warmup_steps={max(1, cfg.schedule.recovery_steps // 10)}")


# ----- widths per schedule step ---------------------------------------------------------------------------------


def target_widths(original: Widths, ratios: Ratios, fraction: float) -> Widths:
    """Widths after a `fraction` (step / steps) of the schedule, always computed from the original widths."""
    r, m = ratios, ratios.round_to
    per_group = original.llm_heads // original.llm_kv_heads
    if r.llm_head_mode == "kv_groups":
        kv = kept_units(original.llm_kv_heads, r.llm_heads * fraction)
        heads = kv * per_group
    else:
        kv = original.llm_kv_heads
        heads = kv * kept_units(per_group, r.llm_heads * fraction)
    return Widths(
        llm_mlp=kept_channels(original.llm_mlp, r.llm_mlp * fraction, m), llm_heads=heads, llm_kv_heads=kv,
        whisper_mlp=kept_channels(original.whisper_mlp, r.whisper_mlp * fraction, m),
        whisper_heads=kept_units(original.whisper_heads, r.whisper_heads * fraction),
        beats_mlp=kept_channels(original.beats_mlp, r.beats_mlp * fraction, m) if original.beats_mlp else 0,
    )


# ----- model in, model out -------------------------------------------------------------------------------------


def describe(salmonn_cfg: SalmonnConfig, model) -> SalmonnConfig:
    """The SalmonnConfig with the pruned widths (the HF configs inside the folder are the ones that load)."""
    w = widths(model)
    llm_cfg = model.llm.config
    beats = dict(salmonn_cfg.beats.cfg)
    if model.audio_encoder is not None and beats:
        beats["encoder_ffn_embed_dim"] = w.beats_mlp
    return dataclasses.replace(
        salmonn_cfg,
        llm=dataclasses.replace(salmonn_cfg.llm, intermediate_size=w.llm_mlp, num_attention_heads=w.llm_heads,
                                num_key_value_heads=w.llm_kv_heads,
                                head_dim=getattr(llm_cfg, "head_dim", None) or salmonn_cfg.llm.head_dim),
        whisper=dataclasses.replace(salmonn_cfg.whisper, encoder_ffn_dim=w.whisper_mlp),
        beats=dataclasses.replace(salmonn_cfg.beats, cfg=beats),
    )


def parameters(model) -> dict:
    return count_parameters(model, model.parts())


# ----- calibration (Taylor) ------------------------------------------------------------------------------------


def calibrate(model, batches: list[dict], loss_fn, device: torch.device) -> float:
    """Accumulate gradients of `loss_fn(batch)` over `batches` on every parameter (dropout off); returns the mean
    loss. Gradients stay on the weights for Taylor scoring; `requires_grad` flags are restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.to(device).eval()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    total = 0.0
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            loss = loss_fn(batch)
            (loss / len(batches)).backward()
            total += float(loss.detach())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    model.cpu()
    return total / max(1, len(batches))


def distill_config(cfg: JobConfig, overrides: list[str]) -> DistillConfig:
    """The distillation config that recovery and Taylor calibration run: `distill_config` with `overrides`."""
    dcfg = load_job_config(cfg.distill_config, overrides)
    if not isinstance(dcfg, DistillConfig):
        raise ConfigError(f"distill_config: {cfg.distill_config} is not a distill.train YAML (its `job:` must be "
                          "distill.train)")
    return dcfg


def calibration_setup(cfg: JobConfig, folder: Path, out: Path):
    """(student, list of batches, loss function) for Taylor scoring, from the distill recipe's data and loss."""
    overrides = [*cfg.distill_overrides, f"init_from={folder}", f"output_dir={out / 'calibration'}"]
    dcfg = distill_config(cfg, overrides)
    train = load_transfer_set(dcfg)
    if cfg.calibration.loss == "distill":
        distiller, _ = build_distiller(dcfg, train)
        student, loss_fn = distiller.student, lambda batch: distiller(batch)["loss"]
        module = distiller
    else:
        student = load_student_folder(folder)
        module, loss_fn = student, lambda batch: student(batch).loss
    rng = np.random.default_rng(cfg.seed)
    count = min(cfg.calibration.clips, len(train))
    chosen = sorted(rng.choice(len(train), count, replace=False).tolist(), key=lambda i: train.durations[i])
    collate = AudioTextCollator(student.tokenizer)
    size = cfg.calibration.batch_size
    batches = [collate([train[i] for i in chosen[k:k + size]]) for k in range(0, count, size)]
    return student, module, batches, loss_fn


# ----- the job ---------------------------------------------------------------------------------------------------


def recover(cfg: JobConfig, pruned: Path, out_dir: Path, step: int) -> Path:
    """KD recovery: a distillation run (`distill.distiller.run_distillation`) of `distill_config` started from the
    pruned folder, from scratch; returns the recovered student folder."""
    overrides = [*cfg.distill_overrides, f"init_from={pruned}", f"output_dir={out_dir}",
                 f"log_dir={Path(cfg.log_dir) / f'step{step}'}", f"loop.max_steps={cfg.schedule.recovery_steps}"]
    print(f"recovery after step {step}: python -m distill.train --config {cfg.distill_config} --force "
          f"{' '.join(overrides)}")
    if run_distillation(distill_config(cfg, overrides), force=True) != 0:
        raise SystemExit(f"recovery after pruning step {step} failed (see above)")
    return out_dir / "model"


def prune_step(cfg: JobConfig, folder: Path, original: Widths, step: int, out: Path) -> tuple[object, SalmonnConfig,
                                                                                              dict]:
    """Load `folder`, score, prune to this step's widths; returns (model, its SalmonnConfig, step report)."""
    salmonn_cfg = read_salmonn_config(folder)
    calibration_loss = None
    if cfg.importance == "taylor":
        model, module, batches, loss_fn = calibration_setup(cfg, folder, out)
        salmonn_cfg = merge_lora(model, salmonn_cfg)
        calibration_loss = calibrate(module, batches, loss_fn, resolve_device(cfg.device))
    else:
        model = load_student_folder(folder)
        salmonn_cfg = merge_lora(model, salmonn_cfg)
    target = target_widths(original, cfg.ratios, step / cfg.schedule.steps)
    log = DepGraphLog(timeout_s=cfg.depgraph_timeout_s)
    torch.manual_seed(cfg.seed + step)  # the random criterion
    before = parameters(model)
    prune_to(model, target, cfg.importance, cfg.ratios.llm_head_mode, log)
    model.zero_grad(set_to_none=True)
    report = {"step": step, "source": str(folder), "target": dataclasses.asdict(target),
              "widths": dataclasses.asdict(widths(model)), "params_before": before, "params_after": parameters(model),
              "depgraph_modules": log.modules or [], "calibration_loss": calibration_loss}
    return model.eval(), describe(salmonn_cfg, model), report


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    validate(cfg)
    out = Path(cfg.output_dir)
    if stage_is_current(cfg, out / "model", inputs=[cfg.model]) and not force:
        print(f"pruned student up to date: {out / 'model'} (use --force to prune again)")
        return 0
    if force:
        shutil.rmtree(out, ignore_errors=True)
    seed_everything(cfg.seed)
    save_resolved(cfg, out)
    started = time.time()
    source = load_student_folder(cfg.model)
    original, original_params = widths(source), parameters(source)
    del source
    folder, steps = Path(cfg.model), []
    n = cfg.schedule.steps
    for step in range(1, n + 1):
        model, salmonn_cfg, report = prune_step(cfg, folder, original, step, out)
        recovering = cfg.schedule.recovery_steps > 0 and (step < n or cfg.schedule.recover_last)
        last = step == n and not recovering
        folder = out / "model" if last else out / "steps" / f"step{step}" / "pruned"
        save_student_folder(model, salmonn_cfg, folder, extra={"pruning_step": step})
        print(f"step {step}/{n}: widths {report['widths']} → {folder}")
        if recovering:
            folder = recover(cfg, folder, out / "steps" / f"step{step}" / "recovered", step)
            report["recovered"] = str(folder)
        steps.append(report)
    if folder != out / "model":
        shutil.rmtree(out / "model", ignore_errors=True)
        shutil.copytree(folder, out / "model")
    final = load_student_folder(out / "model")
    summary = {"source": cfg.model, "importance": cfg.importance, "original_widths": dataclasses.asdict(original),
               "final_widths": dataclasses.asdict(widths(final)), "params_original": original_params,
               "params_final": parameters(final), "steps": steps, "seconds": round(time.time() - started, 1)}
    summary["params_fraction"] = summary["params_final"]["total"] / original_params["total"]
    (out / "pruning_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    mark_stage_done(cfg, out / "model", inputs=[cfg.model])
    print(f"pruned student: {out / 'model'} — {summary['params_final']['total']:,} parameters "
          f"({100 * summary['params_fraction']:.1f} % of {original_params['total']:,})")
    return 0


if __name__ == "__main__":
    run(main)
