"""int8 weights for the student's LLM and encoder linear layers (torchao), saved as safetensors and loaded back: the
library under `python -m prune.quantize`.

Every `nn.Linear` of the chosen parts gets torchao's per-output-channel symmetric int8 weight (`Int8Tensor`:
`qdata` int8 `[out, in]`, `scale` `[out, 1]`) through `quantize_`: `Int8WeightOnlyConfig` (the matmul runs in the
activation dtype on the int8 weight cast back) or `Int8DynamicActivationInt8WeightConfig` (activations quantized
per token at run time, int8 × int8 matmul through `torch._int_mm`). Embeddings and the LM head stay in floating
point (Gemma-2 ties the head to the embeddings).

The folder (`prune.quantize` writes `<output_dir>/model`) holds no floating-point copy of the quantized weights:

    model.safetensors    every tensor of the student; int8 weights flattened by torchao's safetensors support
                         (`<module>._weight_qdata`, `<module>._weight_scale`, ... plus their metadata)
    quantization.json    the marker: scheme, torchao version, quantized module names, tied-weight aliases
    salmonn.yaml, whisper/config.json, beats_config.json, token_pruning.yaml, llm/ (config + tokenizer)

`load_int8_folder` (an `evaluation.run` loader: `prune.int8:load_int8_folder`) builds the student from those
configs, quantizes the same modules and assigns the stored tensors; `prune.quantize` checks that the reloaded model
gives exactly the logits of the one it saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prune.skeleton import build_skeleton, check_keys, flat_state, write_configs
from teacher.salmonn import Salmonn

FORMAT = "smolt-int8/1"
MARKER = "quantization.json"
WEIGHTS = "model.safetensors"
PARTS = ("llm", "speech_encoder", "audio_encoder", "qformer", "projector")
Scheme = Literal["int8_weight_only", "int8_dynamic"]


def torchao_config(scheme: Scheme):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise ValueError(f"scheme must be int8_weight_only or int8_dynamic, got {scheme!r}")


def part_modules(model: Salmonn, parts: list[str]) -> dict[str, nn.Module]:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"parts: unknown {unknown}; choose from {list(PARTS)}")
    return {name: getattr(model, name) for name in parts if getattr(model, name) is not None}


def linear_names(model: Salmonn, parts: list[str], skip: list[str]) -> list[str]:
    """Names (in `model`) of the nn.Linear layers to quantize: in the parts, not skipped, weight not shared."""
    inside = {id(m) for part in part_modules(model, parts).values() for m in part.modules()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) not in inside or id(module.weight) in embeddings:
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        names.append(name)
    return names


def quantize_modules(model: Salmonn, names: list[str], scheme: Scheme) -> None:
    """Quantize exactly the named linear layers in place (torchao `quantize_`)."""
    from torchao.quantization import quantize_
    from torchao.utils import TorchAOBaseTensor

    chosen = set(names)
    quantize_(model, torchao_config(scheme), filter_fn=lambda module, fqn: fqn in chosen)
    missed = [n for n in names if not isinstance(model.get_submodule(n).weight, TorchAOBaseTensor)]
    if missed:
        raise RuntimeError(f"torchao left {len(missed)} linear layers unquantized (e.g. {missed[:3]})")


def save_int8_folder(model: Salmonn, salmonn_cfg, out: Path, info: dict) -> Path:
    """Write the int8 student folder described in the module docstring; `info` goes into quantization.json."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    out.mkdir(parents=True, exist_ok=True)
    write_configs(model, salmonn_cfg, out, llm_weights=False)
    state, aliases = flat_state(model)
    tensors, metadata = flatten_tensor_state_dict({k: v.detach().cpu().contiguous() for k, v in state.items()})
    save_file(tensors, str(out / WEIGHTS), metadata=metadata)
    (out / MARKER).write_text(json.dumps({"format": FORMAT, **info, "aliases": aliases}, indent=2) + "\n")
    return out


def load_int8_folder(folder: str | Path) -> Salmonn:
    """Load a folder written by `save_int8_folder` (an `evaluation.run` loader), in eval mode on the CPU."""
    import torchao
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{folder}: no {MARKER}; not an int8 folder written by prune.quantize")
    info = json.loads(marker.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{marker}: format {info.get('format')!r}, this loader reads {FORMAT!r}")
    if info.get("torchao") != torchao.__version__:
        print(f"warning: {folder} was written with torchao {info.get('torchao')}, loading with {torchao.__version__}")
    model = build_skeleton(folder)
    quantize_modules(model, info["modules"], info["scheme"])
    with safe_open(str(folder / WEIGHTS), "pt") as handle:
        metadata = handle.metadata()
    state, leftover = unflatten_tensor_state_dict(load_file(str(folder / WEIGHTS)), metadata)
    if leftover:
        raise ValueError(f"{folder / WEIGHTS}: tensors that belong to no saved weight: {sorted(leftover)[:5]}")
    check_keys(model, set(state), str(folder / WEIGHTS), may_lack=set(info["aliases"]))
    plain = {k: v for k, v in state.items() if type(v) is torch.Tensor}
    quantized = {k: v for k, v in state.items() if type(v) is not torch.Tensor}
    model.load_state_dict(plain, strict=False)  # copies into the existing tensors: tied weights stay tied
    model.load_state_dict(quantized, strict=False, assign=True)
    return model.eval()


@torch.inference_mode()
def llm_logits(model: Salmonn, text: str) -> torch.Tensor:
    """LLM logits `[1, tokens, vocab]` (fp32) of `text` (tokenized with BOS)."""
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    return model.llm(input_ids=ids).logits.float()
