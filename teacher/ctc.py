"""Character CTC on the Whisper encoder (and token CTC on the Q-Former): the toy teacher's training aids for encoders
trained from scratch, and the encoder pretraining that uses them. Heads are dropped when the model is saved."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from teacher.qformer import num_windows
from teacher.salmonn import crop_mel, run_whisper_encoder


@dataclass
class CTCConfig:
    weight: float = 0.0
    """Weight of an auxiliary character CTC loss on the Whisper encoder's output for ASR clips (0 = off).

    A training aid for encoders trained from scratch (the toy teacher): hybrid CTC/attention training (as in
    ESPnet) grounds the encoder in the audio far sooner than the LLM's loss alone. The head is dropped at save.
    """
    alphabet: str = "abcdefghijklmnopqrstuvwxyz '"
    pretrain_steps: int = 0
    """Before SALMONN training, train the Whisper encoder alone with this CTC loss on the ASR clips for this many
    steps: the toy's stand-in for Whisper's own supervised pretraining (SALMONN starts from a trained Whisper).
    An encoder-only step costs a fraction of a full one, so this is where a from-scratch encoder learns fastest."""
    pretrain_lr: float = 2.0e-3
    pretrain_min_lr_ratio: float = 0.05
    """End of the pretraining's cosine decay, as a fraction of `pretrain_lr` (1.0 = constant after warm-up)."""
    freeze_after_pretrain: bool = False
    """Freeze the pretrained Whisper encoder for SALMONN training, as SALMONN does with its Whisper: the LLM then
    learns on stable acoustic features, and every step skips the encoder's backward pass. The CTC term is dropped
    then (it could only move its own head)."""
    qformer_weight: float = 0.0
    """Weight of an auxiliary CTC loss on the Q-Former outputs for ASR clips, over the LLM tokenizer's ids of the
    transcript (0 = off; the head is dropped at save). A from-scratch LLM learns its language model long before it
    learns to read the audio tokens, and then ignores them; this term makes every window's query carry the words
    under it from the first step, in order (CTC-trained connectors, as in CTC-compressed LLM ASR). It needs more
    windows than tokens: with ~3 words per second, windows of 1/6 s (`model.qformer.second_per_window`)."""


class WithCTC(nn.Module):
    """A SALMONN plus a character CTC head on its Whisper encoder output (`[batch, frames, d_model]`)."""

    def __init__(self, model, cfg: CTCConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.head = nn.Linear(model.speech_encoder.config.d_model, len(cfg.alphabet) + 1)  # index 0 = blank
        self.index = {c: i + 1 for i, c in enumerate(cfg.alphabet)}
        self._speech: list[torch.Tensor] = []  # the encoder's last output only
        self.aligner: nn.Module | None = None  # audio-token alignment as an auxiliary term (AlignConfig.weight)
        self.align_weight = 0.0
        model.speech_encoder.layer_norm.register_forward_hook(self._keep)
        if cfg.qformer_weight:
            self.qformer_head = nn.Linear(model.qformer.cfg.hidden_size, len(model.tokenizer) + 1)  # 0 = blank

    def _keep(self, module, args, output) -> None:
        self._speech[:] = [output]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(batch, target_logits_only=True)
        terms = {"llm": out.loss}
        rows = [i for i, task in enumerate(batch["tasks"]) if task == "asr"]
        terms["loss"] = out.loss
        if rows and self.cfg.weight:
            terms["ctc"] = self.ctc_loss(self._speech[-1], batch, rows)
            terms["loss"] = terms["loss"] + self.cfg.weight * terms["ctc"]
        if rows and self.cfg.qformer_weight:
            terms["qformer_ctc"] = self.qformer_ctc_loss(out.qformer_out, batch, rows)
            terms["loss"] = terms["loss"] + self.cfg.qformer_weight * terms["qformer_ctc"]
        if self.aligner is not None:
            terms["align"] = self.aligner(batch, out.qformer_out)["loss"]
            terms["loss"] = terms["loss"] + self.align_weight * terms["align"]
        return terms

    def qformer_ctc_loss(self, queries: torch.Tensor, batch: dict, rows: list[int]) -> torch.Tensor:
        """CTC of the transcript's LLM token ids over each clip's windows (`queries` `[batch, windows, dim]`)."""
        tok = self.model.tokenizer
        targets = [torch.tensor(tok(batch["texts"][i], add_special_tokens=False)["input_ids"]) + 1 for i in rows]
        frames = ((batch["mel_frames"][rows] + 1) // 2).tolist()
        windows = torch.tensor([min(num_windows(f, self.model.qformer.cfg), queries.shape[1]) for f in frames])
        log_probs = self.qformer_head(queries[rows]).float().log_softmax(-1).transpose(0, 1)  # [windows, rows, V+1]
        return F.ctc_loss(log_probs, torch.cat(targets), windows, torch.tensor([len(t) for t in targets]),
                          zero_infinity=True)

    def ctc_loss(self, speech: torch.Tensor, batch: dict, rows: list[int]) -> torch.Tensor:
        targets = [torch.tensor([self.index[c] for c in batch["texts"][i].lower() if c in self.index]) for i in rows]
        frames = torch.clamp((batch["mel_frames"][rows] + 1) // 2, max=speech.shape[1])
        log_probs = self.head(speech[rows]).float().log_softmax(-1).transpose(0, 1)  # [frames, rows, classes]
        return F.ctc_loss(log_probs, torch.cat(targets), frames, torch.tensor([len(t) for t in targets]),
                          zero_infinity=True)


class EncoderCTC(nn.Module):
    """The Whisper encoder and the CTC head of a `WithCTC`, trained alone (encoder pretraining)."""

    def __init__(self, with_ctc: WithCTC):
        super().__init__()
        self.encoder = with_ctc.model.speech_encoder
        self.head = with_ctc.head
        self._owner = [with_ctc]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        speech = run_whisper_encoder(self.encoder, crop_mel(batch) if self._owner[0].model.pad_to_longest
                                     else batch["mel"])
        loss = self._owner[0].ctc_loss(speech, batch, list(range(len(batch["texts"]))))
        return {"loss": loss, "ctc": loss.detach()}
