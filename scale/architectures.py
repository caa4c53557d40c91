"""The real architectures of teacher and student, built on the meta device from configs alone (no weights, no memory).

A checkpoint path in a config is read for its architecture when it is on disk (an HF folder's `config.json` and
tokenizer, a BEATs `.pt`'s `cfg`). Before the checkpoints are downloaded, the path's last component names one of the
published configurations below: the presets' default folder and file names are the Hugging Face repository names
and the official BEATs file name, so `checkpoints/vicuna-13b-v1.1` (or the hub id `lmsys/vicuna-13b-v1.1`, which is
not downloaded for an estimate) means lmsys/vicuna-13b-v1.1's `config.json`.

The modules are the ones `teacher.build` builds (transformers' WhisperEncoder and causal LMs, `teacher.beats.BEATs`,
`teacher.qformer.WindowQFormer`, peft's LoRA), under the same attribute names as `teacher.salmonn.Salmonn`, so
every count is `sum(p.numel())` of the real modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, Gemma2Config, LlamaConfig, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.hub import parse_hub_id
from prune.width import kept_channels, kept_units
from teacher.beats import BEATs, BEATsConfig
from teacher.build import (
    BeatsEncoderConfig,
    LLMConfig,
    LoraSpec,
    WhisperEncoderConfig,
    apply_lora,
    keep_whisper_heads,
    load_tokenizer,
)
from teacher.qformer import QFormerConfig, WindowQFormer
from teacher.salmonn import salmonn_parts

WHISPER = {
    # openai/whisper-large-v2 config.json (encoder and decoder; smolt builds only the encoder).
    "whisper-large-v2": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                             decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=80,
                             max_source_positions=1500, max_target_positions=448, vocab_size=51865),
}
BEATS = {
    # The `cfg` of the official BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt (SALMONN's audio encoder).
    "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2": dict(
        input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu",
        layer_wise_gradient_decay_ratio=0.6, layer_norm_first=False, deep_norm=True, conv_pos=128,
        conv_pos_groups=16, relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
        finetuned_model=True, predictor_class=527),
}


@dataclass(frozen=True)
class KnownLLM:
    config: dict[str, Any]
    """The model's published `config.json` fields that shape it."""
    tokenizer_size: int
    """len(tokenizer) as released."""
    has_pad_token: bool
    """Whether the released tokenizer has a pad token (SALMONN adds `[PAD]` when it has none)."""


LLMS = {
    # lmsys/vicuna-13b-v1.1 (LLaMA-13B): SALMONN-13B's LLM.
    "vicuna-13b-v1.1": KnownLLM(dict(model_type="llama", hidden_size=5120, intermediate_size=13824,
                                     num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                     max_position_embeddings=2048, rms_norm_eps=1e-6, vocab_size=32000,
                                     tie_word_embeddings=False), 32000, False),
    # lmsys/vicuna-7b-v1.5 (Llama-2-7B): SALMONN-7B's LLM.
    "vicuna-7b-v1.5": KnownLLM(dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                    max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000,
                                    tie_word_embeddings=False), 32000, False),
    # google/gemma-2-2b: the student's LLM.
    "gemma-2-2b": KnownLLM(dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                                final_logit_softcapping=30.0, attn_logit_softcapping=50.0, vocab_size=256000,
                                tie_word_embeddings=True), 256000, True),
}
CONFIG_CLASSES = {"llama": LlamaConfig, "gemma2": Gemma2Config}
ROUND_TO = 8
"""Pruned MLP widths are multiples of this (`prune.structured`'s default `ratios.round_to`)."""


class ArchitectureError(ValueError):
    """A config names a checkpoint that is neither on disk nor a known published architecture."""


def _unknown(where: str, path: str, known: dict) -> ArchitectureError:
    return ArchitectureError(f"{where}: {path} is not on disk and '{Path(path).name}' is not a known architecture "
                             f"(known: {', '.join(sorted(known))}); put the checkpoint there or point the key at one "
                             "of those names")


def release_name(path: str) -> str:
    """The release a model path names: a folder's last component, or a hub id's repository name (`openai/whisper-
    large-v2@main` → `whisper-large-v2`). A hub id is not downloaded to be estimated."""
    hub = parse_hub_id(path)
    return hub[0].split("/")[1] if hub else Path(path).name


def whisper_config(cfg: WhisperEncoderConfig, where: str = "whisper.path") -> WhisperConfig:
    """Whisper's architecture: the folder's config.json, a known release by folder name, or the config's fields."""
    if cfg.path:
        folder = Path(cfg.path)
        if (folder / "config.json").is_file():
            return WhisperConfig.from_pretrained(folder)
        if release_name(cfg.path) not in WHISPER:
            raise _unknown(where, cfg.path, WHISPER)
        return WhisperConfig(**WHISPER[release_name(cfg.path)])
    return WhisperConfig(d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
                         encoder_attention_heads=cfg.encoder_attention_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
                         num_mel_bins=cfg.num_mel_bins, max_source_positions=cfg.max_source_positions)


