"""Distillation as a library: the run's config, the `Distiller` (student + KD terms + teacher side), the transfer set,
and `run_distillation`, the whole run for one config. `distill.train` is its command; pruning recovery
(`prune.structured`) and the step benchmark (`distill.step_bench`) call it directly.

loss = w_ce · CE + w_kd · logit KD + w_feat · Q-Former feature KD (+ w_hidden · Whisper hidden-state KD, online)

Logit KD compares the student's distribution at each answer token with the teacher's: on the same positions
when both share a tokenizer, and at the one-to-one aligned positions otherwise (`distill.cross_tokenizer`).
Every term is logged apart (`train/ce`, `train/kd`, `train/feature`, ...).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from common.config import added_option, save_resolved
from common.dataset import AudioTextCollator, DataConfig, DurationBucketSampler, first_clip_indices
from common.distributed import full_parameters, make_accelerator, prepare_frozen, whole_models
from common.feature_store import SubsetView
from common.features import FeatureConfig
from common.int8_frozen import quantize_frozen
from common.splits import load_split
from common.stages import mark_stage_done, stage_is_current, stage_key
from common.tracking import MetricLogger
from common.training import LoopConfig, OptimConfig, fit, seed_everything
from distill.cross_tokenizer import VocabMap, align_spans, cross_tokenizer_kd, vocab_overlap
from distill.feature_kd import FeatureKD, HiddenStateKD
from distill.losses import KINDS, SparseTeacher, logit_kd
from student.build import (
    StudentConfig,
    build_student,
    ensure_student_tokenizer,
    load_student_folder,
    lora_over_loaded,
    save_student_folder,
)
from teacher.build import LLMConfig, SalmonnConfig, load_tokenizer
from teacher.cache_identity import sample_keys, teacher_identity, teacher_tokenizer_identity
from teacher.cache_store import CacheReader
from teacher.checkpoint import load_model_folder, read_model_config
from teacher.encoder_store import refuse_augmented, with_cached_encoders
from teacher.salmonn import Salmonn, shift_for_next_token
from teacher.validation import ValidationConfig, validator


@dataclass
class KDConfig:
    teacher: Literal["cache", "online"] = "cache"
    """cache: read the teacher cache (no teacher at training time); online: run the frozen teacher each step."""
    cache_dir: str = ""
    """The teacher cache of the train split (built by teacher.cache with the same data config)."""
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    """Weight of the logit KD term (0 trains with CE only)."""
    loss: str = "forward_kl"
    """One of forward_kl, reverse_kl, generalized_jsd, skew_forward_kl, skew_reverse_kl."""
    temperature: float = 1.0
    scale_by_t2: bool = False
    beta: float = 0.5
    """generalized_jsd's mixture weight."""
    alpha: float = 0.1
    """skew KLs' mixture weight."""
    chunk_size: int = 0
    """Positions per chunk of the KD loss (0 = all at once); keeps a 256k vocabulary in memory."""
    uld_weight: float = 0.0
    """Across tokenizers: weight of ULD on the full sorted distributions at aligned positions."""
    tasks: tuple[str, ...] = added_option(())
    """Tasks (of `data.tasks`) whose samples get the KD terms (logit, feature, hidden); empty: every task. For a
    teacher that is weaker than the labels on some task, e.g. `[asr]`: the other tasks' samples train on CE alone.
    Each term stays a mean over what the selected samples hold (answer tokens, windows, frames)."""
    feature_weight: float = 0.0
    """Q-Former output KD (MSE + cosine per window)."""
    hidden_weight: float = 0.0
    """Whisper hidden-state KD (L1 + cosine) from the teacher layers the student's layers came from; online only."""
    teacher_int8: bool = added_option(False)
    """Online teacher only: hold its LLM (LoRA merged first) and Whisper linear weights in int8 (torchao weight-only,
    `common.int8_frozen`): a quarter of fp32's bytes, half of fp16's, for a frozen teacher beside the student on one
    GPU (`python -m scale estimate` prints what that saves). The teacher's outputs move by its int8 rounding."""
    anneal: Literal["none", "linear"] = "none"
    """linear: teacher annealing (Clark et al. 2019, "BAM!"): the KD terms' weights (logit, feature, hidden) fall
    linearly from their value at step 0 to 0 at the last step, so the student ends on the labels alone and can
    pass a teacher that is weaker than the labels on some task. CE keeps its weight throughout."""


