"""Reading datasets: SALMONN annotation JSON, Hugging Face datasets saved with `save_to_disk`, and hub datasets.

SALMONN's format is `{"annotation": [{"path": ..., "text": ..., "task": ..., "Q": optional prompt}]}`,
relative paths resolved against the JSON file's folder. A Hugging Face dataset (a folder, or a hub
id `owner/name[@revision][:split]`, see `common.hub`) needs columns `audio` (an Audio feature or a path string),
`text` and `task` (`Q` optional); `HFDatasetOptions` maps other column names and gives a task to every row.

Every problem names the file, the entry and the field. With `on_error="skip"` the entry is skipped and
counted in the `DataReport` instead of stopping the run; nothing is dropped without being counted. An entry that
repeats another exactly (same audio file, text, task and `Q`, in the same or another source) is such a problem:
it would count twice in training and be folded into one clip by the evaluation. A captioning clip listed once per
reference caption (same path, different text) is not a duplicate.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OPTIONAL_FIELDS = ("Q",)


class DataError(ValueError):
    """An annotation or audio problem. The message names the file, the entry and what to fix."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Example:
    """One (audio, target text) pair as the datasets hold it."""

    path: str
    """Absolute audio path, or `<dataset dir>[index]` for audio stored inside a HF dataset."""
    text: str
    task: str
    prompt: str | None = None
    """The entry's own question (`Q`), used instead of the task's default prompt."""
    source: str = ""
    """Where the entry came from: `file.json#index`."""
    audio_bytes: bytes | None = None
    """Encoded audio file bytes, when the audio lives inside a HF dataset rather than on disk."""


@dataclass
class DataReport:
    """What happened to every entry: kept, dropped by rule (too long, silent...), or skipped for an error."""

    sources: list[str] = field(default_factory=list)
    entries: int = 0
    kept: int = 0
    kept_seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_entries: list[dict] = field(default_factory=list)
    """`{"source": "file.json#i", "reason": ..., "problem": message}` per skipped entry."""
    dropped_entries: list[dict] = field(default_factory=list)
    """`{"source": "file.json#i", "reason": ...}` per clip dropped by a rule on its audio (too short, too long,
    silent, zero length). Entries cut by a size limit of the config (`max_captions_per_clip`, `max_clips_per_task`)
    are only counted: which ones follows from the file order."""
    cleaning: dict = field(default_factory=dict)
    """Counts of `common.cleaning` (VAD, loudness, caption filter) and the training augmentation's settings."""

    def skip(self, err: DataError, source: str) -> None:
        self.skipped[err.reason] += 1
        self.skipped_entries.append({"source": source, "reason": err.reason, "problem": str(err)})

    def drop(self, reason: str, source: str) -> None:
        self.dropped[reason] += 1
        self.dropped_entries.append({"source": source, "reason": reason})

    def to_dict(self) -> dict:
        return {
            "sources": self.sources,
            "entries": self.entries,
            "kept": self.kept,
            "kept_hours": round(self.kept_seconds / 3600, 4),
            "dropped": dict(sorted(self.dropped.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_entries": self.skipped_entries,
            "dropped_entries": self.dropped_entries,
            **({"cleaning": self.cleaning} if self.cleaning else {}),
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.entries} kept ({self.kept_seconds / 3600:.2f} h)"]
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())))
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
        return "; ".join(parts)


