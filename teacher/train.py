"""Train a SALMONN (the toy teacher from scratch, or SALMONN's own stage-1 recipe on real encoders).

    python -m teacher.train --config configs/toy/teacher.yaml [key=value ...]

setup (data, tokenizer, model) → fit (the shared loop: AdamW, warm-up + cosine, clipping, checkpoints,
exact resume, TensorBoard under log_dir) → save the model in the official layouts under
`output_dir/model/` (HF Whisper folder, BEATs .pt, HF LLM folder, SALMONN .pth, salmonn.yaml), which the
teacher cache, the student builder and the evaluation load through the same loaders as the real release.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.bpe import train_bpe
from common.config import config_hash, mark_stage_done, parse_cli, save_resolved, stage_is_current
from common.dataset import AudioTextCollator, AudioTextDataset, DataConfig, DurationBucketSampler
from common.feature_store import with_encoder_outputs, with_feature_store
from common.features import FeatureConfig
from common.tracking import MetricLogger
from common.training import LoopConfig, OptimConfig, fit, seed_everything
from teacher.build import SalmonnConfig, apply_lora, build_llm, build_salmonn
from teacher.checkpoint import save_model_folder
from teacher.qformer import num_windows
from teacher.salmonn import SPEECH_OUT, Salmonn, crop_mel, run_whisper_encoder, speech_frames


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
class BeatsTaggingConfig:
    steps: int = 0
    """Before SALMONN training, train BEATs alone for this many steps as a tagger of the words of the captioning
    clips' captions (0 = off). Where no BEATs checkpoint exists (the mini preset) this stands in for BEATs' own
    pretraining and AudioSet fine-tuning: a multi-label head over per-token logits averaged over the clip (the
    official fine-tuned head's pooling), soft targets (the share of the clip's captions that use the word), binary
    cross-entropy. SALMONN then keeps BEATs as `model.beats.freeze` says (frozen: its outputs can be cached). The
    tagging head is not part of the saved model."""
    lr: float = 1.0e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    batch_size: int = 32
    min_clips: int = 5
    """A word is a tag when the captions of at least this many training clips use it."""


@dataclass
class AlignConfig:
    steps: int = 0
    """Before SALMONN training, train the Q-Former and projection alone for this many steps (0 = off) so that a
    clip's audio tokens point at the LLM's input embeddings of its target's tokens: for every token the training
    targets use, the best cosine similarity over the clip's audio tokens, scaled, is a logit of "this token is in
    the target" (multiple-instance BCE), and the audio tokens' mean norm is pulled to the embeddings'. Without it a
    fresh Q-Former collapses to one constant soft prompt in the few hundred steps a CPU run affords (the LLM then
    learns the answers' language, not the audio); with it the LLM starts from audio tokens that read like the words
    they carry. No LLM pass, so a step costs a small fraction of a SALMONN step. A stand-in for the long stage-1
    training that grounds SALMONN's Q-Former (and for BLIP-2's Q-Former pretraining before its LLM stage)."""
    lr: float = 2.0e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    batch_size: int = 32
    norm_weight: float = 1.0
    """Weight of (mean audio-token norm / mean embedding norm − 1)²."""
    weight: float = 0.0
    """Keep the alignment loss on during SALMONN training with this weight (an auxiliary term, like hybrid CTC), so
    the audio tokens cannot collapse into a constant prompt while the LoRA learns the answers' language."""
    eval_clips_per_task: int = 48
    """Valid clips per task for the report (target-token precision at the clip's own number of tokens)."""


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
    "encoder_pretrain": ("beats_pretrain", "align", "finetune", "relearn"),
    "beats_pretrain": ("align", "finetune", "relearn"),
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
    with MetricLogger(Path(cfg.log_dir) / "encoder_pretrain", stdout_every=5) as logger:
        fit(EncoderCTC(trainer), subset, sampler, AudioTextCollator(), lambda m, batch: m(batch), loop, optim,
            out_dir / "encoder_pretrain", logger, run_key=phase_key(cfg, "encoder_pretrain"))


def caption_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9'-]+", text.lower()))


