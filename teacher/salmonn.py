"""SALMONN: Whisper encoder ⊕ BEATs → window-level Q-Former → projection → LLM (+ LoRA).

The parts come from `transformers` (Whisper encoder, the LLM, the BLIP-2 Q-Former), `teacher.beats` and peft;
this file is only the glue SALMONN adds: layer norms on both encoders, the frame-wise join, the window-level
Q-Former, the projection into the LLM's embedding space, and prompt wrapping around the audio tokens.

The LLM input of one example is `[BOS, prompt before <SpeechHere>, audio tokens, prompt after, target, end]`;
prompt pieces are tokenized without special tokens and the loss covers only the target and its end token.
Training batches are right-padded; generation and prefill batches are left-padded so every row ends at
its last prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.dataset import ENCODER_OUTPUTS
from common.fbank import BEATS_SILENT_FRAME
from common.features import FBANK_SHIFT, FBANK_WINDOW, fbank_frames
from common.int8_frozen import plain_state
from common.model import AudioLanguageModel
from teacher.qformer import WindowQFormer

SPEECH_PLACEHOLDER = "<SpeechHere>"
SPEECH_OUT, AUDIO_OUT = ENCODER_OUTPUTS
"""Batch keys of cached raw encoder outputs; `join_encoders` uses them instead of running the encoders."""

BEATS_PATCH_FRAMES = 16
"""fbank frames (10 ms) per BEATs time patch."""
BeatsPadding = Literal["official", "zero"]
BEATS_PADDING = ("official", "zero")
"""What BEATs' outputs at padded tokens hold when they enter `ln_audio` and the Q-Former. "official": what BEATs
computed there, unmasked, as the released SALMONN's forward does (the only right choice for its checkpoints); "zero":
zeros, as smolt's toy teachers and students were trained (a clip's features then do not depend on its batch)."""


def speech_cut_key(layers: int) -> str:
    """`Salmonn.encoder_outputs`' key for the output of Whisper's first `layers` layers (`speech_cuts`)."""
    return f"{SPEECH_OUT}@{layers}"


def run_whisper_encoder(encoder: nn.Module, mel: torch.Tensor, cuts: Sequence[int] = ()
                        ) -> torch.Tensor | dict[int, torch.Tensor]:
    """Whisper encoder over `mel` `[batch, n_mels, frames]` → `[batch, frames / 2, d_model]`.

    At the full chunk (2 × max_source_positions frames) this is transformers' own forward. Shorter inputs (a
    model trained on batches cut to their longest clip, like the toy teacher) take the same layers with the
    positional table cut to length: HF's forward refuses anything but the full 30 s a pretrained Whisper expects.
    With `cuts`, `{k: output}` for each k in `cuts` and for the whole depth (`whisper_any_length`).
    """
    if cuts:
        return whisper_any_length(encoder, mel, cuts)
    if mel.shape[-1] == 2 * encoder.config.max_source_positions:
        return encoder(mel).last_hidden_state
    return whisper_any_length(encoder, mel)


def whisper_any_length(encoder: nn.Module, mel: torch.Tensor, cuts: Sequence[int] = ()
                       ) -> torch.Tensor | dict[int, torch.Tensor]:
    """The Whisper encoder's forward with the positional table cut to the input's length (even, ≤ the chunk).

    With `cuts`, also what the encoder's first k layers compute under its final norm, for each k in `cuts`, from the
    same pass: `{k: [batch, frames / 2, d_model]}`, the whole depth (`len(encoder.layers)`) included. That is the
    output of a student Whisper cut from this one by `student.whisper_layer_selection: first` with k layers."""
    if mel.shape[-1] % 2 or mel.shape[-1] > 2 * encoder.config.max_source_positions:
        raise ValueError(f"mel frames must be even and at most {2 * encoder.config.max_source_positions}, "
                         f"got {mel.shape[-1]}")
    depth = len(encoder.layers)
    if any(not 1 <= k <= depth for k in cuts):
        raise ValueError(f"Whisper cuts must be in [1, {depth}] layers, got {list(cuts)}")
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    x = F.dropout(x, p=encoder.dropout, training=encoder.training)
    out = {}
    for k, layer in enumerate(encoder.layers, start=1):
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        if k in cuts and k < depth:
            out[k] = encoder.layer_norm(x)
    if not cuts:
        return encoder.layer_norm(x)
    out[depth] = encoder.layer_norm(x)
    return out


def crop_mel(batch: dict) -> torch.Tensor:
    """The batch's mel cut to its longest clip (10 ms frames, rounded up to even), from `mel_frames`."""
    longest = int(batch["mel_frames"].max())
    return batch["mel"][..., : longest + longest % 2]


