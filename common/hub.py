"""Hugging Face Hub ids wherever a config names a model folder or a dataset.

A config path is either a local path or a hub repository id, as every transformers tool takes them:

    model.whisper.path=checkpoints/whisper-large-v2      a local folder
    model.whisper.path=openai/whisper-large-v2           the hub's repository (default branch)
    model.whisper.path=openai/whisper-large-v2@<rev>     at a branch, tag or commit
    data.test=[openslr/librispeech_asr@main:test]        a hub dataset, its split after the colon

The rule (`parse_hub_id`): a string is a hub id only when it is **not** a local path, that is, it does not start
with `.`, `/` or `~`, nothing exists at it on disk, and it has the hub's `owner/name[@revision]` grammar (exactly one
`/`, letters, digits, `-`, `_`, `.`; no `--` or `..`; not ending in `.git`). Every other string is a local path. So
`checkpoints/whisper-large-v2`, when missing on disk, is looked up on the hub too, and the error names both readings
(write `./checkpoints/whisper-large-v2` to mean the folder only).

A hub id resolves through `huggingface_hub.snapshot_download` to a folder of the hub cache (`HF_HUB_CACHE`, else
`HF_HOME/hub`, read when the call is made): downloaded when the machine is connected, read from the cache with
`HF_HUB_OFFLINE=1` or when one request to the hub gets no answer. Model downloads skip other frameworks' files, and
pickled weights when safetensors are there. Data sources ending in `.json` / `.jsonl` are always annotation files.

The commit a hub id resolved to is kept in `RESOLVED`; `common.config.save_resolved` writes it into
the stage's `config.yaml` as `resolved_from`, so `owner/name@<commit>` reruns exactly that snapshot.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)(?:@(?P<revision>[A-Za-z0-9_./-]+))?")
"""`owner/name` with an optional `@revision` (branch, tag, commit hash, or `refs/pr/N`)."""

OTHER_FORMATS = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.mlmodel", "*.gguf",
                 "onnx/*", "coreml/*", "openvino/*", "flax_model*", "tf_model*"]
"""Files of other frameworks in model repositories (openai/whisper-large-v2 carries TF and Flax copies of its 6 GB):
never downloaded."""
PICKLED_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
"""Pickled weights, skipped when the repository has safetensors (the loaders prefer safetensors)."""


class HubError(OSError):
    """A hub id could not be resolved to a folder. The message names the id, the cache, why, and the fix."""


@dataclass
class HubSnapshot:
    """Where a hub id was resolved to."""

    repo: str
    repo_type: str
    """`model` or `dataset`."""
    revision: str
    """As requested (`main` when none was given)."""
    commit: str
    """The commit hash the revision pointed at: `repo@commit` reproduces the run."""
    folder: str
    """The snapshot folder in the hub cache."""


RESOLVED: dict[str, HubSnapshot] = {}
"""Every hub id this process resolved, by the string as the config wrote it."""


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """`(repo_id, revision or None)` when `source` names a hub repository, None when it is a local path."""
    if not source or source[0] in "./~" or Path(source).expanduser().exists():
        return None
    match = HUB_ID.fullmatch(source)
    if match is None:
        return None
    repo = match["repo"]
    owner, name = repo.split("/")
    if "--" in repo or ".." in repo or repo.endswith(".git") or len(name) > 96:
        return None
    if any(part[0] in ".-" or part[-1] in ".-" for part in (owner, name)):
        return None
    return repo, match["revision"]


def is_hub_id(source: str) -> bool:
    return parse_hub_id(source) is not None


def hub_cache_dir() -> Path:
    """The hub cache, from the environment as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def datasets_cache_dir() -> str | None:
    """Where `datasets` writes its Arrow files, from the environment as it is now (None: its own default)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "datasets")
    return None


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) in the environment as it is now, or at import."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def _cached_files(cache: Path, repo: str, revision: str, repo_type: str) -> list[str]:
    """The files of the cached snapshot `revision` points at (empty when there is none)."""
    storage = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = storage / "snapshots" / commit
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*")] if folder.is_dir() else []


def _ignored(files: list[str], repo_type: str) -> list[str]:
    """Patterns a model download skips, decided from the repository's file list (the hub's, else the cache's), so an
    offline run asks for exactly the files the online run fetched."""
    if repo_type != "model":
        return []
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return OTHER_FORMATS + (PICKLED_WEIGHTS if has_safetensors else [])


def _hub_files(repo: str, revision: str, repo_type: str) -> tuple[list[str] | None, str]:
    """The repository's files as the hub lists them, or (None, why) when the hub cannot be asked. One request, no
    retries: on a machine without network the cache is read at once instead of after huggingface_hub's backoff."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().repo_info(repo, revision=revision, repo_type=repo_type)
    except HfHubHTTPError as err:  # not found, gated, no such revision: the answer of a reachable hub
        return None, f"the hub answered {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    except Exception as err:  # noqa: BLE001 — any transport failure (DNS, proxy, timeout) means: read the cache
        return None, f"the hub is not reachable ({type(err).__name__}: {err})"
    return [s.rfilename for s in info.siblings or []], ""


def snapshot(source: str, repo_type: str = "model") -> HubSnapshot:
    """Resolve the hub id `source` to a snapshot folder of the hub cache.

    Downloads what is missing when the hub answers; with `HF_HUB_OFFLINE=1`, or when it does not, reads the cache
    only. Raises HubError saying why the hub reading failed (the id, the cache folder, the fix); callers put it
    after their own not-found message for the local reading.
    """
    from huggingface_hub import snapshot_download

    parsed = parse_hub_id(source)
    if parsed is None:
        raise HubError(f"{source!r} is not a hub id (owner/name[@revision])")
    repo, revision = parsed
    revision = revision or "main"
    cache = hub_cache_dir()
    files, why = (None, "HF_HUB_OFFLINE=1 is set, so only the cache was read") if hub_offline() else \
        _hub_files(repo, revision, repo_type)
    if files is None:
        files = _cached_files(cache, repo, revision, repo_type)
    try:
        folder = snapshot_download(repo, repo_type=repo_type, revision=revision, cache_dir=cache,
                                   local_files_only=bool(why), ignore_patterns=_ignored(files, repo_type) or None)
    except (OSError, ValueError) as err:
        why = why or f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        download = f"hf download {repo} --revision {revision}" + (f" --repo-type {repo_type}" * (repo_type != "model"))
        raise HubError(
            f"Read as a hub {repo_type} id, {repo} at revision {revision} is not in the hub cache {cache} and {why}. "
            f"Fix: on a connected machine run `{download}` (or leave HF_HUB_OFFLINE unset) with that cache; "
            f"write ./{source} to mean a local path only."
        ) from None
    resolved = HubSnapshot(repo, repo_type, revision, Path(folder).name, str(folder))
    RESOLVED[source] = resolved
    return resolved


def local_folder(source: str) -> tuple[Path, str]:
    """`(folder, note)` for a config's model path: the path itself, or the hub snapshot of a hub id. When a hub id
    resolves to nothing, the folder is the local reading (which does not exist) and `note` says why the hub reading
    failed, for the caller's not-found message to end with."""
    if not is_hub_id(source):
        return Path(source), ""
    try:
        return Path(snapshot(source).folder), ""
    except HubError as err:
        return Path(source), " " + str(err)


def resolved_from(strings: set[str]) -> dict[str, dict]:
    """The hub snapshots of those of `strings` that this process resolved, for the saved config."""
    return {s: asdict(RESOLVED[s]) for s in sorted(strings) if s in RESOLVED}
