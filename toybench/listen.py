"""Check the benchmark against an independent listener: a real pretrained Whisper, or any smolt model's predictions.

    python -m toybench.listen --whisper checkpoints/mini/whisper-base-hf            # real Whisper, zero-shot
    python -m toybench.listen --predictions runs/eval/teacher/predictions.jsonl --name teacher

A benchmark we generate is only as good as its independent check: speech that a pretrained recognizer cannot
hear is noise, not difficulty. This scores a split's ASR clips with smolt's corpus WER (`common.asr_metrics`,
Whisper's English normalizer) overall and per bucket of the generation metadata (`<data>/meta/asr_<split>.json`):
voice family, espeak-ng base and variant, flite voice, speaking rate, pitch and noise.

Each run writes `<data>/listener/<name>-<split>.json` (settings, scores, one hypothesis per clip) and re-renders
`<data>/LISTENER.md` from every such file, one WER column per listener, each with its exact command. The data
card (DATACARD.md) links to LISTENER.md rather than holding the table, because the manifest records the card's
size and sha256: editing the card would mark the benchmark incomplete and make `toybench.generate` redo it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from common.asr_metrics import asr_scores
from toybench import tts
from toybench.config import ToyBenchConfig

REPORT_NAME = "LISTENER.md"
RESULTS_DIR = "listener"
UNHEARD_WER = 0.9
"""A bucket where every listener's WER is at least this is flagged as heard by none (noise, not difficulty)."""
THIRDS = ("low", "mid", "high")
DIMENSIONS = ("family", "espeak-ng base", "espeak-ng variant", "flite voice", "rate", "pitch", "noise",
              "noise colour")


class ListenError(ValueError):
    """A problem with the listener's inputs, named with its file and the fix."""


# --- buckets -----------------------------------------------------------------------------------------------


def load_clips(data_dir: Path, split: str) -> list[dict]:
    """The generation records of a split's ASR clips (`meta/asr_<split>.json`), in clip order."""
    path = Path(data_dir) / "meta" / f"asr_{split}.json"
    if not path.is_file():
        raise ListenError(f"{path}: no clip metadata; generate the benchmark first "
                          "(python -m toybench.generate --config configs/toy/data.yaml)")
    records = json.loads(path.read_text(encoding="utf-8"))
    for i, record in enumerate(records):
        missing = [k for k in ("path", "text", "voice", "rate", "pitch", "noise", "snr_db") if k not in record]
        if missing:
            raise ListenError(f"{path}: record {i} lacks {missing}; regenerate the benchmark with this toybench")
    return records


def snr_range(data_dir: Path) -> tuple[float, float]:
    """The SNR range (dB) the benchmark was generated with: its manifest's config, else ToyBenchConfig's."""
    manifest = Path(data_dir) / "manifest.json"
    default = ToyBenchConfig()
    if manifest.is_file():
        config = json.loads(manifest.read_text()).get("config", {})
        return float(config.get("snr_db_min", default.snr_db_min)), float(config.get("snr_db_max", default.snr_db_max))
    return default.snr_db_min, default.snr_db_max


def _third(position: float) -> int:
    return min(int(position * 3), 2)


def _edges(bounds: tuple[float, float], index: int, digits: int = 0) -> str:
    lo, hi = bounds
    step = (hi - lo) / 3
    a, b = lo + step * index, lo + step * (index + 1)
    return f"{a:.{digits}f}-{b:.{digits}f}"


def rate_label(index: int) -> str:
    """Rate thirds of the [0, 1] position, with each engine's setting (flite stretches less when faster)."""
    flite = tuple(reversed(tts.FLITE_STRETCH))
    return (f"{('slow', 'mid', 'fast')[index]} (espeak-ng {_edges(tts.ESPEAK_RATE_WPM, index)} wpm, "
            f"flite stretch {_edges(flite, index, 2)})")


def pitch_label(index: int) -> str:
    return (f"{THIRDS[index]} (espeak-ng pitch {_edges(tts.ESPEAK_PITCH, index)}, "
            f"flite F0 x {_edges(tts.FLITE_F0_SCALE, index, 2)})")


