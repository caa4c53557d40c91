"""A student built from its configs alone, for loaders that bring their own tensors (int8 folders, exports).

The configs that define the shapes travel with every folder this package writes:

- `whisper/config.json`: the HF WhisperConfig (with `encoder_attention_heads_kept` when heads were pruned),
- `beats_config.json`: the official BEATs config, `token_pruning.yaml`: BEATs' token pruning,
- `llm/config.json` and the tokenizer: the HF causal LM (Gemma-2 or LLaMA),
- `salmonn.yaml`: the SalmonnConfig (Q-Former shape, prompt, Whisper padding).

`build_skeleton` makes the model at those shapes with freshly initialised weights; the caller then loads every
tensor and checks that none is left out (`check_keys`). `merge_lora` folds LoRA adapters into the LLM's weights
before a model is pruned, quantized or exported.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.config import from_dict, read_yaml, to_dict
from common.int8_frozen import dequantize_linears
from student.build import PRUNING_FILE
from student.token_pruning import PrunedBEATs, TokenPruningConfig
from teacher.beats import BEATs, BEATsConfig
from teacher.build import DTYPES, HEADS_KEPT, LLMConfig, SalmonnConfig, audio_scale, keep_whisper_heads, load_tokenizer
from teacher.checkpoint import MODEL_CONFIG, base_llm_state, read_model_config
from teacher.qformer import WindowQFormer
from teacher.salmonn import Salmonn

BEATS_CONFIG = "beats_config.json"


def write_configs(model: Salmonn, salmonn_cfg: SalmonnConfig, out: Path, llm_weights: bool) -> None:
    """Write every config file listed above (and the LLM's weights when `llm_weights`) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.speech_encoder.config.save_pretrained(out / "whisper")
    if model.audio_encoder is not None:
        (out / BEATS_CONFIG).write_text(json.dumps(model.audio_encoder.cfg.to_dict(), indent=2) + "\n")
        if isinstance(model.audio_encoder, PrunedBEATs):
            (out / PRUNING_FILE).write_text(yaml.safe_dump(to_dict(model.audio_encoder.pruning_config),
                                                           sort_keys=False))
    base, state = base_llm_state(model)
    if llm_weights:
        base.save_pretrained(out / "llm", state_dict=state)
    else:
        base.config.save_pretrained(out / "llm")
        if base.generation_config is not None:
            base.generation_config.save_pretrained(out / "llm")
    model.tokenizer.save_pretrained(out / "llm")
    (out / MODEL_CONFIG).write_text(yaml.safe_dump(to_dict(salmonn_cfg), sort_keys=False))


def read_salmonn_config(folder: Path) -> SalmonnConfig:
    path = folder / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MODEL_CONFIG}; not a folder written by prune.quantize / prune.export")
    return read_model_config(folder)


def build_skeleton(folder: str | Path, llm: nn.Module | None = None) -> Salmonn:
    """The student described by the configs in `folder`, with fresh weights (or the given `llm`), in eval mode."""
    folder = Path(folder)
    cfg = read_salmonn_config(folder)
    whisper = WhisperEncoder(WhisperConfig.from_pretrained(folder / "whisper"))
    if getattr(whisper.config, HEADS_KEPT, None):
        keep_whisper_heads(whisper, getattr(whisper.config, HEADS_KEPT))
    beats = None
    if (folder / BEATS_CONFIG).is_file():
        beats_cfg = BEATsConfig.from_dict(json.loads((folder / BEATS_CONFIG).read_text()))
        if (folder / PRUNING_FILE).is_file():
            pruning = from_dict(TokenPruningConfig, read_yaml(folder / PRUNING_FILE), str(folder / PRUNING_FILE))
            beats = PrunedBEATs(beats_cfg, pruning)
        else:
            beats = BEATs(beats_cfg)
    encoder_dim = whisper.config.d_model + (beats.cfg.encoder_embed_dim if beats is not None else 0)
    qformer = WindowQFormer(cfg.qformer, encoder_dim)
    if llm is None:
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder / "llm"), dtype=DTYPES[cfg.llm.dtype])
    tokenizer = load_tokenizer(LLMConfig(path=str(folder / "llm"), add_pad_token=cfg.llm.add_pad_token))
    model = Salmonn(whisper, beats, qformer, llm, tokenizer, cfg.prompt, pad_to_longest=cfg.whisper.pad_to_longest,
                    beats_padding=cfg.beats.padding_features, whisper_per_clip=cfg.whisper.per_clip,
                    audio_scale=audio_scale(cfg.llm, llm))
    return model.eval()


def check_keys(model: nn.Module, keys: set[str], source: str, may_lack: set[str] = frozenset()) -> None:
    """Every key of the model's state dict must be in `keys` (except `may_lack`, e.g. a tied LM head) and nothing
    else may be. Raises ValueError naming the file and the keys."""
    expected = set(model.state_dict())
    missing = sorted(expected - keys - set(may_lack))
    unexpected = sorted(keys - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not fit the model built from its configs: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")


def flat_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without tied duplicates (Gemma-2's LM head, BEATs' shared relative position table):
    (tensors, aliases {dropped name: kept name}). Plain tensors are matched by storage, others by identity."""
    state, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = id(tensor) if type(tensor) is not torch.Tensor else (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor
    return state, aliases


def merge_lora(model, salmonn_cfg: SalmonnConfig) -> SalmonnConfig:
    """Fold LoRA adapters into the LLM's weights (pruning cuts the base layers; the adapters would not fit).

    An int8 base (`llm.int8_frozen`, `whisper.int8_frozen`) cannot take the adapters in int8 (pruning and export
    need floating-point weights anyway): its weights are dequantized first (`common.int8_frozen`), the adapters are
    then merged into those, and the returned config has `int8_frozen: false`."""
    int8 = salmonn_cfg.llm.int8_frozen or salmonn_cfg.whisper.int8_frozen
    if int8:
        dequantize_linears(model.llm)
        dequantize_linears(model.speech_encoder)
        salmonn_cfg = dataclasses.replace(salmonn_cfg, llm=dataclasses.replace(salmonn_cfg.llm, int8_frozen=False),
                                          whisper=dataclasses.replace(salmonn_cfg.whisper, int8_frozen=False))
        print("int8 frozen weights dequantized to floating point (int8_frozen: false)")
    if not hasattr(model.llm, "merge_and_unload"):
        return salmonn_cfg
    flags = {n: p.requires_grad for n, p in model.llm.get_base_model().named_parameters()}
    if int8:
        model.llm = _merge_into_dequantized(model.llm)
    else:
        model.llm = model.llm.merge_and_unload()
    for name, p in model.llm.named_parameters():
        p.requires_grad_(flags.get(name, False) or not salmonn_cfg.llm.freeze)
    print("LoRA adapters merged into the LLM; the pruned student has none (lora.enabled: false)")
    return dataclasses.replace(salmonn_cfg, lora=dataclasses.replace(salmonn_cfg.lora, enabled=False))


def _merge_into_dequantized(llm: nn.Module) -> nn.Module:
    """`merge_and_unload` for LoRA layers whose base was int8 and is now dequantized: peft's `TorchaoLoraLinear`
    would quantize the merged weight again, so each layer's delta (B·A·scale) is added to its base weight here."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in llm.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            deltas[name] = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
    base = llm.unload()
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = base.get_submodule(name).weight
            weight += delta.to(weight.dtype)
    return base
