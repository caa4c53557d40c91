"""Teacher cache writing: `CacheWriter` fills a cache folder (layout in `teacher.cache_store`) shard by shard, each
file written to `.tmp`, fsynced and moved into place, so an interrupted run resumes where it stopped and a resumed
cache is byte for byte the one an uninterrupted run writes. `teacher.cache_store.CacheReader` reads and checks it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from teacher.cache_store import (
    DTYPES,
    FORMAT,
    HEADER_FIELDS,
    MANIFEST,
    REBUILD_HINT,
    VERSION,
    CachedSample,
    CacheError,
    CacheIdentity,
    _sha256_file,
    describe_difference,
    shard_name,
    sidecar_name,
)

_INT32 = (-(2**31), 2**31 - 1)
"""Range of the int32 ids stored."""
_TMP_PATTERNS = (MANIFEST + ".tmp", "shard-*.tmp")


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
        for name in HEADER_FIELDS:
            if found.get(name) != self.header[name]:
                difference = describe_difference(found.get(name), self.header[name])
                raise CacheError(f"{path}: this folder holds a cache built with a different {name} ({difference}); "
                                 "pass force=True (--force) to wipe and rebuild it, or write the new cache to another "
                                 "folder")

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


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
