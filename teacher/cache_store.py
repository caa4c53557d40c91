"""Teacher cache storage: safetensors shards of per-sample teacher outputs, a manifest, and a verifying reader (the
writer, resumable shard by shard, is `teacher.cache_writer`).

The teacher runs once over a split, teacher-forced on the references; per sample it leaves the target token ids,
a sparse next-token distribution at every target position and the Q-Former outputs. This module only stores and
checks those arrays; it knows nothing about the model.

On-disk layout of one cache folder:

    manifest.json                  identity (teacher, tokenizer, config hash, mode, k, dtype), shard size, the
                                   ordered sample keys, `complete`, and once complete one entry per shard
                                   (file, sha256, bytes, samples, tokens, windows, qformer_dim)
    shard-00000.safetensors        samples [0, shard_size), concatenated along the token / window axis:
        target_ids      int32   [total_tokens]
        sparse_ids      int32   [total_tokens, k]
        sparse_values   dtype   [total_tokens, k]   probabilities (topk) or importance weights (sampled)
        token_offsets   int64   [samples + 1]       sample i owns tokens [off[i], off[i+1])
        qformer         dtype   [total_windows, qformer_dim]
        window_offsets  int64   [samples + 1]
        metadata        {"sample_keys": JSON list of the shard's keys}
    shard-00000.json               sidecar written after the shard is in place: its manifest entry plus the
                                   fingerprint of the manifest header it belongs to; resume reads these
    shard-00001.safetensors ...

Every file is written to `<name>.tmp`, fsynced and moved into place with `os.replace`, so a crash leaves either
the old file, the new file, or a `.tmp` that the next writer deletes. Nothing written depends on time or process,
so a resumed cache is byte for byte the cache an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

FORMAT = "smolt-teacher-cache"
VERSION = 1
MODES = ("topk", "sampled")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
MANIFEST = "manifest.json"
REBUILD_HINT = "rebuild it with `python -m teacher.cache --config <config> --force`"
RESUME_HINT = "finish it with `python -m teacher.cache --config <config>` (it resumes where it stopped)"

_ID_BYTES = 4  # ids are stored as int32
_SAFETENSORS_DTYPE = {"float16": "F16", "float32": "F32"}
_TENSOR_NAMES = ("target_ids", "sparse_ids", "sparse_values", "token_offsets", "qformer", "window_offsets")
# The manifest fields that a resumed writer must agree with, in the order they are reported.
HEADER_FIELDS = ("format", "version", "teacher", "tokenizer", "config_hash", "mode", "k", "dtype",
                  "shard_size", "num_shards", "sample_keys")


class CacheError(ValueError):
    """A teacher cache is missing, unfinished, corrupted, or made for another teacher / tokenizer / mode / k."""


@dataclass(frozen=True)
class CachedSample:
    """The teacher's outputs for one sample.

    The writer accepts any integer dtype for the ids and any float dtype for the values (it stores int32 and the
    cache's dtype); the reader returns int64 ids (ready for `gather` / `cross_entropy`) and the cache's dtype.
    """

    target_ids: torch.Tensor
    """[tokens] reference token ids the teacher was forced on."""
    sparse_ids: torch.Tensor
    """[tokens, k] vocabulary ids of the kept next-token entries at each target position."""
    sparse_values: torch.Tensor
    """[tokens, k] their probabilities (topk mode) or importance weights (sampled mode)."""
    qformer: torch.Tensor
    """[windows, qformer_dim] Q-Former outputs, one row per audio window."""

    @property
    def num_tokens(self) -> int:
        return self.target_ids.shape[0]


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache was built from; a writer refuses to resume a cache whose identity differs.

    `teacher` and `tokenizer` are JSON values the caller chooses (e.g. `{"name": ..., "sha256": ...}` and
    `tokenizer_identity(...)`); they are normalised through JSON so tuples and lists compare equal.
    """

    teacher: str | dict
    tokenizer: str | dict
    config_hash: str
    """Hash of the teacher-cache config (`config_hash(...)`); a different config means a different cache."""
    mode: str
    """"topk" or "sampled"."""
    k: int
    """Entries kept per target position."""
    dtype: str = "float16"
    """Storage dtype of `sparse_values` and `qformer`: "float16" or "float32"."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"cache mode {self.mode!r} is not one of {MODES}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"cache k must be a positive int, got {self.k!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"cache dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        object.__setattr__(self, "teacher", _json_normalised(self.teacher))
        object.__setattr__(self, "tokenizer", _json_normalised(self.tokenizer))


@dataclass(frozen=True)
class CacheStats:
    """Sizes of a finished cache. Bytes are file bytes on disk (safetensors headers included)."""

    samples: int
    tokens: int
    windows: int
    total_bytes: int
    """All shard files (not the manifest or sidecars)."""
    sparse_bytes: int
    """`sparse_ids` + `sparse_values` payload: tokens * k * (4 + value itemsize)."""

    @property
    def bytes_per_token(self) -> float:
        """Total shard bytes per target token (NaN for a cache without tokens)."""
        return self.total_bytes / self.tokens if self.tokens else math.nan

    @property
    def sparse_bytes_per_token(self) -> float:
        return self.sparse_bytes / self.tokens if self.tokens else math.nan

    def summary(self) -> str:
        return (f"{self.samples} samples, {self.tokens} tokens, {self.windows} windows, "
                f"{self.total_bytes / 2**20:.2f} MiB: {self.bytes_per_token:.1f} B/token total, "
                f"{self.sparse_bytes_per_token:.1f} B/token sparse")


def tokenizer_identity(name: str, vocab: Mapping[str, int], encoding: str | None = None) -> dict:
    """`{"name", "vocab_size", "vocab_sha256"}` for a tokenizer's `get_vocab()`, plus `"encoding"` when given (e.g.
    `teacher.tokenizer.encoding_identity`: the same vocabulary can encode text differently); the writer and the
    recipe that reads the cache must both call this so their identities compare equal."""
    items = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
    identity = {"name": name, "vocab_size": len(vocab), "vocab_sha256": digest}
    if encoding is not None:
        identity["encoding"] = encoding
    return identity


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


class CacheReader:
    """Random access to a finished cache by sample key or index, checked against what the caller expects.

    On open: the manifest exists, is complete, matches `expect_*`, and every shard file exists with its recorded
    size. Each shard's sha256 and structure (tensor names, dtypes, shapes, k, qformer_dim, monotonic offsets that
    end at the totals, its sample keys) are checked the first time it is opened, or all up front with
    `verify_all=True`. Shards are opened lazily with `safe_open` (memory-mapped, samples read by slice) and kept
    in an LRU of `max_open_shards`. Pickling drops the open handles, so a reader can go to DataLoader workers.

    Raises CacheError naming the file, what differs and how to fix it.
    """

    def __init__(self, root: str | Path, *, expect_teacher: str | dict, expect_tokenizer: str | dict,
                 expect_mode: str | None = None, expect_k: int | None = None, verify_all: bool = False,
                 max_open_shards: int = 8):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        self.manifest = _read_manifest(self.manifest_path)
        _check_complete(self.manifest, self.manifest_path)
        expected = {"teacher": expect_teacher, "tokenizer": expect_tokenizer, "mode": expect_mode, "k": expect_k}
        _check_expected(self.manifest, self.manifest_path, expected)
        self._keys: list[str] = self.manifest["sample_keys"]
        self._index = {key: i for i, key in enumerate(self._keys)}
        _check_counts(self.manifest, self.manifest_path, len(self._index))
        for entry in self.manifest["shards"]:
            _check_file_size(self.root / entry["file"], entry["bytes"])
        self.max_open_shards = max(1, max_open_shards)
        self._verified: set[int] = set()
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        if verify_all:
            for index in range(len(self.manifest["shards"])):
                self._shard(index)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        return list(self._keys)

    def index_of(self, key: str) -> int:
        if key not in self._index:
            raise KeyError(f"sample key {key!r} is not in the cache {self.root}")
        return self._index[key]

    def __getitem__(self, key_or_index: str | int) -> CachedSample:
        """The cached sample by key or by position (negative positions count from the end)."""
        if isinstance(key_or_index, str):
            index = self.index_of(key_or_index)
        else:
            index = int(key_or_index) + (len(self) if key_or_index < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"sample index {key_or_index} out of range for a cache of {len(self)} samples")
        shard_index, local = divmod(index, self.manifest["shard_size"])
        return self._shard(shard_index).sample(local)

    def stats(self) -> CacheStats:
        """Sizes from the manifest (file sizes were checked on open)."""
        shards = self.manifest["shards"]
        tokens = sum(entry["tokens"] for entry in shards)
        value_bytes = DTYPES[self.manifest["dtype"]].itemsize
        return CacheStats(samples=len(self), tokens=tokens, windows=sum(entry["windows"] for entry in shards),
                          total_bytes=sum(entry["bytes"] for entry in shards),
                          sparse_bytes=tokens * self.manifest["k"] * (_ID_BYTES + value_bytes))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # safe_open handles cannot be pickled; workers reopen lazily
        return state

    def _shard(self, index: int) -> _OpenShard:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        entry = self.manifest["shards"][index]
        path = self.root / entry["file"]
        if index not in self._verified:
            _check_sha256(path, entry["sha256"])
            self._verified.add(index)
        size = self.manifest["shard_size"]
        shard = _OpenShard.open(path, entry, self.manifest, self._keys[index * size:(index + 1) * size])
        self._open[index] = shard
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return shard


@dataclass
class _OpenShard:
    """A memory-mapped shard and its offsets (python lists: indexing them per sample is the hot path)."""

    handle: object
    token_offsets: list[int]
    window_offsets: list[int]

    @classmethod
    def open(cls, path: Path, entry: dict, manifest: dict, keys: list[str]) -> _OpenShard:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise CacheError(f"{path}: not a readable safetensors file ({err}); {REBUILD_HINT}") from err
        _check_structure(handle, path, entry, manifest, keys)
        return cls(handle, handle.get_tensor("token_offsets").tolist(), handle.get_tensor("window_offsets").tolist())

    def sample(self, local: int) -> CachedSample:
        t0, t1 = self.token_offsets[local], self.token_offsets[local + 1]
        w0, w1 = self.window_offsets[local], self.window_offsets[local + 1]
        return CachedSample(target_ids=self.handle.get_slice("target_ids")[t0:t1].long(),
                            sparse_ids=self.handle.get_slice("sparse_ids")[t0:t1].long(),
                            sparse_values=self.handle.get_slice("sparse_values")[t0:t1],
                            qformer=self.handle.get_slice("qformer")[w0:w1])


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _json_normalised(obj):
    return json.loads(json.dumps(obj))


# ----- reading and checking -----

def _read_manifest(path: Path) -> dict:
    if not path.exists():
        raise CacheError(f"{path}: no teacher cache here (manifest missing); build it with "
                         "`python -m teacher.cache --config <config>` or point to the right folder")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path}: manifest is not valid JSON ({err}); {REBUILD_HINT}") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}; {REBUILD_HINT}")
    missing = [name for name in (*HEADER_FIELDS, "complete", "qformer_dim", "shards") if name not in manifest]
    if missing:
        raise CacheError(f"{path}: manifest lacks the fields {missing}; {REBUILD_HINT}")
    return manifest


def _check_complete(manifest: dict, path: Path) -> None:
    shards = manifest.get("shards", [])
    unfinished = [i for i in range(manifest["num_shards"]) if i >= len(shards) or shards[i] is None]
    if not manifest.get("complete") or unfinished or len(shards) != manifest["num_shards"]:
        listed = f"shards {unfinished[:10]} unfinished" if unfinished else "not marked complete"
        raise CacheError(f"{path}: the cache is unfinished ({listed} of {manifest['num_shards']}); {RESUME_HINT}")


def _check_expected(manifest: dict, path: Path, expected: dict) -> None:
    for name, want in expected.items():
        if want is None:
            continue
        want = _json_normalised(want)
        if manifest.get(name) != want:
            raise CacheError(f"{path}: the cache was made with a different {name} "
                             f"({describe_difference(manifest.get(name), want)}); {REBUILD_HINT} or point to the cache "
                             f"made for this {name}")


def describe_difference(found, expected) -> str:
    """'cache has X, expected Y', naming the differing sub-keys of dicts and the first differing list item."""
    if isinstance(found, dict) and isinstance(expected, dict):
        keys = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
        return "; ".join(f"{k}: cache has {found.get(k)!r}, expected {expected.get(k)!r}" for k in keys)
    if isinstance(found, list) and isinstance(expected, list):
        first = next((i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b),
                     min(len(found), len(expected)))
        return (f"cache has {len(found)} entries, expected {len(expected)}; first difference at index {first}: "
                f"{found[first:first + 1]!r} vs {expected[first:first + 1]!r}")
    return f"cache has {found!r}, expected {expected!r}"


def _check_counts(manifest: dict, path: Path, unique_keys: int) -> None:
    keys, size, shards = manifest["sample_keys"], manifest["shard_size"], manifest["shards"]
    if unique_keys != len(keys):
        raise CacheError(f"{path}: sample_keys repeat keys; {REBUILD_HINT}")
    for index, entry in enumerate(shards):
        want = len(keys[index * size:(index + 1) * size])
        if entry["samples"] != want or entry["file"] != shard_name(index):
            raise CacheError(f"{path}: shard entry {index} lists {entry['samples']} samples in {entry['file']!r}, "
                             f"expected {want} in {shard_name(index)!r}; {REBUILD_HINT}")


def _check_file_size(path: Path, expected: int) -> None:
    if not path.exists():
        raise CacheError(f"{path}: shard file missing; {REBUILD_HINT}")
    size = path.stat().st_size
    if size != expected:
        raise CacheError(f"{path}: shard file has {size} bytes, the manifest records {expected} "
                         f"(truncated or overwritten); {REBUILD_HINT}")


def _check_sha256(path: Path, expected: str) -> None:
    found = _sha256_file(path)
    if found != expected:
        raise CacheError(f"{path}: sha256 mismatch (file {found}, manifest {expected}); the shard is corrupted; "
                         f"{REBUILD_HINT}")


def _check_structure(handle, path: Path, entry: dict, manifest: dict, keys: list[str]) -> None:
    """Tensor names, dtypes and shapes, offsets, and sample keys of one shard against its manifest entry."""
    def fail(what: str):
        raise CacheError(f"{path}: {what}; {REBUILD_HINT}")

    if sorted(handle.keys()) != sorted(_TENSOR_NAMES):
        fail(f"tensors {sorted(handle.keys())}, expected {sorted(_TENSOR_NAMES)}")
    if json.loads((handle.metadata() or {}).get("sample_keys", "null")) != keys:
        fail("sample keys in the shard metadata differ from the manifest's")
    k, value_dtype, n = manifest["k"], _SAFETENSORS_DTYPE[manifest["dtype"]], entry["samples"]
    tokens, windows = entry["tokens"], entry["windows"]
    expected = {"target_ids": ("I32", [tokens]), "sparse_ids": ("I32", [tokens, k]),
                "sparse_values": (value_dtype, [tokens, k]), "token_offsets": ("I64", [n + 1]),
                "qformer": (value_dtype, [windows, manifest["qformer_dim"]]), "window_offsets": ("I64", [n + 1])}
    for name, (dtype, shape) in expected.items():
        found = handle.get_slice(name)
        if found.get_dtype() != dtype or list(found.get_shape()) != shape:
            fail(f"{name} is {found.get_dtype()} {list(found.get_shape())}, expected {dtype} {shape}")
    for name, total in (("token_offsets", tokens), ("window_offsets", windows)):
        offsets = handle.get_tensor(name)
        if offsets[0] != 0 or offsets[-1] != total or bool((offsets.diff() < 0).any()):
            fail(f"{name} must rise monotonically from 0 to {total}, got {offsets.tolist()}")
