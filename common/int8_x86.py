"""A linear layer for CPU deployment in int8: int8 weights, activations quantized at run time, FBGEMM's int8 GEMM
(PyTorch's x86 quantized engine; the kernel behind `torch.ao.nn.quantized.dynamic.Linear`).

`X86DynamicLinear` holds plain tensors, so it saves and loads like any module (safetensors, `load_state_dict`):

    weight              int8    [out, in]   per output row, symmetric: float weight ≈ weight_scale[:, None] × weight
    weight_scale        float32 [out]
    weight_zero_point   int64   [out]       all 0 (symmetric), kept so the stored layout is the general one
    bias                float32 [out]       (when the layer has one)

and, built from them whenever they change (`pack`, also after `load_state_dict`), FBGEMM's packed copy of the weight
that the forward pass reads. At each call the input is quantized to uint8 with one scale for the whole input (per
tensor, from its min and max; for a decode step that is the one row), using 7 of the 8 bits (`reduce_range`, as
PyTorch does on x86: without VNNI, FBGEMM's u8 × s8 pair sums would saturate int16), multiplied in int8 with int32
accumulation, and the result comes back in float32 (then in the input's dtype).

It runs on x86 CPUs only (the `x86`/`fbgemm` quantized engine); on a GPU, use torchao's weight-only int8
(`prune.int8`, scheme `int8_weight_only`). RAM holds the int8 weight twice (the tensor above and the packed copy);
weight bytes count the stored one. `torch.utils.flop_counter` counts its matmul like a float one's (the analytic
FLOPs of `evaluation.analytic` stay those of the model's shapes).
"""

from __future__ import annotations

import contextlib
import math
import platform
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

ENGINES = ("x86", "fbgemm")
WEIGHT_MAX = 127
"""Weights use [-127, 127]: symmetric, and with activations in [0, 127] a pair of products fits int16."""


def check_engine() -> None:
    """Raise RuntimeError (naming the fix) if this PyTorch build has no x86/fbgemm quantized engine."""
    supported = torch.backends.quantized.supported_engines
    if not any(engine in supported for engine in ENGINES):
        raise RuntimeError(f"scheme int8_dynamic_x86 needs PyTorch's x86 (FBGEMM) quantized engine, which this build "
                           f"lacks (engines: {supported}; machine: {platform.machine()}). It "
                           "exists in PyTorch's x86 Linux/Windows builds; elsewhere use scheme int8_weight_only.")


@contextlib.contextmanager
def x86_engine() -> Iterator[None]:
    """Select the x86 quantized engine while weights are packed (packing follows the global engine), then restore."""
    check_engine()
    before, supported = torch.backends.quantized.engine, torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = before if before in ENGINES else next(e for e in ENGINES if e in supported)
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8 of a float weight `[out, in]`: (int8 `[out, in]`, float32 scale `[out]`),
    scale = max |row| / 127 (a zero row gets scale 1, so it stays exactly zero)."""
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / WEIGHT_MAX, torch.ones_like(amax))
    qdata = torch.round(weight / scale[:, None]).clamp(-WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)
    return qdata, scale


class X86DynamicLinear(nn.Module):
    """`y = x Wᵀ + b` with W in int8 and x quantized per call (see the module docstring). Input `[..., in]` in any
    float dtype on the CPU; output `[..., out]` in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        check_engine()
        self.in_features, self.out_features = in_features, out_features
        # an int8 Parameter (never trained) so parameter counts see the layer's logical shape
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed = None
        self.pack()

    @classmethod
    def from_float(cls, linear: nn.Linear) -> X86DynamicLinear:
        """The int8 layer for a float `nn.Linear` (its weight quantized by `quantize_weight`, its bias in float32)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        qdata, scale = quantize_weight(linear.weight)
        module.weight.data.copy_(qdata)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach().float())
        module.pack()
        return module

    def pack(self) -> None:
        """Rebuild FBGEMM's packed weight from `weight`, `weight_scale`, `weight_zero_point` and `bias`."""
        with warnings.catch_warnings(), x86_engine():
            # PyTorch 2.13 warns that quantized-dtype tensors are deprecated; FBGEMM's prepack still takes only them
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight.detach().cpu(), self.weight_scale.detach().cpu().double(),
                self.weight_zero_point.detach().cpu().long(), 0)
            bias = None if self.bias is None else self.bias.detach().cpu().float()
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def _apply(self, fn, recurse=True):
        # fail where the model is moved (`model.to("cuda")`), not at its first token
        module = super()._apply(fn, recurse)
        if self.weight.device.type != "cpu":
            raise RuntimeError(f"X86DynamicLinear (scheme int8_dynamic_x86) runs on the CPU only, not on "
                               f"{self.weight.device}; quantize with scheme int8_weight_only for a GPU")
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the common case first, with no conversions: a decode step makes ~30 of these calls of ~15 µs each
        if x.is_cpu and x.dtype is torch.float32:
            return torch.ops.quantized.linear_dynamic.default(x, self._packed, True)  # True: reduce_range (docstring)
        if not x.is_cpu:
            raise RuntimeError(f"X86DynamicLinear (scheme int8_dynamic_x86) runs on the CPU only, got input on "
                               f"{x.device}; quantize with scheme int8_weight_only for a GPU")
        return torch.ops.quantized.linear_dynamic.default(x.float(), self._packed, True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _linear_dynamic_flops(input_shape, packed, *args, out_shape=None, **kwargs) -> int:
    """2 × rows × in × out, as for `F.linear` (the packed weight is opaque; the output's shape gives `out`)."""
    return 2 * math.prod(input_shape) * out_shape[-1]


if hasattr(torch.ops.quantized, "linear_dynamic"):  # builds without quantized ops fail in check_engine instead
    register_flop_formula(torch.ops.quantized.linear_dynamic)(_linear_dynamic_flops)
