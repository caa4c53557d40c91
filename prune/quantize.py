"""int8 weights for the student's LLM and encoder linear layers (torchao), saved as safetensors and loaded back.

    python -m prune.quantize --config configs/toy/quantize.yaml [key=value ...]

Every `nn.Linear` of the chosen parts gets torchao's per-output-channel symmetric int8 weight (`Int8Tensor`:
`qdata` int8 `[out, in]`, `scale` `[out, 1]`) through `quantize_`: `Int8WeightOnlyConfig` (the matmul runs in the
activation dtype on the int8 weight cast back) or `Int8DynamicActivationInt8WeightConfig` (activations quantized
per token at run time, int8 × int8 matmul through `torch._int_mm`). Embeddings and the LM head stay in floating
point (Gemma-2 ties the head to the embeddings).

The folder (`<output_dir>/model`) holds no floating-point copy of the quantized weights:

    model.safetensors    every tensor of the student; int8 weights flattened by torchao's safetensors support
                         (`<module>._weight_qdata`, `<module>._weight_scale`, ... plus their metadata)
    quantization.json    the marker: scheme, torchao version, quantized module names, tied-weight aliases
    salmonn.yaml, whisper/config.json, beats_config.json, token_pruning.yaml, llm/ (config + tokenizer)

`load_int8_folder` (an `evaluation.run` loader: `prune.quantize:load_int8_folder`) builds the student from those
configs, quantizes the same modules and assigns the stored tensors; the job checks that the reloaded model gives
exactly the logits of the one it saved.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common.cli import run
from common.config import mark_stage_done, parse_cli, save_resolved, stage_is_current
from common.sizes import weight_bytes
from prune.skeleton import build_skeleton, check_keys, flat_state, merge_lora, read_salmonn_config, write_configs
from student.build import load_student_folder
from teacher.checkpoint import MODEL_CONFIG
from teacher.salmonn import Salmonn

FORMAT = "smolt-int8/1"
MARKER = "quantization.json"
WEIGHTS = "model.safetensors"
PARTS = ("llm", "speech_encoder", "audio_encoder", "qformer", "projector")
Scheme = Literal["int8_weight_only", "int8_dynamic"]


@dataclass
class JobConfig:
    """Quantize a saved student's linear weights to int8."""

    model: str = "outputs/toy/student/model"
    """The student folder (e.g. a pruned one: outputs/toy/pruned-25/model)."""
    output_dir: str = "outputs/toy/student-int8"
    parts: list[str] = field(default_factory=lambda: ["llm", "speech_encoder", "audio_encoder"])
    """Parts whose nn.Linear layers are quantized: any of llm, speech_encoder, audio_encoder, qformer, projector."""
    scheme: Scheme = "int8_weight_only"
    """int8_weight_only (weights int8, matmul in the activation dtype: on a V100, float16 compute) or int8_dynamic (int8
    activations too). Neither decodes faster than float32 on a CPU with torch 2.13 / torchao 0.18 (both cast or
    quantize per call; `python -m evaluation.int8_speed` measures it): int8 buys bytes here, not CPU time."""
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    """Module names (or name suffixes after a dot) left in floating point."""
    check_text: str = "USER: Describe the audio.\nASSISTANT: a high tone followed by three short beeps"
    """Text whose LLM logits compare the floating-point and int8 models (reported in quantization.json)."""


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


def main(argv: list[str] | None = None) -> int:
    import torchao

    cfg, force = parse_cli(JobConfig, argv)
    source = Path(cfg.model)
    if not (source / MODEL_CONFIG).is_file():
        raise SystemExit(f"config error: model {cfg.model!r} is not a student folder (no {MODEL_CONFIG})")
    out = Path(cfg.output_dir)
    if stage_is_current(cfg, out / "model", inputs=[cfg.model]) and not force:
        print(f"int8 student up to date: {out / 'model'} (use --force to quantize again)")
        return 0
    if force:
        shutil.rmtree(out, ignore_errors=True)
    save_resolved(cfg, out)
    model = load_student_folder(source)
    salmonn_cfg = merge_lora(model, read_salmonn_config(source))
    try:
        names = linear_names(model, cfg.parts, cfg.skip)
    except ValueError as err:
        raise SystemExit(f"config error: {err}") from None
    parts = model.parts()
    before = weight_bytes(model, parts)
    reference = llm_logits(model, cfg.check_text)
    quantize_modules(model, names, cfg.scheme)
    after = weight_bytes(model, parts)
    logits = llm_logits(model, cfg.check_text)
    diff = (logits - reference).abs().max().item()
    info = {"torchao": torchao.__version__, "scheme": cfg.scheme, "parts": cfg.parts, "skip": cfg.skip,
            "modules": names, "source": str(source), "weight_bytes_before": before, "weight_bytes_after": after,
            "check": {"text": cfg.check_text, "max_abs_logit_diff_vs_float": diff,
                      "logit_range_float": [reference.min().item(), reference.max().item()]}}
    save_int8_folder(model, dataclasses.replace(salmonn_cfg), out / "model", info)
    again = load_int8_folder(out / "model")
    if not torch.equal(llm_logits(again, cfg.check_text), logits):
        raise SystemExit(f"{out / 'model'}: the reloaded int8 model does not reproduce the saved one's logits")
    mark_stage_done(cfg, out / "model", inputs=[cfg.model])
    print(f"{len(names)} linear layers → int8 ({cfg.scheme}); weights {before['total']:,} → {after['total']:,} bytes; "
          f"max |Δ logit| vs float on the check text {diff:.4g}; reload reproduces the logits → {out / 'model'}")
    return 0


if __name__ == "__main__":
    run(main)
