"""Data cleaning (VAD trimming, loudness normalisation, the caption filter hook) and training augmentation."""

import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from common.audio import SAMPLE_RATE, load_audio
from common.augment import AugmentConfig, AugmentedDataset, speed_perturb, with_augmentation
from common.cleaning import CleanConfig
from common.config import config_hash
from common.dataset import AudioTextCollator, AudioTextDataset, DataConfig
from common.features import FeatureConfig

FEAT = FeatureConfig(whisper_n_mels=80, whisper_chunk_seconds=8)


def tone(seconds, amp=0.3, freq=440.0):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A synthetic spoken sentence (espeak-ng), 16 kHz mono float32: something silero-vad, trained on real
    speech, recognises as speech."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: the VAD test needs a spoken clip (apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "the quick brown fox jumps over the lazy dog"], check=True,
                   capture_output=True)
    return load_audio(path)


def write_split(folder, clips: dict[str, tuple[np.ndarray, str, str]]):
    """Write `{name: (wav, text, task)}` as 16 kHz wavs plus an annotation JSON; returns the JSON's path."""
    entries = []
    for name, (wav, text, task) in clips.items():
        sf.write(folder / f"{name}.wav", wav, SAMPLE_RATE)
        entries.append({"path": f"{name}.wav", "text": text, "task": task})
    path = folder / "split.json"
    path.write_text(json.dumps({"annotation": entries}))
    return path


def scan(path, clean: CleanConfig | None = None, **kw):
    return AudioTextDataset.scan([str(path)], DataConfig(clean=clean or CleanConfig(), **kw), FEAT)


