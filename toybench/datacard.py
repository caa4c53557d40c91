"""Statistics of a generated benchmark and its data card (DATACARD.md).

Everything here is a pure function of the clip records, the config and the tool versions, so the
data card is as reproducible as the audio: no dates, timings or absolute paths.
"""

import json
from collections import Counter

import numpy as np

from toybench import audio, captions, grammar, items, scenes, tts
from toybench.config import PRESETS, ToyBenchConfig
from toybench.splits import SPLITS, TASKS


def compute_stats(records: list[dict]) -> dict:
    """Counts, durations, voices, sentences and recipes per task and split."""
    stats: dict = {"clips": {}, "annotation_entries": {}, "hours": {}, "duration_s": {}}
    for task in TASKS:
        for key in stats:
            stats[key][task] = {}
        for split in SPLITS:
            chosen = [r for r in records if r["task"] == task and r["split"] == split]
            durations = np.array([r["duration_s"] for r in chosen])
            entries = len(chosen) if task == "asr" else sum(len(r["captions"]) for r in chosen)
            stats["clips"][task][split] = len(chosen)
            stats["annotation_entries"][task][split] = entries
            stats["hours"][task][split] = round(float(durations.sum()) / 3600, 3)
            stats["duration_s"][task][split] = {"min": round(float(durations.min()), 2),
                                                "mean": round(float(durations.mean()), 2),
                                                "max": round(float(durations.max()), 2)}
    asr = {s: [r for r in records if r["task"] == "asr" and r["split"] == s] for s in SPLITS}
    aac = {s: [r for r in records if r["task"] == "aac" and r["split"] == s] for s in SPLITS}
    stats["asr"] = {
        "vocabulary_size": len(grammar.vocabulary()),
        "words_used": {s: len({w for r in asr[s] for w in r["text"].split()}) for s in SPLITS},
        "distinct_sentences": {s: len({r["text"] for r in asr[s]}) for s in SPLITS},
        "voices_used": {s: len({r["voice"] for r in asr[s]}) for s in SPLITS},
        "flite_clips": {s: sum(r["voice"].startswith("flite:") for r in asr[s]) for s in SPLITS},
        "noisy_clips": {s: sum(r["noise"] is not None for r in asr[s]) for s in SPLITS},
    }
    events = {s: {_event_key(e) for r in aac[s] for e in r["events"]} for s in SPLITS}
    stats["aac"] = {
        "distinct_recipes": {s: len({r["recipe"] for r in aac[s]}) for s in SPLITS},
        "events_per_clip": {s: dict(sorted(Counter(len(r["events"]) for r in aac[s]).items()))
                            for s in SPLITS},
        "caption_vocabulary_size": len(captions.caption_vocabulary()),
        "test_events_unseen_in_train": sorted(events["test"] - events["train"]),
    }
    return stats


def _event_key(event: dict) -> str:
    return scenes.Event(event["kind"], event["attr"]).key


def preset_name(cfg: ToyBenchConfig) -> str | None:
    """The size preset whose counts `cfg` has, if any."""
    counts = {"n_train": cfg.n_train, "n_valid": cfg.n_valid, "n_test": cfg.n_test}
    return next((name for name, sizes in PRESETS.items() if sizes == counts), None)


