"""common.fbank against torchaudio's own Kaldi fbank (tests/fixtures/beats_fbank_reference.npz).

Tolerances, float32 on the CPU: log energies within 1e-3 absolute, normalised features within 1e-4 (the same
error divided by 2 × 6.55582); floor channels exactly log(float32 eps). The float32 FFT rounds differently on
different CPUs: on one, 98 % of values were bit-identical and the largest difference 7e-5; on an AVX-512 one
(2026-12-04), 50 % and 5.8e-4, on channels 15–24 nats below their frame's peak energy, where the rounding of the
frame's power spectrum is a visible fraction of the channel's energy. A real difference in the recipe (window,
pre-emphasis, mel scale, energy floor) moves values by more than 1e-2.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.fbank import beats_fbank, kaldi_fbank, mel_filterbank

FIXTURE = Path(__file__).parent / "fixtures" / "beats_fbank_reference.npz"
CLIPS = ("chirp_noise_2s", "noise_1_37s")
LOG_FLOOR = math.log(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    with np.load(FIXTURE) as arrays:
        return {key: torch.from_numpy(arrays[key]) for key in arrays.files}


@pytest.mark.parametrize("clip", CLIPS)
def test_kaldi_fbank_matches_torchaudio(reference, clip):
    wav, expected = reference[f"{clip}_wav"], reference[f"{clip}_fbank"]
    fbank = kaldi_fbank(wav[None] * 2**15)[0]
    assert fbank.shape == expected.shape  # 1 + (samples - 400) // 160 frames: snip_edges
    assert fbank.dtype == torch.float32
    torch.testing.assert_close(fbank, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("clip", CLIPS)
def test_empty_mel_channels_sit_on_the_floor(reference, clip):
    """torchaudio keeps mel filters that cover no FFT bin; their channels read log(eps) on every frame."""
    expected = reference[f"{clip}_fbank"]
    floor_channels = (expected == expected.min()).all(dim=0).nonzero().flatten()
    assert floor_channels.tolist() == [3]
    fbank = kaldi_fbank(reference[f"{clip}_wav"][None] * 2**15)[0]
    assert torch.all(fbank[:, floor_channels] == torch.tensor(LOG_FLOOR, dtype=torch.float32))


def test_mel_filterbank_has_the_empty_filter_torchaudio_tolerates():
    banks = mel_filterbank(128, 512, 16000.0, 20.0, 0.0)
    assert banks.shape == (128, 257)
    assert (banks.sum(dim=1) == 0).nonzero().flatten().tolist() == [3]
    assert torch.all(banks[:, -1] == 0)  # the Nyquist bin never contributes
    assert banks.max() <= 1.0 and banks.min() >= 0.0


@pytest.mark.parametrize("clip", CLIPS)
def test_beats_fbank_matches_reference_normalisation(reference, clip):
    features = beats_fbank(reference[f"{clip}_wav"][None])[0]
    torch.testing.assert_close(features, reference[f"{clip}_normalized"], atol=1e-4, rtol=0)


def test_batched_equals_one_clip_at_a_time(reference):
    """Batching is only vectorisation: each row equals the same clip computed alone."""
    wav = reference["chirp_noise_2s_wav"]
    batch = torch.stack([wav, 0.5 * wav.flip(0)])
    batched = beats_fbank(batch)
    assert batched.shape == (2, 198, 128)
    for row in range(2):
        torch.testing.assert_close(batched[row], beats_fbank(batch[row : row + 1])[0], atol=1e-5, rtol=0)


def test_frame_count_and_short_input():
    assert kaldi_fbank(torch.zeros(3, 400)).shape == (3, 1, 128)
    assert kaldi_fbank(torch.zeros(1, 559)).shape == (1, 1, 128)
    assert kaldi_fbank(torch.zeros(1, 560)).shape == (1, 2, 128)
    assert kaldi_fbank(torch.zeros(2, 399)).shape == (2, 0, 128)
    silence = kaldi_fbank(torch.zeros(1, 1600))
    assert torch.all(silence == torch.tensor(LOG_FLOOR))


def test_rejects_unbatched_waveform():
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        kaldi_fbank(torch.zeros(16000))