def caption_tags(dataset, min_clips: int, vocabulary: list[str] | None = None):
    """(tag words, {clip path: soft target `[tags]`}) from the captioning entries of `dataset`.

    A clip's target for a word is the share of its captions that use the word. Tags are the words used by the
    captions of at least `min_clips` clips, unless `vocabulary` gives them (the valid split takes the train tags).
    """
    captions: dict[str, list[set[str]]] = {}
    for ex in dataset.examples:
        if ex.task == "audiocaption":
            captions.setdefault(ex.path, []).append(caption_words(ex.text))
    if vocabulary is None:
        counts = Counter(word for caps in captions.values() for word in set().union(*caps))
        vocabulary = sorted(word for word, n in counts.items() if n >= min_clips)
    index = {word: i for i, word in enumerate(vocabulary)}
    targets = {}
    for path, caps in captions.items():
        target = torch.zeros(len(vocabulary))
        for words in caps:
            for word in words & index.keys():
                target[index[word]] += 1.0 / len(caps)
        targets[path] = target
    return vocabulary, targets


class BeatsTagger(nn.Module):
    """BEATs plus a linear tagging head: per-token logits averaged over the clip's tokens, BCE with soft targets."""

    def __init__(self, beats: nn.Module, tags: list[str], targets: dict[str, torch.Tensor]):
        super().__init__()
        self.beats = beats
        self.head = nn.Linear(beats.cfg.encoder_embed_dim, len(tags))
        self.targets = targets

    def clip_logits(self, batch: dict) -> torch.Tensor:
        """`[batch, tags]` logits: the head over every token `[batch, tokens, tags]`, averaged over real tokens."""
        features, mask = self.beats.forward_fbank(batch["fbank"], batch.get("fbank_padding_mask"))
        logits = self.head(features)
        if mask is None:
            return logits.mean(1)
        keep = (~mask).unsqueeze(-1).to(logits.dtype)
        return (logits * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.clip_logits(batch)
        target = torch.stack([self.targets[p] for p in batch["paths"]]).to(logits.device)
        return {"loss": F.binary_cross_entropy_with_logits(logits.float(), target)}


def first_clip_of_each(dataset, task: str) -> list[int]:
    seen, rows = set(), []
    for i, ex in enumerate(dataset.examples):
        if ex.task == task and ex.path not in seen:
            seen.add(ex.path)
            rows.append(i)
    return rows


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision of ranking `scores` `[clips]` against boolean `positive` `[clips]` (at least one)."""
    hits = positive[scores.argsort(descending=True)].float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


@torch.no_grad()
def tagging_scores(tagger: BeatsTagger, dataset, rows: list[int], targets: dict[str, torch.Tensor],
                   prior: torch.Tensor, batch_size: int) -> dict[str, float]:
    """The tagger on `rows` against the constant prediction `prior` (train tag frequencies): mean BCE of both, and
    mAP over the tags that some clip has (target ≥ 0.5) with its chance level (the tags' positive rates)."""
    tagger.eval()
    collate = AudioTextCollator()
    logits, target = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in rows[start : start + batch_size]])
        target.append(torch.stack([targets[p] for p in batch["paths"]]))
        logits.append(tagger.clip_logits(batch).float())
    logits, target = torch.cat(logits), torch.cat(target)
    positive = target >= 0.5
    tags = [t for t in range(target.shape[1]) if positive[:, t].any()]
    return {"tag_bce": float(F.binary_cross_entropy_with_logits(logits, target)),
            "tag_bce_prior": float(F.binary_cross_entropy(prior.expand_as(target), target)),
            "tag_map": sum(average_precision(logits[:, t], positive[:, t]) for t in tags) / max(1, len(tags)),
            "tag_map_chance": float(positive[:, tags].float().mean(0).mean()) if tags else 0.0}


