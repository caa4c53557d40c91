"""Loading any stage's model folder and decoding clips with it: the code `evaluation.run` and `evaluation.infer` share.

Every stage writes a folder that one loader reads back (a `module:function` taking the folder's path):

- teacher, student, pruned, recovered (`teacher.checkpoint.save_model_folder`, `student.build.save_student_folder`):
  `salmonn.yaml` + `salmonn.pth`, read by `student.build:load_student_folder`;
- int8 (`prune.quantize`): `quantization.json`, read by `prune.quantize:load_int8_folder`;
- export (`prune.export`): `encoders.safetensors` + `qformer_projector.safetensors`, read by `prune.export:load_export`.

(`load_student_folder` reads a teacher folder as `teacher.checkpoint:load_model_folder` does: a teacher has no
`token_pruning.yaml`.) Loaders are imported by name, so evaluation never imports a stage it does not load.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from common.device import InferenceDtype, place_for_inference
from common.model import AudioLanguageModel


@dataclass(frozen=True)
class FolderKind:
    name: str
    """What the folder holds, in words (for messages)."""
    files: tuple[str, ...]
    """Files that all must be in the folder."""
    loader: str
    """`module:function` that loads it."""


FOLDER_KINDS = (
    # int8 and export folders also hold a salmonn.yaml (their shapes), so they are recognised first.
    FolderKind("int8 student (prune.quantize)", ("quantization.json",), "prune.quantize:load_int8_folder"),
    FolderKind("exported student (prune.export)", ("encoders.safetensors", "qformer_projector.safetensors"),
               "prune.export:load_export"),
    FolderKind("teacher / student / pruned / recovered model",
               ("salmonn.yaml", "salmonn.pth"), "student.build:load_student_folder"),
)


def folder_kind(folder: str | Path) -> FolderKind:
    """The kind of model folder `folder` is. Raises ValueError naming the kinds it accepts (and, for a stage's
    output folder such as `outputs/toy/teacher`, the model folder inside it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model folder")
    for kind in FOLDER_KINDS:
        if all((folder / name).is_file() for name in kind.files):
            return kind
    accepted = "; ".join(f"{kind.name}: {' + '.join(kind.files)}" for kind in FOLDER_KINDS)
    inside = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and _is_model_folder(sub)]
    hint = f" It holds a model folder: use {inside[0]}." if inside else ""
    raise ValueError(f"{folder} is not a model folder. Accepted kinds, by the files they hold: {accepted}.{hint}")


def _is_model_folder(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in kind.files) for kind in FOLDER_KINDS)


def load_model(loader: str, path: str | Path, device: str = "cpu", dtype: InferenceDtype = "float32",
               where: str = "loader") -> AudioLanguageModel:
    """The model in the folder `path`, read by `loader` (`module:function`; empty: chosen from the folder's files,
    see `folder_kind`), in eval mode on `device` with its floating weights in `dtype`."""
    if not loader:
        loader = folder_kind(path).loader
    module_name, _, function = loader.partition(":")
    if not function:
        raise ValueError(f"{where} must be 'module:function', got {loader!r}")
    model = getattr(importlib.import_module(module_name), function)(str(path))
    return place_for_inference(model, device, dtype)


