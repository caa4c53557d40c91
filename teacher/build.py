"""Build SALMONN from a config: each part from its own local files (the official layouts), or fresh at toy size.

Real users point the config at a Hugging Face Whisper folder, an official BEATs `.pt`, an HF LLM folder and
a SALMONN `.pth`; the toy preset leaves the paths empty and gets fresh parts of the same architectures, and
`teacher.checkpoint.save_official_layout` writes a trained toy teacher back in exactly those layouts, so
the same loaders serve both.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.config import added_option
from common.hub import local_folder
from common.int8_frozen import int8_config_error, quantize_frozen
from teacher.beats import BEATs, BEATsConfig
from teacher.official import CheckpointError, load_salmonn_checkpoint
from teacher.qformer import QFormerConfig, WindowQFormer
from teacher.salmonn import BeatsPadding, PromptConfig, Salmonn, prompt_pieces
from teacher.tokenizer import load_llm_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class WhisperEncoderConfig:
    path: str = ""
    """Hugging Face Whisper folder (config.json + safetensors/bin) or hub id (`openai/whisper-large-v2[@revision]`,
    see `common.hub`); empty builds a fresh encoder from the fields."""
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    """Output frames; the encoder reads exactly twice as many mel frames (1500 → 30 s)."""
    pad_to_longest: bool = False
    """Run the encoder only up to the longest clip of each batch instead of the full chunk. Only for encoders
    trained that way (the toy teacher); a pretrained Whisper expects its full 30 s."""
    per_clip: bool = added_option(False)
    """Run the encoder on each clip cut to its own audio, with no padding (overrides `pad_to_longest`): a clip's
    outputs then do not depend on its batch, so a frozen encoder's can be stored once (`encoder_store`), and no
    work goes into padding. For a pretrained Whisper over short clips (the quick preset's teacher): Whisper was
    trained on 30 s windows, mostly padding for short utterances, and hears a clip alone as well."""
    freeze: bool = True
    int8_frozen: bool = added_option(False)
    """Hold the frozen encoder's linear weights in int8 (torchao weight-only, `common.int8_frozen`): a quarter of
    fp32's bytes, for an online teacher's Whisper on a small GPU. Needs `freeze: true`."""


@dataclass
class BeatsEncoderConfig:
    enabled: bool = True
    path: str = ""
    """Official BEATs checkpoint (`{"cfg", "model"}`); empty builds a fresh BEATs from `cfg`."""
    cfg: dict[str, Any] = field(default_factory=dict)
    """BEATsConfig fields for a fresh model (ignored when `path` is set)."""
    freeze: bool = True
    padding_features: BeatsPadding = "official"
    """What BEATs' outputs at a batch's padded tokens hold when they enter `ln_audio` and the Q-Former: "official"
    (as BEATs computed them, unmasked: the released SALMONN's forward, so the only right value for its checkpoints)
    or "zero" (zeros: how smolt's toy teachers and their students train; needed by `qformer.trim_to_audio`). Saved in
    every model folder's salmonn.yaml; a folder written before this key existed loads with "zero" unless it was
    assembled from the official checkpoints (`teacher.assemble`, whose salmonn.pth is a link)."""
    ln_gain_init: float = added_option(1.0)
    """The starting gain of `ln_audio`, the layer norm BEATs' outputs pass before they join Whisper's. 0 starts a fresh
    teacher as Whisper alone and lets training open BEATs' channels one by one (a zero-initialised gate, as
    Flamingo's and LLaMA-Adapter's): each gain's gradient is nonzero from the first step. Only a fresh model sees it;
    a loaded checkpoint's gains replace it."""


@dataclass
class LLMConfig:
    path: str = ""
    """Hugging Face causal-LM folder (with its tokenizer) or hub id (`lmsys/vicuna-13b-v1.1[@revision]`, see
    `common.hub`); empty builds a fresh model from the fields below."""
    tokenizer: str = ""
    """Tokenizer folder or hub id, when it is not inside `path` (always needed for a fresh model)."""
    architecture: Literal["llama", "gemma2"] = "llama"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 0
    """0 = hidden_size / num_attention_heads."""
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    freeze: bool = True
    """Freeze the base weights (LoRA adapters, if any, still train)."""
    int8_frozen: bool = added_option(False)
    """Hold the frozen base's linear weights in int8 (torchao weight-only, `common.int8_frozen`) and train LoRA
    adapters (fp32, or `dtype`) over them: 1 byte per base parameter instead of 4 (fp32) or 2 (fp16); embeddings
    (and a head tied to them) stay in `dtype`. Runs on the CPU and on a V100 (fp16 activations). Needs the base
    frozen: `lora.enabled: true` or `freeze: true`."""
    add_pad_token: bool = True
    """Add SALMONN's `[PAD]` token (and resize the embeddings) when the tokenizer has no pad token."""
    unscale_audio: bool = added_option(False)
    """Gemma multiplies every input embedding by sqrt(hidden_size) (48 for Gemma-2-2B); true divides the audio tokens
    by it first, as PaliGemma does its image tokens, so that they enter the LLM at the projection's scale rather
    than sqrt(hidden_size) times it. Does nothing for an LLM without that scaling (LLaMA, Vicuna). Saved with the
    model; false (the default) keeps models trained before it decoding as they were."""


@dataclass
class LoraSpec:
    enabled: bool = True
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class SalmonnConfig:
    """A whole SALMONN: every part's source and shape, and the optional SALMONN checkpoint."""

    whisper: WhisperEncoderConfig = field(default_factory=WhisperEncoderConfig)
    beats: BeatsEncoderConfig = field(default_factory=BeatsEncoderConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    checkpoint: str = ""
    """SALMONN `.pth` with the trained Q-Former, projection, layer norms and LoRA; empty = fresh glue."""


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model folder: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(load_file(str(folder / shard)))
        return weights
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_whisper_encoder(path: str | Path) -> WhisperEncoder:
    """The encoder of an HF Whisper folder (WhisperModel or WhisperForConditionalGeneration layout).

    Only encoder tensors are read; the decoder is never built. Raises CheckpointError naming missing or
    mis-shaped keys.
    """
    folder, hub_note = local_folder(str(path))
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face Whisper folder (no config.json); check whisper.path"
                              + hub_note)
    encoder = WhisperEncoder(WhisperConfig.from_pretrained(folder))
    if getattr(encoder.config, HEADS_KEPT, None):
        keep_whisper_heads(encoder, getattr(encoder.config, HEADS_KEPT))
    weights = read_hf_weights(folder)
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in weights)), None)
    if prefix is None:
        raise CheckpointError(f"{folder}: no encoder weights (keys starting with model.encoder. or encoder.)")
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    _load_strict(encoder, state, folder)
    return encoder