def render_datacard(cfg: ToyBenchConfig, stats: dict, versions: dict[str, str], generator_version: str,
                    records: list[dict]) -> str:
    """The DATACARD.md text; a few test `records` serve as examples."""
    test = {task: [r for r in records if r["task"] == task and r["split"] == "test"][:3] for task in TASKS}
    parts = [
        _header(cfg, versions, generator_version),
        _splits_section(stats),
        _asr_section(cfg, stats, test["asr"]),
        _aac_section(stats, test["aac"]),
        _listener_section(),
    ]
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _header(cfg: ToyBenchConfig, versions: dict[str, str], generator_version: str) -> str:
    size = preset_name(cfg)
    if size is not None and cfg.data_fields() == ToyBenchConfig(**PRESETS[size], seed=cfg.seed).data_fields():
        how = f"    python -m toybench.generate --out DIR --size {size} --seed {cfg.seed}"
    else:
        how = "    toybench.generate(toybench.ToyBenchConfig(**config), DIR)  # config: the JSON below"
    tools = "\n".join(f"- {name}: {version}" for name, version in versions.items())
    files = _table(["path", "holds"], [
        ["`audio/{asr,aac}/{split}/NNNNN.flac`", "16 kHz mono 16-bit FLAC clips"],
        ["`asr_{split}.json`, `aac_{split}.json`",
         'SALMONN annotation JSON of one task, `{"annotation": [{"path", "text", "task"}]}`, '
         "task `asr` or `audiocaption`; an AAC clip appears once per caption"],
        ["`{split}.json`", "both tasks of a split, ASR entries first"],
        ["`meta/{task}_{split}.json`", "one record per clip: voice, prosody, noise (ASR); recipe, "
         "event onsets, durations and levels, captions (AAC)"],
        ["`manifest.json`", "sha256 and size of every other file, config, tool versions, statistics"],
    ])
    return f"""# toybench: synthetic speech and sound scenes

A benchmark generated on the machine, because no model or dataset hub is reachable: spoken sentences
for ASR (espeak-ng and flite voices), and sound scenes of synthetic events with five reference
captions each for audio captioning (AAC). Generator version {generator_version}, seed {cfg.seed}.
Regenerate with

{how}

## Config

```json
{json.dumps(cfg.data_fields(), indent=2)}
```

## Tools

The same seed gives byte-identical files with the same versions of:

{tools}

## Files

Paths in the annotation JSON are relative to its folder, the benchmark root.

{files}
"""


def _splits_section(stats: dict) -> str:
    rows = []
    for task in TASKS:
        for split in SPLITS:
            d = stats["duration_s"][task][split]
            rows.append([task, split, stats["clips"][task][split], stats["annotation_entries"][task][split],
                         f"{stats['hours'][task][split]:.3f}",
                         f"{d['min']:.2f} / {d['mean']:.2f} / {d['max']:.2f}"])
    table = _table(["task", "split", "clips", "annotation entries", "hours", "duration min / mean / max (s)"],
                   rows)
    return f"""## Splits

Content is split by a stable hash (sha256) of its text, 80 / 10 / 10 % of the content space to
train / valid / test: a sentence (ASR) or a scene recipe (AAC) never occurs in two splits. ASR voices
are split too: valid and test voices are never heard in training.

{table}
"""


def _asr_section(cfg: ToyBenchConfig, stats: dict, examples: list[dict]) -> str:
    asr = stats["asr"]
    rows = []
    for split in SPLITS:
        pool = len(tts.voice_pool(split, "espeak")) + len(tts.voice_pool(split, "flite"))
        rows.append([split, pool, asr["voices_used"][split], asr["flite_clips"][split],
                     asr["noisy_clips"][split], asr["distinct_sentences"][split], asr["words_used"][split],
                     ", ".join(tts.FLITE_SPLIT_VOICES[split]),
                     ", ".join(tts.ESPEAK_SPLIT_VARIANTS[split])])
    table = _table(["split", "voices in pool", "voices used", "flite clips", "noisy clips",
                    "distinct sentences", "words used", "flite voices", "espeak-ng variants"], rows)
    example_lines = "\n".join(f'- `{r["path"]}` ({r["voice"]}): "{r["text"]}"' for r in examples)
    bullets = [
        f"Sentences: {len(grammar.TEMPLATES)} templates over {asr['vocabulary_size']} words, "
        "lowercase without punctuation; the transcript is the target.",
        f"Voices: every espeak-ng English base ({', '.join(tts.ESPEAK_BASES)}) with the voice variants "
        f"below, and flite's built-in voices (kal is 8 kHz, upsampled); flite speaks a clip with probability "
        f"{cfg.flite_prob}.",
        f"Prosody: espeak-ng at {_span(tts.ESPEAK_RATE_WPM)} words per minute and pitch "
        f"{_span(tts.ESPEAK_PITCH)}; "
        f"flite with duration stretch {_span(tts.FLITE_STRETCH)} and mean F0 × {_span(tts.FLITE_F0_SCALE)} "
        "(rms ignores the F0 setting).",
        f"Clips: the synthesizer's silence trimmed, then {_span(items.ASR_LEAD_S)} s of silence before and "
        f"{_span(items.ASR_TAIL_S)} s after (more, to reach {cfg.min_duration_s} s), peak at "
        f"{_span(items.ASR_PEAK_DBFS, ' to ')} dBFS.",
        f"Noise: with probability {cfg.noise_prob}, white, pink or brown noise at "
        f"{cfg.snr_db_min}-{cfg.snr_db_max} dB SNR (against the speech, not the padding); under every clip a "
        f"white noise floor at {audio.NOISE_FLOOR_DBFS} dBFS.",
    ]
    bullet_lines = "\n".join("- " + bullet for bullet in bullets)
    return f"""## ASR: synthetic speech

{bullet_lines}

{table}

Examples from the test split:

{example_lines}
"""


