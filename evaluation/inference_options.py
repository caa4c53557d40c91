"""Inference speed-ups of a SALMONN-shaped model that leave its outputs unchanged: the attention code of its Hugging
Face parts (eager or SDPA), a static KV cache instead of the growing dynamic one, and `torch.compile` of the LLM's
decode step (over the static cache) and of the audio path (both encoders, Q-Former, projector: the audio part of
TTFT).

`OptionModel` wraps a loaded `teacher.salmonn.Salmonn` (teacher, student, pruned or int8 alike) with one
`InferenceOption`, sharing its weights, so that several options can be timed on the same model in one process
(`evaluation.speedups`). Attention is a setting of the shared HF modules, so it is applied around each use with
`attention_applied` rather than held by the wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from common.model import AudioLanguageModel, Batch

ATTENTIONS = ("", "eager", "sdpa")
"""An option's attention: "" keeps what the model was loaded with; "eager" is HF's eager code; "sdpa" is torch's
`scaled_dot_product_attention`, whichever kernel it picks."""


@dataclass(frozen=True)
class InferenceOption:
    """One way to run a model's TTFT / TPOT path. The defaults are the harness as it runs today."""

    attention: Literal["", "eager", "sdpa"] = ""
    """"" keeps the attention each HF part was loaded with; "eager": HF's eager code; "sdpa": torch's
    `scaled_dot_product_attention`. Parts without it in transformers keep theirs (Gemma-2 has no SDPA)."""
    static_cache: bool = False
    """Prefill into a preallocated `transformers.StaticCache` (as long as the longest timed prefill + decode steps)
    and decode in place, instead of a `DynamicCache` that concatenates one position per step."""
    compile_decode: bool = False
    """`torch.compile` the LLM's decode step (needs `static_cache`: with a growing cache every step is a new shape)."""
    compile_encoders: bool = False
    """`torch.compile` `encode_audio` (Whisper, BEATs, Q-Former, projector): what TTFT spends before the prefill."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {self.attention!r}")
        if self.compile_decode and not self.static_cache:
            raise ValueError("compile_decode needs static_cache: a dynamic cache changes shape at every step, so "
                             "the compiled step would recompile at every position")


OPTIONS: dict[str, InferenceOption] = {
    "baseline": InferenceOption(),
    "eager_attention": InferenceOption(attention="eager"),
    "sdpa_attention": InferenceOption(attention="sdpa"),
    "static_cache": InferenceOption(static_cache=True),
    "compile_decode": InferenceOption(static_cache=True, compile_decode=True),
    "compile_encoders": InferenceOption(compile_encoders=True),
    "all_compiled": InferenceOption(static_cache=True, compile_decode=True, compile_encoders=True),
}
"""The options `evaluation.speedups` times, by name; "baseline" is the harness as it runs today."""


class OptionModel(AudioLanguageModel):
    """`model` run with `option` (attention aside: see `attention_applied`); the same weights, no copy.

    Args:
        model: a `teacher.salmonn.Salmonn` (it provides `wrap` and `llm` besides the evaluation interface).
        option: what to change.
        max_cache_len: positions of the static cache: the longest prefill (prompt + audio tokens) plus the decode
            steps that follow it. Ignored without `option.static_cache`.
    """

    def __init__(self, model: AudioLanguageModel, option: InferenceOption, max_cache_len: int = 0) -> None:
        super().__init__()
        if option.static_cache and max_cache_len < 1:
            raise ValueError("static_cache needs max_cache_len ≥ 1 (longest prefill + decode steps)")
        self.model = model
        self.option = option
        self.max_cache_len = max_cache_len
        self._caches: dict[int, Any] = {}  # batch size → StaticCache, allocated on first use and reused
        self._encode = torch.compile(model.encode_audio) if option.compile_encoders else model.encode_audio
        self._step = torch.compile(self._static_step, dynamic=False) if option.compile_decode else self._static_step

    def parts(self) -> dict[str, nn.Module]:
        return self.model.parts()

    def encode_audio(self, batch: Batch) -> Tensor:
        return self._encode(batch)

    def prefill(self, audio_embeds: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Any]:
        if not self.option.static_cache:
            return self.model.prefill(audio_embeds, prompts)
        inputs, mask, _ = self.model.wrap(audio_embeds, prompts, left_pad=True)
        rows, length = mask.shape
        if length >= self.max_cache_len:
            raise ValueError(f"the prefill holds {length} positions but the static cache only {self.max_cache_len} "
                             "(max_cache_len must cover the longest prompt + audio tokens + decode steps)")
        cache = self._static_cache(rows)
        cache.reset()  # zeroed keys and values, length 0: a fresh cache without a new allocation
        # The mask spans the whole cache (one shape for every step); positions past the last written one are 0.
        full_mask = mask.new_zeros(rows, self.max_cache_len)
        full_mask[:, :length] = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens, as `Salmonn.prefill`
        out = self.model.llm(inputs_embeds=inputs, attention_mask=full_mask, position_ids=positions,
                             cache_position=torch.arange(length, device=mask.device), past_key_values=cache,
                             use_cache=True)
        return out.logits[:, -1], {"static_cache": cache, "attention_mask": full_mask, "length": length}

    def decode_step(self, token_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
        if not self.option.static_cache:
            return self.model.decode_step(token_ids, cache)
        length = cache["length"]
        if length >= self.max_cache_len:
            raise ValueError(f"static cache full at {self.max_cache_len} positions; raise max_cache_len")
        mask = cache["attention_mask"]
        mask[:, length] = 1
        logits = self._step(token_ids, mask, torch.tensor([length], device=mask.device), cache["static_cache"])
        return logits, {**cache, "length": length + 1}

    def _static_step(self, token_ids: Tensor, mask: Tensor, cache_position: Tensor, cache: Any) -> Tensor:
        """One decode step into the static cache: `[batch, 1]` tokens → next-token logits `[batch, vocab]`. Only
        tensors of fixed shape and the cache object enter, so the compiled step traces once for every position."""
        positions = mask.sum(-1, keepdim=True) - 1
        return self.model.llm(input_ids=token_ids, attention_mask=mask, position_ids=positions,
                              cache_position=cache_position, past_key_values=cache, use_cache=True).logits[:, -1]

    def _static_cache(self, rows: int) -> Any:
        if rows not in self._caches:
            self._caches[rows] = static_cache(self.model.llm.config, self.max_cache_len)
        return self._caches[rows]

    def generate(self, batch: Batch, prompts: Sequence[str], max_new_tokens: int = 64, num_beams: int = 1,
                 **generation_kwargs: Any) -> list[str]:
        """The model's own `generate` (the options change the timed TTFT / TPOT path, not full decoding)."""
        return self.model.generate(batch, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   **generation_kwargs)