def test_vad_trims_leading_silence_and_counts_it(tmp_path, speech):
    silence = np.zeros(SAMPLE_RATE, np.float32)
    noise_only = (0.01 * np.random.default_rng(0).standard_normal(2 * SAMPLE_RATE)).astype(np.float32)
    path = write_split(tmp_path, {
        "padded": (np.concatenate([silence, speech]), "the quick brown fox", "asr"),
        "no_speech": (noise_only, "nothing", "asr"),
        "scene": (np.concatenate([silence, tone(1.0)]), "a tone", "audiocaption"),  # VAD is for ASR clips only
    })
    plain = scan(path, max_seconds=8.0)
    ds = scan(path, CleanConfig(vad=True, vad_pad_ms=30), max_seconds=8.0)
    assert [ex.text for ex in ds.examples] == ["the quick brown fox", "a tone"]
    trimmed = len(speech) / SAMPLE_RATE + 1.0 - ds.durations[0]
    # The 1 s of silence goes; silero keeps vad_pad_ms (30 ms) around speech on 32 ms windows, and espeak's own
    # leading/trailing quiet may go too, so allow 0.1 s less and 0.3 s more than the silence.
    assert 0.9 <= trimmed <= 1.3
    wav = ds.load_wav(0)
    assert len(wav) == round(ds.durations[0] * SAMPLE_RATE)
    assert np.max(np.abs(wav[: SAMPLE_RATE // 10])) > 0.01  # the trimmed clip starts near speech, not in silence
    assert ds.durations[1] == pytest.approx(plain.durations[2])  # the captioning clip keeps its silence
    report = ds.report.to_dict()
    assert report["dropped"] == {"vad_no_speech": 1}
    vad = report["cleaning"]["vad"]
    assert vad["asr_entries"] == 2 and vad["trimmed"] == 1 and vad["emptied"] == 1
    assert vad["trimmed_seconds"] == pytest.approx(trimmed + 2.0, abs=1e-3)  # the emptied clip's 2 s count too
    assert "cleaning" not in plain.report.to_dict()


def test_plans_are_cached_in_memory_and_on_disk(tmp_path, speech, monkeypatch):
    path = write_split(tmp_path, {"a": (np.concatenate([np.zeros(8000, np.float32), speech]), "words", "asr")})
    clean = CleanConfig(vad=True, cache_dir=str(tmp_path / "plans"))
    ds = scan(path, clean, max_seconds=8.0)
    calls = []
    import common.cleaning

    monkeypatch.setattr(common.cleaning, "speech_span", lambda *a: calls.append(a) or (0, 1))
    first = ds.load_wav(0)
    np.testing.assert_array_equal(ds.load_wav(0), first)  # a second epoch reads the plan, runs no VAD
    again = scan(path, clean, max_seconds=8.0)  # a later stage: the plan comes from cache_dir
    assert calls == [] and again.durations == ds.durations
    assert again.report.cleaning["vad"]["trimmed"] == 1
    sf.write(tmp_path / "a.wav", np.concatenate([speech, np.zeros(4000, np.float32)]), SAMPLE_RATE)
    scan(path, clean, max_seconds=8.0)  # an edited file (new size and mtime) is planned again
    assert len(calls) == 1


def test_feature_store_holds_cleaned_features_under_its_own_key(tmp_path, speech):
    from common.feature_store import SubsetView, store_key, with_feature_store

    path = write_split(tmp_path, {"a": (np.concatenate([np.zeros(SAMPLE_RATE, np.float32), speech]), "w", "asr")})
    plain, ds = scan(path, max_seconds=8.0), scan(path, CleanConfig(vad=True), max_seconds=8.0)
    assert store_key(ds, FEAT) != store_key(plain, FEAT)
    assert store_key(plain, FEAT) == store_key(scan(path, CleanConfig(cache_dir="x"), max_seconds=8.0), FEAT)
    stored = with_feature_store(ds, FEAT, tmp_path / "store", "train", workers=1)
    # The store keeps float16 features; log-mel values lie in about [-1, 1.5], where float16 steps are ≤ 1e-3.
    torch.testing.assert_close(stored[0]["mel"], ds[0]["mel"], rtol=0, atol=2e-3)
    assert not torch.allclose(stored[0]["mel"], plain[0]["mel"], atol=0.1)
    assert store_key(SubsetView(ds, [0]), FEAT) == store_key(ds, FEAT)  # views find the cleaner underneath
    # Waveform augmentation over the store reads the (cleaned) clip again: the same item as over the audio files.
    cfg = AugmentConfig(speed_perturb=0.1, noise_snr_db=20.0, noise_prob=1.0)
    torch.testing.assert_close(AugmentedDataset(stored, cfg, 3)[0]["mel"], AugmentedDataset(ds, cfg, 3)[0]["mel"],
                               rtol=0, atol=0)


def test_loudness_normalisation_reaches_target(tmp_path):
    pyloudnorm = pytest.importorskip("pyloudnorm")
    path = write_split(tmp_path, {"quiet": (tone(2.0, amp=0.01), "q", "asr"), "loud": (tone(2.0, amp=0.5), "l", "asr"),
                                  "short": (tone(0.2, amp=0.05), "s", "asr")})
    ds = scan(path, CleanConfig(loudness_lufs=-23.0))
    meter = pyloudnorm.Meter(SAMPLE_RATE)
    for i in (0, 1):
        # BS.1770 of a steady tone is exact up to float32 rounding of the scaled samples.
        assert meter.integrated_loudness(ds.load_wav(i).astype(np.float64)) == pytest.approx(-23.0, abs=0.01)
    np.testing.assert_array_equal(ds.load_wav(2), load_audio(tmp_path / "short.wav"))  # under one 0.4 s block
    report = ds.report.cleaning["loudness"]
    assert report["entries"] == 3 and report["left_alone_too_short"] == 1 and report["peak_limited"] == 0


def keep_captions_without_dog(pairs):
    """A stand-in for a CLAP scorer: keeps a caption unless it mentions a dog."""
    assert all(isinstance(wav, np.ndarray) and wav.ndim == 1 for wav, _ in pairs)
    return ["dog" not in text for _, text in pairs]


def test_caption_filter_hook_drops_rejected_captions(tmp_path):
    path = write_split(tmp_path, {"a": (tone(1.0), "a dog barks", "audiocaption"),
                                  "b": (tone(1.0), "a bell rings", "audiocaption"),
                                  "c": (tone(1.0), "a dog says words", "asr")})
    ds = scan(path, CleanConfig(caption_filter=f"{__name__}:keep_captions_without_dog", caption_filter_batch=1))
    assert [ex.text for ex in ds.examples] == ["a bell rings", "a dog says words"]
    assert ds.report.dropped["caption_filter"] == 1
    assert ds.report.cleaning["caption_filter"]["scored"] == 2
    with pytest.raises(ValueError, match="data.clean.caption_filter: module 'tests.test_cleaning' has no function"):
        scan(path, CleanConfig(caption_filter="tests.test_cleaning:missing"))


def test_new_options_at_default_leave_config_hash_alone():
    base = config_hash(DataConfig())
    fields = {k: v for k, v in dataclasses.asdict(DataConfig()).items() if k not in ("clean", "augment")}
    assert config_hash(DataConfig(**fields)) == base
    assert config_hash(DataConfig(clean=CleanConfig(vad=True))) != base
    assert config_hash(DataConfig(augment=AugmentConfig(time_masks=2))) != base


# ----- augmentation -----------------------------------------------------------------------------------------------

AUG = AugmentConfig(speed_perturb=0.1, noise_snr_db=10.0, noise_prob=0.5, time_masks=2, freq_masks=2)


@pytest.fixture
def train_split(tmp_path):
    rng = np.random.default_rng(0)
    clips = {f"c{i}": ((0.2 * rng.standard_normal(SAMPLE_RATE + 800 * i)).astype(np.float32), f"text {i}", "asr")
             for i in range(4)}
    return scan(write_split(tmp_path, clips))


def augmented_batch(dataset, seed, epoch=0):
    aug = AugmentedDataset(dataset, AUG, seed)
    aug.set_epoch(epoch)
    return aug, AudioTextCollator()([aug[i] for i in range(len(aug))])


def test_augmentation_is_deterministic_per_seed_and_epoch(train_split):
    aug, batch = augmented_batch(train_split, seed=1)
    _, same = augmented_batch(train_split, seed=1)
    _, other_seed = augmented_batch(train_split, seed=2)
    _, other_epoch = augmented_batch(train_split, seed=1, epoch=1)
    plain = AudioTextCollator()([train_split[i] for i in range(len(train_split))])
    for key in ("mel", "fbank"):
        torch.testing.assert_close(batch[key], same[key], rtol=0, atol=0)
        assert not torch.equal(batch[key], other_seed[key])
        assert not torch.equal(batch[key], other_epoch[key])
        assert not torch.equal(batch[key], plain[key])
    assert aug.counts["items"] == 4 and aug.counts["time_masks"] == 8 and aug.counts["freq_masks"] == 8
    assert aug.counts["speed_changed"] + aug.counts["noise_added"] > 0


def test_speed_perturbation_changes_duration():
    wav = tone(1.0)
    assert len(speed_perturb(wav, 1.1)) == pytest.approx(SAMPLE_RATE / 1.1, abs=2)
    assert len(speed_perturb(wav, 0.9)) == pytest.approx(SAMPLE_RATE / 0.9, abs=2)


def test_spec_augment_masks_only_audio_frames(train_split):
    cfg = AugmentConfig(time_masks=3, time_mask_frames=20, freq_masks=2, freq_mask_bins=10)
    aug = with_augmentation(train_split, cfg, seed=0)
    item, plain = aug[0], train_split[0]
    frames = int(np.ceil(item["duration"] * 100))
    # Whisper's padding (frames after the audio) is never masked.
    torch.testing.assert_close(item["mel"][:, frames:], plain["mel"][:, frames:], rtol=0, atol=0)
    changed = (item["mel"] != plain["mel"]).any(dim=0)
    assert 0 < int(changed.sum()) <= frames
    assert train_split.report.to_dict()["cleaning"]["augment"]["time_masks"] == 3


def test_augmentation_off_returns_the_split_itself(train_split):
    assert with_augmentation(train_split, AugmentConfig(), seed=0) is train_split
    with pytest.raises(ValueError, match="data.augment.speed_perturb"):
        with_augmentation(train_split, AugmentConfig(speed_perturb=1.5), seed=0)


def test_fit_tells_the_dataset_each_batch_epoch(tmp_path):
    """Augmentation draws per (seed, epoch, item): `fit` must set the epoch before it reads a batch's items."""
    from common.dataset import DurationBucketSampler
    from common.feature_store import SubsetView
    from common.tracking import MetricLogger
    from common.training import LoopConfig, OptimConfig, fit

    class EpochRecorder:
        examples = durations = [None] * 8

        def __init__(self):
            self.epoch, self.seen = 0, []

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 8

        def __getitem__(self, index):
            self.seen.append(self.epoch)
            return {"x": torch.full((2,), float(index))}

    recorder = EpochRecorder()
    model = torch.nn.Linear(2, 1)
    sampler = DurationBucketSampler([1.0] * 8, batch_size=4, seed=0)  # 2 batches per epoch
    loop = LoopConfig(max_steps=5, log_every=1, eval_every=100, save_every=100)
    with MetricLogger(tmp_path / "logs", backends=("jsonl",)) as logger:
        fit(model, SubsetView(recorder, list(range(8))), sampler,
            lambda items: {"x": torch.stack([i["x"] for i in items])},
            lambda m, batch: {"loss": m(batch["x"]).pow(2).mean()}, loop, OptimConfig(lr=1e-3, warmup_steps=1),
            tmp_path, logger)
    assert recorder.seen == [0] * 8 + [1] * 8 + [2] * 4


def test_noise_is_added_at_the_chosen_snr(tmp_path):
    from common.augment import add_noise

    wav = tone(1.0)
    rng = np.random.default_rng(0)
    recording = (0.05 * np.sin(np.arange(3000) / 3.0)).astype(np.float32)  # shorter than the clip: looped
    for noise in (None, recording):
        noisy = add_noise(wav, 10.0, rng, noise)
        added = noisy.astype(np.float64) - wav
        snr = 10 * np.log10(np.mean(wav.astype(np.float64) ** 2) / np.mean(added**2))
        assert snr == pytest.approx(10.0, abs=0.01)  # exact up to float32 rounding of the sum
    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise/hum.wav", recording, SAMPLE_RATE)
    sf.write(tmp_path / "c.wav", tone(1.0), SAMPLE_RATE)
    (tmp_path / "s.json").write_text(json.dumps({"annotation": [{"path": "c.wav", "text": "t", "task": "asr"}]}))
    ds = scan(tmp_path / "s.json")
    cfg = AugmentConfig(noise_snr_db=0.0, noise_prob=1.0, noise_dir=str(tmp_path / "noise"))
    hum, white = AugmentedDataset(ds, cfg, 0)[0], AugmentedDataset(ds, dataclasses.replace(cfg, noise_dir=""), 0)[0]
    assert not torch.allclose(hum["mel"], white["mel"], atol=0.1)
    with pytest.raises(ValueError, match="noise_dir .*: no audio files"):
        AugmentedDataset(ds, dataclasses.replace(cfg, noise_dir=str(tmp_path / "nothing")), 0)
