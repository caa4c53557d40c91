"""Decoding clips with any `common.model.AudioLanguageModel`: what validation during training, evaluation and
sequence-level KD share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from common.dataset import AudioTextCollator
from common.model import AudioLanguageModel, move_batch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    num_beams: int = 1
    repetition_penalty: float = 1.0


@torch.inference_mode()
def decode(model: AudioLanguageModel, dataset, indices: list[int], batch_size: int,
           generation: GenerationConfig) -> list[str]:
    """The model's output text for each of `dataset[i]`, `i` in `indices`, in that order.

    `dataset` is an `AudioTextDataset` (items with features and `prompt`; `durations` in seconds). Clips are decoded
    `batch_size` at a time, in order of duration, so that a batch holds clips of similar length (less padding in
    BEATs and in the left-padded prompts).
    """
    collate = AudioTextCollator()
    order = sorted(indices, key=lambda i: dataset.durations[i])
    out: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="decode", unit="batch", leave=False, disable=None):
        ids = order[start : start + batch_size]
        batch = collate([dataset[i] for i in ids])
        batch = move_batch(batch, model.device)
        texts = model.generate(batch, batch["prompts"], max_new_tokens=generation.max_new_tokens,
                               num_beams=generation.num_beams, repetition_penalty=generation.repetition_penalty)
        out.update(zip(ids, texts, strict=True))
    return [out[i] for i in indices]
