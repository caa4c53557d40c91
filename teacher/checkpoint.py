"""Model folders: write a model in the official layouts (HF Whisper folder, BEATs `.pt`, HF LLM folder, SALMONN
`.pth`) with its `salmonn.yaml`, and load such a folder back (`load_model_folder`). The official checkpoint's key
names and its loading into a built model are `teacher.official`'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from common.config import to_dict
from common.int8_frozen import plain_state
from teacher.official import ours_to_official, trained_glue_keys
from teacher.salmonn import Salmonn

# (official prefix pattern, our prefix) for the trained glue; applied in order, first match wins.
# Buffers the model recomputes itself.
# Parts that come from their own files (Whisper folder, BEATs .pt, LLM folder), not from the SALMONN .pth.


def salmonn_state_dict(model: Salmonn) -> dict[str, torch.Tensor]:
    """The trained glue under official names, as SALMONN's training loop saves it."""
    params = dict(model.named_parameters())
    return {ours_to_official(k): params[k].detach().cpu().contiguous() for k in trained_glue_keys(model)}


def save_whisper_encoder(model: Salmonn, folder: Path) -> None:
    """HF Whisper folder holding the encoder (`model.encoder.*` keys, as WhisperForConditionalGeneration); int8
    weights (`whisper.int8_frozen`) are written dequantized (`common.int8_frozen`)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = model.speech_encoder
    encoder.config.save_pretrained(folder)
    state = {f"model.encoder.{k}": v.detach().cpu().contiguous() for k, v in plain_state(encoder.state_dict()).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def base_llm_state(model: Salmonn) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The LLM without its LoRA adapters: (HF model to save, its state dict under plain HF names). An int8 base
    (`llm.int8_frozen`) comes dequantized to the LLM's dtype (`common.int8_frozen`): HF folders hold plain tensors."""
    llm = model.llm
    if not hasattr(llm, "get_base_model"):
        return llm, plain_state(llm.state_dict())
    base = llm.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
    return base, plain_state(state)


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
    out = Path(out_dir)
    paths = save_official_layout(model, out, extra)
    write_model_config(cfg, out, beats="beats" in paths)
    return out


def write_model_config(cfg, folder: Path, beats: bool) -> Path:
    """`folder/salmonn.yaml`: the SalmonnConfig `cfg` with its paths pointing at the folder's own files (`whisper/`,
    `llm/` with its tokenizer, `salmonn.pth`, and `beats.pt` when `beats`), so the folder loads wherever it is."""
    folder_cfg = dataclasses.replace(
        cfg,
        whisper=dataclasses.replace(cfg.whisper, path="whisper"),
        beats=dataclasses.replace(cfg.beats, path="beats.pt" if beats else ""),
        llm=dataclasses.replace(cfg.llm, path="llm", tokenizer=""),
        checkpoint="salmonn.pth",
    )
    path = folder / MODEL_CONFIG
    path.write_text(yaml.safe_dump(to_dict(folder_cfg), sort_keys=False))
    return path


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
