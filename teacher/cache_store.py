"""Teacher cache storage: safetensors shards of per-sample teacher outputs, a manifest, and a verifying reader.

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
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "smolt-teacher-cache"
VERSION = 1
MODES = ("topk", "sampled")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
MANIFEST = "manifest.json"
REBUILD_HINT = "rebuild it with `python -m teacher.cache --config <config> --force`"
RESUME_HINT = "finish it with `python -m teacher.cache --config <config>` (it resumes where it stopped)"

_ID_BYTES = 4  # ids are stored as int32
_INT32 = (-(2**31), 2**31 - 1)
_SAFETENSORS_DTYPE = {"float16": "F16", "float32": "F32"}
_TMP_PATTERNS = (MANIFEST + ".tmp", "shard-*.tmp")
_TENSOR_NAMES = ("target_ids", "sparse_ids", "sparse_values", "token_offsets", "qformer", "window_offsets")
# The manifest fields that a resumed writer must agree with, in the order they are reported.
_HEADER_FIELDS = ("format", "version", "teacher", "tokenizer", "config_hash", "mode", "k", "dtype",
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
class PendingShard:
    """A shard the caller still has to compute: run the teacher on `keys`, in this order."""

    index: int
    keys: tuple[str, ...]
    first_sample: int
    """Position of `keys[0]` in the full ordered key list."""

    @property
    def sample_indices(self) -> range:
        return range(self.first_sample, self.first_sample + len(self.keys))


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


class CacheWriter:
    """Writes a cache shard by shard and resumes an interrupted one.

    Given the full ordered key list and the shard size, shard i holds keys[i * shard_size : (i + 1) * shard_size].
    On start the writer keeps every shard whose sidecar belongs to this cache and whose file still has the recorded
    size and sha256; `pending_shards()` lists the rest, so the caller runs the teacher only on those. When the last
    shard lands the manifest is rewritten with `complete: true` and every shard's entry. One writer per folder.

    Args:
        root: cache folder (created if missing).
        identity: teacher, tokenizer, config hash, mode, k and dtype of this cache.
        sample_keys: every sample key of the split, in order; unique strings.
        shard_size: samples per shard (the last shard may hold fewer).
        force: wipe the cache files already in `root` (manifest, shards, sidecars, `.tmp` files; nothing else)
            instead of resuming; needed when the folder holds a cache with another identity.
        verify_existing: re-hash finished shards before trusting them (one read of the cache on resume).
    """

    def __init__(self, root: str | Path, identity: CacheIdentity, sample_keys: Sequence[str], shard_size: int,
                 *, force: bool = False, verify_existing: bool = True):
        _check_keys(sample_keys)
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.header = _header(identity, sample_keys, shard_size)
        self._fingerprint = hashlib.sha256(_canonical_json(self.header).encode()).hexdigest()
        if force:
            _wipe(self.root)
        else:
            self._check_resumable()
        _remove_partial_writes(self.root)
        self.discarded: list[str] = []
        """Why finished-looking shards were not kept (also emitted as warnings)."""
        self._entries = [self._load_finished(i, verify_existing) for i in range(self.num_shards)]
        self._write_manifest()

    @property
    def num_shards(self) -> int:
        return self.header["num_shards"]

    @property
    def complete(self) -> bool:
        return all(entry is not None for entry in self._entries)

    def shard_keys(self, index: int) -> list[str]:
        size = self.header["shard_size"]
        return self.header["sample_keys"][index * size:(index + 1) * size]

    def pending_shards(self) -> list[PendingShard]:
        """The shards still to compute, in order."""
        size = self.header["shard_size"]
        return [PendingShard(i, tuple(self.shard_keys(i)), i * size)
                for i, entry in enumerate(self._entries) if entry is None]

    def write_shard(self, index: int, samples: Sequence[CachedSample]) -> None:
        """Store shard `index`; `samples` are the teacher's outputs for `shard_keys(index)`, in that order.

        Raises ValueError when the shard is already finished or a sample has the wrong shapes, dtypes or
        non-finite values (checked after the cast, since fp16 overflows to inf).
        """
        if not 0 <= index < self.num_shards:
            raise ValueError(f"shard index {index} out of range: this cache has {self.num_shards} shards")
        if self._entries[index] is not None:
            raise ValueError(f"shard {index} is already finished in {self.root}; write only pending_shards()")
        keys = self.shard_keys(index)
        if len(samples) != len(keys):
            raise ValueError(f"shard {index} holds {len(keys)} samples, got {len(samples)}")
        tensors = _pack(keys, samples, self.identity.k, DTYPES[self.identity.dtype], self._qformer_dim())
        path = self.root / shard_name(index)
        tmp = _tmp(path)
        # A single metadata entry: safetensors writes a multi-entry metadata map in a per-process hash order,
        # which would break byte-for-byte reproducibility of shards.
        save_file(tensors, tmp, metadata={"sample_keys": json.dumps(keys)})
        _fsync(tmp)
        entry = {"file": path.name, "sha256": _sha256_file(tmp), "bytes": tmp.stat().st_size,
                 "samples": len(keys), "tokens": tensors["target_ids"].shape[0],
                 "windows": tensors["qformer"].shape[0], "qformer_dim": tensors["qformer"].shape[1]}
        os.replace(tmp, path)
        _fsync(self.root)
        # The sidecar lands after the shard: a crash in between only costs recomputing this shard.
        _write_json_atomic(self.root / sidecar_name(index), {"fingerprint": self._fingerprint, **entry})
        self._entries[index] = entry
        if self.complete:
            self._write_manifest()

    def _check_resumable(self) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            return
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"{path}: unreadable manifest ({err}); pass force=True (--force) to wipe and "
                             "rebuild the cache") from err
        for name in _HEADER_FIELDS:
            if found.get(name) != self.header[name]:
                raise CacheError(f"{path}: this folder holds a cache built with a different {name} "
                                 f"({_difference(found.get(name), self.header[name])}); pass force=True (--force) "
                                 "to wipe and rebuild it, or write the new cache to another folder")

    def _load_finished(self, index: int, verify: bool) -> dict | None:
        sidecar = self.root / sidecar_name(index)
        if not sidecar.exists():
            return None
        problem, entry = _check_sidecar(sidecar, self.root / shard_name(index), self._fingerprint, verify)
        if problem is None:
            return entry
        message = f"{sidecar}: {problem}; shard {index} will be recomputed"
        self.discarded.append(message)
        warnings.warn(message, stacklevel=3)
        return None

    def _qformer_dim(self) -> int | None:
        dims = {entry["qformer_dim"] for entry in self._entries if entry is not None}
        if len(dims) > 1:
            raise CacheError(f"{self.root}: finished shards disagree on qformer_dim {sorted(dims)}; {REBUILD_HINT}")
        return dims.pop() if dims else None

    def _write_manifest(self) -> None:
        complete = self.complete
        manifest = {**self.header, "complete": complete,
                    "qformer_dim": self._qformer_dim() if complete else None,
                    "shards": list(self._entries) if complete else []}
        # Field order for people reading the file: the long key list goes last.
        manifest["sample_keys"] = manifest.pop("sample_keys")
        _write_json_atomic(self.root / MANIFEST, manifest)


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


# ----- writing -----

def _header(identity: CacheIdentity, keys: Sequence[str], shard_size: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "teacher": identity.teacher, "tokenizer": identity.tokenizer,
            "config_hash": identity.config_hash, "mode": identity.mode, "k": identity.k, "dtype": identity.dtype,
            "shard_size": shard_size, "num_shards": math.ceil(len(keys) / shard_size), "sample_keys": list(keys)}


def _check_keys(keys: Sequence[str]) -> None:
    bad = [key for key in keys if not isinstance(key, str)]
    if bad:
        raise ValueError(f"sample keys must be strings, got {bad[:3]!r}")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        duplicates = [key for key in keys if key in seen or seen.add(key)]
        raise ValueError(f"sample keys must be unique; repeated: {duplicates[:3]!r}")


def _pack(keys: list[str], samples: Sequence[CachedSample], k: int, dtype: torch.dtype,
          qformer_dim: int | None) -> dict[str, torch.Tensor]:
    """Concatenate a shard's samples along the token / window axis (see the module docstring for the tensors)."""
    if qformer_dim is None and samples:
        qformer_dim = samples[0].qformer.shape[-1]
    for key, sample in zip(keys, samples, strict=True):
        _check_sample(key, sample, k, qformer_dim)
    values = torch.cat([s.sparse_values.to(dtype) for s in samples])
    qformer = torch.cat([s.qformer.to(dtype) for s in samples])
    for name, tensor in (("sparse_values", values), ("qformer", qformer)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} of shard starting at {keys[0]!r} has non-finite entries as {dtype}")
    return {"target_ids": torch.cat([s.target_ids for s in samples]).to(torch.int32),
            "sparse_ids": torch.cat([s.sparse_ids for s in samples]).to(torch.int32),
            "sparse_values": values,
            "token_offsets": _offsets([s.target_ids.shape[0] for s in samples]),
            "qformer": qformer,
            "window_offsets": _offsets([s.qformer.shape[0] for s in samples])}