@dataclass
class TrainingStage:
    until_step: int = 0
    """This stage lasts until this optimizer step (exclusive); the last stage runs to the end."""
    train: list[str] = field(default_factory=lambda: ["all"])
    """Parts that train: any of speech_encoder, audio_encoder, qformer, projector, llm, lora, all."""


@dataclass
class DistillConfig:
    """Everything one distillation run reads: the `distill.train` job's config (its `JobConfig` adds nothing), which
    pruning recovery and the step benchmark load from the same YAML."""

    teacher_folder: str = "outputs/toy/teacher/model"
    student: StudentConfig = field(default_factory=StudentConfig)
    init_from: str = ""
    """Start from this saved student (e.g. a pruned one) instead of building one from the teacher. With
    `student.lora.enabled` its LLM is frozen (in int8 with `student.llm.int8_frozen`) and LoRA adapters train over it
    (`student.build.lora_over_loaded`); the other `student.*` keys describe a new student and are not read."""
    kd: KDConfig = field(default_factory=KDConfig)
    stages: list[TrainingStage] = field(default_factory=list)
    """Optional schedule of which parts train when (empty: everything trainable trains throughout)."""
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_store: str = ""
    encoder_store: str = added_option("")
    """Folder for the outputs of the student's frozen encoders (`student.freeze_whisper`, `student.freeze_beats`),
    computed once per training clip and read instead of running them at every step, as `teacher.train`'s
    `encoder_store`. Needs `kd.teacher: cache` (an online teacher must hear the clips itself) and no Whisper
    hidden-state KD. A recovery run (`init_from`) whose pruning left the frozen encoders alone reuses the store. Files
    are named by what the outputs depend on: a student Whisper cut from the teacher's first k layers reads what the
    teacher's pass stored with `encoder_store_whisper_cuts: [k]` (the same folder) without running."""
    transfer_clips_per_task: int = added_option(0)
    """Distil on only the first N distinct clips of each task of the train split (0 = all): a transfer set smaller
    than the data the teacher learned from, as SALMONN's teacher has heard far more than a distillation corpus
    holds. The teacher cache stays the whole split's; a captioning clip keeps all its captions."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output_dir: str = "outputs/toy/student"
    log_dir: str = "runs/toy/student"
    """TensorBoard events and `metrics.jsonl`. Follows `output_dir` (`common.config.LOG_DIR_RULE`): when the YAML or
    an override sets `output_dir` without `log_dir` beside it, or `log_dir` is empty, the logs go to
    `<output_dir>/logs`; a preset's `log_dir` belongs to its own `output_dir`. A run never deletes logs another
    output folder left here: they are moved to `<log_dir>/previous-<time>/` (`common.tracking.LOG_OWNER`)."""


PART_PREFIXES = {"speech_encoder": ("speech_encoder.",), "audio_encoder": ("audio_encoder.",),
                 "qformer": ("qformer.", "ln_speech.", "ln_audio."), "projector": ("projector.",), "llm": ("llm.",)}


def answer_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows that predict each answer token, left-aligned: `[batch, L, vocab]` and a `[batch, L]` mask.

    `logits`/`labels` are already shifted (row t predicts label t); row j of the output predicts answer token j.
    """
    keep = labels != -100
    counts = keep.sum(1)
    length = int(counts.max()) if counts.numel() else 0
    out = logits.new_zeros(logits.shape[0], length, logits.shape[-1])
    mask = torch.zeros(logits.shape[0], length, dtype=torch.bool, device=logits.device)
    for i in range(logits.shape[0]):
        n = int(counts[i])
        out[i, :n] = logits[i][keep[i]]
        mask[i, :n] = True
    return out, mask


