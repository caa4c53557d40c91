"""Read CTranslate2's `model.bin` (the weights file of a faster-whisper / CTranslate2 model folder).

The layout, as `ctranslate2/specs/model_spec.py` (`ModelSpec._serialize`) writes it, little-endian:

    u32 binary_version                  5 (ctranslate2 2.x) or 6 (3.0 and later); same layout
    str spec_name                       e.g. "WhisperSpec"
    u32 spec_revision
    u32 num_variables, then per variable (sorted by name):
        str name                        scope path, e.g. "encoder/layer_0/self_attention/linear_0/weight"
        u8  rank, u32 dims[rank]
        u8  dtype id                    0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
        u32 num_bytes, then the raw row-major data
    u32 num_aliases, then per alias:
        str alias, str target           a variable equal to another one is stored once, under the
                                        alphabetically first name; the others are aliases of it
    (end of file)

`str` is a u16 length that counts a trailing NUL, the UTF-8 bytes, then the NUL. Reading needs no
ctranslate2 install; the reader checks every length against the file and names what is wrong.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from convert import ConversionError

SUPPORTED_BINARY_VERSIONS = (5, 6)
DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


@dataclass
class Ct2Weights:
    """The content of one model.bin: header fields and every variable (aliases resolved to shared tensors)."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    """Name → tensor in the stored dtype; rank-0 tensors are scalars (head counts, flags, ...)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Alias name → the variable name it repeats (both names are also keys of `variables`)."""


class _Cursor:
    """Reads fixed-size pieces of a file, failing with the file, the offset and what was being read."""

    def __init__(self, handle: BinaryIO, path: Path, size: int):
        self.handle, self.path, self.size = handle, path, size

    def read(self, n: int, what: str) -> bytes:
        offset = self.handle.tell()
        data = self.handle.read(n)
        if len(data) != n:
            raise ConversionError(
                f"{self.path}: truncated at byte {offset} of {self.size} while reading {what} "
                f"({n} bytes needed, {len(data)} left). The file is incomplete: download or concatenate it again."
            )
        return data

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        raw = self.read(length, what)
        if length == 0 or raw[-1] != 0:
            raise ConversionError(f"{self.path}: {what} at byte {self.handle.tell() - length} is not a "
                                  "NUL-terminated string; this is not a CTranslate2 model.bin or it is corrupted")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{self.path}: {what} is not UTF-8; the file is corrupted") from None


def read_model_bin(path: str | Path) -> Ct2Weights:
    """Read every variable of a CTranslate2 `model.bin` into torch tensors (stored dtype, no conversion)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: model.bin not found (a CTranslate2 model folder holds model.bin, "
                              "config.json and a vocabulary file)")
    size = path.stat().st_size
    with path.open("rb") as handle:
        cur = _Cursor(handle, path, size)
        version = cur.unpack("I", "the binary version")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise ConversionError(
                f"{path}: CTranslate2 binary version {version} is not supported (this reader knows versions "
                f"{list(SUPPORTED_BINARY_VERSIONS)}, written by ctranslate2 2.x to 4.x). If this is a model.bin, "
                "re-convert the original model with a current ct2-transformers-converter."
            )
        weights = Ct2Weights(path, version, cur.string("the spec name"), cur.unpack("I", "the spec revision"))
        count = cur.unpack("I", "the number of variables")
        for index in range(count):
            name = cur.string(f"the name of variable {index}")
            rank = cur.unpack("B", f"the rank of {name}")
            shape = [cur.unpack("I", f"dimension {d} of {name}") for d in range(rank)]
            type_id = cur.unpack("B", f"the dtype of {name}")
            if type_id not in DTYPES:
                raise ConversionError(f"{path}: variable {name} has unknown dtype id {type_id} "
                                      f"(known: {sorted(DTYPES)}); the file is corrupted or from a newer CTranslate2")
            dtype = DTYPES[type_id]
            num_bytes = cur.unpack("I", f"the byte count of {name}")
            expected = math.prod(shape) * dtype.itemsize
            if num_bytes != expected:
                raise ConversionError(f"{path}: variable {name} declares {num_bytes} bytes but its shape {shape} "
                                      f"in {dtype} needs {expected}; the file is corrupted")
            data = bytearray(cur.read(num_bytes, f"the data of {name}"))
            tensor = torch.frombuffer(data, dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
            weights.variables[name] = tensor.reshape(shape)
        num_aliases = cur.unpack("I", "the number of aliases")
        for index in range(num_aliases):
            alias = cur.string(f"the name of alias {index}")
            target = cur.string(f"the target of alias {alias}")
            if target not in weights.variables:
                raise ConversionError(f"{path}: alias {alias} points to {target}, which the file does not hold")
            weights.aliases[alias] = target
        trailing = size - handle.tell()
        if trailing:
            raise ConversionError(f"{path}: {trailing} unexpected bytes after the last alias; the file is not one "
                                  "complete model.bin (were split parts concatenated twice or in the wrong order?)")
    for alias, target in weights.aliases.items():
        weights.variables[alias] = weights.variables[target]
    return weights