def beats_config(cfg: BeatsEncoderConfig, where: str = "beats.path") -> BEATsConfig | None:
    """BEATs' architecture: the checkpoint's `cfg`, a known release by file name, or the config's `cfg` fields."""
    if not cfg.enabled:
        return None
    if cfg.path:
        path = Path(cfg.path)
        if path.is_file():
            return BEATsConfig.from_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["cfg"])
        if path.stem not in BEATS:
            raise _unknown(where, cfg.path, BEATS)
        return BEATsConfig.from_dict(BEATS[path.stem])
    return BEATsConfig.from_dict(cfg.cfg)


def llm_config(cfg: LLMConfig, where: str = "llm.path"):
    """The LLM's HF config with `vocab_size` as built: rows for every token, SALMONN's `[PAD]` included."""
    from teacher.build import fresh_llm_config

    if cfg.path and (Path(cfg.path) / "config.json").is_file():
        config = AutoConfig.from_pretrained(cfg.path)
        tokens = len(load_tokenizer(cfg))
    elif cfg.path:
        name = release_name(cfg.path)
        if name not in LLMS:
            raise _unknown(where, cfg.path, LLMS)
        known = LLMS[name]
        fields = dict(known.config)
        config = CONFIG_CLASSES[fields.pop("model_type")](**fields)
        tokens = known.tokenizer_size + int(cfg.add_pad_token and not known.has_pad_token)
    else:
        tokenizer = load_tokenizer(cfg)
        config = fresh_llm_config(cfg, tokenizer)
        tokens = len(tokenizer)
    config.vocab_size = max(config.vocab_size, tokens)  # build_llm resizes only when the tokenizer is larger
    return config


class MetaSalmonn(nn.Module):
    """SALMONN's parts on the meta device, under `Salmonn`'s attribute names (so parameter names match it).

    `llm_dtype` is the LLM's dtype as built (`llm.dtype`; the other parts are built in float32); `lora` tells
    whether the LLM carries peft LoRA adapters.
    """

    def __init__(self, speech_encoder: nn.Module, audio_encoder: nn.Module | None, qformer: WindowQFormer,
                 llm: nn.Module, llm_dtype: str, lora: bool):
        super().__init__()
        self.speech_encoder = speech_encoder
        self.ln_speech = nn.LayerNorm(speech_encoder.config.d_model)
        self.audio_encoder = audio_encoder
        self.ln_audio = nn.LayerNorm(audio_encoder.cfg.encoder_embed_dim) if audio_encoder is not None else None
        self.qformer = qformer
        self.projector = nn.Linear(qformer.cfg.hidden_size, llm.config.hidden_size)
        self.llm = llm
        self.llm_dtype = llm_dtype
        self.lora = lora

    def parts(self) -> dict[str, nn.Module]:
        """The same parts as `Salmonn.parts()` (`teacher.salmonn.salmonn_parts`)."""
        return salmonn_parts(self)


def build_meta(whisper: WhisperConfig, beats: BEATsConfig | None, qformer: QFormerConfig, llm, llm_dtype: str,
               lora: LoraSpec, whisper_layers: int = 0, prune_ratio: float = 0.0) -> MetaSalmonn:
    """A SALMONN-shaped model on the meta device.

    Args:
        whisper / beats / llm: architecture configs (from `whisper_config`, `beats_config`, `llm_config`).
        whisper_layers: keep this many encoder layers (the student's distilled Whisper); 0 keeps them all.
        prune_ratio: structured width pruning as `prune.structured` does it with every ratio set to this: the MLP
            channels of the LLM, Whisper and BEATs (rounded to multiples of 8), the LLM's KV groups (each with its
            query heads) and Whisper's heads (whole, head width kept). Hidden widths and the Q-Former stay whole.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"a pruning ratio must be in [0, 1), got {prune_ratio}")
    whisper = WhisperConfig.from_dict(whisper.to_dict())
    if whisper_layers:
        whisper.encoder_layers = whisper_layers
    whisper.encoder_ffn_dim = kept_channels(whisper.encoder_ffn_dim, prune_ratio, ROUND_TO)
    if beats is not None:
        beats = dataclasses.replace(beats, encoder_ffn_embed_dim=kept_channels(beats.encoder_ffn_embed_dim,
                                                                               prune_ratio, ROUND_TO))
    llm = type(llm).from_dict(llm.to_dict())
    if prune_ratio:
        kv = llm.num_key_value_heads or llm.num_attention_heads
        if getattr(llm, "head_dim", None) is None:
            llm.head_dim = llm.hidden_size // llm.num_attention_heads  # heads keep their width
        per_group = llm.num_attention_heads // kv
        llm.num_key_value_heads = kept_units(kv, prune_ratio)
        llm.num_attention_heads = llm.num_key_value_heads * per_group
        llm.intermediate_size = kept_channels(llm.intermediate_size, prune_ratio, ROUND_TO)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        speech = WhisperEncoder(whisper)
        heads = kept_units(whisper.encoder_attention_heads, prune_ratio)
        if heads != whisper.encoder_attention_heads:
            keep_whisper_heads(speech, heads)
        audio = BEATs(beats) if beats is not None else None
        encoder_dim = whisper.d_model + (beats.encoder_embed_dim if beats is not None else 0)
        window_qformer = WindowQFormer(qformer, encoder_dim)
        lm = AutoModelForCausalLM.from_config(llm)
        if lora.enabled:
            lm = apply_lora(lm, lora)
        return MetaSalmonn(speech, audio, window_qformer, lm, llm_dtype, lora.enabled)
