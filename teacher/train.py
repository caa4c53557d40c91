"""Train a SALMONN (the toy teacher from scratch, or SALMONN's own stage-1 recipe on real encoders).

    python -m teacher.train --config configs/toy/teacher.yaml [key=value ...]

setup (data, tokenizer, model) → fit (the shared loop: AdamW, warm-up + cosine, clipping, checkpoints,
exact resume, TensorBoard under log_dir) → save the model in the official layouts under
`output_dir/model/` (HF Whisper folder, BEATs .pt, HF LLM folder, SALMONN .pth, salmonn.yaml), which the
teacher cache, the student builder and the evaluation load through the same loaders as the real release.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.augment import AugmentedDataset
from common.bpe import train_bpe
from common.cli import run
from common.config import added_option, config_hash, parse_cli, save_resolved
from common.dataset import AudioTextCollator, DataConfig, DurationBucketSampler
from common.features import FeatureConfig
from common.hub import is_hub_id
from common.splits import load_split as load_data_split
from common.stages import mark_stage_done, stage_is_current
from common.tracking import MetricLogger
from common.training import LoopConfig, OptimConfig, fit, seed_everything
from teacher.build import SalmonnConfig, apply_lora, build_llm, build_salmonn
from teacher.checkpoint import save_model_folder
from teacher.ctc import CTCConfig, EncoderCTC, WithCTC
from teacher.encoder_store import refuse_augmented, with_cached_encoders, with_stored_augmented_copies
from teacher.salmonn import SPEECH_OUT, Salmonn
from teacher.train_aids import (
    AlignConfig,
    BeatsTaggingConfig,
    LMPretrainConfig,
    align_audio_tokens,
    pretrain_beats,
    pretrain_llm,
)
from teacher.validation import ValidationConfig
from teacher.validation import validator as valid_scorer


@dataclass
class TokenizerConfig:
    vocab_size: int = 1000
    style: Literal["llama", "bytelevel"] = "llama"
    """llama: `▁` word markers like Vicuna's SentencePiece; bytelevel: `Ġ` markers (the toy student's)."""


@dataclass
class FinetuneConfig:
    steps: int = 0
    """After SALMONN training, this many more steps (0 = off) with the training aids off (no Q-Former CTC, no
    alignment term) and a fresh warm-up + cosine schedule: the aids ground the audio path, then the Q-Former,
    projection and LLM tune on the answers alone (SALMONN's own stages also end on the task loss alone)."""
    lr: float = 1.0e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0


@dataclass
class RelearnConfig:
    steps: int = 0
    """Last, this many more steps (0 = off) for a fresh LLM and projection over the trained encoders and Q-Former,
    on the answers alone. A from-scratch LLM trained jointly with a fresh audio path learns the answers' language
    model while the audio tokens still mean nothing, and then leans on it: the toy teacher's LLM guessed captions
    that its own BEATs and Q-Former could tell apart. A new LLM over the now-trained audio path learns to read it
    from its first step (the toy's stand-in for SALMONN's pretrained Vicuna, which never had that habit to lose).
    The Whisper encoder keeps `model.whisper.freeze` / `ctc.freeze_after_pretrain`; BEATs and the Q-Former train."""
    lr: float = 1.0e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    seed: int = 1
    """Seed of the fresh LLM's and projection's initialisation."""


@dataclass
class JobConfig:
    """Train a SALMONN on annotation data."""

    model: SalmonnConfig = field(default_factory=SalmonnConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Used when `model.llm` is fresh and `model.llm.tokenizer` does not exist yet: a BPE is trained on the
    training texts and prompts and saved there."""
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_store: str = ""
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)
    beats_pretrain: BeatsTaggingConfig = field(default_factory=BeatsTaggingConfig)
    lm_pretrain: LMPretrainConfig = added_option(LMPretrainConfig())
    align: AlignConfig = field(default_factory=AlignConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    encoder_store: str = ""
    """Folder for the outputs of frozen encoders (`model.whisper.freeze`, `model.beats.freeze`), computed once per
    training clip before SALMONN training and read instead of running the encoders at every step (and by
    `teacher.cache` with the same folder). Needs outputs that do not depend on the batch: Whisper without
    `pad_to_longest`, BEATs only with `model.qformer.trim_to_audio`. Empty runs the encoders at every step."""
    encoder_store_whisper_cuts: list[int] = added_option([])
    """Also store, from the same Whisper pass, the outputs of Whisper's first k layers under its final norm, for
    each k: what a student built with `student.whisper_layer_selection: first` and k Whisper layers computes, so
    `distill.train` with the same `encoder_store` reads them instead of running its encoder over every clip."""
    output_dir: str = "outputs/toy/teacher"
    log_dir: str = "runs/toy-teacher"
    """TensorBoard events and `metrics.jsonl`. Follows `output_dir` (`common.config.LOG_DIR_RULE`): when the YAML or
    an override sets `output_dir` without `log_dir` beside it, or `log_dir` is empty, the logs go to
    `<output_dir>/logs`; a preset's `log_dir` belongs to its own `output_dir`. A run never deletes logs another
    output folder left here: they are moved to `<log_dir>/previous-<time>/` (`common.tracking.LOG_OWNER`)."""


def load_split(cfg: JobConfig, split: str):
    """`common.splits.load_split` with this job's data, features, feature store, output folder and seed."""
    return load_data_split(cfg.data, cfg.features, split, cfg.output_dir, cfg.feature_store, cfg.loop.seed)


def ensure_tokenizer(cfg: JobConfig, train) -> None:
    """Train and save the BPE tokenizer of a fresh LLM, on the training texts and every prompt string."""
    llm = cfg.model.llm
    if llm.path or (llm.tokenizer and (Path(llm.tokenizer, "tokenizer.json").is_file() or is_hub_id(llm.tokenizer))):
        return  # a trained one, or a hub tokenizer (common.hub)
    if not llm.tokenizer:
        raise SystemExit("config error: model.llm.tokenizer must name a folder for the fresh LLM's tokenizer")
    template = cfg.model.prompt.template.format(cfg.model.prompt.audio_wrapper + "x")
    prompts = [template, *cfg.data.prompts.values(), *{ex.prompt for ex in train.examples if ex.prompt}]
    texts = [ex.text for ex in train.examples] + prompts * 50
    tokenizer = train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.style)
    tokenizer.save_pretrained(llm.tokenizer)
    print(f"trained a {cfg.tokenizer.style} BPE tokenizer ({len(tokenizer)} tokens) → {llm.tokenizer}")


LATER_SECTIONS = {
    "encoder_pretrain": ("beats_pretrain", "lm_pretrain", "align", "finetune", "relearn"),
    "beats_pretrain": ("lm_pretrain", "align", "finetune", "relearn"),
    "lm_pretrain": ("align", "finetune", "relearn"),
    "align": ("finetune", "relearn"),
    "salmonn": ("finetune", "relearn"),
    "finetune": ("relearn",),
    "relearn": (),
}
"""Per phase, the config sections that only later phases read."""


def phase_key(cfg: JobConfig, phase: str) -> str:
    """The run key of one phase's checkpoints: the config without the sections of later phases, so that changing
    (say) `relearn` resumes the finished earlier phases, while changing anything they read starts them over."""
    blank = {name: type(getattr(cfg, name))() for name in LATER_SECTIONS[phase]}
    blank.update(output_dir="", log_dir="")  # where the run is written does not change what it trains
    return f"{phase} {config_hash(dataclasses.replace(cfg, **blank))}"


def pretrain_encoder(cfg: JobConfig, trainer: WithCTC, train, out_dir: Path) -> None:
    """CTC pretraining of the Whisper encoder on the ASR clips (checkpointed and resumable like any fit)."""
    asr = [i for i, ex in enumerate(train.examples) if ex.task == "asr"]
    if not asr:
        raise SystemExit("config error: ctc.pretrain_steps > 0 but the training data has no asr clips")
    subset = torch.utils.data.Subset(train, asr)
    sampler = DurationBucketSampler([train.durations[i] for i in asr], cfg.loop.batch_size,
                                    cfg.data.bucket_pool_batches, seed=cfg.loop.seed)
    loop = dataclasses.replace(cfg.loop, max_steps=cfg.ctc.pretrain_steps, eval_every=10**9, best_metric="")
    optim = dataclasses.replace(cfg.optim, lr=cfg.ctc.pretrain_lr, min_lr_ratio=cfg.ctc.pretrain_min_lr_ratio)
    with MetricLogger(Path(cfg.log_dir) / "encoder_pretrain", stdout_every=5,
                      owner=out_dir / "encoder_pretrain") as logger:
        fit(EncoderCTC(trainer), subset, sampler, AudioTextCollator(), lambda m, batch: m(batch), loop, optim,
            out_dir / "encoder_pretrain", logger, run_key=phase_key(cfg, "encoder_pretrain"))


def validator(cfg: JobConfig, valid, out_dir: Path):
    """`teacher.validation.validator` on this job's `validation` section."""
    return valid_scorer(cfg.validation, valid, out_dir)


def answers_only_phase(cfg: JobConfig, trainer: WithCTC, train, valid, sampler, collate, name: str,
                       phase: FinetuneConfig | RelearnConfig):
    """`phase.steps` more steps of the task loss alone, with a fresh warm-up + cosine; checkpoints, logs and valid
    decodes under `<output_dir>/<name>/` and `<log_dir>/<name>/`."""
    out_dir = Path(cfg.output_dir) / name
    loop = dataclasses.replace(cfg.loop, max_steps=phase.steps, eval_every=min(cfg.loop.eval_every, phase.steps),
                               log_every=min(cfg.loop.log_every, phase.steps))
    optim = dataclasses.replace(cfg.optim, lr=phase.lr, warmup_steps=phase.warmup_steps,
                                min_lr_ratio=phase.min_lr_ratio)
    evaluate = validator(cfg, valid, out_dir / "valid")
    with MetricLogger(Path(cfg.log_dir) / name, stdout_every=5, owner=out_dir) as logger:
        return fit(trainer, train, sampler, collate, lambda m, batch: m(batch), loop, optim, out_dir, logger,
                   evaluate=lambda m, step: evaluate(m.model, step), run_key=phase_key(cfg, name))


def fresh_llm_and_projection(model: Salmonn, model_cfg: SalmonnConfig, seed: int) -> None:
    """Replace `model`'s LLM and projection with freshly initialised ones of the same shape (seeded, so a resumed run
    builds the same ones before its checkpoint is loaded over them). An LLM from `llm.path` is reloaded from there
    with a fresh LoRA: only what training changed starts again."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    llm = build_llm(model_cfg.llm, model.tokenizer)
    if model_cfg.lora.enabled:
        llm = apply_lora(llm, model_cfg.lora)
    else:
        llm.requires_grad_(not model_cfg.llm.freeze)
    model.llm = llm
    model.projector.reset_parameters()
    torch.random.set_rng_state(generator_state)


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    out_dir = Path(cfg.output_dir)
    if stage_is_current(cfg, out_dir / "model") and not force:
        print(f"teacher up to date: {out_dir / 'model'} (use --force to retrain)")
        return 0
    if force:
        # A forced rerun starts from scratch: the loop would otherwise resume from the old checkpoints.
        shutil.rmtree(out_dir, ignore_errors=True)
    if cfg.encoder_store:
        refuse_augmented(cfg.data.augment, copies_supported=True)
    seed_everything(cfg.loop.seed)
    save_resolved(cfg, out_dir)
    train, valid = load_split(cfg, "train"), load_split(cfg, "valid")
    augmented = train if isinstance(train, AugmentedDataset) else None
    ensure_tokenizer(cfg, train)
    model, _ = build_salmonn(cfg.model)
    collate = AudioTextCollator(model.tokenizer)
    sampler = DurationBucketSampler(train.durations, cfg.loop.batch_size, cfg.data.bucket_pool_batches,
                                    seed=cfg.loop.seed)
    print(f"padding with bucketing: {sampler.padding_report()}")

    trainer = WithCTC(model, cfg.ctc)
    if cfg.ctc.pretrain_steps:
        pretrain_encoder(cfg, trainer, train, out_dir)
        if cfg.ctc.freeze_after_pretrain:
            model.speech_encoder.requires_grad_(False)
            trainer.cfg = dataclasses.replace(cfg.ctc, weight=0.0)
    if cfg.beats_pretrain.steps:
        pretrain_beats(cfg, model, train, valid, out_dir, phase_key(cfg, "beats_pretrain"))
    if cfg.lm_pretrain.steps:
        pretrain_llm(cfg, model, train, valid, out_dir, phase_key(cfg, "lm_pretrain"))
    if cfg.encoder_store:
        if augmented is not None:  # data.augment.stored_copies (refuse_augmented stopped it without)
            train = with_stored_augmented_copies(model, train, cfg.features, cfg.encoder_store, "train")
        else:
            train = with_cached_encoders(model, train, cfg.features, cfg.encoder_store, "train",
                                         cfg.encoder_store_whisper_cuts)
        if SPEECH_OUT in model.cacheable_encoders() and trainer.cfg.weight:
            raise SystemExit("config error: ctc.weight > 0 needs the Whisper encoder to run at every step, but its "
                             "outputs are cached (encoder_store); set ctc.weight=0 or encoder_store=''")
    if cfg.align.steps:
        aligner = align_audio_tokens(cfg, model, train, valid, out_dir, phase_key(cfg, "align"))
        if cfg.align.weight:
            trainer.aligner, trainer.align_weight = aligner, cfg.align.weight
    evaluate = validator(cfg, valid, out_dir / "valid")
    with MetricLogger(cfg.log_dir, stdout_every=5, owner=out_dir) as logger:
        state = fit(trainer, train, sampler, collate, lambda m, batch: m(batch), cfg.loop, cfg.optim, out_dir,
                    logger, evaluate=lambda m, step: evaluate(m.model, step), run_key=phase_key(cfg, "salmonn"))
    extra = {"step": state.step}
    if augmented is not None and augmented.counts:  # what augmentation drew in this process's run
        where = (" (every draw of this run: pretraining phases, then the stored copies' encoder passes, each clip "
                 "once per stored encoder)") if augmented is not train else ""
        print(f"augmentation drew{where}: {dict(augmented.counts)}")
    if cfg.finetune.steps or cfg.relearn.steps:
        trainer.cfg = dataclasses.replace(trainer.cfg, weight=0.0, qformer_weight=0.0)
        trainer.aligner = None
    if cfg.finetune.steps:
        state = answers_only_phase(cfg, trainer, train, valid, sampler, collate, "finetune", cfg.finetune)
        extra["finetune_step"] = state.step
    if cfg.relearn.steps:
        fresh_llm_and_projection(model, cfg.model, cfg.relearn.seed)
        state = answers_only_phase(cfg, trainer, train, valid, sampler, collate, "relearn", cfg.relearn)
        extra["relearn_step"] = state.step
    model_cfg = dataclasses.replace(cfg.model, checkpoint="")
    save_model_folder(model.cpu().eval(), model_cfg, out_dir / "model", extra=extra)
    mark_stage_done(cfg, out_dir / "model")
    print(f"teacher saved to {out_dir / 'model'} after {extra}")
    return 0


if __name__ == "__main__":
    run(main)