def pad_sparse(samples, device, mode: str) -> SparseTeacher:
    """Cached per-sample `[T_i, k]` ids/values → a padded SparseTeacher `[batch, T, k]` (value 0 = padding)."""
    length = max(s.sparse_ids.shape[0] for s in samples)
    k = samples[0].sparse_ids.shape[1]
    ids = torch.zeros(len(samples), length, k, dtype=torch.long)
    values = torch.zeros(len(samples), length, k)
    for i, s in enumerate(samples):
        ids[i, : s.sparse_ids.shape[0]] = s.sparse_ids
        values[i, : s.sparse_ids.shape[0]] = s.sparse_values.float()
    return SparseTeacher(ids.to(device), values.to(device), mode)


def pad_windows(features: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(f.shape[0] for f in features)
    out = torch.zeros(len(features), length, features[0].shape[-1])
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f.float()
        mask[i, : f.shape[0]] = True
    return out.to(device), mask.to(device)


class Distiller(nn.Module):
    """The student plus the trainable parts of the KD terms (feature maps); `forward(batch)` → loss terms."""

    def __init__(self, student: Salmonn, cfg: KDConfig, teacher_tokenizer, teacher: Salmonn | None = None,
                 cache: CacheReader | None = None, keys: list[str] | None = None, teacher_qformer_dim: int = 0,
                 hidden_pairs: list[tuple[int, int]] | None = None):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.teacher_tokenizer = teacher_tokenizer
        self._teacher = [teacher]  # a list keeps the frozen teacher out of this module's parameters and state
        self.cache, self.keys = cache, keys
        same = teacher_tokenizer.get_vocab() == student.tokenizer.get_vocab()
        self.vocab_map = None if same else VocabMap.build(teacher_tokenizer, student.tokenizer)
        self.feature_kd = (FeatureKD(student.qformer.cfg.hidden_size, teacher_qformer_dim)
                           if cfg.feature_weight else None)
        width = student.speech_encoder.config.d_model
        self.hidden_kd = (HiddenStateKD(hidden_pairs, width, teacher.speech_encoder.config.d_model)
                          if cfg.hidden_weight else None)
        self.kd_scale = 1.0
        """Multiplies every KD term's weight; set each step by `anneal_scale` (a function of the step, so a
        resumed run gets the same value without storing it)."""

    @property
    def teacher(self) -> Salmonn | None:
        return self._teacher[0]

    def prepare_teacher(self, accelerator, loop: LoopConfig) -> None:
        """Ready the online teacher for inference on this process (`common.distributed.prepare_frozen`: fp16, no
        optimizer state; sharded under ZeRO-3, replicated otherwise). No-op with a cached teacher."""
        if self.teacher is not None:
            self._teacher = list(prepare_frozen(self.teacher, accelerator, loop))  # [module, engine or None]

    def teacher_side(self, batch: dict):
        """(teacher answer distributions: dense [B, Lt, Vt] or SparseTeacher, Q-Former outputs per sample)."""
        if self.cfg.teacher == "cache":
            samples = [self.cache[self.keys[int(i)]] for i in batch["index"]]
            device = batch["mel"].device
            return pad_sparse(samples, device, self.cache.manifest["mode"]), [s.qformer for s in samples]
        device = batch["mel"].device
        if self.teacher.device != device:
            self.teacher.to(device)
        collate = AudioTextCollator(self.teacher_tokenizer)
        t_batch = dict(batch)
        t_batch["target_ids"], t_batch["labels"] = (x.to(device) for x in collate.tokenize_targets(batch["texts"]))
        with torch.no_grad():
            out = self.teacher(t_batch)
        logits, labels = shift_for_next_token(out.logits, out.labels)
        rows, mask = answer_rows(logits.float(), labels)
        windows = [out.qformer_out[i] for i in range(out.qformer_out.shape[0])]
        return rows, windows

    def logit_term(self, rows, mask, teacher, texts, chosen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The logit KD term over the answer rows of the samples `chosen` [batch] bool marks (None: all of them)."""
        c = self.cfg
        chunk = c.chunk_size or None
        if chosen is not None:
            mask = mask & chosen[:, None]
        if self.vocab_map is None:
            length = teacher.ids.shape[1] if isinstance(teacher, SparseTeacher) else teacher.shape[1]
            if length != rows.shape[1]:
                raise RuntimeError("teacher and student targets differ in length although they share a tokenizer; "
                                   "was the cache built from the same data and tokenizer?")
            kd = logit_kd(c.loss, rows, teacher, mask, c.temperature, beta=c.beta, alpha=c.alpha,
                          scale_by_t2=c.scale_by_t2, chunk_size=chunk)
            return {"kd": kd}
        keep = chosen.tolist() if chosen is not None else [True] * len(texts)
        alignments = [align_spans(t, self.teacher_tokenizer, self.student.tokenizer, with_eos=True) if k else []
                      for t, k in zip(texts, keep, strict=True)]
        out = cross_tokenizer_kd(rows, teacher, alignments, self.vocab_map, c.loss, c.temperature, c.uld_weight,
                                 beta=c.beta, alpha=c.alpha, scale_by_t2=c.scale_by_t2, chunk_size=chunk,
                                 student_mask=mask)
        return {"kd": out["loss"], "kd_divergence": out["kd"].detach(), "uld": out["uld"].detach(),
                "aligned_fraction": torch.tensor(out["aligned_fraction"]),
                "carried_mass": torch.tensor(out["carried_mass"])}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.cfg
        hidden = _capture_hidden(self.student) if self.hidden_kd is not None else None
        out = self.student(batch)
        terms = {"ce": out.loss}
        loss = c.ce_weight * out.loss
        scale = self.kd_scale
        if c.anneal != "none":
            terms["kd_scale"] = torch.tensor(scale)
        if c.kd_weight or c.feature_weight:
            teacher_rows, teacher_windows = self.teacher_side(batch)
        chosen = (torch.tensor([t in c.tasks for t in batch["tasks"]], dtype=torch.bool, device=out.loss.device)
                  if c.tasks else None)  # the samples the KD terms cover (None: all)
        if c.kd_weight:
            logits, labels = shift_for_next_token(out.logits, out.labels)
            rows, mask = answer_rows(logits, labels)
            kd_terms = self.logit_term(rows, mask, teacher_rows, batch["texts"], chosen)
            terms.update(kd_terms)
            loss = loss + scale * c.kd_weight * kd_terms["kd"]
        if c.feature_weight:
            target, mask = pad_windows(teacher_windows, out.qformer_out.device)
            mask = mask if chosen is None else mask & chosen[:, None]
            width = min(target.shape[1], out.qformer_out.shape[1])
            feat = self.feature_kd(out.qformer_out[:, :width], target[:, :width], mask[:, :width])
            terms.update(feature=feat["loss"], feature_mse=feat["mse"].detach(), feature_cos=feat["cos"].detach())
            loss = loss + scale * c.feature_weight * feat["loss"]
        if self.hidden_kd is not None:
            teacher_hidden = _capture_hidden(self.teacher)
            with torch.no_grad():
                self.teacher.join_encoders(batch)
            student_states, teacher_states = hidden.pop(), teacher_hidden.pop()
            length = min(student_states[0].shape[1], teacher_states[0].shape[1])
            frames = None if chosen is None else chosen[:, None].expand(-1, length)
            h = self.hidden_kd([s[:, :length] for s in student_states], [t[:, :length] for t in teacher_states],
                               frames)
            terms["hidden"] = h["loss"]
            loss = loss + scale * c.hidden_weight * h["loss"]
        terms["loss"] = loss
        return terms


class _capture_hidden:  # noqa: N801 (used like a function)
    """Records a Whisper encoder's hidden states (input of layer 0, then each layer's output) on its next run."""

    def __init__(self, model: Salmonn):
        self.states: list[torch.Tensor] = []
        encoder = model.speech_encoder
        self.handles = [encoder.layers[0].register_forward_pre_hook(self._pre)]
        self.handles += [layer.register_forward_hook(self._post) for layer in encoder.layers]

    def _pre(self, module, args):
        self.states.append(args[0])

    def _post(self, module, args, output):
        self.states.append(output[0] if isinstance(output, tuple) else output)

    def pop(self) -> list[torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return self.states


def stage_setter(model: Salmonn, stages: list[TrainingStage]):
    """A callback `(step) -> None` that sets which parameters train at each step (None without stages)."""
    if not stages:
        return None
    base = {n for n, p in model.named_parameters() if p.requires_grad}
    bounds = sorted(stages, key=lambda s: s.until_step)

    def apply(step: int) -> None:
        stage = next((s for s in bounds if step < s.until_step), bounds[-1])
        for name, p in model.named_parameters():
            p.requires_grad_(name in base and _in_parts(name, stage.train))

    return apply


def _in_parts(name: str, parts: list[str]) -> bool:
    if "all" in parts:
        return True
    if "lora" in parts and ".lora_" in name:
        return True
    return any(name.startswith(prefix) for part in parts for prefix in PART_PREFIXES.get(part, ()))


def teacher_tokenizer_of(folder: str | Path):
    return load_tokenizer(LLMConfig(path=str(Path(folder) / "llm")))


def split_of(cfg: DistillConfig, split: str):
    """`common.splits.load_split` with this run's data, features, feature store, output folder and seed."""
    return load_split(cfg.data, cfg.features, split, cfg.output_dir, cfg.feature_store, cfg.loop.seed)


def load_transfer_set(cfg: DistillConfig):
    """The train split (`common.splits.load_split`), cut to `transfer_clips_per_task` when that is set."""
    train = split_of(cfg, "train")
    if cfg.transfer_clips_per_task:
        train = SubsetView(train, first_clip_indices(train.examples, cfg.transfer_clips_per_task))
        print(f"transfer set: the first {cfg.transfer_clips_per_task} clips of each task, "
              f"{len(train)} of {len(train.dataset)} entries")
    return train


def int8_teacher(teacher: Salmonn) -> None:
    """The frozen online teacher with its LLM and Whisper linear weights in int8 (`kd.teacher_int8`), in place. LoRA
    is merged into the LLM's floating-point weights first: the adapters would otherwise run beside the int8 layers
    for nothing, since nothing of the teacher trains."""
    if hasattr(teacher.llm, "merge_and_unload"):
        teacher.llm = teacher.llm.merge_and_unload()
    quantize_frozen(teacher.llm)
    quantize_frozen(teacher.speech_encoder)


def build_distiller(cfg: DistillConfig, train) -> tuple[Distiller, SalmonnConfig]:
    """The student (new from the teacher, or loaded) wrapped with its KD terms and teacher side."""
    unknown = [t for t in cfg.kd.tasks if t not in cfg.data.tasks]
    if unknown:
        raise SystemExit(f"kd.tasks names {unknown}, which are not tasks of this data (data.tasks: {cfg.data.tasks}); "
                         "list some of those, or leave kd.tasks empty for every task")
    t_tok = teacher_tokenizer_of(cfg.teacher_folder)
    if cfg.init_from:
        student = load_student_folder(cfg.init_from)
        student_cfg = read_model_config(cfg.init_from)
        if cfg.student.lora.enabled:  # LoRA recovery over the saved student's frozen (int8) LLM
            student, student_cfg = lora_over_loaded(student, student_cfg, cfg.student)
        layers = list(range(student.speech_encoder.config.encoder_layers))
    else:
        ensure_student_tokenizer(cfg.student, [ex.text for ex in train.examples] + _prompt_texts(cfg))
        student, student_cfg = build_student(cfg.student, cfg.teacher_folder)
        layers = student.whisper_layers_from_teacher
    teacher = cache = None
    if cfg.kd.teacher == "online" or cfg.kd.hidden_weight:
        teacher = load_model_folder(cfg.teacher_folder).requires_grad_(False)
        if cfg.kd.teacher_int8:
            int8_teacher(teacher)
    elif cfg.kd.teacher_int8:
        raise SystemExit("config error: kd.teacher_int8: true, but no teacher runs at training time (kd.teacher: "
                         "cache and kd.hidden_weight: 0). Fix: set kd.teacher: online, or kd.teacher_int8: false")
    if cfg.kd.teacher == "cache" and (cfg.kd.kd_weight or cfg.kd.feature_weight):
        identity = teacher_identity(cfg.teacher_folder)
        cache = CacheReader(cfg.kd.cache_dir, expect_teacher=identity,
                            expect_tokenizer=teacher_tokenizer_identity(t_tok))
        missing = [k for k in sample_keys(train) if k not in cache]
        if missing:
            raise SystemExit(f"{cfg.kd.cache_dir}: the cache lacks {len(missing)} of this training split's samples "
                             f"(e.g. {missing[0]}); build it with the same data config (python -m teacher.cache)")
    t_dim = cache.manifest["qformer_dim"] if cache is not None else (teacher.qformer.cfg.hidden_size if teacher else 0)
    pairs = [(j + 1, i + 1) for j, i in enumerate(layers)]  # hidden_states index 0 = the embeddings
    distiller = Distiller(student, cfg.kd, t_tok, teacher, cache, sample_keys(train), t_dim, pairs)
    return distiller, student_cfg


def student_encoder_store(cfg: DistillConfig, student: Salmonn, train):
    """`train` whose items carry the outputs of the student's frozen encoders, stored once under `encoder_store`."""
    if cfg.kd.teacher != "cache" or cfg.kd.hidden_weight:
        raise SystemExit("config error: encoder_store feeds stored student-encoder outputs to the batch, which an "
                         "online teacher (kd.teacher: online, or kd.hidden_weight > 0) would read as its own; set "
                         "kd.teacher: cache and kd.hidden_weight: 0, or encoder_store: ''")
    refuse_augmented(cfg.data.augment)
    train = with_cached_encoders(student, train, cfg.features, cfg.encoder_store, "train")
    student.train()
    return train


def _prompt_texts(cfg: DistillConfig) -> list[str]:
    template = cfg.student.prompt.template.format(cfg.student.prompt.audio_wrapper + "x")
    return [template, *cfg.data.prompts.values()] * 50


def report_tokenizers(distiller: Distiller, train) -> dict[str, float]:
    """Vocabulary overlap and the fraction of student answer tokens that align one-to-one with the teacher's."""
    if distiller.vocab_map is None:
        return {"same_tokenizer": 1.0}
    from distill.cross_tokenizer import aligned_fraction

    texts = [ex.text for ex in train.examples[:500]]
    frac = aligned_fraction(texts, distiller.teacher_tokenizer, distiller.student.tokenizer)
    overlap = vocab_overlap(distiller.vocab_map)
    return {"vocab_overlap_teacher": overlap["teacher"], "vocab_overlap_student": overlap["student"],
            "aligned_fraction_student": frac["student"], "aligned_fraction_teacher": frac["teacher"]}



def run_distillation(cfg: DistillConfig, force: bool = False) -> int:
    """Distil (or, with `init_from`, recover) a student as `cfg` says; the student lands in `<output_dir>/model/`.
    Skipped when that folder holds a finished run of the same config on the same inputs, unless `force` (which
    starts over, deleting `output_dir`). Returns 0 (the command's exit status)."""
    if cfg.kd.loss not in KINDS:
        raise SystemExit(f"config error: kd.loss must be one of {KINDS}, got {cfg.kd.loss!r}")
    out_dir = Path(cfg.output_dir)
    inputs = [cfg.teacher_folder, cfg.kd.cache_dir if cfg.kd.teacher == "cache" else "", cfg.init_from]
    if stage_is_current(cfg, out_dir / "model", inputs=inputs) and not force:
        print(f"student up to date: {out_dir / 'model'} (use --force to retrain)")
        return 0
    # One process, or one of several (accelerate launch: DDP or DeepSpeed); the main one writes the shared files.
    accelerator = make_accelerator(cfg.loop)
    main_process = accelerator.is_main_process
    if force and main_process:
        # A forced rerun starts from scratch: the loop would otherwise resume from the old checkpoints.
        shutil.rmtree(out_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    seed_everything(cfg.loop.seed)
    if main_process:
        save_resolved(cfg, out_dir)
    # The main process goes first and writes the data reports, the feature store and the student's tokenizer.
    with accelerator.main_process_first(), whole_models(accelerator):
        train, valid = load_transfer_set(cfg), split_of(cfg, "valid")
        distiller, student_cfg = build_distiller(cfg, train)
        if cfg.encoder_store:
            train = student_encoder_store(cfg, distiller.student, train)
    distiller.prepare_teacher(accelerator, cfg.loop)
    tokenizers = report_tokenizers(distiller, train)
    print(f"tokenizers: {tokenizers}")
    collate = AudioTextCollator(distiller.student.tokenizer)
    sampler = DurationBucketSampler(train.durations, cfg.loop.batch_size, cfg.data.bucket_pool_batches,
                                    seed=cfg.loop.seed)
    rank_suffix = "" if main_process else f"_rank{accelerator.process_index}"  # ZeRO-3 evaluates on every rank
    evaluate = validator(cfg.validation, valid, out_dir / f"valid{rank_suffix}")
    with MetricLogger(cfg.log_dir, backends=("tensorboard", "stdout", "jsonl") if main_process else (),
                      stdout_every=5, owner=out_dir) as logger:
        logger.log(0, {f"data/{k}": v for k, v in tokenizers.items()})
        state = fit(distiller, train, sampler, collate, lambda model, batch: model(batch), cfg.loop, cfg.optim,
                    out_dir, logger, evaluate=lambda model, step: evaluate(model.student, step),
                    before_step=_before_step(distiller, cfg.stages, cfg.loop.max_steps), accelerator=accelerator,
                    run_key=stage_key(dataclasses.replace(cfg, output_dir="", log_dir=""), inputs))
    with full_parameters(distiller.student):  # ZeRO-3: every rank gathers the shards, the main process saves
        if main_process:
            student = distiller.student.eval()
            if not any(hasattr(p, "ds_id") for p in student.parameters()):
                student = student.cpu()
            save_student_folder(student, student_cfg, out_dir / "model", extra={"step": state.step})
            mark_stage_done(cfg, out_dir / "model", inputs=inputs)
            print(f"student saved to {out_dir / 'model'} after {state.step} steps")
    accelerator.wait_for_everyone()
    return 0


def anneal_scale(kind: str, step: int, max_steps: int) -> float:
    """The KD terms' weight multiplier at optimizer step `step` (0-based) of `max_steps`: 1 throughout for
    "none"; for "linear", 1 at step 0 falling to 0 at the last step."""
    if kind == "none":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - step / max(1, max_steps - 1))
    raise ValueError(f"kd.anneal must be none or linear, got {kind!r}")


def _before_step(distiller: Distiller, stages: list[TrainingStage], max_steps: int):
    """The loop's per-step hook: which parts train (stages) and the KD weights' multiplier (kd.anneal)."""
    setter = stage_setter(distiller.student, stages)
    kind = distiller.cfg.anneal
    if setter is None and kind == "none":
        return None

    def hook(model: Distiller, step: int) -> None:
        if setter is not None:
            setter(step)
        model.kd_scale = anneal_scale(kind, step, max_steps)

    return hook


