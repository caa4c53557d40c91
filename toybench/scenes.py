"""Sound scenes for the toy AAC task: recipes of synthetic events, their timing, and their audio.

A *recipe* is the ordered list of events with their captioned attributes ("high tone, then three
beeps"); splits are made by recipe, so every test scene is a new combination of events that each
occur in training. What captions do not mention (exact frequencies, onsets, durations, loudness)
varies freely inside a recipe.
"""

from dataclasses import dataclass

import numpy as np

from toybench.audio import coloured_noise, fade, n_samples, peak_normalize, rms, seconds
from toybench.splits import MAX_CONTENT_DRAWS, split_of
from toybench.tts import SAMPLE_RATE, babble_pool

# Captioned attribute values of each event kind; "" for kinds with a single form.
EVENT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tone": ("low", "high"),
    "sweep": ("rising", "falling"),
    "beeps": ("2", "3", "4", "5"),
    "noise": ("white", "pink", "brown"),
    "clicks": ("slow", "fast"),
    "siren": ("",),
    "babble": ("",),
}
EVENT_KINDS = tuple(EVENT_ATTRIBUTES)

# Probability of a scene holding 1, 2 or 3 events.
EVENT_COUNT_PROBS = (0.25, 0.45, 0.30)

# Duration range of each kind, seconds; beeps take as long as their count needs.
DURATION_RANGE_S = {
    "tone": (0.4, 1.2), "sweep": (0.6, 1.5), "noise": (0.5, 1.5), "clicks": (1.0, 2.0),
    "siren": (1.0, 2.0), "babble": (1.0, 2.0),
}
LEAD_S = (0.1, 0.6)
"""Silence before the first event, seconds."""
GAP_S = (0.25, 0.7)
"""Silence between events, seconds: long enough that the order is audible."""
TAIL_S = (0.1, 0.5)
"""Silence after the last event, seconds."""
EVENT_PEAK_DBFS = (-20.0, -3.0)
"""Peak level of each event, dB re full scale (relative loudness is not captioned)."""

BEEP_PERIOD_S = (0.2, 0.34)
"""Onset-to-onset time of beeps in a series, seconds."""
BEEP_DUTY = 0.45
"""Fraction of a beep period that sounds; the rest is the gap (so beeps last 90-150 ms)."""

MAX_TIMING_DRAWS = 200


@dataclass(frozen=True)
class Event:
    """One captioned event: its kind and attribute (pitch class, direction, count, colour, pace)."""

    kind: str
    attr: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.attr}" if self.attr else self.kind


Recipe = tuple[Event, ...]


def recipe_key(recipe: Recipe) -> str:
    """Canonical text of a recipe, e.g. "tone:high>beeps:3"; what splits are decided on."""
    return ">".join(event.key for event in recipe)


ALL_EVENTS = tuple(Event(kind, attr) for kind, attrs in EVENT_ATTRIBUTES.items() for attr in attrs)


@dataclass(frozen=True)
class PlacedEvent:
    """An event placed in a clip: onset and duration in seconds, peak level in dBFS."""

    event: Event
    onset_s: float
    duration_s: float
    peak_dbfs: float


def sample_event(rng: np.random.Generator) -> Event:
    # Kind first, then attribute, so kinds with many attributes (beeps) are not over-represented.
    kind = EVENT_KINDS[rng.integers(len(EVENT_KINDS))]
    attrs = EVENT_ATTRIBUTES[kind]
    return Event(kind, attrs[rng.integers(len(attrs))])


def sample_recipe(rng: np.random.Generator) -> Recipe:
    """1-3 events, no event (kind and attribute) twice, so each caption phrase names one event."""
    n_events = 1 + int(rng.choice(len(EVENT_COUNT_PROBS), p=EVENT_COUNT_PROBS))
    recipe: list[Event] = []
    while len(recipe) < n_events:
        event = sample_event(rng)
        if event not in recipe:
            recipe.append(event)
    return tuple(recipe)


def sample_recipe_in_split(rng: np.random.Generator, split: str) -> Recipe:
    """Draw whole recipes until one is owned by `split`."""
    for _ in range(MAX_CONTENT_DRAWS):
        recipe = sample_recipe(rng)
        if split_of("aac:" + recipe_key(recipe)) == split:
            return recipe
    raise RuntimeError(f"no recipe for split {split!r} in {MAX_CONTENT_DRAWS} draws")


def sample_timing(recipe: Recipe, rng: np.random.Generator, min_s: float, max_s: float,
                  ) -> tuple[list[PlacedEvent], float]:
    """Place the events one after another; returns (placed events, clip duration in seconds).

    Plans longer than `max_s` are redrawn; shorter than `min_s` get a longer tail.
    """
    for _ in range(MAX_TIMING_DRAWS):
        placed, t = [], float(rng.uniform(*LEAD_S))
        for i, event in enumerate(recipe):
            if i > 0:
                t += float(rng.uniform(*GAP_S))
            duration = _event_duration(event, rng)
            placed.append(PlacedEvent(event, round(t, 4), round(duration, 4),
                                      round(float(rng.uniform(*EVENT_PEAK_DBFS)), 2)))
            t += duration
        total = max(t + float(rng.uniform(*TAIL_S)), min_s)
        if total <= max_s:
            return placed, round(total, 4)
    raise RuntimeError(f"recipe {recipe_key(recipe)} does not fit in {max_s} s")


