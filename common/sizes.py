"""How big a model is: parameter counts and bytes of its weights as stored, in total and per part. Pruning and
export report them; the efficiency harness (`evaluation.efficiency`) puts them beside its timings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def count_parameters(model: nn.Module, parts: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Parameter counts (elements; a quantized weight counts its logical shape).

    Returns `{"total": int, "trainable": int, "per_part": {part: int, ..., "other": int}}`. A parameter
    shared by several parts (tied weights) counts once, under the first part that holds it; `other`
    holds the model's parameters that no part holds. Raises ValueError if a part holds a parameter the
    model does not.
    """
    params = {id(p): p for p in model.parameters()}
    owner = _assign_to_parts({name: dict(_unique_params(part)) for name, part in parts.items()}, params)
    per_part = {name: 0 for name in [*parts, "other"]}
    for key, param in params.items():
        per_part[owner.get(key, "other")] += param.numel()
    return {
        "total": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "per_part": per_part,
    }


def weight_bytes(model: nn.Module, parts: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Bytes of the weights as stored: over the state dict's tensors (parameters and persistent
    buffers, tied tensors once), numel × element size; for tensor subclasses (torchao's quantized
    weights) the bytes of their inner tensors (int8 data, scales, zero points).

    Returns `{"total": int, "per_part": {part: int, ..., "other": int}}`, bytes.
    """
    tensors = _unique_state_tensors(model)
    owner = _assign_to_parts({name: _unique_state_tensors(part) for name, part in parts.items()}, tensors)
    per_part = {name: 0 for name in [*parts, "other"]}
    for key, tensor in tensors.items():
        per_part[owner.get(key, "other")] += tensor_bytes(tensor)
    return {"total": sum(per_part.values()), "per_part": per_part}


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes a tensor holds: numel × element size, or, for a wrapper subclass such as torchao's
    `Int8Tensor`, the sum over its inner tensors (whose element sizes are the stored ones)."""
    if is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in inner_names)
        return sum(tensor_bytes(t) for t in inner if t is not None)
    return tensor.numel() * tensor.element_size()


def _unique_params(module: nn.Module) -> Iterator[tuple[int, Tensor]]:
    return ((id(p), p) for p in module.parameters())


def _unique_state_tensors(module: nn.Module) -> dict[int, Tensor]:
    # keep_vars keeps the Parameter objects themselves, so tied weights share an id.
    state = module.state_dict(keep_vars=True)
    return {id(value): value for value in state.values() if isinstance(value, Tensor)}


def _assign_to_parts(part_tensors: Mapping[str, Mapping[int, Tensor]], model_tensors: Mapping[int, Tensor]
                     ) -> dict[int, str]:
    """id → name of the first part holding it."""
    owner: dict[int, str] = {}
    for name, tensors in part_tensors.items():
        foreign = set(tensors) - set(model_tensors)
        if foreign:
            raise ValueError(f"part '{name}' holds {len(foreign)} tensors that are not the model's")
        for key in tensors:
            owner.setdefault(key, name)
    return owner
