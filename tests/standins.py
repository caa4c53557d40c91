"""A tiny `AudioLanguageModel` built from real parts, for tests that need a whole model.

Speech encoder: a 2-layer `transformers` WhisperEncoder (expects exactly 2 × `max_source_positions`
mel frames). Audio encoder: a linear map of fbank frames, standing in for BEATs. The two are joined
frame by frame on the feature axis as SALMONN does, then the projector maps windows of frames to one
LLM token each, standing in for the window-level Q-Former. LLM: a tiny `LlamaForCausalLM` with a real
KV cache. Prompts go through a character-level tokenizer and SALMONN's template.

Import as `from standins import StandInModel, make_clip` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.model import AudioLanguageModel, Batch

PROMPT_TEMPLATE = "USER: <Speech><SpeechHere></Speech> {}\nASSISTANT:"


class CharTokenizer:
    """Lower-cased characters → ids; unknown characters → `unk_id`. Ids 0–3 are special."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    charset = string.ascii_lowercase + string.digits + " .,:?!'\n<>/"

    def __init__(self) -> None:
        self._ids = {char: index + 4 for index, char in enumerate(self.charset)}
        self._chars = {index: char for char, index in self._ids.items()}

    @property
    def vocab_size(self) -> int:
        return 4 + len(self.charset)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(char, self.unk_id) for char in text.lower()]

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first end symbol, special tokens dropped."""
        chars = []
        for token in ids:
            if token == self.eos_id:
                break
            chars.append(self._chars.get(int(token), ""))
        return "".join(chars)


@dataclass(frozen=True)
class StandInConfig:
    """Sizes of the stand-in; the defaults give a model of about 50 k parameters."""

    mel_bins: int = 80
    """Whisper input channels."""
    audio_frames: int = 50
    """Encoder output frames; Whisper then expects 2 × this many mel frames."""
    encoder_dim: int = 32
    """Whisper width."""
    encoder_layers: int = 2
    """Whisper layers."""
    fbank_bins: int = 16
    """Input channels of the linear audio encoder (one fbank frame per encoder frame)."""
    audio_dim: int = 16
    """Output width of the linear audio encoder."""
    window: int = 5
    """Joined encoder frames per LLM audio token (SALMONN uses 17)."""
    llm_dim: int = 32
    """LLM width."""
    llm_layers: int = 2
    """LLM layers."""
    vocab_size: int = 64
    """LLM vocabulary (at least the tokenizer's)."""


@dataclass
class StandInCache:
    """The stand-in's decoding state: the LLM's KV cache and the attention mask over the cached
    positions `[batch, cached_length]` (0 on left padding)."""

    past_key_values: DynamicCache
    attention_mask: Tensor


class StandInModel(AudioLanguageModel):
    """Tiny SALMONN-shaped model; deterministic for a given `seed`. Greedy decoding only.

    Batches: `{"mel": [batch, mel_bins, 2 * audio_frames], "fbank": [batch, audio_frames, fbank_bins]}`
    (see `make_clip`). Audio tokens per clip: `audio_frames // window`.
    """

    def __init__(self, config: StandInConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config = config or StandInConfig()
        self.tokenizer = CharTokenizer()
        if config.audio_frames % config.window:
            raise ValueError("audio_frames must be a multiple of window")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.speech_encoder = WhisperEncoder(_whisper_config(config))
            self.audio_encoder = nn.Linear(config.fbank_bins, config.audio_dim)
            joined_dim = config.encoder_dim + config.audio_dim
            self.projector = nn.Linear(config.window * joined_dim, config.llm_dim)
            self.llm = LlamaForCausalLM(_llama_config(config, self.tokenizer))
        finally:
            # Building a model must not change the caller's random stream.
            torch.random.set_rng_state(generator_state)
        self.eval()

    def parts(self) -> dict[str, nn.Module]:
        return {
            "speech_encoder": self.speech_encoder,
            "audio_encoder": self.audio_encoder,
            "qformer_projector": self.projector,
            "llm": self.llm,
        }

    def encode_audio(self, batch: Batch) -> Tensor:
        dtype = self.projector.weight.dtype
        speech = self.speech_encoder(batch["mel"].to(dtype)).last_hidden_state  # [B, frames, encoder_dim]
        audio = self.audio_encoder(batch["fbank"].to(dtype))  # [B, frames, audio_dim]
        joined = torch.cat([speech, audio], dim=-1)
        windows = joined.reshape(joined.shape[0], -1, self.config.window * joined.shape[-1])
        return self.projector(windows)  # [B, frames // window, llm_dim]

    def prefill(self, audio_embeds: Tensor, prompts: Sequence[str]) -> tuple[Tensor, StandInCache]:
        rows = [self._wrap(row, prompt) for row, prompt in zip(audio_embeds, prompts, strict=True)]
        embeds, mask = self._left_pad(rows)
        cache = DynamicCache(config=self.llm.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1], StandInCache(out.past_key_values, mask)

    def decode_step(self, token_ids: Tensor, cache: StandInCache) -> tuple[Tensor, StandInCache]:
        mask = torch.cat([cache.attention_mask, torch.ones_like(token_ids)], dim=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        out = self.llm(
            input_ids=token_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache.past_key_values,
            use_cache=True,
        )
        return out.logits[:, -1], StandInCache(out.past_key_values, mask)

    def generate(
        self,
        batch: Batch,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        num_beams: int = 1,
        **generation_kwargs: Any,
    ) -> list[str]:
        if num_beams != 1 or generation_kwargs:
            raise ValueError("the stand-in decodes greedily only (num_beams=1, no other options)")
        logits, cache = self.prefill(self.encode_audio(batch), prompts)
        tokens = []
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(dim=-1)
            tokens.append(next_ids)
            finished |= next_ids == self.tokenizer.eos_id
            if finished.all():
                break
            logits, cache = self.decode_step(next_ids[:, None], cache)
        ids = torch.stack(tokens, dim=1).tolist()
        return [self.tokenizer.decode(row) for row in ids]

    def _wrap(self, audio: Tensor, prompt: str) -> Tensor:
        """[audio_tokens, llm_dim] → [BOS, template before, audio, template after] embeddings."""
        before, after = PROMPT_TEMPLATE.format(prompt).split("<SpeechHere>")
        ids_before = [self.tokenizer.bos_id, *self.tokenizer.encode(before)]
        embed = self.llm.get_input_embeddings()
        as_ids = lambda ids: torch.tensor(ids, dtype=torch.long, device=audio.device)
        return torch.cat([embed(as_ids(ids_before)), audio, embed(as_ids(self.tokenizer.encode(after)))])

    def _left_pad(self, rows: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Rows of [length, dim] → embeddings [batch, longest, dim] and attention mask [batch, longest].

        Left padding keeps every row's last position at the end, where decoding continues."""
        longest = max(row.shape[0] for row in rows)
        embeds = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=rows[0].device)
        for index, row in enumerate(rows):
            embeds[index, longest - row.shape[0] :] = row
            mask[index, longest - row.shape[0] :] = 1
        return embeds, mask


def make_clip(config: StandInConfig | None = None, batch_size: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """A random collated batch for `StandInModel`: `{"mel": [batch, mel_bins, 2 * audio_frames],
    "fbank": [batch, audio_frames, fbank_bins]}`, float32, reproducible from `seed`."""
    config = config or StandInConfig()
    generator = torch.Generator().manual_seed(seed)
    return {
        "mel": torch.randn(batch_size, config.mel_bins, 2 * config.audio_frames, generator=generator),
        "fbank": torch.randn(batch_size, config.audio_frames, config.fbank_bins, generator=generator),
    }


def _whisper_config(config: StandInConfig) -> WhisperConfig:
    return WhisperConfig(
        num_mel_bins=config.mel_bins,
        d_model=config.encoder_dim,
        encoder_layers=config.encoder_layers,
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * config.encoder_dim,
        max_source_positions=config.audio_frames,
    )


def _llama_config(config: StandInConfig, tokenizer: CharTokenizer) -> LlamaConfig:
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.llm_dim,
        intermediate_size=2 * config.llm_dim,
        num_hidden_layers=config.llm_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
