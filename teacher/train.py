"""Train a SALMONN (the toy teacher from scratch, or SALMONN's own stage-1 recipe on real encoders).

    python -m teacher.train --config configs/toy/teacher.yaml [key=value ...]

setup (data, tokenizer, model) → fit (the shared loop: AdamW, warm-up + cosine, clipping, checkpoints,
exact resume, TensorBoard under log_dir) → save the model in the official layouts under
`output_dir/model/` (HF Whisper folder, BEATs .pt, HF LLM folder, SALMONN .pth, salmonn.yaml), which the
teacher cache, the student builder and the evaluation load through the same loaders as the real release.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.bpe import train_bpe
from common.config import mark_stage_done, parse_cli, save_resolved, stage_is_current
from common.dataset import AudioTextCollator, AudioTextDataset, DataConfig, DurationBucketSampler
from common.feature_store import with_feature_store
from common.features import FeatureConfig
from common.tracking import MetricLogger
from common.training import LoopConfig, OptimConfig, fit, seed_everything
from teacher.build import SalmonnConfig, build_salmonn
from teacher.checkpoint import save_model_folder
from teacher.salmonn import crop_mel, run_whisper_encoder


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
    output_dir: str = "outputs/toy/teacher"
    log_dir: str = "runs/toy-teacher"


def load_split(cfg: JobConfig, split: str):
    dataset = AudioTextDataset.scan(getattr(cfg.data, split), cfg.data, cfg.features, desc=f"scan {split}")
    dataset.report.save(Path(cfg.output_dir) / f"data_report_{split}.json")
    print(f"{split}: {dataset.report.summary()}")
    if cfg.feature_store:
        dataset = with_feature_store(dataset, cfg.features, cfg.feature_store, split)
    return dataset


def ensure_tokenizer(cfg: JobConfig, train) -> None:
    """Train and save the BPE tokenizer of a fresh LLM, on the training texts and every prompt string."""
    llm = cfg.model.llm
    if llm.path or (llm.tokenizer and Path(llm.tokenizer, "tokenizer.json").is_file()):
        return
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
        model.speech_encoder.layer_norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._speech[:] = [output]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        terms = {"llm": out.loss}
        rows = [i for i, task in enumerate(batch["tasks"]) if task == "asr"]
        if rows and self.cfg.weight:
            terms["ctc"] = self.ctc_loss(self._speech[-1], batch, rows)
            terms["loss"] = out.loss + self.cfg.weight * terms["ctc"]
        else:
            terms["loss"] = out.loss
        return terms

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
    with MetricLogger(Path(cfg.log_dir) / "encoder_pretrain", stdout_every=5) as logger:
        fit(EncoderCTC(trainer), subset, sampler, AudioTextCollator(), lambda m, batch: m(batch), loop, optim,
            out_dir / "encoder_pretrain", logger)


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


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    out_dir = Path(cfg.output_dir)
    if stage_is_current(cfg, out_dir / "model") and not force:
        print(f"teacher up to date: {out_dir / 'model'} (use --force to retrain)")
        return 0
    if force:
        # A forced rerun starts from scratch: the loop would otherwise resume from the old checkpoints.
        shutil.rmtree(out_dir, ignore_errors=True)
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
    evaluate = validator(cfg, valid, out_dir / "valid")
    with MetricLogger(cfg.log_dir, stdout_every=5) as logger:
        state = fit(trainer, train, sampler, collate, lambda m, batch: m(batch), cfg.loop, cfg.optim, out_dir,
                    logger, evaluate=lambda m, step: evaluate(m.model, step))
    model_cfg = dataclasses.replace(cfg.model, checkpoint="")
    save_model_folder(model.cpu().eval(), model_cfg, out_dir / "model", extra={"step": state.step})
    mark_stage_done(cfg, out_dir / "model")
    print(f"teacher saved to {out_dir / 'model'} after {state.step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