HEADS_KEPT = "encoder_attention_heads_kept"
"""Whisper config field of a head-pruned encoder (`prune.width`): heads left in every layer. The head width stays
d_model / encoder_attention_heads, so `encoder_attention_heads` keeps its original value."""


def keep_whisper_heads(encoder: WhisperEncoder, heads: int) -> None:
    """Shrink every encoder layer's attention to `heads` heads of the original head width (fresh weights).

    HF's WhisperAttention derives its head width from d_model / heads and refuses other shapes, so a head-pruned
    encoder is built at full width and its projections are replaced by narrower ones before the weights load:
    q/k/v `[d_model → heads · head_dim]`, out_proj `[heads · head_dim → d_model]`.
    """
    for layer in encoder.layers:
        attn = layer.self_attn
        inner = heads * attn.head_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(old.in_features, inner, bias=old.bias is not None))
        attn.out_proj = nn.Linear(inner, attn.out_proj.out_features, bias=attn.out_proj.bias is not None)
        attn.num_heads = heads
    setattr(encoder.config, HEADS_KEPT, heads)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"shape mismatches: {shapes[:3]}" if shapes else ""]
        raise CheckpointError(f"{source}: weights do not fit the architecture: " + "; ".join(p for p in parts if p))
    module.load_state_dict(state, strict=True)