def pretrain_beats(cfg: JobConfig, model: Salmonn, train, valid, out_dir: Path) -> None:
    """Train BEATs alone as a caption-word tagger on the captioning clips (checkpointed and resumable), then set
    it trainable or frozen as `model.beats.freeze` says."""
    if model.audio_encoder is None:
        raise SystemExit("config error: beats_pretrain.steps > 0 but model.beats.enabled is false")
    b = cfg.beats_pretrain
    tags, targets = caption_tags(train, b.min_clips)
    rows = first_clip_of_each(train, "audiocaption")
    if not tags or not rows:
        raise SystemExit(f"config error: beats_pretrain.steps > 0 but the training data has no captioning clips whose "
                         f"caption words reach beats_pretrain.min_clips={b.min_clips}")
    print(f"BEATs tagging pretraining: {len(rows)} captioning clips, {len(tags)} caption words as tags")
    model.audio_encoder.requires_grad_(True)
    tagger = BeatsTagger(model.audio_encoder, tags, targets)
    sampler = DurationBucketSampler([train.durations[i] for i in rows], b.batch_size, cfg.data.bucket_pool_batches,
                                    seed=cfg.loop.seed)
    loop = dataclasses.replace(cfg.loop, max_steps=b.steps, batch_size=b.batch_size, eval_every=10**9,
                               best_metric="")
    optim = dataclasses.replace(cfg.optim, lr=b.lr, min_lr_ratio=b.min_lr_ratio, warmup_steps=b.warmup_steps)
    with MetricLogger(Path(cfg.log_dir) / "beats_pretrain", stdout_every=5) as logger:
        fit(tagger, torch.utils.data.Subset(train, rows), sampler, AudioTextCollator(), lambda m, batch: m(batch),
            loop, optim, out_dir / "beats_pretrain", logger, run_key=phase_key(cfg, "beats_pretrain"))
        valid_rows = first_clip_of_each(valid, "audiocaption")
        if valid_rows:
            _, valid_targets = caption_tags(valid, b.min_clips, vocabulary=tags)
            prior = torch.stack(list(targets.values())).mean(0).clamp(1e-4, 1 - 1e-4)
            scores = tagging_scores(tagger, valid, valid_rows, valid_targets, prior, b.batch_size)
            logger.log(b.steps, {f"eval/{k}": v for k, v in scores.items()})
            print(f"BEATs tagger on {len(valid_rows)} valid clips: BCE {scores['tag_bce']:.4f} (tag frequencies "
                  f"alone: {scores['tag_bce_prior']:.4f}), mAP {scores['tag_map']:.3f} "
                  f"(chance: {scores['tag_map_chance']:.3f})")
    model.audio_encoder.requires_grad_(not cfg.model.beats.freeze)


def own_window_mask(batch: dict, qformer_cfg, windows: int) -> torch.Tensor:
    """`[batch, windows]` True at the Q-Former windows that cover each clip's own audio (at least one)."""
    own = [min(windows, max(1, num_windows(int(f), qformer_cfg))) for f in speech_frames(batch)]
    return torch.arange(windows)[None] < torch.tensor(own)[:, None]


class AudioTokenAligner(nn.Module):
    """A SALMONN's Q-Former and projection against the LLM's input embeddings of `vocab` (token ids)."""

    def __init__(self, model: Salmonn, vocab: list[int], norm_weight: float):
        super().__init__()
        self.model = model
        self.norm_weight = norm_weight
        embeddings = model.llm.get_input_embeddings().weight.detach().float()
        self.register_buffer("directions", F.normalize(embeddings[vocab], dim=-1), persistent=False)
        self.embedding_norm = float(embeddings[vocab].norm(dim=-1).mean())
        self.column = {token: i for i, token in enumerate(vocab)}
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-4.0))

    def clip_logits(self, batch: dict, queries: torch.Tensor | None = None) -> torch.Tensor:
        """`[batch, vocab]`: per token, the scaled best cosine similarity over the clip's own audio tokens (from the
        Q-Former outputs `queries` when the caller has them)."""
        queries = self.model.audio_queries(batch) if queries is None else queries
        audio = self.model.projector(queries).float()  # [batch, windows, llm_dim]
        own = own_window_mask(batch, self.model.qformer.cfg, audio.shape[1]).to(audio.device)
        cosine = F.normalize(audio, dim=-1) @ self.directions.T  # [batch, windows, vocab]
        best = cosine.masked_fill(~own.unsqueeze(-1), -1.0).max(dim=1).values
        self._norm = audio.norm(dim=-1)[own].mean()
        return best * self.scale + self.bias

    def targets(self, texts: list[str]) -> torch.Tensor:
        target = torch.zeros(len(texts), len(self.column))
        for row, text in enumerate(texts):
            for token in self.model.tokenizer(text, add_special_tokens=False)["input_ids"]:
                if token in self.column:
                    target[row, self.column[token]] = 1.0
        return target

    def forward(self, batch: dict, queries: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.clip_logits(batch, queries)
        bce = F.binary_cross_entropy_with_logits(logits, self.targets(batch["texts"]).to(logits.device))
        ratio = self._norm / self.embedding_norm
        return {"loss": bce + self.norm_weight * (ratio - 1) ** 2, "bce": bce.detach(), "norm_ratio": ratio.detach()}


@torch.no_grad()
def alignment_precision(aligner: AudioTokenAligner, dataset, rows: list[int], batch_size: int,
                        prior: torch.Tensor) -> tuple[float, float]:
    """Mean over clips of the share of the target's distinct tokens among the clip's top-|target| tokens, for the
    aligner and for a constant ranking by training frequency (`prior`, `[vocab]`)."""
    aligner.eval()
    collate = AudioTextCollator()
    ours, base, n = 0.0, 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in rows[start : start + batch_size]])
        logits, target = aligner.clip_logits(batch).cpu(), aligner.targets(batch["texts"])
        for row in range(len(target)):
            k = int(target[row].sum())
            if k:
                ours += float(target[row][logits[row].topk(k).indices].sum()) / k
                base += float(target[row][prior.topk(k).indices].sum()) / k
                n += 1
    return ours / max(1, n), base / max(1, n)