def speech_frames(batch: dict) -> torch.Tensor:
    """Whisper encoder frames (20 ms) that hold each clip's audio, `[batch]`, from `mel_frames` (10 ms)."""
    return (batch["mel_frames"] + 1) // 2


def whole_patch_padding(fbank: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """fbank padding mask `[batch, frames]` (True = padding) that also covers each clip's last, incomplete patch.

    BEATs' official mask keeps a patch whose frames are only partly padding, so a clip would get one more patch,
    holding zeros, when batched with a longer clip than alone (where the convolution drops the incomplete
    patch). Masking it makes a clip's tokens the same in any batch.
    """
    frames = torch.full((fbank.shape[0],), fbank.shape[1], device=fbank.device)
    if padding_mask is not None:
        frames = (~padding_mask).sum(1)
    whole = frames // BEATS_PATCH_FRAMES * BEATS_PATCH_FRAMES
    return torch.arange(fbank.shape[1], device=fbank.device)[None] >= whole[:, None]


def official_fbank_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The fbank `[batch, frames, 128]` and padding mask `[batch, frames]` that the official SALMONN gives BEATs.

    It pads the waveforms with zeros to the longest clip, computes the fbank of each padded waveform and derives the
    frame mask from the sample mask (`downsample_padding_mask`). Per clip that is its own frames, then its tail
    frames over its last samples and zeros (`fbank_tail` from the collator), then the all-zero frame's value; and
    the mask can keep a frame or two more than the clip's own. Needs the collator's `fbank_tail` and `samples`.
    """
    from teacher.beats import downsample_padding_mask

    if "fbank_tail" not in batch or "samples" not in batch:
        raise ValueError("beats.padding_features: official needs the batch's `fbank_tail` and `samples` (from "
                         "common.dataset.AudioTextCollator on items of common.features.AudioFeaturizer); a feature "
                         "store written before them is rebuilt under a new name: delete the old one")
    fbank, own_mask, tail = batch["fbank"], batch["fbank_padding_mask"], batch["fbank_tail"].to(batch["fbank"])
    samples = batch["samples"].to(fbank.device)
    frames = fbank.shape[1]
    longest = int(samples.max())
    if fbank_frames(longest) > frames:
        raise ValueError(f"the batch's fbank has {frames} frames but its longest clip ({longest} samples) gives "
                         f"{fbank_frames(longest)}: `samples` does not belong to this fbank")
    if fbank_frames(longest) < frames:  # padded past its longest clip (rows split from a larger batch):
        longest = FBANK_WINDOW + FBANK_SHIFT * (frames - 1)  # as waveforms zero-padded to give that many frames
    position = torch.arange(frames, device=fbank.device)[None]  # [1, frames]
    own = (~own_mask).sum(1, keepdim=True)  # [batch, 1]
    index = (position - own).clamp(0, tail.shape[1] - 1)  # tail frame read at each position
    tail_frames = torch.gather(tail, 1, index[..., None].expand(-1, -1, tail.shape[-1]))
    past_tail = (position - own >= tail.shape[1])[..., None]
    padded = torch.where(past_tail, torch.full_like(fbank, BEATS_SILENT_FRAME), tail_frames)
    fbank = torch.where((position < own)[..., None], fbank, padded)
    sample_mask = torch.arange(longest, device=fbank.device)[None] >= samples[:, None]
    return fbank, downsample_padding_mask(sample_mask, frames)


@dataclass
class PromptConfig:
    template: str = "USER: {}\nASSISTANT:"
    """SALMONN's chat template; `{}` receives `<Speech><SpeechHere></Speech> {instruction}`."""
    audio_wrapper: str = "<Speech>" + SPEECH_PLACEHOLDER + "</Speech> "
    """Text around the audio tokens; `<SpeechHere>` marks where they go."""


def prompt_pieces(prompt: PromptConfig, instruction: str) -> tuple[str, str]:
    """The wrapped prompt's text before and after `<SpeechHere>` (each tokenized without special tokens)."""
    before, after = prompt.template.format(prompt.audio_wrapper + instruction.strip()).split(SPEECH_PLACEHOLDER)
    return before, after


@dataclass
class ForwardOutput:
    """Teacher-forced pass over wrapped sequences."""

    logits: torch.Tensor
    """`[batch, seq, vocab]` LLM logits; position t predicts token t + 1. With `target_logits_only`, only a window
    of positions: from the one before the first target of any row to the last target of any row."""
    labels: torch.Tensor
    """`[batch, seq]` input ids at target positions, -100 elsewhere (aligned with `logits`, not shifted)."""
    loss: torch.Tensor
    """Mean next-token cross-entropy over target tokens (fp32)."""
    qformer_out: torch.Tensor
    """`[batch, windows × queries, qformer_dim]` Q-Former outputs before the projection (feature KD target)."""
    attention_mask: torch.Tensor
    """`[batch, seq]` 1 for real positions."""


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at t with the label at t + 1: returns `[batch, seq-1, vocab]`, `[batch, seq-1]`."""
    return logits[:, :-1], labels[:, 1:]


class Salmonn(AudioLanguageModel):
    """The SALMONN architecture over ready-made parts (see `teacher.build` for building them).

    Args:
        speech_encoder: Whisper encoder; input `mel` `[batch, n_mels, frames]` → `[batch, frames / 2, d_whisper]`.
        audio_encoder: BEATs or None; input fbank `[batch, frames, 128]` → `[batch, tokens, d_beats]`.
        qformer: window-level Q-Former over the joined `d_whisper + d_beats` features.
        llm: a causal LM (possibly a peft model) with `get_input_embeddings()`.
        tokenizer: the LLM's tokenizer with bos, eos and pad tokens.
        pad_to_longest: run Whisper only up to the batch's longest clip (models trained that way).
        whisper_per_clip: run Whisper on each clip cut to its own audio (no padding at all), outputs zero-padded to
            the batch's longest clip: a clip's features do not depend on its batch (so they can be cached), and a
            pretrained Whisper spends no work on padding. Overrides `pad_to_longest`.
        beats_padding: what BEATs' outputs at padded tokens hold when they enter `ln_audio` ("official": as BEATs
            computed them; "zero": zeros), see `BEATS_PADDING`.
    """

    def __init__(self, speech_encoder: nn.Module, audio_encoder: nn.Module | None, qformer: WindowQFormer,
                 llm: nn.Module, tokenizer, prompt: PromptConfig | None = None, pad_to_longest: bool = False,
                 beats_padding: BeatsPadding = "official", whisper_per_clip: bool = False, audio_scale: float = 1.0):
        super().__init__()
        if beats_padding not in BEATS_PADDING:
            raise ValueError(f"beats.padding_features: {beats_padding!r} is not one of {BEATS_PADDING}")
        if audio_encoder is not None and qformer.cfg.trim_to_audio and beats_padding != "zero":
            raise ValueError("qformer.trim_to_audio needs beats.padding_features: zero (a clip's BEATs outputs must "
                             "not depend on its batch, and cached per-clip outputs are zero-padded)")
        self.pad_to_longest = pad_to_longest
        self.whisper_per_clip = whisper_per_clip
        self.beats_padding = beats_padding
        self.speech_encoder = speech_encoder
        self.ln_speech = nn.LayerNorm(speech_encoder.config.d_model)
        self.audio_encoder = audio_encoder
        self.ln_audio = nn.LayerNorm(audio_encoder.cfg.encoder_embed_dim) if audio_encoder is not None else None
        self.qformer = qformer
        self.projector = nn.Linear(qformer.cfg.hidden_size, llm.config.hidden_size)
        self.audio_scale = audio_scale
        """Factor on the projected audio tokens: 1 / sqrt(hidden_size) cancels a Gemma LLM's embedding scaling
        (`llm.unscale_audio`, `teacher.build.audio_scale`), 1 leaves them as SALMONN feeds Vicuna."""
        self.llm = llm
        self.tokenizer = tokenizer
        self.prompt_cfg = prompt or PromptConfig()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"the LLM tokenizer has no {name.removesuffix('_id')}; SALMONN needs bos, eos, pad")
        self._prompt_ids_cache: dict[str, tuple[list[int], list[int]]] = {}

    # ----- parts and audio -------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        return salmonn_parts(self)

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def trim_to_audio(self) -> bool:
        return self.qformer.cfg.trim_to_audio

    def join_encoders(self, batch: dict) -> torch.Tensor:
        """Both encoders, layer-normed, joined frame by frame: `[batch, frames, d_whisper (+ d_beats)]`.

        The shorter sequence is zero-padded at the end (SALMONN's rule): BEATs' time-major tokens arrive at
        8 per 160 ms, the same average rate as Whisper's 20 ms frames, so index i pairs roughly equal times.
        Cached raw outputs in the batch (`speech_encoder_out`, `audio_encoder_out`, zero-padded) stand in for
        running the encoders.
        """
        speech = batch[SPEECH_OUT] if SPEECH_OUT in batch else self.encode_speech(batch)
        speech = self.ln_speech(speech.to(self.ln_speech.weight.dtype))
        if self.audio_encoder is None:
            return speech
        audio = batch[AUDIO_OUT] if AUDIO_OUT in batch else self.encode_beats(batch)
        audio = self.ln_audio(audio.to(self.ln_audio.weight.dtype))
        length = max(speech.shape[1], audio.shape[1])
        speech = F.pad(speech, (0, 0, 0, length - speech.shape[1]))
        audio = F.pad(audio, (0, 0, 0, length - audio.shape[1]))
        return torch.cat([speech, audio.to(speech.dtype)], dim=-1)

    def encode_speech(self, batch: dict, cuts: Sequence[int] = ()) -> torch.Tensor | dict[int, torch.Tensor]:
        """Whisper encoder output `[batch, frames, d_whisper]` (before `ln_speech`).

        With `trim_to_audio`, frames past each clip's audio are zeroed and the batch is cut to its longest clip.
        With `cuts`, `{k: output}` of the first k layers under the final norm for each k, and of the whole
        encoder (`whisper_any_length`), from one pass.
        """
        dtype = next(self.speech_encoder.parameters()).dtype
        if self.whisper_per_clip:
            speech = self.whisper_per_clip_outputs(batch, dtype, cuts)
        else:
            mel = crop_mel(batch) if self.pad_to_longest else batch["mel"]
            speech = run_whisper_encoder(self.speech_encoder, mel.to(dtype), cuts)
        if not cuts:
            return self.trim_speech(batch, speech)
        return {k: self.trim_speech(batch, v) for k, v in speech.items()}

    def trim_speech(self, batch: dict, speech: torch.Tensor) -> torch.Tensor:
        if not self.trim_to_audio:
            return speech
        lengths = speech_frames(batch).to(speech.device).clamp(max=speech.shape[1])
        padding = torch.arange(speech.shape[1], device=speech.device)[None] >= lengths[:, None]
        return speech.masked_fill(padding.unsqueeze(-1), 0.0)[:, : int(lengths.max())]

    def whisper_per_clip_outputs(self, batch: dict, dtype: torch.dtype, cuts: Sequence[int] = ()
                                 ) -> torch.Tensor | dict[int, torch.Tensor]:
        """Whisper over each clip's own mel frames (rounded up to even), `[batch, longest clip's frames / 2, d]`,
        zero past each clip's audio. Clips of the same length run as one batch (the same computation). With
        `cuts`, `{k: that}` as `whisper_any_length` gives them."""
        mel, frames = batch["mel"], batch["mel_frames"].tolist()
        lengths = [min(f + f % 2, mel.shape[-1]) for f in frames]
        depths = sorted({*cuts, len(self.speech_encoder.layers)}) if cuts else [0]
        out = {k: mel.new_zeros(mel.shape[0], max(lengths) // 2, self.speech_encoder.config.d_model, dtype=dtype)
               for k in depths}
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            speech = run_whisper_encoder(self.speech_encoder, mel[rows, :, :length].to(dtype), cuts)
            for k, tensor in (speech.items() if cuts else [(0, speech)]):
                out[k][rows, : length // 2] = tensor
        return out if cuts else out[0]

    def encode_beats(self, batch: dict) -> torch.Tensor:
        """BEATs features `[batch, tokens, d_beats]` of the batch's fbank.

        At padded tokens they are what BEATs computed there (`beats_padding` "official": the released SALMONN feeds
        them unmasked through `ln_audio` into the Q-Former, and its fbank and mask are the official ones, see
        `official_fbank_batch`) or zeros ("zero"). With `trim_to_audio` (which needs
        "zero"), a clip's last, incomplete patch counts as padding and the batch is cut to its longest clip's tokens,
        so a clip's features do not depend on its batch.
        """
        dtype = next(self.audio_encoder.parameters()).dtype
        fbank, mask = batch["fbank"], batch.get("fbank_padding_mask")
        if self.trim_to_audio:
            mask = whole_patch_padding(fbank, mask)
        elif self.beats_padding == "official" and mask is not None and bool(mask.any()):
            fbank, mask = official_fbank_batch(batch)
        features, mask = self.audio_encoder.forward_fbank(fbank.to(dtype), mask)
        if mask is not None and self.beats_padding == "zero":
            features = features.masked_fill(mask.unsqueeze(-1), 0.0)
            if self.trim_to_audio:
                features = features[:, : int((~mask).sum(1).max())]
        return features

    # ----- cached outputs of frozen encoders -------------------------------------------------------------
    def cacheable_encoders(self) -> list[str]:
        """Batch keys (`speech_encoder_out`, `audio_encoder_out`) of the encoders whose outputs can be computed
        once per clip and cached: frozen (no trainable parameter) and with an output for a clip that does not
        depend on the rest of its batch (Whisper with `whisper_per_clip` or without `pad_to_longest`; BEATs only with
        `trim_to_audio`)."""
        frozen = lambda module: not any(p.requires_grad for p in module.parameters())
        keys = []
        if frozen(self.speech_encoder) and (self.whisper_per_clip or not self.pad_to_longest):
            keys.append(SPEECH_OUT)
        if self.audio_encoder is not None and frozen(self.audio_encoder) and self.trim_to_audio:
            keys.append(AUDIO_OUT)
        return keys

    @torch.no_grad()
    def encoder_outputs(self, batch: dict, keys: Sequence[str], speech_cuts: Sequence[int] = ()
                        ) -> dict[str, list[torch.Tensor]]:
        """Per clip, the raw outputs `join_encoders` reads for `keys`: `{key: [[frames_i, dim], ...]}` (float32).

        Each clip keeps its own frames: with `trim_to_audio` those holding its audio (the rest are zeros in any
        batch), otherwise all of them. With `speech_cuts` (and `SPEECH_OUT` in `keys`), also
        `speech_cut_key(k)`: what a Whisper cut to this one's first k layers would give (`whisper_any_length`)."""
        out = {}
        if SPEECH_OUT in keys:
            depth = len(self.speech_encoder.layers)
            speech = self.encode_speech(batch, speech_cuts) if speech_cuts else {depth: self.encode_speech(batch)}
            for k, tensor in speech.items():
                tensor = tensor.float()
                lengths = speech_frames(batch).clamp(max=tensor.shape[1]) if self.trim_to_audio else None
                out[SPEECH_OUT if k == depth else speech_cut_key(k)] = [
                    tensor[i, : int(lengths[i])] if lengths is not None else tensor[i] for i in range(tensor.shape[0])]
        if AUDIO_OUT in keys:
            mask = whole_patch_padding(batch["fbank"], batch.get("fbank_padding_mask"))
            tokens = (~mask).sum(1) // BEATS_PATCH_FRAMES * 8  # 8 frequency patches per 160 ms
            audio = self.encode_beats(batch).float()
            out[AUDIO_OUT] = [audio[i, : int(tokens[i])] for i in range(audio.shape[0])]
        return out

    def encoder_fingerprint(self, keys: Sequence[str], speech_layers: int | None = None) -> str:
        """Hash of what the cached outputs of `keys` depend on: those encoders' weights and the output rules.

        With `speech_layers`, the hash a model would have whose Whisper is this one cut to its first `speech_layers`
        layers (`student.build.distill_whisper_encoder` with selection "first": the same conv stem, positions and
        final norm), its other settings equal to this one's: the outputs `speech_cuts` gives
        (`encoder_outputs`) are stored under it, where such a student finds them."""
        import hashlib

        h = hashlib.sha256(repr((sorted(keys), self.trim_to_audio, self.pad_to_longest, self.beats_padding)
                                  + ((True,) if self.whisper_per_clip else ())).encode())
        for key, module in ((SPEECH_OUT, self.speech_encoder), (AUDIO_OUT, self.audio_encoder)):
            if key in keys:
                pruning = getattr(module, "pruning_config", None)  # a student's BEATs token pruning (same weights)
                if pruning is not None:
                    h.update(repr(pruning).encode())
                state = plain_state(module.state_dict())  # int8 weights dequantized
                if key == SPEECH_OUT and speech_layers is not None:
                    state = {name: t for name, t in state.items()
                             if not (name.startswith("layers.") and int(name.split(".")[1]) >= speech_layers)}
                for name, tensor in sorted(state.items()):
                    h.update(name.encode())
                    h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def audio_queries(self, batch: dict) -> torch.Tensor:
        """Q-Former outputs `[batch, windows × queries, qformer_dim]`."""
        return self.qformer(self.join_encoders(batch))

    def encode_audio(self, batch: dict) -> torch.Tensor:
        return self.project(self.audio_queries(batch))

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """Q-Former outputs → the LLM's input embeddings of the audio tokens."""
        audio = self.projector(queries)
        if self.audio_scale != 1.0:
            audio = audio * self.audio_scale
        return audio.to(self.llm_dtype)

    # ----- prompt wrapping -------------------------------------------------------------------------------
    def prompt_ids(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before and after `<SpeechHere>`: `[BOS] + before`, `after`."""
        if instruction not in self._prompt_ids_cache:
            before, after = prompt_pieces(self.prompt_cfg, instruction)
            tok = self.tokenizer
            ids_before = [tok.bos_token_id] + tok(before, add_special_tokens=False)["input_ids"]
            ids_after = tok(after, add_special_tokens=False)["input_ids"]
            self._prompt_ids_cache[instruction] = (ids_before, ids_after)
        return self._prompt_ids_cache[instruction]

    def wrap(self, audio_embeds: torch.Tensor, prompts: Sequence[str], target_ids: torch.Tensor | None = None,
             target_labels: torch.Tensor | None = None, left_pad: bool = False):
        """Build LLM inputs around the audio tokens.

        Args:
            audio_embeds: `[batch, audio_tokens, llm_dim]`.
            prompts: one instruction per row.
            target_ids / target_labels: `[batch, target_len]` from the collator (labels -100 at padding).
            left_pad: pad on the left (generation) instead of the right (training).

        Returns: `(inputs_embeds [batch, seq, llm_dim], attention_mask [batch, seq], labels [batch, seq])`.
        """
        embed = self.llm.get_input_embeddings()
        device = audio_embeds.device
        rows, labels = [], []
        for i, instruction in enumerate(prompts):
            before, after = self.prompt_ids(instruction)
            pieces = [embed(torch.tensor(before, device=device)), audio_embeds[i],
                      embed(torch.tensor(after, device=device))]
            n_prompt = len(before) + audio_embeds.shape[1] + len(after)
            row_labels = [torch.full((n_prompt,), -100, dtype=torch.long, device=device)]
            if target_ids is not None:
                keep = target_labels[i] != -100
                pieces.append(embed(target_ids[i][keep].to(device)))
                row_labels.append(target_labels[i][keep].to(device))
            rows.append(torch.cat(pieces))
            labels.append(torch.cat(row_labels))
        length = max(r.shape[0] for r in rows)
        dim = rows[0].shape[-1]
        inputs = audio_embeds.new_zeros(len(rows), length, dim)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        out_labels = torch.full((len(rows), length), -100, dtype=torch.long, device=device)
        for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
            span = slice(length - row.shape[0], length) if left_pad else slice(0, row.shape[0])
            inputs[i, span] = row
            mask[i, span] = 1
            out_labels[i, span] = lab
        return inputs, mask, out_labels

    # ----- training ----------------------------------------------------------------------------------------
    def forward(self, batch: dict, target_logits_only: bool = False) -> ForwardOutput:
        """Teacher-forced pass on a collated batch with `target_ids` / `labels`.

        `target_logits_only` computes the LM head only over the window of positions that predict a target (the
        loss is the same): with a 49k vocabulary the head is a fifth of a small LLM's work at every position.
        """
        queries = self.audio_queries(batch)
        audio = self.project(queries)
        inputs, mask, labels = self.wrap(audio, batch["prompts"], batch["target_ids"], batch["labels"])
        if target_logits_only:
            targets = (labels != -100).any(0).nonzero()[:, 0]
            window = torch.arange(int(targets[0]) - 1, int(targets[-1]) + 1, device=labels.device)
            logits = self.llm(inputs_embeds=inputs, attention_mask=mask, logits_to_keep=window).logits
            labels = labels[:, window]
        else:
            logits = self.llm(inputs_embeds=inputs, attention_mask=mask).logits
        shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
        loss = F.cross_entropy(shifted_logits.float().reshape(-1, logits.shape[-1]), shifted_labels.reshape(-1),
                               ignore_index=-100)
        return ForwardOutput(logits=logits, labels=labels, loss=loss, qformer_out=queries, attention_mask=mask)

    # ----- inference -----------------------------------------------------------------------------------
    def prefill(self, audio_embeds: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, Any]:
        inputs, mask, _ = self.wrap(audio_embeds, prompts, left_pad=True)
        # Left padding: positions count real tokens only, as HF generate derives them from the mask.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True)
        return out.logits[:, -1], {"past_key_values": out.past_key_values, "attention_mask": mask}

    def decode_step(self, token_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        mask = torch.cat([cache["attention_mask"], cache["attention_mask"].new_ones(token_ids.shape[0], 1)], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        out = self.llm(input_ids=token_ids, past_key_values=cache["past_key_values"], attention_mask=mask,
                       position_ids=positions, use_cache=True)
        return out.logits[:, -1], {"past_key_values": out.past_key_values, "attention_mask": mask}

    @torch.inference_mode()
    def generate(self, batch: dict, prompts: Sequence[str], max_new_tokens: int = 64, num_beams: int = 1,
                 **generation_kwargs: Any) -> list[str]:
        """Beam search or greedy decoding with SALMONN's settings available as keyword arguments
        (`repetition_penalty`, `length_penalty`, `min_length`, `do_sample`, `temperature`, `top_p`)."""
        audio = self.encode_audio(batch)
        inputs, mask, _ = self.wrap(audio, prompts, left_pad=True)
        ids = self.llm.generate(
            inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            **generation_kwargs,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def salmonn_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The parts of a SALMONN-shaped model by `Salmonn`'s attribute names (also `scale.architectures.MetaSalmonn`,
    on the meta device): both encoders, the LLM, and the glue between them (layer norms, Q-Former, projector)."""
    parts = {"speech_encoder": model.speech_encoder, "llm": model.llm}
    glue = nn.ModuleList([model.ln_speech, model.qformer, model.projector])
    if model.audio_encoder is not None:
        parts["audio_encoder"] = model.audio_encoder
        glue.append(model.ln_audio)
    parts["qformer_projector"] = glue
    return parts
