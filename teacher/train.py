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
import torch.nn.functional as F
from torch import nn

from common.augment import with_augmentation
from common.bpe import train_bpe
from common.cli import run
from common.config import added_option, config_hash, mark_stage_done, parse_cli, save_resolved, stage_is_current
from common.dataset import AudioTextCollator, DataConfig, DurationBucketSampler, scan_split
from common.feature_store import with_encoder_outputs, with_feature_store
from common.features import FeatureConfig
from common.hub import is_hub_id
from common.tracking import MetricLogger
from common.training import LoopConfig, OptimConfig, fit, seed_everything
from teacher.build import SalmonnConfig, apply_lora, build_llm, build_salmonn
from teacher.checkpoint import save_model_folder
from teacher.qformer import num_windows
from teacher.salmonn import SPEECH_OUT, Salmonn, crop_mel, run_whisper_encoder
from teacher.train_aids import (
    AlignConfig,
    BeatsTaggingConfig,
    LMPretrainConfig,
    align_audio_tokens,
    pretrain_beats,
    pretrain_llm,
)


@dataclass
class TokenizerConfig:
    vocab_size: int = 1000
    style: Literal["llama", "bytelevel"] = "llama"
    """llama: `▁` word markers like Vicuna's SentencePiece; bytelevel: `Ġ` markers (the toy student's)."""


@dataclass
class ValidationConfig:
    max_clips_per_task: int = 48
    """Valid clips decoded per task at each evaluation (the valid split is small; the test split is for the end)."""
    max_new_tokens: int = 40
    batch_size: int = 24


@dataclass
class CTCConfig:
    weight: float = 0.0
    """Weight of an auxiliary character CTC loss on the Whisper encoder's output for ASR clips (0 = off).

    A training aid for encoders trained from scratch (the toy teacher): hybrid CTC/attention training (as in
    ESPnet) grounds the encoder in the audio far sooner than the LLM's loss alone. The head is dropped at save.
    """
    alphabet: str = "abcdefghijklmnopqrstuvwxyz '"
    pretrain_steps: int = 0
    """Before SALMONN training, train the Whisper encoder alone with this CTC loss on the ASR clips for this many
    steps: the toy's stand-in for Whisper's own supervised pretraining (SALMONN starts from a trained Whisper).
    An encoder-only step costs a fraction of a full one, so this is where a from-scratch encoder learns fastest."""
    pretrain_lr: float = 2.0e-3
    pretrain_min_lr_ratio: float = 0.05
    """End of the pretraining's cosine decay, as a fraction of `pretrain_lr` (1.0 = constant after warm-up)."""
    freeze_after_pretrain: bool = False
    """Freeze the pretrained Whisper encoder for SALMONN training, as SALMONN does with its Whisper: the LLM then
    learns on stable acoustic features, and every step skips the encoder's backward pass. The CTC term is dropped
    then (it could only move its own head)."""
    qformer_weight: float = 0.0
    """Weight of an auxiliary CTC loss on the Q-Former outputs for ASR clips, over the LLM tokenizer's ids of the
    transcript (0 = off; the head is dropped at save). A from-scratch LLM learns its language model long before it
    learns to read the audio tokens, and then ignores them; this term makes every window's query carry the words
    under it from the first step, in order (CTC-trained connectors, as in CTC-compressed LLM ASR). It needs more
    windows than tokens: with ~3 words per second, windows of 1/6 s (`model.qformer.second_per_window`)."""


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
    output_dir: str = "outputs/toy/teacher"
    log_dir: str = "runs/toy-teacher"
    """TensorBoard events and `metrics.jsonl`. Follows `output_dir` (`common.config.LOG_DIR_RULE`): when the YAML or
    an override sets `output_dir` without `log_dir` beside it, or `log_dir` is empty, the logs go to
    `<output_dir>/logs`; a preset's `log_dir` belongs to its own `output_dir`. A run never deletes logs another
    output folder left here: they are moved to `<log_dir>/previous-<time>/` (`common.tracking.LOG_OWNER`)."""


def load_split(cfg: JobConfig, split: str):
    """The split scanned (and cleaned), from the feature store when one is set; the train split augmented as
    `data.augment` says. Its data report goes to `<output_dir>/data_report_<split>.json`."""
    dataset = scan_split(cfg.data, cfg.features, split, cfg.output_dir)
    if cfg.feature_store:
        dataset = with_feature_store(dataset, cfg.features, cfg.feature_store, split)
    if split == "train":
        dataset = with_augmentation(dataset, cfg.data.augment, cfg.loop.seed)
        dataset.report.save(Path(cfg.output_dir) / f"data_report_{split}.json")  # with the augmentation's settings
    return dataset


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