def buckets(record: dict, snr: tuple[float, float]) -> dict[str, str]:
    """The bucket of one clip in every dimension that applies to it (dimension → bucket label).

    espeak-ng voices are `espeak:<base>+<variant>`, flite voices `flite:<name>`. Pitch is left out for a flite
    voice that ignores the F0 setting (rms): its pitch position changed nothing. Noise is "clean" or one of three
    equal SNR ranges over the generation's range, lowest SNR (hardest) first.
    """
    engine, name = record["voice"].split(":", 1)
    out = {}
    if engine == "espeak":
        base, variant = name.split("+", 1)
        out.update({"family": "espeak-ng", "espeak-ng base": base, "espeak-ng variant": variant})
    else:
        out.update({"family": "flite", "flite voice": name})
    out["rate"] = rate_label(_third(record["rate"]))
    if engine == "espeak" or tts.FLITE_BASE_F0_HZ.get(name) is not None:
        out["pitch"] = pitch_label(_third(record["pitch"]))
    if record["noise"] is None:
        out["noise"] = "clean"
    else:
        lo, hi = snr
        index = _third((record["snr_db"] - lo) / (hi - lo)) if hi > lo else 0
        out["noise"] = f"SNR {_edges(snr, index)} dB"
        out["noise colour"] = record["noise"]
    return out


def _bucket_order(dimension: str, label: str) -> tuple:
    """Rows in a readable order: clean first, then SNR ascending; thirds low to high; names alphabetically."""
    if dimension == "noise":
        return (0, 0.0) if label == "clean" else (1, float(label.split()[1].split("-")[0]))
    if dimension in ("rate", "pitch"):
        return (0, {"slow": 0, "low": 0, "mid": 1, "fast": 2, "high": 2}[label.split()[0]])
    return (0, label.lower())


def bucket_scores(records: Sequence[dict], hypotheses: Sequence[str], snr: tuple[float, float]) -> dict:
    """Corpus WER overall and per bucket.

    Returns {"overall": asr_scores(...), "buckets": {dimension: {label: {"wer", "cer", "clips", "ref_words",
    "substitutions", "deletions", "insertions"}}}}; a bucket's WER is the corpus WER of its clips (errors summed
    over its clips, divided by its reference words), not a mean of per-clip rates.
    """
    if len(records) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(records)} clips")
    keep = ("wer", "cer", "ref_words", "substitutions", "deletions", "insertions")
    groups: dict[str, dict[str, list[int]]] = {}
    for i, record in enumerate(records):
        for dimension, label in buckets(record, snr).items():
            groups.setdefault(dimension, {}).setdefault(label, []).append(i)
    out: dict = {"overall": asr_scores(list(hypotheses), [r["text"] for r in records]), "buckets": {}}
    for dimension in DIMENSIONS:
        labels = groups.get(dimension, {})
        out["buckets"][dimension] = {}
        for label in sorted(labels, key=lambda lab, d=dimension: _bucket_order(d, lab)):
            chosen = labels[label]
            scores = asr_scores([hypotheses[i] for i in chosen], [records[i]["text"] for i in chosen])
            out["buckets"][dimension][label] = {"clips": len(chosen), **{k: scores[k] for k in keep}}
    return out


# --- listeners ---------------------------------------------------------------------------------------------


def read_predictions(path: Path, records: Sequence[dict]) -> list[str | None]:
    """Hypotheses from a `predictions.jsonl` of `python -m evaluation.run`, one per record (None: not decoded).

    Its ASR lines are `{"task": "asr", "path", "prediction", "references"}`; `path` is the clip as the
    evaluation resolved it (absolute, or relative to where it ran), matched to a record by the record's path
    relative to the benchmark root (`audio/asr/<split>/NNNNN.flac`) being its tail.
    """
    path = Path(path)
    if not path.is_file():
        raise ListenError(f"{path}: predictions file not found; run python -m evaluation.run, which writes "
                          "<output_dir>/<model>/predictions.jsonl")
    index = {tuple(Path(r["path"]).parts): i for i, r in enumerate(records)}
    tail = max(len(key) for key in index)
    hypotheses: list[str | None] = [None] * len(records)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ListenError(f"{path}: line {number} is not JSON ({err.msg})") from None
        if entry.get("task") != "asr":
            continue
        if not isinstance(entry.get("prediction"), str) or not isinstance(entry.get("path"), str):
            raise ListenError(f"{path}: line {number} needs string fields 'path' and 'prediction'")
        parts = Path(entry["path"]).parts
        match = next((index[parts[-n:]] for n in range(1, tail + 1) if parts[-n:] in index), None)
        if match is None:
            raise ListenError(f"{path}: line {number}: clip {entry['path']!r} is not an ASR clip of this split; "
                              "point --data/--split at the benchmark the predictions were made on")
        hypotheses[match] = entry["prediction"]
    if all(h is None for h in hypotheses):
        raise ListenError(f"{path}: no ASR predictions for this split")
    return hypotheses


