"""Model input features from 16 kHz waveforms: Whisper's log-mel and BEATs' normalised Kaldi fbank.

Whisper's log-mel comes from transformers' `WhisperFeatureExtractor` (the reference); BEATs' fbank from
`common.fbank`, our torch port of torchaudio's Kaldi-compatible fbank (torchaudio has no build for torch 2.13),
pinned against torchaudio's own output in tests/test_fbank.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.audio import SAMPLE_RATE
from common.fbank import beats_fbank


@dataclass
class FeatureConfig:
    """How audio becomes model inputs."""

    whisper_n_mels: int = 80
    """Mel bins of the Whisper encoder (80 up to large-v2, 128 for large-v3)."""
    whisper_chunk_seconds: int = 30
    """Whisper pads or cuts every clip to this many seconds; HF's encoder wants exactly 2 × max_source_positions
    frames, i.e. 100 × chunk seconds (30 s → 3000 frames at real scale; toy models use shorter chunks)."""
    beats: bool = True
    """Compute BEATs fbank features (false for models without an audio encoder)."""


class AudioFeaturizer:
    """Turns one waveform `[samples]` (float32, 16 kHz) into the features the encoders read."""

    def __init__(self, cfg: FeatureConfig):
        from transformers import WhisperFeatureExtractor

        self.cfg = cfg
        self.whisper = WhisperFeatureExtractor(
            feature_size=cfg.whisper_n_mels, sampling_rate=SAMPLE_RATE, chunk_length=cfg.whisper_chunk_seconds
        )

    @property
    def whisper_frames(self) -> int:
        return self.whisper.nb_max_frames

    def __call__(self, wav: np.ndarray) -> dict[str, torch.Tensor]:
        """Returns `mel` [n_mels, chunk frames] and, if enabled, `fbank` [frames, 128] (10 ms frames) and
        `fbank_tail` [≤ 4, 128] (`fbank_tail`)."""
        mel = self.whisper(wav, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length")
        out = {"mel": torch.from_numpy(mel["input_features"][0])}
        if self.cfg.beats:
            out["fbank"] = beats_fbank(torch.from_numpy(wav)[None])[0]
            out["fbank_tail"] = fbank_tail(torch.from_numpy(wav))
        return out


FBANK_WINDOW, FBANK_SHIFT = 400, 160
"""Kaldi fbank frame length and shift in samples (25 ms, 10 ms at 16 kHz)."""


def fbank_frames(samples: int) -> int:
    """Whole fbank frames of `samples` samples (`snip_edges`)."""
    return 0 if samples < FBANK_WINDOW else 1 + (samples - FBANK_WINDOW) // FBANK_SHIFT


def fbank_tail(wav: torch.Tensor) -> torch.Tensor:
    """`[frames, 128]`: the fbank frames that a zero-padded batch waveform has past this clip's own frames while they
    still overlap its audio (its last samples, then zeros), up to the first all-zero frame.

    The official SALMONN computes BEATs' fbank on the batch's zero-padded waveforms; a clip's own frames are the
    same alone, these are not, and the frames after them read `BEATS_SILENT_FRAME`."""
    start = fbank_frames(wav.shape[0]) * FBANK_SHIFT
    segment = torch.cat([wav[start:].float(), wav.new_zeros(FBANK_WINDOW, dtype=torch.float32)])
    return beats_fbank(segment[None])[0]
