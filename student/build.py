"""Build the student from a config and from the teacher.

The student has SALMONN's shape with smaller parts:
- a Whisper encoder distilled by keeping maximally spaced teacher layers (distil-whisper's rule: evenly spaced
  indices from first to last, the last one kept) plus the teacher's conv stem, positions and final norm;
- the teacher's BEATs with token pruning (`student.token_pruning`);
- the teacher's Q-Former and encoder layer norms;
- a Gemma-2 LLM (a local HF folder at real scale; a fresh toy Gemma-2 with its own byte-level BPE on the toy
  benchmark, so distillation crosses tokenizers as Vicuna → Gemma does), and a new projection to its width.

It is a `teacher.salmonn.Salmonn` over those parts, so it implements the evaluation interface and saves in the
same official layouts (plus `token_pruning.yaml`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.bpe import train_bpe
from common.config import added_option, from_dict, read_yaml, to_dict
from common.hub import is_hub_id
from common.int8_frozen import plain_state, quantize_frozen
from student.token_pruning import PrunedBEATs, TokenPruningConfig
from teacher.build import (
    LLMConfig,
    LoraSpec,
    SalmonnConfig,
    WhisperEncoderConfig,
    apply_lora,
    audio_scale,
    build_llm,
    check_int8_frozen,
    load_tokenizer,
)
from teacher.checkpoint import load_model_folder, read_model_config, save_model_folder
from teacher.salmonn import PromptConfig, Salmonn

PRUNING_FILE = "token_pruning.yaml"


@dataclass
class StudentTokenizerConfig:
    vocab_size: int = 800
    style: str = "bytelevel"
    """bytelevel (`Ġ` markers, like the toy student's Gemma stand-in) or llama (`▁`)."""


@dataclass
class StudentConfig:
    """The student's shape and where its parts come from."""

    whisper_layers: int = 2
    """Teacher Whisper layers kept (chosen by `whisper_layer_selection`)."""
    whisper_layer_selection: Literal["spaced", "first"] = added_option("spaced")
    """spaced: distil-whisper's rule, evenly spaced from the first layer to the last (the student's Whisper then
    trains to close the gaps); first: the teacher's first `whisper_layers` layers, in order, so the student's Whisper
    computes exactly the teacher's hidden state at that depth (then its final layer norm). `first` is what a frozen
    student Whisper needs (`freeze_whisper`): its features are the pretrained encoder's own, not layers glued
    across a gap, and they can be stored once per clip (`encoder_store`)."""
    token_pruning: TokenPruningConfig = field(default_factory=TokenPruningConfig)
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(architecture="gemma2", tie_word_embeddings=True))
    tokenizer: StudentTokenizerConfig = field(default_factory=StudentTokenizerConfig)
    """Used for a fresh LLM whose `llm.tokenizer` folder does not exist yet (trained on the training texts)."""
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(enabled=False))
    freeze_whisper: bool = False
    freeze_beats: bool = False
    whisper_pad_to_longest: bool | None = None
    """None: the student's Whisper reads what the teacher's does (its whole chunk, each batch up to its longest clip,
    or each clip alone: `whisper.per_clip`); true: only up to each batch's longest clip (the student trains that
    way, so it learns the shorter windows: less work than a pretrained teacher's whole chunk); false: the whole
    chunk."""
    projector_from_teacher: bool = False
    """Start from the teacher's projection instead of a fresh one: for an LLM made from the teacher's own (e.g. width
    pruned, LoRA merged), whose embedding space the teacher's projection already writes into."""
    prompt: PromptConfig = field(default_factory=PromptConfig)


