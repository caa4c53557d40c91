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
        """Returns `mel` [n_mels, chunk frames] and, if enabled, `fbank` [frames, 128] (10 ms frames)."""
        mel = self.whisper(wav, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length")
        out = {"mel": torch.from_numpy(mel["input_features"][0])}
        if self.cfg.beats:
            out["fbank"] = beats_fbank(torch.from_numpy(wav)[None])[0]
        return out
