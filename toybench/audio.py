"""Signal helpers shared by both tasks: coloured noise, fades, levels, and writing FLAC.

Every signal is float32 in [-1, 1], shape [samples], at `SAMPLE_RATE` Hz.
"""

from pathlib import Path

import numpy as np
import soundfile as sf

from toybench.tts import SAMPLE_RATE

NOISE_COLOURS = ("white", "pink", "brown")

NOISE_FLOOR_DBFS = -70.0
"""RMS level of the faint white noise under every clip, dB re full scale; real recordings are
never digitally silent, and log-mel / fbank features of exact zeros are degenerate."""


def seconds(n_samples: int) -> float:
    return n_samples / SAMPLE_RATE


def n_samples(duration_s: float) -> int:
    return int(round(duration_s * SAMPLE_RATE))


def coloured_noise(colour: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Noise with power spectrum 1 (white), 1/f (pink) or 1/f^2 (brown), unit RMS, [n]."""
    if colour == "white":
        noise = rng.standard_normal(n)
    else:
        # Shape the spectrum over a power-of-two length: an FFT over a prime length is 100× slower.
        size = 1 << max(n - 1, 1).bit_length()
        spectrum = np.fft.rfft(rng.standard_normal(size))
        freqs = np.fft.rfftfreq(size, d=1.0 / SAMPLE_RATE)
        # Power ∝ f^-exponent means amplitude ∝ f^(-exponent/2); DC is dropped.
        exponent = NOISE_COLOURS.index(colour)
        spectrum[1:] /= freqs[1:] ** (exponent / 2)
        spectrum[0] = 0.0
        noise = np.fft.irfft(spectrum, size)[:n]
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def fade(signal: np.ndarray, fade_s: float) -> np.ndarray:
    """Raised-cosine fade-in and fade-out of `fade_s` seconds each, so onsets do not click."""
    k = min(n_samples(fade_s), len(signal) // 2)
    if k == 0:
        return signal
    ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, k))).astype(np.float32)
    out = signal.copy()
    out[:k] *= ramp
    out[-k:] *= ramp[::-1]
    return out


def peak_normalize(signal: np.ndarray, peak_dbfs: float = 0.0) -> np.ndarray:
    """Scale so that max |x| sits at `peak_dbfs` dB re full scale."""
    peak = float(np.max(np.abs(signal)))
    if peak == 0.0:
        return signal
    return (signal * (10 ** (peak_dbfs / 20) / peak)).astype(np.float32)


def rms(signal: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(signal, dtype=np.float64))))


def add_noise_floor(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return signal + coloured_noise("white", len(signal), rng) * 10 ** (NOISE_FLOOR_DBFS / 20)


def write_flac(path: Path, signal: np.ndarray) -> None:
    """Write 16 kHz mono 16-bit FLAC. Quantizing here (not in libsndfile) pins the rounding rule;
    libFLAC itself is deterministic for a given version."""
    pcm = np.clip(np.round(signal * 32767.0), -32768, 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")


def trim_silence(signal: np.ndarray, relative_threshold: float = 0.01, margin_s: float = 0.02) -> np.ndarray:
    """Cut leading and trailing samples quieter than `relative_threshold` × peak, keeping
    `margin_s` seconds around the sound; synthesizers pad unevenly, and we add our own pauses."""
    peak = float(np.max(np.abs(signal))) if len(signal) else 0.0
    if peak == 0.0:
        return signal
    active = np.flatnonzero(np.abs(signal) > relative_threshold * peak)
    margin = n_samples(margin_s)
    return signal[max(active[0] - margin, 0):active[-1] + margin + 1]
