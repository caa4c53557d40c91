"""Kaldi-compatible log-mel filterbank in pure torch, as `torchaudio.compliance.kaldi.fbank` computes it.

torchaudio has no build for torch 2.13, and BEATs was trained on torchaudio's output, so this module
reproduces that function for the settings BEATs uses, batched over clips and vectorised over frames.
Fixed to torchaudio's defaults: no dither, DC offset removed per frame, pre-emphasis 0.97, Povey window,
FFT size rounded up to a power of two, `snip_edges=True` (only whole frames), power spectrum, natural-log
mel energies floored at float32 eps, no energy column, no VTLN.

The mel filterbank follows torchaudio, not Kaldi proper: with 128 bins over a 512-point FFT at 16 kHz the
lowest triangles are narrower than one FFT bin, so some hold no bin at all. Kaldi refuses such a bank;
torchaudio keeps it, and those channels read `log(eps)` on every frame. BEATs learned with them, so we keep
them too.
"""

from __future__ import annotations

import functools
import math

import torch

BEATS_FBANK_MEAN = 15.41663
"""Mean of BEATs' pre-training fbank (AudioSet), subtracted before the encoder."""
BEATS_FBANK_STD = 6.55582
"""Standard deviation of the same; BEATs divides by twice this value."""

_PREEMPHASIS = 0.97
_LOG_FLOOR = torch.finfo(torch.float32).eps  # torchaudio floors at float32 eps whatever the input dtype


def _mel(freq_hz: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale (natural log, 1127 × ln(1 + f / 700))."""
    if isinstance(freq_hz, torch.Tensor):
        return 1127.0 * (1.0 + freq_hz / 700.0).log()
    return 1127.0 * math.log(1.0 + freq_hz / 700.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(
    num_mel_bins: int, fft_size: int, sample_frequency: float, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Triangular mel filters over the rfft bins, `[num_mel_bins, fft_size // 2 + 1]`, float32 on the CPU.

    Built with torchaudio's float32 arithmetic (so boundary bins land on the same side) and its quirk that
    the Nyquist bin always gets weight 0. `high_freq <= 0` counts down from Nyquist, as in Kaldi.
    Cached: callers must not modify the returned tensor in place.
    """
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < high_freq <= nyquist):
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist} Hz, got {low_freq}, {high_freq}")
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)  # +1: the outer triangles spread past the edges

    bin_index = torch.arange(num_mel_bins).unsqueeze(1)  # [bins, 1]
    left = mel_low + bin_index * mel_delta
    center = mel_low + (bin_index + 1.0) * mel_delta
    right = mel_low + (bin_index + 2.0) * mel_delta
    fft_bin_width = sample_frequency / fft_size
    fft_hz = fft_bin_width * torch.arange(fft_size // 2, dtype=torch.float32)
    fft_mel = _mel(fft_hz).unsqueeze(0)  # [1, fft/2]

    up_slope = (fft_mel - left) / (center - left)
    down_slope = (right - fft_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up_slope, down_slope), min=0.0)  # [bins, fft/2]
    return torch.nn.functional.pad(banks, (0, 1))  # Nyquist column: zero weight


def _povey_window(window_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Kaldi's default window: a symmetric Hann window raised to 0.85, `[window_size]`."""
    return torch.hann_window(window_size, periodic=False, device=device, dtype=dtype).pow(0.85)


def kaldi_fbank(
    waveform: torch.Tensor,
    num_mel_bins: int = 128,
    sample_frequency: float = 16000.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Log mel filterbank energies of each frame, as torchaudio's `kaldi.fbank` with default options.

    Args:
        waveform: `[batch, samples]` at `sample_frequency` Hz, in the amplitude scale the caller wants
            analysed (Kaldi tools expect 16-bit integer scale, i.e. float audio × 2¹⁵).
        num_mel_bins: number of mel channels.
        frame_length_ms / frame_shift_ms: analysis window and hop, milliseconds.
        low_freq / high_freq: band edges of the mel bank in Hz; `high_freq <= 0` is relative to Nyquist.

    Returns:
        `[batch, frames, num_mel_bins]` natural-log energies, `waveform.dtype`; frames = 1 + (samples −
        window) // hop, one every `frame_shift_ms`.
    """
    if waveform.dim() != 2:
        raise ValueError(f"waveform must be [batch, samples], got shape {tuple(waveform.shape)}")
    window_size = int(sample_frequency * frame_length_ms * 0.001)
    window_shift = int(sample_frequency * frame_shift_ms * 0.001)
    fft_size = 1 << (window_size - 1).bit_length()  # round_to_power_of_two: 400 samples → 512

    if waveform.shape[-1] < window_size:  # not one whole frame (snip_edges)
        return waveform.new_empty(waveform.shape[0], 0, num_mel_bins)
    frames = waveform.unfold(-1, window_size, window_shift)  # whole frames only: [batch, frames, window]
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove_dc_offset
    # Pre-emphasis x[j] - 0.97 x[j-1], with the first sample standing in for its own predecessor.
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - _PREEMPHASIS * previous
    frames = frames * _povey_window(window_size, frames.device, frames.dtype)

    # rfft zero-pads each frame to fft_size: [batch, frames, fft_size // 2 + 1]
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2.0)
    banks = mel_filterbank(num_mel_bins, fft_size, float(sample_frequency), float(low_freq), float(high_freq))
    mel_energies = power @ banks.to(device=power.device, dtype=power.dtype).T
    return mel_energies.clamp(min=_LOG_FLOOR).log()


def beats_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """BEATs' encoder input: normalised 128-bin Kaldi fbank of float audio.

    Args:
        waveform: `[batch, samples]` float audio in [-1, 1] at 16 kHz.

    Returns:
        `[batch, frames, 128]`, 25 ms windows every 10 ms, normalised as BEATs' pre-training data:
        (fbank(waveform × 2¹⁵) − 15.41663) / (2 × 6.55582).
    """
    fbank = kaldi_fbank(waveform * 2**15, num_mel_bins=128, sample_frequency=16000.0)
    return (fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)


BEATS_SILENT_FRAME = (math.log(_LOG_FLOOR) - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
"""Every bin of `beats_fbank` on an all-zero frame (about -2.39): what the official BEATs reads at a batch's padding,
where it computes the fbank of zero-padded waveforms."""

