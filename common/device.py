"""Where an inference job (teacher cache, evaluation) runs its model, and in which dtype.

`device: auto` takes the GPU when there is one and the CPU otherwise; `dtype: auto` is float16 on a GPU (a V100
has no bf16) and float32 on the CPU. Models cast the batch tensors to their own dtype, so placing the weights is
all an inference job has to do; the batch follows with `move_batch`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Device = str
"""`auto`, `cpu`, `cuda` or `cuda:N`."""
InferenceDtype = Literal["auto", "float32", "float16", "bfloat16"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: Device, where: str = "device") -> torch.device:
    """`auto` → `cuda` if available, else `cpu`; a CUDA device that is not there stops with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"config error: {where}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"config error: {where}={name!r} but this machine has no CUDA GPU; use {where}=auto "
                             "or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"config error: {where}={name!r} but only {torch.cuda.device_count()} GPU(s) are "
                             "visible")
    elif device.type != "cpu":
        raise SystemExit(f"config error: {where}={name!r}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: InferenceDtype, device: torch.device, where: str = "dtype") -> torch.dtype:
    """`auto` → float16 on CUDA, float32 on the CPU; bfloat16 on a GPU without it (a V100) stops with the fix."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise SystemExit(f"config error: {where}={name!r}; use auto, float32, float16 or bfloat16")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"config error: {where}=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16; "
                         "use float16 (or auto)")
    return _DTYPES[name]


def is_quantized(model: nn.Module) -> bool:
    """True when some weight is a tensor subclass (torchao's int8 weights), which keeps its own dtype."""
    return any(type(p.data) is not torch.Tensor for p in model.parameters())


def place_for_inference(model: nn.Module, device: Device = "auto", dtype: InferenceDtype = "auto",
                        where: str = "") -> nn.Module:
    """`model` in eval mode on `device`, its floating weights in `dtype`. int8-quantized weights (torchao) only
    move: their scales keep the dtype they were quantized in; the rest of such a model (embeddings, norms, LM head,
    biases) takes `dtype`, so an int8 model on a V100 computes in float16 like the others (weight-only int8 casts
    its int8 weight to the activations' dtype at each matmul)."""
    prefix = f"{where}." if where else ""
    target = resolve_device(device, prefix + "device")
    wanted = resolve_dtype(dtype, target, prefix + "dtype")
    model = model.to(target)
    if not is_quantized(model):
        model = model.to(wanted)
    else:
        _cast_plain_floating(model, wanted)
    return model.eval()


def _cast_plain_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every plain floating parameter and buffer to `dtype` in place, leaving tensor subclasses (torchao's int8
    weights) alone. `param.data` is replaced, not the Parameter, so tied weights stay tied."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if type(param.data) is torch.Tensor and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if type(buffer) is torch.Tensor and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