def with_option(model: AudioLanguageModel, option: InferenceOption, clips: Sequence[Batch], prompt: str,
                decode_steps: int) -> AudioLanguageModel:
    """`model` itself for the default option (the harness unchanged), else an `OptionModel` whose static cache holds
    the longest prefill of `clips` plus `decode_steps` (clips already on the model's device). A compiled option has run
    every clip once before it is returned, so that no compilation falls into a timed run."""
    if option == InferenceOption():
        return model
    longest = max(prefill_length(model, clip, prompt) for clip in clips) if option.static_cache else 0
    wrapped = OptionModel(model, option, longest + decode_steps + 1)
    if option.compile_decode or option.compile_encoders:
        for clip in clips:
            greedy_tokens(wrapped, clip, prompt, decode_steps)
    return wrapped


def static_cache(config: Any, max_cache_len: int) -> Any:
    """A `transformers.StaticCache` of `max_cache_len` positions for an LLM with `config`.

    Sliding-window layers (Gemma-2's every other layer) whose window covers the whole cache get a plain static layer
    instead: they attend to the same positions, and transformers' sliding static layer counts its length in a Python
    int, which a compiled step guards on, recompiling at every position.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [StaticLayer(max_cache_len=max_cache_len)
                    if getattr(layer, "is_sliding", False) and layer.max_cache_len == max_cache_len else layer
                    for layer in cache.layers]
    return cache


def prefill_length(model: AudioLanguageModel, clip: Batch, prompt: str) -> int:
    """LLM positions of the prefill of `clip` with `prompt` (BOS, prompt pieces, audio tokens): runs `encode_audio`."""
    with torch.inference_mode():
        inputs, _, _ = model.wrap(model.encode_audio(clip), [prompt], left_pad=True)
    return inputs.shape[1]


def hf_models(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [module for module in model.modules() if isinstance(module, PreTrainedModel)]


@contextlib.contextmanager
def attention_applied(model: nn.Module, attention: str) -> Iterator[dict[str, str]]:
    """Within the block, the HF parts of `model` use `attention` ("" changes nothing); after it, each has its own
    again. Yields class name → the implementation each part actually runs (a part whose architecture has no such
    implementation in transformers keeps its own, e.g. Gemma-2 under "sdpa", and says so)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    parts = hf_models(model)
    before = [part.config._attn_implementation for part in parts]
    refused = set()
    try:
        if attention:
            for part in parts:
                if part.config._attn_implementation != attention:
                    try:
                        part.set_attn_implementation(attention)
                    except ValueError:  # transformers has no such code for this architecture (Gemma-2: no SDPA)
                        refused.add(id(part))
        yield {type(part).__name__: part.config._attn_implementation
               + (f" (transformers has no {attention} for it)" if id(part) in refused else "") for part in parts}
    finally:
        for part, implementation in zip(parts, before, strict=True):
            if part.config._attn_implementation != implementation:
                part.set_attn_implementation(implementation)


def greedy_tokens(model: AudioLanguageModel, clip: Batch, prompt: str, steps: int) -> tuple[list[int], Tensor]:
    """What the timed path generates for `clip` (batch 1): the first token after the prefill and `steps` cached decode
    steps, greedy. Returns (the `1 + steps` token ids, their logits `[1 + steps, vocab]` in float32)."""
    with torch.inference_mode():
        logits, cache = model.prefill(model.encode_audio(clip), [prompt])
        rows = [logits[0].float()]
        for _ in range(steps):
            logits, cache = model.decode_step(logits.argmax(-1, keepdim=True), cache)
            rows.append(logits[0].float())
    stacked = torch.stack(rows)
    return stacked.argmax(-1).tolist(), stacked
