"""Reading datasets: SALMONN annotation JSON and Hugging Face datasets saved with `save_to_disk`.

SALMONN's format is `{"annotation": [{"path": ..., "text": ..., "task": ..., "Q": optional prompt}]}`,
relative paths resolved against the JSON file's folder. A Hugging Face dataset folder needs columns
`audio` (an Audio feature or a path string), `text` and `task` (`Q` optional).

Every problem names the file, the entry and the field. With `on_error="skip"` the entry is skipped and
counted in the `DataReport` instead of stopping the run; nothing is dropped without being counted.
"""

from __future__ import annotations

import json
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
    cleaning: dict = field(default_factory=dict)
    """Counts of `common.cleaning` (VAD, loudness, caption filter) and the training augmentation's settings."""

    def skip(self, err: DataError, source: str) -> None:
        self.skipped[err.reason] += 1
        self.skipped_entries.append({"source": source, "reason": err.reason, "problem": str(err)})

    def to_dict(self) -> dict:
        return {
            "sources": self.sources,
            "entries": self.entries,
            "kept": self.kept,
            "kept_hours": round(self.kept_seconds / 3600, 4),
            "dropped": dict(sorted(self.dropped.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_entries": self.skipped_entries,
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


def read_hf_dataset(path: str | Path, tasks: list[str], on_error: str, report: DataReport) -> list[Example]:
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
    missing = [c for c in ("audio", "text", "task") if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: dataset lacks column(s) {missing}; has {ds.column_names}", "missing_field")
    if isinstance(ds.features["audio"], datasets.Audio):
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    report.sources.append(str(path))
    examples = []
    for i, row in enumerate(ds):
        where = f"{path}: row {i}"
        report.entries += 1
        audio = row["audio"]
        try:
            if isinstance(audio, dict):
                data, audio_path = audio.get("bytes"), audio.get("path")
            elif isinstance(audio, str):
                data, audio_path = None, audio
            else:
                raise DataError(f"{where}: column 'audio' must be an Audio feature or a path", "wrong_type")
            fields = {"path": audio_path or f"{path}[{i}]", "text": row["text"], "task": row["task"]}
            if row.get("Q") is not None:
                fields["Q"] = row["Q"]
            audio_path, text, task, prompt = _check_entry(fields, where, tasks)
        except DataError as err:
            if on_error != "skip":
                raise
            report.skip(err, f"{path}[{i}]")
            continue
        if data is None and not Path(audio_path).is_absolute():
            audio_path = str(path / audio_path)
        name = audio_path if data is None else f"{path}[{i}]"
        examples.append(Example(name, text, task, prompt, source=f"{path}[{i}]", audio_bytes=data))
    return examples


def read_examples(sources: list[str], tasks: list[str], on_error: str, report: DataReport) -> list[Example]:
    """Read every source (annotation JSON file, or HF dataset folder) into one list of examples."""
    examples = []
    for source in sources:
        reader = read_hf_dataset if Path(source).is_dir() else read_annotation_json
        examples.extend(reader(source, tasks, on_error, report))
    return examples
