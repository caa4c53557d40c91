"""The official SALMONN checkpoint: its key names mapped onto our modules, and loading it into a built model with a
report of what was and was not loaded (`load_salmonn_checkpoint`, which `teacher.build.build_salmonn` calls).

An official `.pth` holds `{"model": state_dict, "optimizer", "config", "scaler", "epoch"}`. Its state dict
has the trained parts (Q-Former in BERT naming, query tokens, projection, both layer norms, LoRA) and also
every buffer of the model (rotary `inv_freq`, BERT `position_ids`, BEATs tensors shared between layers
under their alias names). Buffers are recomputed here and reported, never treated as errors; a trained key
that is missing is an error for `python -m teacher.inspect`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teacher.salmonn import Salmonn

_RENAMES = [
    (r"^speech_Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.qformer.layernorm."),
    (r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.",
     r"qformer.qformer.encoder.layer.\1.attention.attention."),
    (r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.",
     r"qformer.qformer.encoder.layer.\1.crossattention.attention."),
    (r"^speech_Qformer\.bert\.encoder\.", "qformer.qformer.encoder."),
    (r"^speech_query_tokens$", "qformer.query_tokens"),
    (r"^speech_Qformer\.pool\.", "qformer.pool."),  # qformer.kind: pool (smolt's toy teachers; not in SALMONN)
    (r"^speech_llama_proj\.", "projector."),
    (r"^ln_speech\.", "ln_speech."),
    (r"^ln_audio\.", "ln_audio."),
    (r"^llama_model\.(.*lora_[AB]\..*)$", r"llm.\1"),
]


_RECOMPUTED = [r"\.position_ids$", r"rotary_emb\.inv_freq$"]


_OWN_FILES = [r"^speech_encoder\.", r"^beats\.", r"^llama_model\."]


@dataclass
class KeyReport:
    """What happened to each key of a SALMONN checkpoint."""

    path: str
    loaded: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    """Buffers in the file that the model computes itself."""
    from_own_files: list[str] = field(default_factory=list)
    """Encoder / LLM tensors that the model takes from their own checkpoints instead."""
    unexpected: list[str] = field(default_factory=list)
    missing_trained: list[str] = field(default_factory=list)
    """Trained parameters of the model that the file does not hold (an error for `teacher.inspect`)."""

    def summary(self) -> str:
        lines = [f"SALMONN checkpoint {self.path}:",
                 f"  loaded            {len(self.loaded)}",
                 f"  recomputed        {len(self.recomputed)} (buffers: position ids, rotary inv_freq)",
                 f"  from own files    {len(self.from_own_files)} (encoder / LLM tensors, e.g. shared BEATs aliases)",
                 f"  unexpected        {len(self.unexpected)}",
                 f"  missing (trained) {len(self.missing_trained)}"]
        for name, keys in (("unexpected", self.unexpected), ("missing", self.missing_trained)):
            for key in keys[:20]:
                lines.append(f"    {name}: {key}")
        return "\n".join(lines)


def official_to_ours(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def ours_to_official(key: str) -> str:
    """Inverse of `official_to_ours` for the trained glue (used when writing a SALMONN `.pth`)."""
    rules = [
        (r"^qformer\.qformer\.layernorm\.", "speech_Qformer.bert.embeddings.LayerNorm."),
        (r"^qformer\.qformer\.encoder\.layer\.(\d+)\.attention\.attention\.",
         r"speech_Qformer.bert.encoder.layer.\1.attention.self."),
        (r"^qformer\.qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.",
         r"speech_Qformer.bert.encoder.layer.\1.crossattention.self."),
        (r"^qformer\.qformer\.encoder\.", "speech_Qformer.bert.encoder."),
        (r"^qformer\.query_tokens$", "speech_query_tokens"),
        (r"^qformer\.pool\.", "speech_Qformer.pool."),
        (r"^projector\.", "speech_llama_proj."),
        (r"^llm\.", "llama_model."),
    ]
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def trained_glue_keys(model: Salmonn) -> list[str]:
    """Parameters a SALMONN checkpoint must provide: Q-Former, queries, projection, layer norms, LoRA."""
    keys = []
    for name, _ in model.named_parameters():
        if name.startswith(("qformer.", "projector.", "ln_speech.", "ln_audio.")) or ".lora_" in name:
            keys.append(name)
    return keys


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SALMONN checkpoint not found; check `checkpoint` in the config")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "model" not in blob:
        raise ValueError(f"{path}: expected a dict with a 'model' state dict (SALMONN's training checkpoint)")
    return blob["model"]


def load_salmonn_checkpoint(model: Salmonn, path: str | Path) -> KeyReport:
    """Load the trained glue from an official SALMONN `.pth` into `model` and report every key."""
    state = read_checkpoint(path)
    ours = dict(model.named_parameters())
    report = KeyReport(path=str(path))
    to_load = {}
    for key, tensor in state.items():
        if any(re.search(p, key) for p in _RECOMPUTED):
            report.recomputed.append(key)
            continue
        mapped = official_to_ours(key)
        if mapped is not None and mapped in ours:
            if ours[mapped].shape != tensor.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model's {mapped} has "
                                 f"{tuple(ours[mapped].shape)}; does the config match this checkpoint?")
            to_load[mapped] = tensor
            report.loaded.append(key)
        elif mapped is None and any(re.search(p, key) for p in _OWN_FILES):
            report.from_own_files.append(key)
        else:
            report.unexpected.append(key)
    with torch.no_grad():
        for name, tensor in to_load.items():
            ours[name].copy_(tensor.to(ours[name].dtype))
    report.missing_trained = sorted(set(trained_glue_keys(model)) - set(to_load))
    return report


class CheckpointError(ValueError):
    """A checkpoint file is missing or does not fit the configured architecture."""
