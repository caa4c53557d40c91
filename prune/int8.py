"""int8 weights for the student's LLM and encoder linear layers, saved as safetensors and loaded back: the library
under `python -m prune.quantize`.

Every `nn.Linear` of the chosen parts gets a per-output-channel symmetric int8 weight, by one of three schemes:

- `int8_weight_only` (torchao `Int8WeightOnlyConfig`, `Int8Tensor`: `qdata` int8 `[out, in]`, `scale` `[out, 1]`):
  the matmul runs in the activation dtype on the int8 weight cast back. **The GPU scheme**: a V100 runs it with
  float16 compute (no bf16, no int8 tensor cores). On a CPU it halves the bytes but decodes slower than float32.
- `int8_dynamic` (torchao `Int8DynamicActivationInt8WeightConfig`): activations quantized per token at run time,
  int8 × int8 matmul through `torch._int_mm`; slower still on a CPU (no fast int8 kernel behind `_int_mm` there).
- `int8_dynamic_x86` (`common.int8_x86.X86DynamicLinear`): int8 weight, activations quantized per call, FBGEMM's int8
  GEMM (PyTorch's x86 quantized engine). **The CPU scheme**: faster than float32 wherever the linear layers are
  wide enough (`python -m evaluation.int8_speed`, 1 thread on the project's AMD EPYC: a Gemma-2 decode step × 0.44 at
  d 512, × 0.34 at d 1024, but × 1.15 at d 192, where FBGEMM's ~13 µs per call exceeds a float GEMV; prefill-sized
  GEMMs × 0.26–0.42); x86 CPUs only, it refuses to move to a GPU.

Embeddings and the LM head stay in floating point (Gemma-2 ties the head to the embeddings).

The folder (`prune.quantize` writes `<output_dir>/model`) holds no floating-point copy of the quantized weights:

    model.safetensors    every tensor of the student; torchao's int8 weights flattened by its safetensors support
                         (`<module>._weight_qdata`, `<module>._weight_scale`, ... plus their metadata); x86 ones as
                         plain tensors (`<module>.weight` int8, `.weight_scale`, `.weight_zero_point`, `.bias`)
    quantization.json    the marker: scheme, torchao version, quantized module names, tied-weight aliases
    salmonn.yaml, whisper/config.json, beats_config.json, token_pruning.yaml, llm/ (config + tokenizer)

`load_int8_folder` (an `evaluation.run` loader: `prune.int8:load_int8_folder`) builds the student from those
configs, quantizes the same modules and assigns the stored tensors (x86 layers repack FBGEMM's weight from them);
`prune.quantize` checks that the reloaded model gives exactly the logits of the one it saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common.int8_x86 import X86DynamicLinear
from prune.skeleton import build_skeleton, check_keys, flat_state, write_configs
from teacher.salmonn import Salmonn

FORMAT = "smolt-int8/1"
MARKER = "quantization.json"
WEIGHTS = "model.safetensors"
PARTS = ("llm", "speech_encoder", "audio_encoder", "qformer", "projector")
Scheme = Literal["int8_weight_only", "int8_dynamic", "int8_dynamic_x86"]
SCHEMES = ("int8_weight_only", "int8_dynamic", "int8_dynamic_x86")


def torchao_config(scheme: Scheme):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise ValueError(f"scheme must be int8_weight_only or int8_dynamic for torchao, got {scheme!r}")


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
    """Quantize exactly the named linear layers in place (torchao `quantize_`, or `X86DynamicLinear` replacing them)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if scheme == "int8_dynamic_x86":
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, X86DynamicLinear.from_float(owner.get_submodule(child)))
        return
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