def _check_entry(raw, where: str, tasks: list[str]) -> tuple[str, str, str, str | None]:
    """Validate one annotation entry's fields; returns (path, text, task, prompt)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with path/text/task, got {type(raw).__name__}", "malformed")
    for name in ("path", "text", "task"):
        if name not in raw:
            raise DataError(f"{where}: missing field '{name}'", "missing_field")
        if not isinstance(raw[name], str):
            raise DataError(
                f"{where}: field '{name}' must be a string, got {type(raw[name]).__name__} ({raw[name]!r})",
                "wrong_type",
            )
    if "Q" in raw and raw["Q"] is not None and not isinstance(raw["Q"], str):
        raise DataError(f"{where}: field 'Q' must be a string, got {type(raw['Q']).__name__}", "wrong_type")
    if not raw["path"].strip():
        raise DataError(f"{where}: field 'path' is empty", "empty_path")
    if not raw["text"].strip():
        raise DataError(f"{where}: field 'text' is empty — give the transcript or caption", "empty_text")
    if raw["task"] not in tasks:
        raise DataError(
            f"{where}: unknown task '{raw['task']}' — expected one of {tasks} (data.tasks lists the tasks)",
            "unknown_task",
        )
    return raw["path"], raw["text"].strip(), raw["task"], raw.get("Q")


def read_annotation_json(path: str | Path, tasks: list[str], on_error: str, report: DataReport) -> list[Example]:
    """Read a SALMONN annotation JSON; relative audio paths resolve against the JSON's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found", "missing_annotation")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise DataError(f"{path}: malformed JSON at {where}: {err.msg}", "malformed") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})", "malformed") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotation"), list):
        raise DataError(
            f"{path}: expected a top-level object {{\"annotation\": [...]}} (SALMONN format)", "malformed"
        )
    report.sources.append(str(path))
    examples = []
    for i, raw in enumerate(data["annotation"]):
        where = f"{path}: entry {i}"
        report.entries += 1
        try:
            audio, text, task, prompt = _check_entry(raw, where, tasks)
        except DataError as err:
            if on_error != "skip":
                raise
            report.skip(err, f"{path}#{i}")
            continue
        audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        examples.append(Example(str(audio_path), text, task, prompt, source=f"{path}#{i}"))
    return examples


@dataclass
class HFDatasetOptions:
    """How the rows of a Hugging Face dataset (a `save_to_disk` folder or a hub dataset) become examples."""

    subset: str = ""
    """The hub dataset's configuration (`load_dataset(..., name=subset)`), e.g. `clean`; empty: its default."""
    columns: dict[str, str] = field(default_factory=dict)
    """Dataset column for each of smolt's fields `audio`, `text`, `task`, `Q`, where the names differ
    (e.g. `{text: sentence}`); a field not listed is read from the column of its own name."""
    task: str = ""
    """The task of every row, for a dataset without a task column (e.g. `asr` for LibriSpeech)."""

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


def read_hf_dataset(path: str | Path, tasks: list[str], on_error: str, report: DataReport,
                    options: HFDatasetOptions | None = None) -> list[Example]:
    """Read a dataset saved with `datasets.Dataset.save_to_disk` without decoding audio through `datasets`.

    Audio columns are read as raw bytes or paths (datasets' own decoder needs torchcodec, which this torch lacks)
    and decoded later by `common.audio`, with the same checks as files on disk.
    """
    import datasets

    path = Path(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: cannot open as a saved Hugging Face dataset ({err})", "malformed") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds a DatasetDict ({list(ds)}); point at one split's folder", "malformed")
    return _dataset_examples(ds, str(path), path, tasks, on_error, report, options or HFDatasetOptions())


def read_hub_dataset(source: str, tasks: list[str], on_error: str, report: DataReport,
                     options: HFDatasetOptions | None = None) -> list[Example]:
    """Read a hub dataset `owner/name[@revision][:split]` (see `common.hub`) with `datasets.load_dataset`.

    The repository is resolved to its snapshot in the hub cache first (downloaded when connected, read from the
    cache with `HF_HUB_OFFLINE=1`; the commit is recorded), then loaded from that folder, so the data read is
    exactly the recorded commit. Audio is decoded by `common.audio` (16 kHz mono), as for `read_hf_dataset`.
    """
    import datasets

    from common.hub import HubError, datasets_cache_dir, snapshot

    options = options or HFDatasetOptions()
    repo_source, _, split = source.partition(":")
    try:
        snap = snapshot(repo_source, repo_type="dataset")
    except HubError as err:
        raise DataError(f"{source}: no annotation file or dataset folder there. {err}", "missing_annotation") from None
    try:
        ds = datasets.load_dataset(snap.folder, name=options.subset or None, split=split or None,
                                   cache_dir=datasets_cache_dir())
    except (OSError, ValueError, KeyError) as err:
        what = f"split '{split}'" if split else "the dataset"
        raise DataError(f"{source}: cannot load {what} of hub dataset {snap.repo} (commit {snap.commit}, "
                        f"subset {options.subset or 'default'}): {err}; check the split after the ':' and "
                        "data.hf_subset", "malformed") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{source}: hub dataset {snap.repo} has splits {list(ds)}; name one after a colon, "
                            f"e.g. {repo_source}:{next(iter(ds))}", "malformed")
        ds = next(iter(ds.values()))
    return _dataset_examples(ds, source, Path(snap.folder), tasks, on_error, report, options)