def whisper_settings(tokens_per_second: float, extra_tokens: int, no_repeat_ngram: int) -> dict:
    return {"decoding": "greedy", "language": "en", "task": "transcribe", "timestamps": False,
            "max_new_tokens": f"ceil({tokens_per_second} x clip seconds) + {extra_tokens}, longest clip of a batch",
            "no_repeat_ngram_size": no_repeat_ngram, "timestamp_tokens": "suppressed"}


def transcribe_whisper(folder: Path, paths: Sequence[Path], batch_size: int = 8, tokens_per_second: float = 5.0,
                       extra_tokens: int = 8, no_repeat_ngram: int = 4, progress: bool = False) -> list[str]:
    """Greedy English transcripts (no timestamps) of `paths` by a Hugging Face Whisper folder, one per clip.

    Two guards against the decoder looping on a clip it cannot hear: `max_new_tokens` follows the longest clip of
    the batch (`tokens_per_second` tokens per second of audio, plus `extra_tokens`; the toy speech is at most
    ~3.2 words/s), and no token n-gram of `no_repeat_ngram` tokens may repeat (0 turns it off). A loop would
    otherwise add up to 448 tokens of insertions and dominate the corpus WER.
    """
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from common.audio import load_audio

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ListenError(f"{folder}: not a Hugging Face Whisper folder (no config.json); provision one with "
                          "python -m convert.provision")
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    rate = processor.feature_extractor.sampling_rate
    extra = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    if no_repeat_ngram:
        extra["no_repeat_ngram_size"] = no_repeat_ngram
    # No timestamps, so none may be emitted either: HF's Whisper generate re-decodes a window from the last
    # timestamp it saw, and a model that emits <|0.00|> twice would re-decode the same window forever.
    first_timestamp = model.generation_config.no_timestamps_token_id + 1
    extra["suppress_tokens"] = sorted({*(model.generation_config.suppress_tokens or []),
                                       *range(first_timestamp, model.config.vocab_size)})
    texts: list[str] = []
    for start in range(0, len(paths), batch_size):
        waves = [load_audio(p, rate) for p in paths[start:start + batch_size]]
        longest = max(len(w) for w in waves) / rate
        features = processor.feature_extractor(waves, sampling_rate=rate, return_tensors="pt").input_features
        # Whisper's 448 target positions hold the 4 prompt tokens too.
        limit = min(math.ceil(tokens_per_second * longest) + extra_tokens, model.config.max_target_positions - 4)
        with torch.inference_mode():
            ids = model.generate(features, max_new_tokens=limit, do_sample=False, num_beams=1,
                                 return_timestamps=False, **extra)
        texts += [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if progress:
            print(f"  {len(texts)}/{len(paths)} clips", file=sys.stderr, flush=True)
    return texts


# --- report ------------------------------------------------------------------------------------------------


def result_path(data_dir: Path, name: str, split: str) -> Path:
    return Path(data_dir) / RESULTS_DIR / f"{name}-{split}.json"


def load_results(data_dir: Path) -> list[dict]:
    folder = Path(data_dir) / RESULTS_DIR
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def render_table(results: Sequence[dict]) -> str:
    """Markdown table: one row per bucket, one "WER (clips)" column per listener; rows of one split only."""
    def cell(scores: dict | None) -> str:
        return "" if scores is None else f"{scores['wer']:.3f} ({scores['clips']})"

    header = ["bucket", "", *[r["name"] for r in results]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    overall = [{"wer": r["scores"]["overall"]["wer"], "clips": r["scores"]["overall"]["utterances"]}
               for r in results]
    lines.append("| **all** | | " + " | ".join(f"**{cell(s)}**" for s in overall) + " |")
    for dimension in DIMENSIONS:
        labels: list[str] = []
        for r in results:
            labels += [lab for lab in r["scores"]["buckets"].get(dimension, {}) if lab not in labels]
        for label in labels:
            cells = [cell(r["scores"]["buckets"].get(dimension, {}).get(label)) for r in results]
            lines.append(f"| {dimension} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unheard(results: Sequence[dict], threshold: float = UNHEARD_WER) -> list[str]:
    """Buckets where every listener that scored them has WER >= threshold: "<dimension>: <label>"."""
    found = []
    for dimension in DIMENSIONS:
        labels = {lab for r in results for lab in r["scores"]["buckets"].get(dimension, {})}
        for label in sorted(labels):
            wers = [r["scores"]["buckets"][dimension][label]["wer"] for r in results
                    if label in r["scores"]["buckets"].get(dimension, {})]
            if wers and min(wers) >= threshold:
                found.append(f"{dimension}: {label}")
    return found


def render_report(results: Sequence[dict]) -> str:
    """LISTENER.md: per split, the bucket table of every listener, the commands, and the unheard buckets."""
    parts = ["""# Independent listener

Corpus WER (Whisper English normalizer, `common.asr_metrics`) of independent listeners on this benchmark's
ASR clips, overall and per bucket of the generation metadata (`meta/asr_<split>.json`); each cell is
"WER (clips)". Rate and pitch buckets are thirds of the sampled position in [0, 1] (mapped onto each engine's
setting as shown); noise buckets are thirds of the SNR range; flite's rms ignores the pitch setting and has no
pitch bucket. A bucket that no listener hears (WER >= 0.9 for all) is noise, not difficulty.

The trained teacher's column is filled by running the same command on its predictions:

    python -m evaluation.run --config <eval config> ...     # writes <output_dir>/<model>/predictions.jsonl
    python -m toybench.listen --predictions <output_dir>/<model>/predictions.jsonl --name teacher
"""]
    for split in sorted({r["split"] for r in results}):
        chosen = [r for r in results if r["split"] == split]
        commands = "\n".join(f"- {r['name']}: `{r['command']}`" for r in chosen)
        settings = "\n".join(f"- {r['name']}: {json.dumps(r['settings'])}" for r in chosen)
        none = ", ".join(unheard(chosen)) or "none"
        parts.append(f"""## Split {split}

{render_table(chosen)}

Heard by no listener (WER >= {UNHEARD_WER}): {none}.

Commands:

{commands}

Decoding settings:

{settings}
""")
    return "\n".join(parts)


def write_report(data_dir: Path) -> Path:
    """Re-render `<data>/LISTENER.md` from every result in `<data>/listener/`; idempotent."""
    path = Path(data_dir) / REPORT_NAME
    path.write_text(render_report(load_results(data_dir)), encoding="utf-8")
    return path


# --- command line ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m toybench.listen", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--whisper", type=Path, help="a Hugging Face Whisper folder to transcribe with (zero-shot)")
    source.add_argument("--predictions", type=Path, help="predictions.jsonl written by python -m evaluation.run")
    parser.add_argument("--name", help="column name (default: the Whisper folder's or the model folder's name)")
    parser.add_argument("--data", type=Path, default=Path("data/toy"), help="benchmark root (default data/toy)")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--max-clips", type=int, default=0, help="score only the first N clips (0: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens-per-second", type=float, default=5.0,
                        help="Whisper's max_new_tokens per second of audio (a guard against loops)")
    parser.add_argument("--no-repeat-ngram", type=int, default=4,
                        help="Whisper may not repeat a token n-gram of this size (0: off)")
    parser.add_argument("--no-report", action="store_true", help=f"do not re-render <data>/{REPORT_NAME}")
    args = parser.parse_args(argv)

    records = load_clips(args.data, args.split)
    if args.max_clips:
        records = records[:args.max_clips]
    if args.whisper is not None:
        name = args.name or args.whisper.name.removesuffix("-hf")
        paths = [args.data / r["path"] for r in records]
        hypotheses: list[str | None] = list(transcribe_whisper(
            args.whisper, paths, args.batch_size, args.tokens_per_second, no_repeat_ngram=args.no_repeat_ngram,
            progress=True))
        settings = whisper_settings(args.tokens_per_second, 8, args.no_repeat_ngram)
    else:
        name = args.name or args.predictions.parent.name
        hypotheses = read_predictions(args.predictions, records)
        settings = {"predictions": "as decoded by python -m evaluation.run"}
    scored = [(r, h) for r, h in zip(records, hypotheses, strict=True) if h is not None]
    if len(scored) < len(records):
        print(f"{len(records) - len(scored)} of {len(records)} clips have no prediction; scoring the other "
              f"{len(scored)}", file=sys.stderr)
    snr = snr_range(args.data)
    scores = bucket_scores([r for r, _ in scored], [h for _, h in scored], snr)
    result = {"name": name, "split": args.split, "command": "python -m toybench.listen " + shlex.join(argv),
              "settings": settings, "scores": scores,
              "hypotheses": [{"path": r["path"], "text": r["text"], "hypothesis": h} for r, h in scored]}
    out = result_path(args.data, name, args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(render_table([result]))
    print(f"\nwrote {out}")
    if not args.no_report:
        print(f"wrote {write_report(args.data)}")
    return result


if __name__ == "__main__":
    main()