def select_layers(teacher_layers: int, student_layers: int, selection: str = "spaced") -> list[int]:
    """The teacher layer indices the student keeps: "spaced" is distil-whisper's choice, evenly spaced from the
    first to the last (inclusive); "first" is the first `student_layers` in order."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student_layers must be in [1, {teacher_layers}], got {student_layers}")
    if selection == "first":
        return list(range(student_layers))
    if selection != "spaced":
        raise ValueError(f"student.whisper_layer_selection must be spaced or first, got {selection!r}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [int(i) for i in np.linspace(0, teacher_layers - 1, student_layers, dtype=int)]


def distill_whisper_encoder(teacher: WhisperEncoder, layers: list[int]) -> WhisperEncoder:
    """A Whisper encoder with the teacher's conv stem, positions and final norm and the chosen layers' weights (in
    floating point: a teacher's int8 weights, `whisper.int8_frozen`, are dequantized, since the student's train)."""
    config = copy.deepcopy(teacher.config)
    config.encoder_layers = len(layers)
    student = WhisperEncoder(WhisperConfig.from_dict(config.to_dict()))
    teacher_state = plain_state(teacher.state_dict())
    state = {k: v for k, v in teacher_state.items() if not k.startswith("layers.")}
    for new, old in enumerate(layers):
        prefix = f"layers.{old}."
        state.update({f"layers.{new}.{k[len(prefix):]}": v for k, v in teacher_state.items()
                      if k.startswith(prefix)})
    student.load_state_dict(state, strict=True)
    return student


def ensure_student_tokenizer(cfg: StudentConfig, texts: list[str]) -> None:
    """Train and save the fresh student LLM's BPE (on the training texts and the prompt strings) if missing."""
    llm = cfg.llm
    if llm.path or (llm.tokenizer and (Path(llm.tokenizer, "tokenizer.json").is_file() or is_hub_id(llm.tokenizer))):
        return  # a trained one, or a hub tokenizer (common.hub)
    if not llm.tokenizer:
        raise SystemExit("config error: student.llm.tokenizer must name a folder for the fresh LLM's tokenizer")
    train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.style).save_pretrained(llm.tokenizer)


def student_salmonn_config(cfg: StudentConfig, teacher_cfg: SalmonnConfig, whisper: WhisperEncoder) -> SalmonnConfig:
    """The SalmonnConfig describing the student (paths are filled in when it is saved)."""
    w = whisper.config
    return SalmonnConfig(
        whisper=WhisperEncoderConfig(d_model=w.d_model, encoder_layers=w.encoder_layers,
                                     encoder_attention_heads=w.encoder_attention_heads,
                                     encoder_ffn_dim=w.encoder_ffn_dim,
                                     num_mel_bins=w.num_mel_bins, max_source_positions=w.max_source_positions,
                                     pad_to_longest=student_pad_to_longest(cfg, teacher_cfg),
                                     per_clip=student_per_clip(cfg, teacher_cfg), freeze=cfg.freeze_whisper),
        beats=dataclasses.replace(teacher_cfg.beats, path="", freeze=cfg.freeze_beats),
        qformer=teacher_cfg.qformer, llm=cfg.llm, lora=cfg.lora, prompt=cfg.prompt,
    )


def student_pad_to_longest(cfg: StudentConfig, teacher_cfg: SalmonnConfig) -> bool:
    return teacher_cfg.whisper.pad_to_longest if cfg.whisper_pad_to_longest is None else cfg.whisper_pad_to_longest


def student_per_clip(cfg: StudentConfig, teacher_cfg: SalmonnConfig) -> bool:
    """The teacher's `whisper.per_clip`, unless `whisper_pad_to_longest` sets the student's input explicitly."""
    return teacher_cfg.whisper.per_clip and cfg.whisper_pad_to_longest is None