def _event_duration(event: Event, rng: np.random.Generator) -> float:
    if event.kind == "beeps":
        return float(rng.uniform(*BEEP_PERIOD_S)) * (int(event.attr) - 1 + BEEP_DUTY)
    return float(rng.uniform(*DURATION_RANGE_S[event.kind]))


def render_scene(placed: list[PlacedEvent], duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Mix the placed events into a clip of `duration_s` seconds, float32 [samples]."""
    clip = np.zeros(n_samples(duration_s), dtype=np.float32)
    for item in placed:
        signal = render_event(item.event, item.duration_s, rng)
        signal = peak_normalize(signal, item.peak_dbfs)
        start = n_samples(item.onset_s)
        clip[start:start + len(signal)] += signal[: len(clip) - start]
    return clip


def render_event(event: Event, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Audio of one event, `duration_s` seconds long, at any level (the caller sets it)."""
    renderers = {"tone": _tone, "sweep": _sweep, "beeps": _beeps, "noise": _noise, "clicks": _clicks,
                 "siren": _siren, "babble": _babble}
    return renderers[event.kind](event.attr, duration_s, rng)


def _time(duration_s: float) -> np.ndarray:
    return np.arange(n_samples(duration_s), dtype=np.float64) / SAMPLE_RATE


def _tone(attr: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Steady tone: low 150-350 Hz, high 1500-3000 Hz, with a weak second harmonic."""
    freq = rng.uniform(150, 350) if attr == "low" else rng.uniform(1500, 3000)
    t = _time(duration_s)
    wave = np.sin(2 * np.pi * freq * t) + 0.25 * np.sin(4 * np.pi * freq * t)
    return fade(wave.astype(np.float32), 0.01)


def _sweep(attr: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Exponential sweep between 250-500 Hz and 1800-3000 Hz, upward when rising."""
    low, high = rng.uniform(250, 500), rng.uniform(1800, 3000)
    f_start, f_end = (low, high) if attr == "rising" else (high, low)
    t = _time(duration_s)
    ratio = f_end / f_start
    # Phase of f(t) = f_start * ratio^(t / T), integrated in closed form.
    phase = 2 * np.pi * f_start * duration_s / np.log(ratio) * (ratio ** (t / duration_s) - 1)
    return fade(np.sin(phase).astype(np.float32), 0.01)


def _beeps(attr: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """`attr` beeps at one frequency of 800-1400 Hz filling `duration_s` (see `_event_duration`)."""
    count, freq = int(attr), rng.uniform(800, 1400)
    period_s = duration_s / (count - 1 + BEEP_DUTY)
    out = np.zeros(n_samples(duration_s), dtype=np.float32)
    beep = fade(np.sin(2 * np.pi * freq * _time(period_s * BEEP_DUTY)).astype(np.float32), 0.005)
    for i in range(count):
        start = n_samples(i * period_s)
        out[start:start + len(beep)] = beep[: len(out) - start]
    return out


def _noise(attr: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    return fade(coloured_noise(attr, n_samples(duration_s), rng), 0.02)


def _clicks(attr: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Decaying noise bursts: slow 2-3.5 per second, fast 8-12 per second, slightly jittered."""
    rate_hz = rng.uniform(2.0, 3.5) if attr == "slow" else rng.uniform(8.0, 12.0)
    out = np.zeros(n_samples(duration_s), dtype=np.float32)
    # An 8 ms noise burst decaying with a 2 ms time constant: short enough to read as a click.
    click_n = n_samples(0.008)
    click = (rng.standard_normal(click_n) * np.exp(-np.arange(click_n) / (click_n / 4))).astype(np.float32)
    period = 1.0 / rate_hz
    t = 0.0
    while t + seconds(click_n) < duration_s:
        start = n_samples(t)
        out[start:start + click_n] += click
        t += period * rng.uniform(0.9, 1.1)
    return out


def _siren(attr: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Yelping siren: a square-ish tone whose frequency swings ±250-400 Hz around 700-1000 Hz,
    1.5-3 times per second."""
    centre, depth, rate_hz = rng.uniform(700, 1000), rng.uniform(250, 400), rng.uniform(1.5, 3.0)
    t = _time(duration_s)
    start_phase = rng.uniform(0, 2 * np.pi)
    # Phase of f(t) = centre + depth * sin(2π rate t + start_phase), integrated in closed form.
    phase = 2 * np.pi * centre * t - depth / rate_hz * (np.cos(2 * np.pi * rate_hz * t + start_phase)
                                                      - np.cos(start_phase))
    wave = np.sin(phase) + np.sin(3 * phase) / 3 + np.sin(5 * phase) / 5
    return fade(wave.astype(np.float32), 0.02)


def _babble(attr: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """3-5 overlapping talkers from the fixed babble pool, each at a random offset and level."""
    pool = babble_pool()
    n = n_samples(duration_s)
    out = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(3, 6))):
        utterance = pool[rng.integers(len(pool))]
        looped = np.tile(utterance, n // len(utterance) + 2)
        start = int(rng.integers(len(utterance)))
        talker = looped[start:start + n]
        out += talker / (rms(talker) + 1e-9) * 10 ** (rng.uniform(-4, 4) / 20)
    return fade(out, 0.05)