def _span(bounds: tuple[float, float], joiner: str = "-") -> str:
    return f"{bounds[0]}{joiner}{bounds[1]}"


def _aac_section(stats: dict, examples: list[dict]) -> str:
    aac = stats["aac"]
    events = _table(["event", "captioned attributes", "synthesis"],
                    [[kind, ", ".join(a for a in attrs if a) or "-", _SYNTHESIS_NOTES[kind]]
                     for kind, attrs in scenes.EVENT_ATTRIBUTES.items()])
    splits = _table(["split", "distinct recipes", "clips by number of events"],
                    [[s, aac["distinct_recipes"][s], aac["events_per_clip"][s]] for s in SPLITS])
    templates = _table(["events", "templates"], [[n, " / ".join(ts)] for n, ts in captions.TEMPLATES.items()])
    phrases = _table(["event", "paraphrases"], [[e.key, " / ".join(text for text, _ in captions.phrases(e))]
                                                for e in scenes.ALL_EVENTS])
    example_lines = "\n".join(
        f"- `{r['path']}` ({r['recipe']}): " + "; ".join(f'"{c}"' for c in r["captions"]) for r in examples)
    unseen = ", ".join(aac["test_events_unseen_in_train"]) or "none"
    probs = ", ".join(map(str, scenes.EVENT_COUNT_PROBS))
    intro = (
        f"A scene is 1, 2 or 3 events (probabilities {probs}) one after another, separated by "
        f"{_span(scenes.GAP_S)} s of silence, each peaking at {_span(scenes.EVENT_PEAK_DBFS, ' to ')} dBFS, "
        f"over a {audio.NOISE_FLOOR_DBFS} dBFS white noise floor. Its *recipe* is the ordered list of events "
        "with their captioned attributes (e.g. `tone:high>beeps:3`); no event occurs twice in a recipe. "
        "Frequencies, onsets, durations and levels vary within a recipe and are not captioned. "
        f"Events of test scenes never seen in a training scene: {unseen}."
    )
    return f"""## AAC: synthetic sound scenes

{intro}

{events}

{splits}

### Captions

Five distinct captions per clip ({aac["caption_vocabulary_size"]} words in all), each a template filled
with one paraphrase per event in time order; `{{is<i>}}` and `{{s<i>}}` agree a verb with event i.
Templates that name a later event first say so ("comes after", "follows", "preceded by").

{templates}

{phrases}

Examples from the test split:

{example_lines}
"""


def _listener_section() -> str:
    # A link, not the table: the manifest records this card's sha256, so a listener run must not edit it.
    return """## Independent listener

A generated benchmark is checked against real pretrained recognizers: their WER overall and per voice family,
voice, rate, pitch and noise bucket, with the exact commands, is in `LISTENER.md` beside this card (written by
`python -m toybench.listen`; absent until it has run). A bucket no listener hears is noise, not difficulty.
"""


_SYNTHESIS_NOTES = {
    "tone": "sine with a weak 2nd harmonic; low 150-350 Hz, high 1500-3000 Hz; 0.4-1.2 s",
    "sweep": "exponential sweep between 250-500 Hz and 1800-3000 Hz; 0.6-1.5 s",
    "beeps": "90-150 ms beeps at one frequency of 800-1400 Hz, 0.2-0.34 s apart",
    "noise": "white, 1/f (pink) or 1/f² (brown) noise; 0.5-1.5 s",
    "clicks": "8 ms decaying noise bursts, slow 2-3.5 per s, fast 8-12 per s; 1-2 s",
    "siren": "square-ish tone swinging ±250-400 Hz around 700-1000 Hz 1.5-3 times per s; 1-2 s",
    "babble": "3-5 overlapping espeak-ng talkers from a fixed pool of 16 utterances; 1-2 s",
}
