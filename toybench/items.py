"""One clip of either task, made from (config, task, split, index) alone: the work of a worker process.

Each function writes its audio file and returns the clip's record (what the annotation JSON, the
per-clip metadata and the data card are built from).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toybench.audio import (
    NOISE_COLOURS,
    add_noise_floor,
    coloured_noise,
    n_samples,
    peak_normalize,
    rms,
    seconds,
    trim_silence,
    write_flac,
)
from toybench.captions import sample_captions
from toybench.config import ToyBenchConfig
from toybench.grammar import sample_sentence_in_split
from toybench.scenes import recipe_key, render_scene, sample_recipe_in_split, sample_timing
from toybench.splits import item_rng
from toybench.tts import sample_prosody, synthesize, voice_pool

ASR_LEAD_S = (0.1, 0.4)
"""Silence before the speech, seconds."""
ASR_TAIL_S = (0.1, 0.4)
"""Silence after the speech, seconds."""
ASR_PEAK_DBFS = (-9.0, -1.0)
"""Peak level of an ASR clip, dB re full scale."""
MAX_SENTENCE_DRAWS = 50


@dataclass(frozen=True)
class Job:
    """Which clip to make and where the benchmark lives."""

    cfg: ToyBenchConfig
    task: str
    split: str
    index: int
    out_dir: str


def audio_path(task: str, split: str, index: int) -> str:
    """Path of a clip relative to the benchmark folder (and so to every annotation JSON)."""
    return f"audio/{task}/{split}/{index:05d}.flac"


def make_item(job: Job) -> dict:
    return make_asr_item(job) if job.task == "asr" else make_aac_item(job)


def make_asr_item(job: Job) -> dict:
    """One spoken sentence from a voice of the split's pool, padded, optionally noisy."""
    cfg, rng = job.cfg, item_rng(job.cfg.seed, "asr", job.split, job.index)
    pool = voice_pool(job.split, "flite" if rng.uniform() < cfg.flite_prob else "espeak")
    voice = pool[rng.integers(len(pool))]
    prosody = sample_prosody(rng)
    for _ in range(MAX_SENTENCE_DRAWS):
        text = sample_sentence_in_split(rng, job.split)
        speech = trim_silence(synthesize(voice, text, prosody))
        lead, tail = n_samples(rng.uniform(*ASR_LEAD_S)), n_samples(rng.uniform(*ASR_TAIL_S))
        if seconds(lead + len(speech) + tail) <= cfg.max_duration_s:
            break
    else:
        raise RuntimeError(f"no sentence fits in {cfg.max_duration_s} s for {voice.id}")
    tail = max(tail, n_samples(cfg.min_duration_s) - lead - len(speech))
    clip = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(tail, np.float32)])

    colour, snr_db = None, None
    if rng.uniform() < cfg.noise_prob:
        colour = NOISE_COLOURS[rng.integers(len(NOISE_COLOURS))]
        snr_db = round(float(rng.uniform(cfg.snr_db_min, cfg.snr_db_max)), 2)
        # SNR against the speech itself, not the padded clip, so it means the same for any padding.
        noise = coloured_noise(colour, len(clip), rng) * rms(speech) * 10 ** (-snr_db / 20)
        clip = clip + noise
    clip = add_noise_floor(peak_normalize(clip, float(rng.uniform(*ASR_PEAK_DBFS))), rng)

    path = audio_path("asr", job.split, job.index)
    write_flac(Path(job.out_dir) / path, clip)
    return {"task": "asr", "split": job.split, "index": job.index, "path": path, "text": text,
            "voice": voice.id, "rate": round(prosody.rate, 3), "pitch": round(prosody.pitch, 3),
            "noise": colour, "snr_db": snr_db, "duration_s": round(seconds(len(clip)), 4)}


def make_aac_item(job: Job) -> dict:
    """One scene of 1-3 events with five captions that name them in order."""
    cfg, rng = job.cfg, item_rng(job.cfg.seed, "aac", job.split, job.index)
    recipe = sample_recipe_in_split(rng, job.split)
    placed, duration_s = sample_timing(recipe, rng, cfg.min_duration_s, cfg.max_duration_s)
    captions = sample_captions(recipe, rng)
    clip = add_noise_floor(render_scene(placed, duration_s, rng), rng)

    path = audio_path("aac", job.split, job.index)
    write_flac(Path(job.out_dir) / path, clip)
    events = [{"kind": p.event.kind, "attr": p.event.attr, "onset_s": p.onset_s, "duration_s": p.duration_s,
               "peak_dbfs": p.peak_dbfs} for p in placed]
    return {"task": "aac", "split": job.split, "index": job.index, "path": path,
            "recipe": recipe_key(recipe), "events": events, "captions": captions,
            "duration_s": round(seconds(len(clip)), 4)}