def build_whisper(cfg: WhisperEncoderConfig) -> WhisperEncoder:
    encoder = _whisper_encoder(cfg)
    if cfg.int8_frozen:
        quantize_frozen(encoder)
    return encoder


def _whisper_encoder(cfg: WhisperEncoderConfig) -> WhisperEncoder:
    if cfg.path:
        return load_whisper_encoder(cfg.path)
    config = WhisperConfig(
        d_model=cfg.d_model, encoder_layers=cfg.encoder_layers, encoder_attention_heads=cfg.encoder_attention_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim, num_mel_bins=cfg.num_mel_bins,
        max_source_positions=cfg.max_source_positions, decoder_layers=1, decoder_attention_heads=1,
        decoder_ffn_dim=4, dropout=0.0,
    )
    return WhisperEncoder(config)


def build_beats(cfg: BeatsEncoderConfig) -> BEATs | None:
    if not cfg.enabled:
        return None
    if cfg.path:
        if not Path(cfg.path).is_file():
            raise CheckpointError(f"{cfg.path}: BEATs checkpoint not found; check beats.path")
        return BEATs.from_checkpoint(cfg.path)
    return BEATs(BEATsConfig.from_dict(cfg.cfg))


def load_tokenizer(cfg: LLMConfig, probe_texts: Sequence[str] = ()):
    """The LLM's tokenizer (`teacher.tokenizer.load_llm_tokenizer`: sentencepiece semantics for LLaMA, checked on
    `probe_texts`), with SALMONN's `[PAD]` added when it has no pad token."""
    source = cfg.tokenizer or cfg.path
    if not source:
        raise CheckpointError("llm.tokenizer: a fresh LLM needs a tokenizer folder (llm.tokenizer)")
    folder, hub_note = local_folder(source)
    if not folder.is_dir():
        raise CheckpointError(f"{source}: tokenizer folder not found; check llm.tokenizer / llm.path" + hub_note)
    tokenizer = load_llm_tokenizer(folder, probe_texts)
    if tokenizer.pad_token is None and cfg.add_pad_token:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.padding_side = "right"
    return tokenizer


def fresh_llm_config(cfg: LLMConfig, tokenizer):
    """A LLaMA or Gemma-2 config of the given size, with the tokenizer's vocabulary and special ids."""
    from transformers import Gemma2Config, LlamaConfig

    common = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    if cfg.architecture == "llama":
        return LlamaConfig(head_dim=head_dim, **common)
    return Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, **common)


def build_llm(cfg: LLMConfig, tokenizer) -> nn.Module:
    dtype = DTYPES[cfg.dtype]
    if cfg.path:
        folder, hub_note = local_folder(cfg.path)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{cfg.path}: not a Hugging Face model folder (no config.json); check llm.path"
                                  + hub_note)
        llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        llm = AutoModelForCausalLM.from_config(fresh_llm_config(cfg, tokenizer), dtype=dtype)
    old = llm.get_input_embeddings().weight.shape[0]
    if old < len(tokenizer):
        # SALMONN adds [PAD] to the LLaMA tokenizer and resizes before LoRA is applied. The new rows are not in
        # any checkpoint, so they get the mean of the old rows: deterministic, so every load gives one model.
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
                matrix[old:] = matrix[:old].mean(0)
    if cfg.int8_frozen:
        quantize_frozen(llm)  # after the resize (it rewrites the head) and before LoRA (peft wraps int8 layers)
    return llm