def build_student(cfg: StudentConfig, teacher_folder: str | Path) -> tuple[Salmonn, SalmonnConfig]:
    """The student initialised from the teacher saved in `teacher_folder`; returns (model, its SalmonnConfig)."""
    check_int8_frozen(cfg.llm, cfg.lora, None, "student")
    teacher = load_model_folder(teacher_folder)
    teacher_cfg = read_model_config(teacher_folder)
    layers = select_layers(teacher.speech_encoder.config.encoder_layers, cfg.whisper_layers,
                           cfg.whisper_layer_selection)
    whisper = distill_whisper_encoder(teacher.speech_encoder, layers)
    beats = None
    if teacher.audio_encoder is not None:
        beats = PrunedBEATs.from_beats(copy.deepcopy(teacher.audio_encoder), cfg.token_pruning)
    tokenizer = load_tokenizer(cfg.llm)
    llm = build_llm(cfg.llm, tokenizer)
    if cfg.lora.enabled:
        llm = apply_lora(llm, cfg.lora)
    model = Salmonn(whisper, beats, copy.deepcopy(teacher.qformer), llm, tokenizer, cfg.prompt,
                    pad_to_longest=student_pad_to_longest(cfg, teacher_cfg),
                    beats_padding=teacher_cfg.beats.padding_features,
                    whisper_per_clip=student_per_clip(cfg, teacher_cfg), audio_scale=audio_scale(cfg.llm, llm))
    model.ln_speech.load_state_dict(teacher.ln_speech.state_dict())
    if cfg.projector_from_teacher:
        if model.projector.weight.shape != teacher.projector.weight.shape:
            shapes = tuple(teacher.projector.weight.shape), tuple(model.projector.weight.shape)
            raise ValueError(f"student.projector_from_teacher: the teacher's projection is {shapes[0]}, the "
                             f"student's {shapes[1]}; the student's LLM must have the teacher's hidden size")
        model.projector.load_state_dict(teacher.projector.state_dict())
    if beats is not None:
        model.ln_audio.load_state_dict(teacher.ln_audio.state_dict())
    model.speech_encoder.requires_grad_(not cfg.freeze_whisper)
    if beats is not None:
        model.audio_encoder.requires_grad_(not cfg.freeze_beats)
    if not cfg.lora.enabled:
        model.llm.requires_grad_(not cfg.llm.freeze)
    model.whisper_layers_from_teacher = layers
    return model, student_salmonn_config(cfg, teacher_cfg, whisper)


def lora_over_loaded(model: Salmonn, salmonn_cfg: SalmonnConfig, cfg: StudentConfig
                     ) -> tuple[Salmonn, SalmonnConfig]:
    """LoRA recovery of a saved student (`distill.train`'s `init_from` with `student.lora.enabled`): its LLM frozen,
    held in int8 with `student.llm.int8_frozen` (torchao weight-only, `common.int8_frozen`), and `student.lora`'s
    adapters trained over it; the returned config saves and loads it that way (the base dequantized on disk)."""
    if hasattr(model.llm, "get_base_model"):
        raise SystemExit("config error: the init_from student already has LoRA adapters; merge them first "
                         "(prune.structured merges them) or set student.lora.enabled: false")
    model.llm.requires_grad_(False)
    if cfg.llm.int8_frozen:
        quantize_frozen(model.llm)
    model.llm = apply_lora(model.llm, cfg.lora)
    llm_cfg = dataclasses.replace(salmonn_cfg.llm, freeze=True, int8_frozen=cfg.llm.int8_frozen)
    return model, dataclasses.replace(salmonn_cfg, llm=llm_cfg, lora=cfg.lora)


def save_student_folder(model: Salmonn, salmonn_cfg: SalmonnConfig, out_dir: str | Path,
                        extra: dict | None = None) -> Path:
    """The teacher's layout (whisper/, beats.pt, llm/, salmonn.pth, salmonn.yaml) plus token_pruning.yaml."""
    out = Path(out_dir)
    save_model_folder(model, salmonn_cfg, out, extra)  # PrunedBEATs saves as a plain official BEATs checkpoint
    beats = model.audio_encoder
    if isinstance(beats, PrunedBEATs):
        (out / PRUNING_FILE).write_text(yaml.safe_dump(to_dict(beats.pruning_config), sort_keys=False))
    return out


def load_student_folder(folder: str | Path) -> Salmonn:
    """Load a student saved by `save_student_folder` (an evaluation loader: `student.build:load_student_folder`)."""
    folder = Path(folder)
    model = load_model_folder(folder)
    if (folder / PRUNING_FILE).is_file() and model.audio_encoder is not None:
        pruning = from_dict(TokenPruningConfig, read_yaml(folder / PRUNING_FILE), str(folder / PRUNING_FILE))
        frozen = not any(p.requires_grad for p in model.audio_encoder.parameters())  # `beats.freeze` of the folder
        model.audio_encoder = PrunedBEATs.from_beats(model.audio_encoder, pruning).requires_grad_(not frozen)
    return model.eval()


def describe_student(model: Salmonn, teacher: Salmonn) -> dict[str, float]:
    """Parameter counts of student and teacher, and the student's fraction."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    return {"student_params": count(model), "teacher_params": count(teacher),
            "fraction": count(model) / max(1, count(teacher))}