def align_audio_tokens(cfg: JobConfig, model: Salmonn, train, valid, out_dir: Path) -> AudioTokenAligner:
    """Train the Q-Former and projection alone to point the audio tokens at their targets' token embeddings
    (checkpointed and resumable), on the training data as given (cached encoder outputs when there are)."""
    a = cfg.align
    tokenizer = model.tokenizer
    counts = Counter(t for ex in train.examples for t in set(tokenizer(ex.text, add_special_tokens=False)["input_ids"]))
    vocab = sorted(counts)
    print(f"audio-token alignment: {len(train)} clips, {len(vocab)} distinct target tokens")
    aligner = AudioTokenAligner(model, vocab, a.norm_weight)
    sampler = DurationBucketSampler(train.durations, a.batch_size, cfg.data.bucket_pool_batches, seed=cfg.loop.seed)
    loop = dataclasses.replace(cfg.loop, max_steps=a.steps, batch_size=a.batch_size, eval_every=10**9,
                               best_metric="")
    optim = dataclasses.replace(cfg.optim, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps)
    with MetricLogger(Path(cfg.log_dir) / "align", stdout_every=5) as logger:
        fit(aligner, train, sampler, AudioTextCollator(), lambda m, batch: m(batch), loop, optim, out_dir / "align",
            logger, run_key=phase_key(cfg, "align"))
        rows = [i for task in cfg.data.tasks for i in first_clip_of_each(valid, task)[: a.eval_clips_per_task]]
        if rows:
            prior = torch.tensor([float(counts[t]) for t in vocab])
            precision, chance = alignment_precision(aligner, valid, rows, a.batch_size, prior)
            logger.log(a.steps, {"eval/align_precision": precision, "eval/align_precision_prior": chance})
            print(f"audio-token alignment on {len(rows)} valid clips: target-token precision {precision:.3f} "
                  f"(most frequent tokens: {chance:.3f})")
    model.train()
    return aligner


def with_cached_encoders(model: Salmonn, dataset, features: FeatureConfig, store_dir: str, name: str):
    """`dataset` whose items carry the outputs of `model`'s frozen encoders, each encoder's computed once into its
    own file under `store_dir` (so a change of BEATs does not recompute Whisper's)."""
    keys = model.cacheable_encoders()
    if not keys:
        raise SystemExit("config error: encoder_store is set but no encoder's outputs can be cached: freeze an encoder "
                         "(model.whisper.freeze, model.beats.freeze); Whisper also needs whisper.pad_to_longest: false "
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
    with MetricLogger(Path(cfg.log_dir) / name, stdout_every=5) as logger:
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
        pretrain_beats(cfg, model, train, valid, out_dir)
    if cfg.encoder_store:
        train = with_cached_encoders(model, train, cfg.features, cfg.encoder_store, "train")
        if SPEECH_OUT in model.cacheable_encoders() and trainer.cfg.weight:
            raise SystemExit("config error: ctc.weight > 0 needs the Whisper encoder to run at every step, but its "
                             "outputs are cached (encoder_store); set ctc.weight=0 or encoder_store=''")
    if cfg.align.steps:
        aligner = align_audio_tokens(cfg, model, train, valid, out_dir)
        if cfg.align.weight:
            trainer.aligner, trainer.align_weight = aligner, cfg.align.weight
    evaluate = validator(cfg, valid, out_dir / "valid")
    with MetricLogger(cfg.log_dir, stdout_every=5) as logger:
        state = fit(trainer, train, sampler, collate, lambda m, batch: m(batch), cfg.loop, cfg.optim, out_dir,
                    logger, evaluate=lambda m, step: evaluate(m.model, step), run_key=phase_key(cfg, "salmonn"))
    extra = {"step": state.step}
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
    sys.exit(main())