class WithCTC(nn.Module):
    """A SALMONN plus a character CTC head on its Whisper encoder output (`[batch, frames, d_model]`)."""

    def __init__(self, model, cfg: CTCConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.head = nn.Linear(model.speech_encoder.config.d_model, len(cfg.alphabet) + 1)  # index 0 = blank
        self.index = {c: i + 1 for i, c in enumerate(cfg.alphabet)}
        self._speech: list[torch.Tensor] = []  # the encoder's last output only
        self.aligner: nn.Module | None = None  # audio-token alignment as an auxiliary term (AlignConfig.weight)
        self.align_weight = 0.0
        model.speech_encoder.layer_norm.register_forward_hook(self._keep)
        if cfg.qformer_weight:
            self.qformer_head = nn.Linear(model.qformer.cfg.hidden_size, len(model.tokenizer) + 1)  # 0 = blank

    def _keep(self, module, args, output) -> None:
        self._speech[:] = [output]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(batch, target_logits_only=True)
        terms = {"llm": out.loss}
        rows = [i for i, task in enumerate(batch["tasks"]) if task == "asr"]
        terms["loss"] = out.loss
        if rows and self.cfg.weight:
            terms["ctc"] = self.ctc_loss(self._speech[-1], batch, rows)
            terms["loss"] = terms["loss"] + self.cfg.weight * terms["ctc"]
        if rows and self.cfg.qformer_weight:
            terms["qformer_ctc"] = self.qformer_ctc_loss(out.qformer_out, batch, rows)
            terms["loss"] = terms["loss"] + self.cfg.qformer_weight * terms["qformer_ctc"]
        if self.aligner is not None:
            terms["align"] = self.aligner(batch, out.qformer_out)["loss"]
            terms["loss"] = terms["loss"] + self.align_weight * terms["align"]
        return terms

    def qformer_ctc_loss(self, queries: torch.Tensor, batch: dict, rows: list[int]) -> torch.Tensor:
        """CTC of the transcript's LLM token ids over each clip's windows (`queries` `[batch, windows, dim]`)."""
        tok = self.model.tokenizer
        targets = [torch.tensor(tok(batch["texts"][i], add_special_tokens=False)["input_ids"]) + 1 for i in rows]
        frames = ((batch["mel_frames"][rows] + 1) // 2).tolist()
        windows = torch.tensor([min(num_windows(f, self.model.qformer.cfg), queries.shape[1]) for f in frames])
        log_probs = self.qformer_head(queries[rows]).float().log_softmax(-1).transpose(0, 1)  # [windows, rows, V+1]
        return F.ctc_loss(log_probs, torch.cat(targets), windows, torch.tensor([len(t) for t in targets]),
                          zero_infinity=True)

    def ctc_loss(self, speech: torch.Tensor, batch: dict, rows: list[int]) -> torch.Tensor:
        targets = [torch.tensor([self.index[c] for c in batch["texts"][i].lower() if c in self.index]) for i in rows]
        frames = torch.clamp((batch["mel_frames"][rows] + 1) // 2, max=speech.shape[1])
        log_probs = self.head(speech[rows]).float().log_softmax(-1).transpose(0, 1)  # [frames, rows, classes]
        return F.ctc_loss(log_probs, torch.cat(targets), frames, torch.tensor([len(t) for t in targets]),
                          zero_infinity=True)


class EncoderCTC(nn.Module):
    """The Whisper encoder and the CTC head of a `WithCTC`, trained alone (encoder pretraining)."""

    def __init__(self, with_ctc: WithCTC):
        super().__init__()
        self.encoder = with_ctc.model.speech_encoder
        self.head = with_ctc.head
        self._owner = [with_ctc]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        speech = run_whisper_encoder(self.encoder, crop_mel(batch) if self._owner[0].model.pad_to_longest
                                     else batch["mel"])
        loss = self._owner[0].ctc_loss(speech, batch, list(range(len(batch["texts"]))))
        return {"loss": loss, "ctc": loss.detach()}


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


def with_cached_encoders(model: Salmonn, dataset, features: FeatureConfig, store_dir: str, name: str):
    """`dataset` whose items carry the outputs of `model`'s frozen encoders, each encoder's computed once into its
    own file under `store_dir` (so a change of BEATs does not recompute Whisper's)."""
    keys = model.cacheable_encoders()
    if not keys:
        raise SystemExit("config error: encoder_store is set but no encoder's outputs can be cached: freeze an encoder "
                         "(model.whisper.freeze, model.beats.freeze); Whisper also needs whisper.per_clip: true or "
                         "whisper.pad_to_longest: false "
                         "and BEATs model.qformer.trim_to_audio: true (otherwise a clip's output depends on its batch)")
    model.eval()
    device = next(model.parameters()).device
    for key in keys:

        def encode(batch: dict, key: str = key) -> dict[str, list[torch.Tensor]]:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            return {k: [t.cpu() for t in v] for k, v in model.encoder_outputs(batch, [key]).items()}

        dataset = with_encoder_outputs(dataset, encode, model.encoder_fingerprint([key]), features, store_dir,
                                       f"{name}-{key}")
        print(f"{name}: cached {key} from {dataset.path}")
    return dataset


def validator(cfg: JobConfig, valid, out_dir: Path):
    """Decode part of the valid split and score it with the evaluation code (WER, CIDEr-D)."""
    from evaluation.run import GenerationConfig, quality
    from evaluation.run import JobConfig as EvalConfig

    v = cfg.validation
    eval_cfg = EvalConfig(max_clips_per_task=v.max_clips_per_task, batch_size=v.batch_size,
                          generation=GenerationConfig(max_new_tokens=v.max_new_tokens))

    def evaluate(model, step: int) -> dict[str, float]:
        metrics, _, _ = quality(model, valid, eval_cfg, out_dir / f"step_{step:07d}", None)
        return {f"eval/{k}": float(metrics[k]) for k in ("wer", "cer", "cider_d", "bleu_4") if k in metrics}

    return evaluate


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
    if cfg.encoder_store and cfg.data.augment.active:
        raise SystemExit("config error: data.augment changes the encoders' inputs, but encoder_store reads cached "
                         "encoder outputs of the unaugmented clips; set encoder_store: '' to augment, or turn "
                         "data.augment off")
    seed_everything(cfg.loop.seed)
    save_resolved(cfg, out_dir)
    train, valid = load_split(cfg, "train"), load_split(cfg, "valid")
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
        train = with_cached_encoders(model, train, cfg.features, cfg.encoder_store, "train")
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
    if getattr(train, "counts", None):  # an AugmentedDataset: what augmentation drew in this process's run
        print(f"augmentation drew: {dict(train.counts)}")
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
