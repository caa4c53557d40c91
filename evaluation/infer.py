"""Run any stage's model on audio files and print what it says: transcripts, captions, answers to a prompt.

    python -m evaluation.infer --model outputs/toy/student/model --task asr a.wav b.wav
    python -m evaluation.infer --model outputs/toy/int8/model --prompt "What animal is this?" dog.wav
    python -m evaluation.infer --model outputs/toy/export data/toy/test.json --output predictions.jsonl

The model folder may be any stage's (teacher, student, pruned, recovered, int8, export; see `evaluation.models`).
Inputs are audio files (anything soundfile reads, resampled to 16 kHz mono) or SALMONN annotation JSON files, whose
entries bring their own task and prompt (`Q`); a captioning clip listed once per reference caption is decoded once.
`--task` asks with the prompt the model was trained with for that task (the training config's `data.prompts` when
the model folder sits in a training job's output folder, else `common.dataset.DEFAULT_PROMPTS`); `--prompt` asks
anything. Loading and decoding are `evaluation.run`'s own (`evaluation.models`), so the outputs are those the
evaluation scores. One line per clip goes to stdout (`path<TAB>output`); `--output` also writes them as JSONL or JSON.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import json
import sys
from pathlib import Path

from common.annotations import DataError, DataReport, Example, read_examples
from common.audio import SAMPLE_RATE, AudioError, load_audio
from common.cli import run
from common.config import ConfigError, read_yaml
from common.dataset import DEFAULT_PROMPTS, AudioTextDataset, DataConfig
from common.decode import GenerationConfig, decode
from common.features import FeatureConfig
from evaluation.models import FOLDER_KINDS, folder_kind, load_model

OUTPUT_SUFFIXES = (".jsonl", ".json")


def task_prompts(folder: Path) -> tuple[dict[str, str], str]:
    """The prompt per task the model in `folder` was trained with, and where they came from.

    A training job writes its resolved config (with `data.prompts`) beside its `model/` folder
    (`outputs/<preset>/teacher/config.yaml`); stages without one (int8, export) were trained with the defaults
    unless their source's config said otherwise.
    """
    for config in (folder / "config.yaml", folder.parent / "config.yaml"):
        try:
            data = read_yaml(config).get("data")
        except ConfigError:  # absent or not a job's config: not where the prompts are
            continue
        prompts = data.get("prompts") if isinstance(data, dict) else None
        if isinstance(prompts, dict) and prompts:
            return {**DEFAULT_PROMPTS, **prompts}, f"{config} (data.prompts)"
    return dict(DEFAULT_PROMPTS), "common.dataset.DEFAULT_PROMPTS"


def feature_config(model) -> FeatureConfig:
    """The features the model's encoders read: Whisper's mel bins and window (HF's encoder wants exactly
    2 × max_source_positions frames of 10 ms), BEATs fbank only if the model has BEATs."""
    whisper = model.speech_encoder.config
    return FeatureConfig(whisper_n_mels=whisper.num_mel_bins,
                         whisper_chunk_seconds=2 * whisper.max_source_positions // 100,
                         beats=model.audio_encoder is not None)


def read_inputs(inputs: list[str], task: str | None, prompt: str | None,
                prompts: dict[str, str]) -> tuple[list[Example], dict[int, list[str]]]:
    """One example per clip to decode, and the reference texts of the clips that came from annotation JSON.

    Audio files are asked `prompt`, or the prompt of `task`. Annotation JSON files and saved HF dataset folders
    (see `common.annotations`) bring a task and maybe a prompt (`Q`) per entry; `--task` / `--prompt` override them.
    A clip listed several times with the same prompt (one entry per reference caption) is decoded once.
    """
    examples, refs, seen = [], {}, {}
    for source in inputs:
        if source.endswith(".json") or Path(source).is_dir():
            entries = read_examples([source], list(prompts), "raise", DataReport())
        else:
            if task is None and prompt is None:
                raise SystemExit(f"error: {source}: an audio file needs --task ({' / '.join(prompts)}) or --prompt")
            entries = [Example(str(Path(source)), "", task or "prompt", source=source)]
        for ex in entries:
            if task is not None:
                ex.task = task
            ex.prompt = prompt or (prompts[task] if task is not None else ex.prompt or prompts[ex.task])
            key = (ex.path, ex.prompt)
            if key not in seen:
                seen[key] = len(examples)
                examples.append(ex)
            if ex.text:
                refs.setdefault(seen[key], []).append(ex.text)
    return examples, refs


def clip_durations(examples: list[Example]) -> list[float]:
    """Each clip's duration in seconds, read once so that a missing, unreadable or empty file stops the run before the
    (slow) model load, named."""
    durations = []
    for ex in examples:
        wav = load_audio(ex.path, data=ex.audio_bytes)
        if len(wav) == 0:
            raise AudioError(f"{ex.path}: no audio (0 samples)", "zero_length")
        durations.append(len(wav) / SAMPLE_RATE)
    return durations


class WindowFeaturizer:
    """The dataset's featurizer on the first `seconds` of each clip: a longer clip's BEATs fbank would otherwise run
    past the Whisper window and give the Q-Former more windows than the model ever saw in training."""

    def __init__(self, featurizer, seconds: float):
        self.featurizer = featurizer
        self.samples = int(seconds * SAMPLE_RATE)

    def __call__(self, wav):
        return self.featurizer(wav[: self.samples])


def clip_dataset(examples: list[Example], durations: list[float], features: FeatureConfig) -> AudioTextDataset:
    """The clips as the evaluation's dataset (features computed as items are read), each cut to the model's Whisper
    window (with a warning: the evaluation drops such clips, `data.max_seconds`)."""
    window = features.whisper_chunk_seconds
    for ex, seconds in zip(examples, durations, strict=True):
        if seconds > window:
            print(f"warning: {ex.path} is {seconds:.1f} s; the model hears its first {window} s (its Whisper window)",
                  file=sys.stderr)
    durations = [min(seconds, window) for seconds in durations]
    report = DataReport(kept=len(examples), kept_seconds=sum(durations))
    dataset = AudioTextDataset(examples, durations, DataConfig(), features, report)
    dataset.featurizer = WindowFeaturizer(dataset.featurizer, window)
    return dataset


def write_outputs(path: Path, records: list[dict], header: dict) -> None:
    """JSONL: one record per line; JSON: `{**header, "outputs": records}`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        path.write_text(json.dumps({**header, "outputs": records}, indent=2, ensure_ascii=False) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    kinds = "; ".join(kind.name for kind in FOLDER_KINDS)
    parser = argparse.ArgumentParser(prog="python -m evaluation.infer", description=__doc__.split("\n")[0],
                                     epilog=f"Model folders: {kinds}.")
    parser.add_argument("inputs", nargs="+", help="audio files, SALMONN annotation JSON files or saved HF datasets")
    parser.add_argument("--model", required=True, help="a model folder of any stage (e.g. outputs/toy/student/model)")
    ask = parser.add_mutually_exclusive_group()
    ask.add_argument("--task", help="ask with the model's training prompt of this task (asr, audiocaption)")
    ask.add_argument("--prompt", help="ask this instruction instead (the model's template wraps it)")
    parser.add_argument("--output", help="also write the outputs here: .jsonl (one record per clip) or .json")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="clips decoded together (default 1: each clip alone). Batching is faster, but a clip's "
                             "audio tokens then depend on the longest clip in its batch (padding: extra Q-Former "
                             "windows with qformer.trim_to_audio, padded BEATs frames without it), so a clip's output "
                             "can change with the clips beside it; clips of equal length batch exactly")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights' dtype: auto is float16 on a GPU, float32 on the CPU; int8 weights stay int8")
    parser.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    parser.add_argument("--num-beams", type=int, default=GenerationConfig.num_beams, help="1 = greedy")
    parser.add_argument("--repetition-penalty", type=float, default=GenerationConfig.repetition_penalty)
    parser.add_argument("--loader", default="", help="module:function that loads the folder (default: from its files)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.num_beams < 1:
        parser.error("--batch-size, --max-new-tokens and --num-beams must be at least 1")
    if args.output and Path(args.output).suffix not in OUTPUT_SUFFIXES:
        parser.error(f"--output {args.output}: use a .jsonl or .json file")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Returns the records written: `{"path", "task", "prompt", "output"}` (plus `references` for annotated clips)."""
    args = parse_args(argv)
    folder = Path(args.model)
    try:
        kind = folder_kind(folder) if not args.loader else None
        prompts, prompts_from = task_prompts(folder)
        if args.task is not None and args.task not in prompts:
            raise SystemExit(f"error: --task {args.task}: the model's prompts ({prompts_from}) cover "
                             f"{', '.join(prompts)}; use one of them or --prompt")
        examples, refs = read_inputs(args.inputs, args.task, args.prompt, prompts)
        durations = clip_durations(examples)
    except (ValueError, DataError, AudioError) as err:  # folder_kind raises ValueError; both others are ones too
        raise SystemExit(f"error: {err}") from None
    loader = args.loader or kind.loader
    print(f"loading {folder} ({kind.name if kind else loader}) ...", file=sys.stderr)
    try:
        model = load_model(loader, folder, args.device, args.dtype, where="--loader")
    except (OSError, ValueError, KeyError, ImportError, AttributeError) as err:
        raise SystemExit(f"error: cannot load {folder} with {loader}: {err}") from None
    dataset = clip_dataset(examples, durations, feature_config(model))
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                  repetition_penalty=args.repetition_penalty)
    texts = decode(model, dataset, list(range(len(examples))), args.batch_size, generation)
    records = []
    for i, (ex, text) in enumerate(zip(examples, texts, strict=True)):
        record = {"path": ex.path, "task": None if ex.task == "prompt" else ex.task, "prompt": ex.prompt,
                  "output": text}
        if i in refs:
            record["references"] = refs[i]
        records.append(record)
        print(f"{ex.path}\t{text}")
    if args.output:
        header = {"model": str(folder), "loader": loader, "prompts_from": prompts_from,
                  "generation": vars(generation), "device": str(model.device)}
        write_outputs(Path(args.output), records, header)
        print(f"wrote {len(records)} outputs to {args.output}", file=sys.stderr)
    return records


if __name__ == "__main__":
    run(main)
