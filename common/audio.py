"""Audio loading: any file soundfile reads → float32 mono at 16 kHz, with errors that name the file.

Every model in smolt (Whisper, BEATs) hears 16 kHz mono. Resampling uses soxr (high quality), downmixing
averages the channels. Problems become `AudioError` with the path and what is wrong, never a libsndfile
traceback and never a silently shortened clip.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """An audio file cannot be used. The message names the file and the problem; `reason` is a short key."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _wav_truncation(path: Path) -> str | None:
    """For RIFF/WAVE files, compare the `data` chunk's declared size with the bytes really present.

    libsndfile reads a truncated WAV without complaint and returns fewer samples than the header promises,
    which would silently cut a clip short; a download or copy that stopped half-way looks exactly like that.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        endian = "<" if head[:4] == b"RIFF" else ">"
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack(endian + "4sI", f.read(8))
            if chunk_id == b"data":
                available = size - offset - 8
                if chunk_size != 0xFFFFFFFF and chunk_size > available:
                    return f"truncated: header declares {chunk_size} data bytes, file holds {available}"
                return None
            offset += 8 + chunk_size + (chunk_size & 1)
    return "truncated: no data chunk found"


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, data: bytes | None = None) -> np.ndarray:
    """Read an audio file as float32 mono at `sample_rate` Hz: `[samples]` in [-1, 1].

    `data`, when given, holds the encoded file's bytes (audio stored inside a dataset); `path` then only
    names it in messages. Raises AudioError for a missing, unreadable, truncated or non-finite file.
    """
    path = Path(path)
    if data is None:
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, not an audio file — point the entry's path at an audio file",
                             "audio_is_directory")
        if not path.is_file():
            raise AudioError(f"{path}: audio file not found", "missing_audio")
        truncated = _wav_truncation(path) if path.stat().st_size > 0 else "empty file (0 bytes)"
        if truncated:
            raise AudioError(f"{path}: {truncated}", "truncated_audio")
    try:
        source = str(path) if data is None else io.BytesIO(data)
        wav, sr = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioError(
            f"{path}: cannot decode audio ({err}); is the file complete and in a format soundfile reads?",
            "unreadable_audio",
        ) from None
    if not np.all(np.isfinite(wav)):
        bad = int(np.sum(~np.isfinite(wav)))
        raise AudioError(f"{path}: {bad} samples are NaN or infinite", "nonfinite_audio")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if sr != sample_rate and len(wav) > 0:
        wav = soxr.resample(wav, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)


def peak_dbfs(wav: np.ndarray) -> float:
    """Peak level in dB relative to full scale (−inf for all-zero audio)."""
    peak = float(np.max(np.abs(wav))) if len(wav) else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else float("-inf")
