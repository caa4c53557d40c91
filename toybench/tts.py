"""Speech synthesis with espeak-ng and flite, and the voice pools of each split.

Both engines run as subprocesses (about 10 ms per espeak-ng call, 15-50 ms per flite call here)
and are deterministic: the same text, voice, rate and pitch give the same samples.
"""

import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soxr

SAMPLE_RATE = 16000
"""Sample rate of everything the benchmark writes, Hz."""

INSTALL_HINT = "apt-get install espeak-ng flite"

# espeak-ng English voices that need no MBROLA data (the mb-* voices in `espeak-ng --voices=en` do).
ESPEAK_BASES = (
    "en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
    "en-us-nyc",
)

# Voice variants from espeak-ng-data/voices/!v, each combined with every base. Left out: whisper and
# whisperf (unvoiced), croak, Demonic, UniRobot and anikaRobot (hard to understand even for a human),
# fast (a test variant), "Mr serious" (a space in its name).
ESPEAK_TRAIN_VARIANTS = (
    "adam", "Alex", "Alicia", "Andrea", "anika", "announcer", "antonio", "AnxiousAndy", "aunty",
    "benjamin", "boris", "caleb", "Denis", "Diogo", "edward", "f1", "f5", "Gene", "Gene2", "grandma",
    "grandpa", "Henrique", "Hugo", "iven", "iven3", "Jacky", "john", "kaukovalta", "klatt", "klatt2",
    "klatt4", "klatt6", "linda", "m1", "m2", "m3", "m5", "m8", "marcelo", "Marco", "Mario", "Michael",
    "michel", "miguel", "Mike", "Nguyen", "norbert", "pablo", "paul", "pedro", "quincy", "RicishayMax",
    "RicishayMax2", "RicishayMax3", "rob", "robert", "robosoft", "robosoft2", "robosoft4", "robosoft5",
    "robosoft7", "robosoft8", "sandro", "shelby", "steph", "Storm", "travis", "Tweaky", "victor", "zac",
)
# Held-out variants: a mix of male, female, klatt and named voices, never heard in training.
ESPEAK_VALID_VARIANTS = ("m4", "f3", "klatt3", "Andy", "belinda", "edward2", "iven2", "robosoft3", "steph2")
ESPEAK_TEST_VARIANTS = ("m6", "m7", "f2", "f4", "klatt5", "Annie", "david", "gustave", "iven4", "max",
                        "robosoft6", "steph3", "ed", "Lee")
ESPEAK_SPLIT_VARIANTS = {"train": ESPEAK_TRAIN_VARIANTS, "valid": ESPEAK_VALID_VARIANTS,
                         "test": ESPEAK_TEST_VARIANTS}

# flite's built-in voices; kal is an 8 kHz diphone voice (upsampled), the rest are 16 kHz.
FLITE_SPLIT_VOICES = {"train": ("kal", "kal16", "slt"), "valid": ("awb",), "test": ("rms",)}
# Mean F0 of each flite voice, Hz, scaled per utterance to vary pitch; rms ignores the setting.
FLITE_BASE_F0_HZ = {"kal": 100.0, "kal16": 100.0, "slt": 170.0, "awb": 125.0, "rms": None}

ESPEAK_RATE_WPM = (125, 190)
"""Range of espeak-ng speaking rates, words per minute."""
ESPEAK_PITCH = (25, 75)
"""Range of espeak-ng pitch settings (0-99, 50 is the voice's own)."""
FLITE_STRETCH = (0.85, 1.2)
"""Range of flite duration stretch factors (above 1 speaks slower)."""
FLITE_F0_SCALE = (0.85, 1.2)
"""Range of factors on a flite voice's mean F0."""


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an engine and its voice name ("en-us+m3" for espeak-ng, "slt" for flite)."""

    engine: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"


@dataclass(frozen=True)
class Prosody:
    """How a sentence is spoken, as positions in [0, 1] within each engine's range above.

    rate: 0 is the slowest speaking rate, 1 the fastest; pitch: 0 the lowest, 1 the highest.
    """

    rate: float
    pitch: float


def check_tools() -> None:
    """Fail early, with the install command, when a synthesizer or one of our voices is missing."""
    missing = [tool for tool in ("espeak-ng", "flite") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"toybench needs {' and '.join(missing)} on PATH: {INSTALL_HINT}")
    variants = _espeak_data_dir() / "voices" / "!v"
    absent = [v for v in all_espeak_variants() if not (variants / v).is_file()]
    if absent:
        # espeak-ng silently falls back to the plain voice for an unknown variant, which would
        # quietly merge held-out speakers into one.
        raise RuntimeError(f"espeak-ng voice variants missing from {variants}: {absent}; {INSTALL_HINT}")
    flite_voices = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
    absent = [v for v in FLITE_BASE_F0_HZ if v not in flite_voices]
    if absent:
        raise RuntimeError(f"flite lacks the built-in voices {absent}; {INSTALL_HINT}")


def tool_versions() -> dict[str, str]:
    """Version lines of the two synthesizers, recorded in the data card and manifest."""
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    flite = subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout
    flite_line = next((line.strip() for line in flite.splitlines() if "version" in line), flite.strip())
    return {"espeak-ng": espeak.split("Data at")[0].strip(), "flite": flite_line}


def _espeak_data_dir() -> Path:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    return Path(out.split("Data at:")[1].strip())


def all_espeak_variants() -> tuple[str, ...]:
    return ESPEAK_TRAIN_VARIANTS + ESPEAK_VALID_VARIANTS + ESPEAK_TEST_VARIANTS


@cache
def voice_pool(split: str, engine: str) -> tuple[Voice, ...]:
    """The voices a split may use for one engine; the pools of different splits are disjoint."""
    if engine == "flite":
        return tuple(Voice("flite", name) for name in FLITE_SPLIT_VOICES[split])
    return tuple(Voice("espeak", f"{base}+{variant}")
                 for base in ESPEAK_BASES for variant in ESPEAK_SPLIT_VARIANTS[split])


def sample_prosody(rng: np.random.Generator) -> Prosody:
    """Uniform rate and pitch positions; `synthesize` maps them onto each engine's settings."""
    return Prosody(rate=float(rng.uniform()), pitch=float(rng.uniform()))


