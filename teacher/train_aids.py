"""Training aids of `teacher.train` that run before SALMONN training, each a stand-in for pretraining a toy or
mini teacher cannot afford (the configs' docstrings say what each replaces):

- BEATs tagging (`beats_pretrain`): BEATs alone as a multi-label tagger of the caption words;
- audio-token alignment (`align`): the Q-Former and projection alone, pointing each clip's audio tokens at the
  LLM embeddings of its target's tokens.

Neither head is part of the saved model.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.dataset import AudioTextCollator, DurationBucketSampler
from common.tracking import MetricLogger
from common.training import fit
from teacher.qformer import num_windows
from teacher.salmonn import Salmonn, speech_frames

TeacherJob = Any
"""`teacher.train`'s JobConfig, which imports this module (so it is not imported here): the phases below read its
`data`, `loop`, `optim`, `log_dir`, `model` and their own section (`beats_pretrain`, `align`, `lm_pretrain`)."""


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


def pretrain_beats(cfg: TeacherJob, model: Salmonn, train, valid, out_dir: Path, run_key: str) -> None:
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
    with MetricLogger(Path(cfg.log_dir) / "beats_pretrain", stdout_every=5, owner=out_dir / "beats_pretrain") as logger:
        fit(tagger, torch.utils.data.Subset(train, rows), sampler, AudioTextCollator(), lambda m, batch: m(batch),
            loop, optim, out_dir / "beats_pretrain", logger, run_key=run_key)
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
        audio = self.model.project(queries).float()  # [batch, windows, llm_dim]
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


def align_audio_tokens(cfg: TeacherJob, model: Salmonn, train, valid, out_dir: Path,
                       run_key: str) -> AudioTokenAligner:
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
    with MetricLogger(Path(cfg.log_dir) / "align", stdout_every=5, owner=out_dir / "align") as logger:
        fit(aligner, train, sampler, AudioTextCollator(), lambda m, batch: m(batch), loop, optim, out_dir / "align",
            logger, run_key=run_key)
        rows = [i for task in cfg.data.tasks for i in first_clip_of_each(valid, task)[: a.eval_clips_per_task]]
        if rows:
            prior = torch.tensor([float(counts[t]) for t in vocab])
            precision, chance = alignment_precision(aligner, valid, rows, a.batch_size, prior)
            logger.log(a.steps, {"eval/align_precision": precision, "eval/align_precision_prior": chance})
            print(f"audio-token alignment on {len(rows)} valid clips: target-token precision {precision:.3f} "
                  f"(most frequent tokens: {chance:.3f})")
    model.train()
    return aligner


@dataclass(frozen=True)  # frozen: a shared default instance (`added_option`)
class LMPretrainConfig:
    steps: int = 0
    """Before SALMONN training, train the LLM alone for this many steps (0 = off) as a language model of the training
    split's targets behind their prompts, with no audio tokens: `[BOS, prompt before, prompt after, target, end]`,
    loss on the target and its end token. A stand-in for the pretrained Vicuna SALMONN starts from: an LLM that
    already knows the benchmark's language, so that in SALMONN training the only way left to lower the loss is
    through the audio tokens (a fresh LLM learns the answers' language first and then ignores the audio). The LLM's
    own head is the LM head: nothing is added to the model. After it, `model.lora` / `model.llm.freeze` say what of
    the LLM trains on. An LLM from `model.llm.path` already knows a language; this phase is for fresh ones."""
    lr: float = 1.0e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    batch_size: int = 64
    eval_texts: int = 500
    """Valid targets (at most) on which the LM loss is reported before and after."""


class TextTargets(torch.utils.data.Dataset):
    """The (prompt, target text) pairs of a scanned split, without audio: items `{"text", "prompt"}`."""

    def __init__(self, dataset, limit: int = 0):
        examples = dataset.examples[:limit] if limit else dataset.examples
        self.items = [{"text": ex.text, "prompt": dataset.prompt(ex)} for ex in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class TextCollator:
    """Batches of `TextTargets` items: `prompts`, `texts`, `target_ids` and `labels` as `AudioTextCollator` makes."""

    def __init__(self, tokenizer):
        self.targets = AudioTextCollator(tokenizer)

    def __call__(self, items: list[dict]) -> dict:
        texts = [it["text"] for it in items]
        target_ids, labels = self.targets.tokenize_targets(texts)
        return {"prompts": [it["prompt"] for it in items], "texts": texts, "target_ids": target_ids, "labels": labels}


class PromptedLM(nn.Module):
    """A SALMONN's LLM as a language model of targets behind their prompts, with zero audio tokens."""

    def __init__(self, model: Salmonn):
        super().__init__()
        self.llm = model.llm  # the only module here, so the only parameters `fit` trains and checkpoints
        self._owner = [model]  # for the prompt wrapping, outside the module tree

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        model = self._owner[0]
        embed = self.llm.get_input_embeddings()
        no_audio = embed.weight.new_zeros(len(batch["prompts"]), 0, embed.weight.shape[1])
        inputs, mask, labels = model.wrap(no_audio, batch["prompts"], batch["target_ids"], batch["labels"])
        logits = self.llm(inputs_embeds=inputs, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        return {"loss": loss}


@torch.no_grad()
def lm_loss(lm: PromptedLM, texts: TextTargets, batch_size: int) -> float:
    """Mean per-token cross-entropy (nats) of `lm` on the targets of `texts`."""
    lm.eval()
    collate = TextCollator(lm._owner[0].tokenizer)
    total, tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = collate([texts[i] for i in range(start, min(len(texts), start + batch_size))])
        n = int((batch["labels"] != -100).sum())
        total += float(lm(batch)["loss"]) * n
        tokens += n
    lm.train()
    return total / max(1, tokens)


def pretrain_llm(cfg: TeacherJob, model: Salmonn, train, valid, out_dir: Path, run_key: str) -> dict[str, float]:
    """Train the LLM's base weights alone as a prompted LM of the training targets (checkpointed and resumable), then
    restore which LLM parameters train (LoRA adapters, or the base as `model.llm.freeze` says). Returns the valid LM
    loss before and after (`{"lm_loss_before", "lm_loss_after"}`, nats per token)."""
    p = cfg.lm_pretrain
    texts = TextTargets(train)
    if not len(texts):
        raise SystemExit("config error: lm_pretrain.steps > 0 but the training data has no targets")
    if cfg.model.llm.int8_frozen:
        raise SystemExit("config error: lm_pretrain.steps > 0 trains the LLM's base weights, but model.llm.int8_frozen "
                         "holds them in int8, which cannot train. Fix: set lm_pretrain.steps: 0, or "
                         "model.llm.int8_frozen: false")
    trainable = {name: param.requires_grad for name, param in model.llm.named_parameters()}
    for name, param in model.llm.named_parameters():
        param.requires_grad_("lora_" not in name)  # the base weights; LoRA adapters stay as built (B = 0: no effect)
    lm = PromptedLM(model)
    valid_texts = TextTargets(valid, p.eval_texts)
    before = lm_loss(lm, valid_texts, p.batch_size) if len(valid_texts) else float("nan")
    print(f"LLM pretraining: {len(texts)} training targets, {p.steps} steps; valid LM loss {before:.3f} nats/token")
    sampler = DurationBucketSampler([len(it["text"]) for it in texts.items], p.batch_size,
                                    cfg.data.bucket_pool_batches, seed=cfg.loop.seed)
    loop = dataclasses.replace(cfg.loop, max_steps=p.steps, batch_size=p.batch_size, eval_every=10**9,
                               best_metric="")
    optim = dataclasses.replace(cfg.optim, lr=p.lr, min_lr_ratio=p.min_lr_ratio, warmup_steps=p.warmup_steps)
    with MetricLogger(Path(cfg.log_dir) / "lm_pretrain", stdout_every=5, owner=out_dir / "lm_pretrain") as logger:
        fit(lm, texts, sampler, TextCollator(model.tokenizer), lambda m, batch: m(batch), loop, optim,
            out_dir / "lm_pretrain", logger, run_key=run_key)
        after = lm_loss(lm, valid_texts, p.batch_size) if len(valid_texts) else float("nan")
        logger.log(p.steps, {"eval/lm_loss_before": before, "eval/lm_loss": after})
    print(f"LLM pretraining done: valid LM loss {before:.3f} → {after:.3f} nats/token")
    for name, param in model.llm.named_parameters():
        param.requires_grad_(trainable[name])
    model.train()
    return {"lm_loss_before": before, "lm_loss_after": after}