def _check_sample(key: str, sample: CachedSample, k: int, qformer_dim: int) -> None:
    """Shapes ([tokens], [tokens, k], [windows, qformer_dim]), int ids / float values, ids that fit int32."""
    if sample.target_ids.dim() != 1 or sample.qformer.dim() != 2:
        raise ValueError(f"sample {key!r}: target_ids must be [tokens] and qformer [windows, dim], got "
                         f"{list(sample.target_ids.shape)} and {list(sample.qformer.shape)}")
    tokens, windows = sample.target_ids.shape[0], sample.qformer.shape[0]
    expected = {"target_ids": (tokens,), "sparse_ids": (tokens, k), "sparse_values": (tokens, k),
                "qformer": (windows, qformer_dim)}
    for name, shape in expected.items():
        tensor = getattr(sample, name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"sample {key!r}: {name} has shape {list(tensor.shape)}, expected {list(shape)} "
                             f"(tokens={tokens}, k={k}, qformer_dim={qformer_dim})")
        is_ids = name.endswith("_ids")
        if tensor.is_floating_point() == is_ids:
            raise ValueError(f"sample {key!r}: {name} has dtype {tensor.dtype}, expected "
                             f"{'an integer' if is_ids else 'a floating'} dtype")
        if is_ids and tensor.numel() and (tensor.min() < _INT32[0] or tensor.max() > _INT32[1]):
            raise ValueError(f"sample {key!r}: {name} holds ids outside int32, which the cache stores")


