"""FLOPs and bytes moved per output token (decode step) and per prefill, from a model's shapes.

They do not move between runs, and they explain measured time ratios: a batch-1 decode step reads every LLM weight
once plus the KV cache, so on any machine its time is at least `bytes / memory bandwidth` (the TPOT floor);
prefill is closer to compute-bound.

What is counted (multiply-add = 2 FLOPs; bytes as stored, so int8 weights count their int8 data and scales):
  - LLM linear FLOPs per token: 2 × Σ in × out over every `nn.Linear` (and `X86DynamicLinear`) in the LLM (LM head
    and LoRA adapters included; a quantized weight counts its logical shape).
  - Attention FLOPs per token attending `c` positions: 4 × layers × heads × head_dim × c (QKᵀ and AV).
  - Decode bytes: every LLM tensor once, except the input embedding, of which one row is read (unless it is tied to
    the LM head, which reads all of it); plus the KV cache read: 2 × layers × kv_heads × head_dim × c × element size.
  - Prefill of `t` tokens: t × the linear FLOPs, attention over the full t × t square (what eager and SDPA's math
    kernel compute before masking), every LLM tensor once, the KV cache written; the encoders (Whisper, BEATs,
    Q-Former, projector) are counted by `torch.utils.flop_counter.FlopCounterMode` over one `encode_audio` call (the
    shapes of every matmul, convolution and attention it dispatches) and read their weights once.
Norms, softmax, activations and rotary embeddings are left out (a few FLOPs per element, not per weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.int8_x86 import X86DynamicLinear
from common.sizes import tensor_bytes


@dataclass
class LLMShape:
    """The shapes that set a decoder LLM's per-token cost."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    linear_params: int
    """Σ in × out over the LLM's `nn.Linear` layers, elements (logical shape)."""
    weight_bytes: int
    """Bytes of every LLM tensor (parameters and persistent buffers, tied ones once)."""
    embedding_bytes_skipped: int
    """Bytes of the input embedding a decode step does not read (all but one row; 0 when tied to the LM head)."""
    kv_element_bytes: int
    """Bytes of one KV-cache element (the LLM's activation dtype)."""


def llm_shape(llm: nn.Module) -> LLMShape:
    """Shapes of a Hugging Face causal LM (`config.num_hidden_layers`, heads, KV heads, head_dim, hidden size)."""
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = {id(t): t for t in llm.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    embedding = llm.get_input_embeddings().weight
    output = llm.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    row_bytes = tensor_bytes(embedding) // embedding.shape[0]
    return LLMShape(
        layers=config.num_hidden_layers, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim, hidden=config.hidden_size,
        linear_params=sum(m.in_features * m.out_features for m in llm.modules()
                          if isinstance(m, (nn.Linear, X86DynamicLinear))),
        weight_bytes=sum(tensor_bytes(t) for t in state.values()),
        embedding_bytes_skipped=0 if tied else tensor_bytes(embedding) - row_bytes,
        kv_element_bytes=embedding.element_size() if embedding.is_floating_point() else 2,
    )


def kv_cache_bytes(shape: LLMShape, positions: float) -> float:
    """Bytes of keys and values for `positions` cached positions."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * positions * shape.kv_element_bytes


def attention_flops(shape: LLMShape, queries: float, keys: float) -> float:
    """QKᵀ and AV for `queries` query positions over `keys` key positions, FLOPs."""
    return 4 * shape.layers * shape.heads * shape.head_dim * queries * keys


def decode_cost(shape: LLMShape, context: float) -> dict[str, float]:
    """One decode step attending `context` positions (the cache plus the new token): FLOPs and bytes moved."""
    weights = shape.weight_bytes - shape.embedding_bytes_skipped
    kv = kv_cache_bytes(shape, context)
    return {"flops": 2 * shape.linear_params + attention_flops(shape, 1, context), "bytes": weights + kv,
            "weight_bytes": weights, "kv_cache_bytes": kv, "context_tokens": context}


def prefill_cost(shape: LLMShape, tokens: int) -> dict[str, float]:
    """The LLM's prefill over `tokens` positions: FLOPs and bytes moved (weights once, the KV cache written)."""
    kv = kv_cache_bytes(shape, tokens)
    return {"flops": 2 * shape.linear_params * tokens + attention_flops(shape, tokens, tokens),
            "bytes": shape.weight_bytes + kv, "weight_bytes": shape.weight_bytes, "kv_cache_bytes": kv,
            "tokens": tokens}


def counted_flops(fn, *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """`fn(*args, **kwargs)` and the FLOPs `FlopCounterMode` counts from the shapes of what it dispatches.

    Parameters are frozen meanwhile: the counter's module tracker hooks the backward of any that require grad, which
    fails in inference mode."""
    params = [p for arg in args if isinstance(arg, nn.Module) for p in arg.parameters() if p.requires_grad]
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        params += [p for p in owner.parameters() if p.requires_grad]
    try:
        for param in params:
            param.requires_grad_(False)
        with FlopCounterMode(display=False) as counter:
            result = fn(*args, **kwargs)
    finally:
        for param in params:
            param.requires_grad_(True)
    return result, counter.get_total_flops()


def cached_length(cache: Any) -> int | None:
    """Positions in a decoding state that holds an HF cache under `past_key_values` (dict entry or attribute)."""
    past = cache.get("past_key_values") if isinstance(cache, Mapping) else getattr(cache, "past_key_values", None)
    return None if past is None else int(past.get_seq_length())


@torch.no_grad()
def model_costs(model: nn.Module, clip: Mapping[str, Any], prompt: str, decode_steps: int) -> dict[str, Any] | None:
    """Analytic costs of one clip as the harness times it: TTFT's work (encoders + LLM prefill) and a decode step at
    the mean context of the timed steps (the prompt plus steps 1..`decode_steps`). None when the model has no
    Hugging Face LLM under `.llm` (the formulas need its config)."""
    llm = getattr(model, "llm", None)
    if llm is None or not hasattr(llm, "config") or not hasattr(llm, "get_input_embeddings"):
        return None
    shape = llm_shape(llm)
    audio, encoder_flops = counted_flops(model.encode_audio, clip)
    _, cache = model.prefill(audio, [prompt])
    prompt_tokens = cached_length(cache)
    if prompt_tokens is None:
        return None
    llm_ids = {id(t) for t in llm.state_dict(keep_vars=True).values()}
    encoder_bytes = sum(tensor_bytes(t) for key, t in {id(t): t for t in model.state_dict(keep_vars=True).values()
                                                        if isinstance(t, torch.Tensor)}.items() if key not in llm_ids)
    prefill = prefill_cost(shape, prompt_tokens)
    mean_context = prompt_tokens + (decode_steps + 1) / 2  # step i attends prompt + i positions
    return {
        "shape": asdict(shape),
        "prompt_tokens": prompt_tokens,
        "decode": decode_cost(shape, mean_context),
        "prefill": {**prefill, "llm_flops": prefill["flops"], "encoder_flops": encoder_flops,
                    "encoder_weight_bytes": encoder_bytes, "flops": prefill["flops"] + encoder_flops,
                    "bytes": prefill["bytes"] + encoder_bytes},
    }