def check_int8_frozen(llm: LLMConfig, lora: LoraSpec, whisper_frozen: bool | None, prefix: str) -> None:
    """Refuse an `int8_frozen` part that would train (SystemExit naming the key and the fix). `prefix` is where the
    config sits (`model` for the teacher, `student` for the student); `whisper_frozen` None: no Whisper switch."""
    if llm.int8_frozen and not llm.freeze and not lora.enabled:
        raise SystemExit(int8_config_error(
            f"{prefix}.llm.int8_frozen", f"{prefix}.llm.freeze is false and {prefix}.lora.enabled is false, so the "
            "LLM's own weights would train", f"set {prefix}.lora.enabled: true (LoRA over the int8 base) or "
            f"{prefix}.llm.freeze: true, or {prefix}.llm.int8_frozen: false"))
    if whisper_frozen is False:
        raise SystemExit(int8_config_error(
            f"{prefix}.whisper.int8_frozen", "the Whisper encoder trains (freeze: false)",
            f"set {prefix}.whisper.freeze: true, or {prefix}.whisper.int8_frozen: false"))


def apply_lora(llm: nn.Module, cfg: LoraSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias: a FutureWarning on every
        # load that the user cannot act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # Over an int8 base (`llm.int8_frozen`) peft warns that it cannot merge into int8 weights; smolt never asks it
        # to: `prune.skeleton.merge_lora` dequantizes the base first and merges there.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        return get_peft_model(llm, config)


EMBED_SCALED = ("gemma", "gemma2", "gemma3", "gemma3_text")
"""Hugging Face model types whose embedding layer's output is multiplied by sqrt(hidden_size) in the model."""


def audio_scale(cfg: LLMConfig, llm: nn.Module) -> float:
    """The factor on the projected audio tokens (`Salmonn.audio_scale`): 1 / sqrt(hidden_size) for an LLM that scales
    its input embeddings by sqrt(hidden_size) when `cfg.unscale_audio`, else 1."""
    config = llm.config
    if not cfg.unscale_audio or config.model_type not in EMBED_SCALED:
        return 1.0
    return 1.0 / math.sqrt(config.hidden_size)


def set_trainable(model: Salmonn, cfg: SalmonnConfig) -> None:
    """Freeze what the config freezes; the Q-Former, projection and layer norms always train."""
    model.speech_encoder.requires_grad_(not cfg.whisper.freeze)
    if model.audio_encoder is not None:
        model.audio_encoder.requires_grad_(not cfg.beats.freeze)
    if not cfg.lora.enabled:
        model.llm.requires_grad_(not cfg.llm.freeze)


def build_salmonn(cfg: SalmonnConfig, load_checkpoint: bool = True):
    """Build the model; returns `(model, key_report)` where key_report is None without a SALMONN checkpoint."""
    check_int8_frozen(cfg.llm, cfg.lora, cfg.whisper.freeze if cfg.whisper.int8_frozen else None, "model")
    tokenizer = load_tokenizer(cfg.llm, prompt_pieces(cfg.prompt, "Transcribe the speech."))
    whisper = build_whisper(cfg.whisper)
    beats = build_beats(cfg.beats)
    encoder_dim = whisper.config.d_model + (beats.cfg.encoder_embed_dim if beats is not None else 0)
    qformer = WindowQFormer(cfg.qformer, encoder_dim)
    llm = build_llm(cfg.llm, tokenizer)
    if cfg.lora.enabled:
        llm = apply_lora(llm, cfg.lora)
    model = Salmonn(whisper, beats, qformer, llm, tokenizer, cfg.prompt, pad_to_longest=cfg.whisper.pad_to_longest,
                    beats_padding=cfg.beats.padding_features, whisper_per_clip=cfg.whisper.per_clip,
                    audio_scale=audio_scale(cfg.llm, llm))
    if model.ln_audio is not None:
        nn.init.constant_(model.ln_audio.weight, cfg.beats.ln_gain_init)
    set_trainable(model, cfg)
    report = None
    if cfg.checkpoint and load_checkpoint:
        report = load_salmonn_checkpoint(model, cfg.checkpoint)
    return model, report