def _offsets(lengths: list[int]) -> torch.Tensor:
    """[n + 1] int64: 0, then the running sum of `lengths`."""
    return torch.cumsum(torch.tensor([0, *lengths], dtype=torch.int64), dim=0)


def _check_sidecar(sidecar: Path, shard: Path, fingerprint: str, verify: bool) -> tuple[str | None, dict | None]:
    """(None, entry) if the sidecar's shard can be kept, else (why not, None)."""
    try:
        entry = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable sidecar ({err})", None
    if entry.pop("fingerprint", None) != fingerprint:
        return "left by a cache with another identity or key list", None
    if not shard.exists() or shard.stat().st_size != entry.get("bytes"):
        return f"{shard.name} is missing or has the wrong size", None
    if verify and _sha256_file(shard) != entry.get("sha256"):
        return f"{shard.name} does not match its recorded sha256", None
    return None, entry


def _wipe(root: Path) -> None:
    """Delete this module's files in `root` (and only those: the folder may hold other things)."""
    for pattern in (MANIFEST, "shard-*.safetensors", "shard-*.json", *_TMP_PATTERNS):
        for path in root.glob(pattern):
            path.unlink()


def _remove_partial_writes(root: Path) -> None:
    """Delete the `.tmp` files a crashed writer left; they never count as finished."""
    for pattern in _TMP_PATTERNS:
        for path in root.glob(pattern):
            path.unlink()


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename survives a power cut), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


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
    missing = [name for name in (*_HEADER_FIELDS, "complete", "qformer_dim", "shards") if name not in manifest]
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
                             f"({_difference(manifest.get(name), want)}); {REBUILD_HINT} or point to the cache "
                             f"made for this {name}")


def _difference(found, expected) -> str:
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
