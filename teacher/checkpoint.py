"""SALMONN checkpoints: map the official key names onto our modules, report what was and was not loaded,
and write a model back in the official layouts (HF Whisper folder, BEATs `.pt`, HF LLM folder, SALMONN `.pth`).

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
from safetensors.torch import save_file

from teacher.salmonn import Salmonn

# (official prefix pattern, our prefix) for the trained glue; applied in order, first match wins.
_RENAMES = [
    (r"^speech_Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.qformer.layernorm."),
    (r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.",
     r"qformer.qformer.encoder.layer.\1.attention.attention."),
    (r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.",
     r"qformer.qformer.encoder.layer.\1.crossattention.attention."),
    (r"^speech_Qformer\.bert\.encoder\.", "qformer.qformer.encoder."),
    (r"^speech_query_tokens$", "qformer.query_tokens"),
    (r"^speech_llama_proj\.", "projector."),
    (r"^ln_speech\.", "ln_speech."),
    (r"^ln_audio\.", "ln_audio."),
    (r"^llama_model\.(.*lora_[AB]\..*)$", r"llm.\1"),
]
# Buffers the model recomputes itself.
_RECOMPUTED = [r"\.position_ids$", r"rotary_emb\.inv_freq$"]
# Parts that come from their own files (Whisper folder, BEATs .pt, LLM folder), not from the SALMONN .pth.
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


def salmonn_state_dict(model: Salmonn) -> dict[str, torch.Tensor]:
    """The trained glue under official names, as SALMONN's training loop saves it."""
    params = dict(model.named_parameters())
    return {ours_to_official(k): params[k].detach().cpu().contiguous() for k in trained_glue_keys(model)}


def save_whisper_encoder(model: Salmonn, folder: Path) -> None:
    """HF Whisper folder holding the encoder (`model.encoder.*` keys, as WhisperForConditionalGeneration)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = model.speech_encoder
    encoder.config.save_pretrained(folder)
    state = {f"model.encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def base_llm_state(model: Salmonn) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The LLM without its LoRA adapters: (HF model to save, its state dict under plain HF names)."""
    llm = model.llm
    if not hasattr(llm, "get_base_model"):
        return llm, llm.state_dict()
    base = llm.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
    return base, state


def save_official_layout(model: Salmonn, out_dir: str | Path, extra: dict | None = None) -> dict[str, str]:
    """Write `whisper/`, `beats.pt`, `llm/` (base weights + tokenizer) and `salmonn.pth` under `out_dir`.

    With LoRA, the base LLM is saved without the adapters and the adapters go into `salmonn.pth`, exactly as
    the official release splits them. Returns the paths, for a config that loads the model back.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"whisper": str(out / "whisper"), "llm": str(out / "llm"), "checkpoint": str(out / "salmonn.pth")}
    save_whisper_encoder(model, out / "whisper")
    if model.audio_encoder is not None:
        torch.save(model.audio_encoder.to_checkpoint(), out / "beats.pt")
        paths["beats"] = str(out / "beats.pt")
    base, state = base_llm_state(model)
    base.save_pretrained(out / "llm", state_dict=state)
    model.tokenizer.save_pretrained(out / "llm")
    blob = {"model": salmonn_state_dict(model), **(extra or {})}
    tmp = out / "salmonn.pth.tmp"
    torch.save(blob, tmp)
    tmp.replace(out / "salmonn.pth")
    return paths


MODEL_CONFIG = "salmonn.yaml"


def save_model_folder(model: Salmonn, cfg, out_dir: str | Path, extra: dict | None = None) -> Path:
    """`save_official_layout` plus `salmonn.yaml`: the SalmonnConfig that loads it back (paths relative)."""
    import dataclasses

    import yaml

    from common.config import to_dict

    out = Path(out_dir)
    paths = save_official_layout(model, out, extra)
    folder_cfg = dataclasses.replace(
        cfg,
        whisper=dataclasses.replace(cfg.whisper, path="whisper"),
        beats=dataclasses.replace(cfg.beats, path="beats.pt" if "beats" in paths else ""),
        llm=dataclasses.replace(cfg.llm, path="llm", tokenizer=""),
        checkpoint="salmonn.pth",
    )
    (out / MODEL_CONFIG).write_text(yaml.safe_dump(to_dict(folder_cfg), sort_keys=False))
    return out


def legacy_beats_padding(folder: Path) -> str:
    """`beats.padding_features` of a model folder written before the key existed: the behaviour it was made with.

    Until then smolt zeroed BEATs' outputs at padded tokens, and every model it trained (toy teachers, students,
    pruned and quantized ones) learned with that. A folder made by `teacher.assemble` from the official checkpoints
    (its salmonn.pth is a symbolic link to the release) holds the released SALMONN, which does not zero them.
    """
    return "official" if (folder / "salmonn.pth").is_symlink() else "zero"


def read_model_config(folder: str | Path):
    """The SalmonnConfig in a model folder's salmonn.yaml (paths as written, relative to the folder), with the
    `beats.padding_features` the model was made with when the file predates that key."""
    from common.config import from_dict, read_yaml
    from teacher.build import SalmonnConfig

    folder = Path(folder)
    path = folder / MODEL_CONFIG
    raw = read_yaml(path)
    beats = raw.get("beats") if isinstance(raw, dict) else None
    if isinstance(beats, dict) and "padding_features" not in beats:
        raw = {**raw, "beats": {**beats, "padding_features": legacy_beats_padding(folder)}}
    return from_dict(SalmonnConfig, raw, str(path))


def load_model_folder(folder: str | Path) -> Salmonn:
    """Load a folder written by `save_model_folder` (paths in its salmonn.yaml are relative to it)."""
    import dataclasses

    from teacher.build import build_salmonn

    folder = Path(folder)
    cfg = read_model_config(folder)
    rel = lambda p: str(folder / p) if p else ""
    cfg = dataclasses.replace(
        cfg,
        whisper=dataclasses.replace(cfg.whisper, path=rel(cfg.whisper.path)),
        beats=dataclasses.replace(cfg.beats, path=rel(cfg.beats.path)),
        llm=dataclasses.replace(cfg.llm, path=rel(cfg.llm.path)),
        checkpoint=rel(cfg.checkpoint),
    )
    model, report = build_salmonn(cfg)
    if report is not None and (report.missing_trained or report.unexpected):
        raise ValueError(f"{folder}: checkpoint does not fit its config:\n{report.summary()}")
    return model.eval()