def _dataset_examples(ds, name: str, folder: Path, tasks: list[str], on_error: str, report: DataReport,
                      options: HFDatasetOptions) -> list[Example]:
    """Examples of one datasets.Dataset (`name` in messages; relative audio paths resolve against `folder`)."""
    import datasets

    audio_col, text_col, task_col, q_col = (options.column(f) for f in ("audio", "text", "task", "Q"))
    needed = [audio_col, text_col] + ([] if options.task else [task_col])
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(f"{name}: dataset lacks column(s) {missing}; has {ds.column_names}. Map smolt's fields to "
                        "its columns with data.hf_columns (e.g. data.hf_columns.text=sentence) and give a dataset "
                        "without a task column its task with data.hf_task=asr", "missing_field")
    if isinstance(ds.features[audio_col], datasets.Audio):
        ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
    report.sources.append(name)
    examples = []
    for i, row in enumerate(ds):
        where = f"{name}: row {i}"
        report.entries += 1
        audio = row[audio_col]
        try:
            if isinstance(audio, dict):
                data, audio_path = audio.get("bytes"), audio.get("path")
            elif isinstance(audio, str):
                data, audio_path = None, audio
            else:
                raise DataError(f"{where}: column '{audio_col}' must be an Audio feature or a path", "wrong_type")
            task = row[task_col] if task_col in row else options.task
            fields = {"path": audio_path or f"{name}[{i}]", "text": row[text_col], "task": task}
            if row.get(q_col) is not None:
                fields["Q"] = row[q_col]
            audio_path, text, task, prompt = _check_entry(fields, where, tasks)
        except DataError as err:
            if on_error != "skip":
                raise
            report.skip(err, f"{name}[{i}]")
            continue
        if data is None and not Path(audio_path).is_absolute():
            audio_path = str(folder / audio_path)
        clip = audio_path if data is None else f"{name}[{i}]"
        examples.append(Example(clip, text, task, prompt, source=f"{name}[{i}]", audio_bytes=data))
    return examples


def is_hub_dataset(source: str) -> bool:
    """A data source names a hub dataset (`common.hub` rule; `.json` / `.jsonl` names are annotation files)."""
    from common.hub import is_hub_id

    repo = source.partition(":")[0]
    return not source.endswith((".json", ".jsonl")) and not Path(source).exists() and is_hub_id(repo)


def read_examples(sources: list[str], tasks: list[str], on_error: str, report: DataReport,
                  options: HFDatasetOptions | None = None) -> list[Example]:
    """Read every source (annotation JSON file, HF dataset folder, or hub dataset id) into one list of examples,
    without exact duplicates (see `drop_duplicates`)."""
    examples = []
    for source in sources:
        if Path(source).is_dir():
            examples.extend(read_hf_dataset(source, tasks, on_error, report, options))
        elif is_hub_dataset(source):
            examples.extend(read_hub_dataset(source, tasks, on_error, report, options))
        else:
            examples.extend(read_annotation_json(source, tasks, on_error, report))
    return drop_duplicates(examples, on_error, report)


def _entry_name(source: str) -> tuple[str, str]:
    """`file.json#3` → (`file.json`, `entry 3`); `folder[3]` → (`folder`, `row 3`)."""
    if source.endswith("]") and "[" in source:
        file, _, index = source[:-1].rpartition("[")
        return file, f"row {index}"
    file, _, index = source.rpartition("#")
    return file, f"entry {index}"


def drop_duplicates(examples: list[Example], on_error: str, report: DataReport) -> list[Example]:
    """Keep the first of entries that are exactly alike: the same audio file (after resolving the path), text,
    task and prompt. With `on_error="skip"` a repeat is skipped and counted as `duplicate_entry`; otherwise it
    raises, naming both entries. Several captions of one clip differ in text and are all kept."""
    first: dict[tuple, Example] = {}
    kept = []
    for ex in examples:
        audio = os.path.normpath(ex.path) if ex.audio_bytes is None else ex.source
        key = (audio, ex.text, ex.task, ex.prompt or None)
        if key not in first:
            first[key] = ex
            kept.append(ex)
            continue
        file, entry = _entry_name(ex.source)
        other_file, other = _entry_name(first[key].source)
        of = other if other_file == file else f"{other} of {other_file}"
        err = DataError(
            f"{file}: {entry} repeats {of} exactly (same path, text, task and Q) — delete one of them; the evaluation "
            f"would fold them into one clip and training would see it twice (a clip with several reference captions "
            f"lists each caption once, with its own text)", "duplicate_entry")
        if on_error != "skip":
            raise err
        report.skip(err, ex.source)
    return kept
