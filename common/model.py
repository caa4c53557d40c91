"""The model interface that every stage (teacher, student, pruned, quantized) implements.

Evaluation code (metrics, the efficiency harness) talks to models only through this interface, so
that every comparison between stages is measured by the same code. A model is an `nn.Module` that
splits its forward pass into the pieces whose cost we report:

    batch ──encode_audio──▶ audio_embeds ──prefill(prompts)──▶ logits, cache ──decode_step──▶ ...
          └───────────────── TTFT (time to first token) ─────┘             └── TPOT (per token) ──┘

A `batch` is whatever the model's collator produced: a mapping from names to tensors whose first
axis is the batch (e.g. `{"mel": [batch, 80, 3000], "fbank": [batch, frames, 128]}`). Evaluation code
never looks inside it except through `batch_size_of`, `move_batch` and `concat_batches` below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

PART_NAMES = ("speech_encoder", "audio_encoder", "qformer_projector", "llm")
"""Keys `AudioLanguageModel.parts()` may use: Whisper encoder, BEATs encoder, Q-Former with its
projection into the LLM's embedding space, and the LLM (with its LoRA adapters, if any)."""

Batch = Mapping[str, Any]


class AudioLanguageModel(nn.Module, ABC):
    """Base class of every model smolt evaluates: encoders → Q-Former + projector → LLM.

    Subclasses implement the five abstract methods; `generate` may be built on `prefill` and
    `decode_step` or call a library's generation loop, as long as the three agree (same prompt
    wrapping, same weights). Models cast batch tensors to their own dtype; callers move the batch to
    `self.device` (see `move_batch`).
    """

    @abstractmethod
    def parts(self) -> dict[str, nn.Module]:
        """The model's parts, keyed by names from `PART_NAMES` (a model without BEATs omits
        `audio_encoder`). Parameters reachable from the model but from no part count as `other`."""

    @abstractmethod
    def encode_audio(self, batch: Batch) -> Tensor:
        """Audio → LLM input embeddings: both encoders, their frame-wise join, the Q-Former and the
        projection. Counted in TTFT.

        Returns `[batch, audio_tokens, llm_dim]`, in the LLM's dtype.
        """

    @abstractmethod
    def prefill(self, audio_embeds: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Any]:
        """Wrap each prompt around its audio tokens (the model's template, e.g. SALMONN's
        `"USER: <Speech><SpeechHere></Speech> {prompt}\\nASSISTANT:"`), tokenize, and run the LLM over
        the whole sequence with a KV cache. Counted in TTFT.

        Args:
            audio_embeds: `[batch, audio_tokens, llm_dim]` from `encode_audio`.
            prompts: one instruction per batch row, without the template.

        Returns:
            `(next_token_logits [batch, vocab], cache)`; the cache is opaque to callers and is only
            passed back to `decode_step`.
        """

    @abstractmethod
    def decode_step(self, token_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """One cached decode step: append `token_ids` `[batch, 1]` to every sequence, attending to the
        cache. Counted in TPOT (one call = one output token per row).

        Returns `(next_token_logits [batch, vocab], cache)` with the cache one position longer.
        """

    @abstractmethod
    def generate(
        self,
        batch: Batch,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        num_beams: int = 1,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Full decoding, as used for WER and SPIDEr and for throughput: one string per batch row,
        without the prompt and without special tokens."""

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (CPU for a model without parameters)."""
        first = next(self.parameters(), None)
        return torch.device("cpu") if first is None else first.device


def batch_size_of(batch: Batch) -> int:
    """Number of rows in a collated batch: the common length of its tensors' first axis (and of its
    lists, e.g. paths). Raises ValueError if they disagree or if the batch holds no tensor or list."""
    sizes = {name: _leading_size(value) for name, value in batch.items()}
    sizes = {name: size for name, size in sizes.items() if size is not None}
    if not sizes:
        raise ValueError(f"batch has no tensors or lists to read a batch size from: keys {list(batch)}")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch entries disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def _leading_size(value: Any) -> int | None:
    if isinstance(value, Tensor):
        return value.shape[0] if value.dim() > 0 else None
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def move_batch(batch: Batch, device: torch.device | str) -> dict[str, Any]:
    """A copy of `batch` with every tensor on `device` (other values pass through unchanged)."""
    # Asynchronous only towards CUDA: a non-blocking copy to the host may be read before it lands.
    non_blocking = torch.device(device).type == "cuda"
    return {
        name: value.to(device, non_blocking=non_blocking) if isinstance(value, Tensor) else value
        for name, value in batch.items()
    }


def concat_batches(batches: Sequence[Batch]) -> dict[str, Any]:
    """Join batches row-wise: tensors with `torch.cat` on axis 0, lists by concatenation; other
    entries (settings shared by every row) must be equal and are kept once.

    For clips collated to the same shapes (fixed-length inputs, as the efficiency harness uses);
    variable-length clips need the model's collator instead, which pads. Raises ValueError if the
    batches have different keys or tensor shapes beyond the first axis.
    """
    keys = list(batches[0])
    if any(list(batch) != keys for batch in batches):
        raise ValueError("batches have different keys")
    return {key: _concat_values([batch[key] for batch in batches], key) for key in keys}


def _concat_values(values: list[Any], key: str) -> Any:
    if isinstance(values[0], Tensor):
        if len({value.shape[1:] for value in values}) != 1:
            raise ValueError(f"'{key}' has different shapes across batches; collate with padding instead")
        return torch.cat(values, dim=0)
    if isinstance(values[0], (list, tuple)):
        return [item for value in values for item in value]
    if all(value == values[0] for value in values):  # a setting shared by every row, e.g. sample rate
        return values[0]
    raise ValueError(f"non-batched entry '{key}' differs across batches: {values}")