def synthesize(voice: Voice, text: str, prosody: Prosody) -> np.ndarray:
    """Speak `text`; returns float32 samples in [-1, 1] at SAMPLE_RATE Hz, shape [samples]."""
    if voice.engine == "espeak":
        command = _espeak_command(voice.name, text, prosody)
    else:
        command = _flite_command(voice.name, text, prosody)
    result = subprocess.run(command, capture_output=True, check=True)
    samples, rate = parse_wav(result.stdout)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE)
    return samples.astype(np.float32)


def _espeak_command(name: str, text: str, prosody: Prosody) -> list[str]:
    wpm = round(_lerp(ESPEAK_RATE_WPM, prosody.rate))
    pitch = round(_lerp(ESPEAK_PITCH, prosody.pitch))
    return ["espeak-ng", "-v", name, "-s", str(wpm), "-p", str(pitch), "--stdout", text]


def _flite_command(name: str, text: str, prosody: Prosody) -> list[str]:
    # A faster speaker stretches durations less, hence 1 - rate.
    stretch = _lerp(FLITE_STRETCH, 1.0 - prosody.rate)
    command = ["flite", "-voice", name, "--setf", f"duration_stretch={stretch:.3f}"]
    base_f0 = FLITE_BASE_F0_HZ[name]
    if base_f0 is not None:
        f0 = base_f0 * _lerp(FLITE_F0_SCALE, prosody.pitch)
        command += ["--setf", f"int_f0_target_mean={f0:.1f}"]
    return command + ["-t", text, "-o", "/dev/stdout"]


def _lerp(bounds: tuple[float, float], position: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * position


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode 16-bit mono PCM WAV bytes into (float32 samples in [-1, 1], sample rate in Hz).

    Written by hand because espeak-ng streams its WAV with placeholder chunk sizes (0x7fffffff),
    which general readers reject; the data chunk simply runs to the end of the stream.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("synthesizer output is not a RIFF/WAVE stream")
    pos, rate = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if chunk == b"fmt ":
            channels, rate = int.from_bytes(body[2:4], "little"), int.from_bytes(body[4:8], "little")
            bits = int.from_bytes(body[14:16], "little")
            if (channels, bits) != (1, 16):
                raise ValueError(f"expected 16-bit mono WAV, got {channels} channels of {bits} bits")
        elif chunk == b"data":
            if rate is None:
                raise ValueError("WAV data chunk before its fmt chunk")
            body = body[: len(body) // 2 * 2]
            return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0, rate
        pos += 8 + size + (size & 1)
    raise ValueError("WAV stream has no data chunk")


@cache
def babble_pool() -> tuple[np.ndarray, ...]:
    """Fixed utterances (float32 [samples] at 16 kHz) that AAC babble events mix together.

    Built once per process from fixed texts and training voices, so it is identical in every
    worker and independent of the benchmark seed.
    """
    from toybench.grammar import sample_sentence

    rng = np.random.default_rng(20240601)
    voices = [Voice("espeak", f"{base}+{variant}") for base, variant in zip(
        ESPEAK_BASES, ("m1", "f1", "m3", "f5", "m5", "klatt2", "Alicia", "john"), strict=True)]
    pool = []
    for i in range(16):
        text = " ".join(sample_sentence(rng) for _ in range(2))
        pool.append(synthesize(voices[i % len(voices)], text, Prosody(rate=0.7, pitch=0.5)))
    return tuple(pool)
