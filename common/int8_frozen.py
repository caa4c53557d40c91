"""Frozen parts held in int8 while LoRA adapters train over them (`model.llm.int8_frozen`, `model.whisper.int8_frozen`).

Every `nn.Linear` of a frozen part gets torchao's int8 weight-only tensor (`Int8Tensor`, as `Int8WeightOnlyConfig`
makes it: per output row, symmetric, `qdata` int8 `[out, in]` and an fp32 `scale` `[out, 1]`, also for fp16
weights; `int8_weight` says where its scale differs), so its weights take 1 byte per parameter (+ 4 per row)
instead of 4 (fp32) or 2 (fp16). The matmul runs in the activation dtype on the int8 weight cast back: it works on
any CPU and on GPUs without int8 tensor cores or bf16 (a V100 runs it with fp16 activations). peft wraps such layers
in `TorchaoLoraLinear`, whose adapters are plain fp32 (or the LLM's dtype) parameters; gradients flow through the
int8 matmul into them, and the int8 weights (`requires_grad=False`) are never updated. bitsandbytes (LLM.int8,
4-bit) is not installed here and is not used.

Embeddings and a head tied to them stay in floating point: only linear layers are quantized.

What leaves the process is always plain floating point (`plain_state`): a model folder's `llm/` and `whisper/` hold
the dequantized weights (exactly the values the int8 tensors stand for, in the part's dtype), so every existing
loader reads them; a folder whose salmonn.yaml keeps `int8_frozen: true` quantizes them again when it is loaded, to
the same int8 values (`int8_weight` picks a grid that quantizing its own dequantized values gives back).
`dequantize_linears` turns a part back into plain floating point, e.g. before LoRA is merged into the LLM for
pruning or export.
"""

from __future__ import annotations

import torch
from torch import nn


def is_int8(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is one of torchao's quantized tensors (the int8 weight of a frozen linear layer)."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:  # torchao not installed: nothing can be int8
        return False
    return isinstance(tensor, TorchAOBaseTensor)


def frozen_linear_names(part: nn.Module) -> list[str]:
    """Names (in `part`) of its `nn.Linear` layers whose weight is not shared with an embedding (a tied LM head)."""
    embeddings = {id(m.weight) for m in part.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in part.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in embeddings and not is_int8(m.weight)]


def int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` `[out, in]` as torchao's int8 weight-only tensor (`Int8Tensor`, per output row, symmetric): int8
    `qdata` = round(w / scale) in [-127, 127] and an fp32 `scale` `[out, 1]` = max |w| of the row / 127.

    torchao's own choice (`Int8WeightOnlyConfig`) divides by 127.5 instead; then quantizing the dequantized weights
    again lands on another grid. With 127 it lands on the same one, so a model folder, which holds the dequantized
    weights, loads back with the very int8 values it was trained over."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    data = weight.detach()
    scale = data.abs().amax(dim=1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).eps) / 127
    return Int8Tensor.from_hp(data, PerRow(), scale=scale)


class _Int8Linear(torch.autograd.Function):
    """y = x · Wᵀ for an int8 weight W = scale · qdata, keeping only the int8 weight for backward.

    Called on torchao's tensor directly, autograd would save the floating-point copy of W that the int8 matmul casts
    to the activations' dtype, for every layer until backward: the whole frozen base in fp32 again, and no memory
    saved in training. Here the forward runs without autograd and the backward rebuilds one layer's copy at a time:
    dL/dx = (dL/dy · scale) · qdata. The weight is frozen, so it gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight  # a frozen parameter the module holds anyway: a reference costs nothing
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.weight
        scaled = grad * weight.scale.to(grad.dtype).flatten()
        return scaled @ weight.qdata.to(grad.dtype), None


class Int8FrozenLinear(nn.Linear):
    """An `nn.Linear` whose weight is int8 (`int8_weight`) and frozen: the same module, state and names, with a
    forward that keeps only the int8 weight for backward (`_Int8Linear`). With a plain weight (after
    `dequantize_linears`) it is an ordinary `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_int8(self.weight):
            return super().forward(x)
        y = _Int8Linear.apply(x, self.weight) if torch.is_grad_enabled() and x.requires_grad else \
            torch.nn.functional.linear(x, self.weight)
        return y + self.bias if self.bias is not None else y


def quantize_frozen(part: nn.Module) -> list[str]:
    """Give every linear layer of `part` (see `frozen_linear_names`) an int8 weight (`int8_weight`) in place; the
    part's parameters are frozen (`requires_grad=False`). Call it before LoRA is applied (peft then wraps the int8
    layers in `TorchaoLoraLinear`). Each layer becomes an `Int8FrozenLinear` by a class swap (as
    `torch.nn.utils.parametrize` does it): the module, its hooks and every reference to it stay. Returns the
    quantized layers' names."""
    names = frozen_linear_names(part)
    part.requires_grad_(False)
    for name in names:
        module = part.get_submodule(name)
        if type(module) is not nn.Linear:
            raise TypeError(f"{name}: {type(module).__name__} is not a plain nn.Linear; int8_frozen swaps only those")
        module.weight = nn.Parameter(int8_weight(module.weight), requires_grad=False)
        module.__class__ = Int8FrozenLinear
    return names


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a plain tensor: an int8 weight dequantized to its floating-point dtype, anything else as it is."""
    return tensor.dequantize() if is_int8(tensor) else tensor


def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every int8 weight dequantized (`plain`): what safetensors and HF `save_pretrained` take."""
    return {name: plain(tensor) for name, tensor in state.items()}


def dequantize_linears(part: nn.Module) -> int:
    """Replace every int8 linear weight in `part` by a plain, frozen floating-point parameter, and each
    `Int8FrozenLinear` by the plain `nn.Linear` it was (tools such as torch-pruning dispatch on the exact type);
    returns how many layers."""
    count = 0
    for module in part.modules():
        if isinstance(module, nn.Linear) and is_int8(module.weight):
            module.weight = nn.Parameter(module.weight.dequantize().detach().clone(), requires_grad=False)
            count += 1
        if type(module) is Int8FrozenLinear:
            module.__class__ = nn.Linear
    return count


def weight_bytes(part: nn.Module) -> dict[str, int]:
    """Bytes of `part`'s parameters: `int8` (the quantized weights: int8 values + scales), `int8_as_fp32` (what the
    same weights take in fp32, 4 bytes each), `other` (every other parameter, e.g. embeddings and adapters)."""
    out = {"int8": 0, "int8_as_fp32": 0, "other": 0}
    seen = set()
    for p in part.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_int8(p):
            out["int8"] += p.qdata.numel() * p.qdata.element_size() + p.scale.numel() * p.scale.element_size()
            out["int8_as_fp32"] += p.numel() * 4
        else:
            out["other"] += p.numel() * p.element_size()
    return out


def int8_config_error(key: str, trains: str, fix: str) -> str:
    """The message for an `int8_frozen` part that would train: names the key, why, and the fix."""
    return (f"config error: {key}: true, but {trains}; int8 weights cannot be trained (only LoRA adapters over them "
            f"can). Fix: {fix}")
