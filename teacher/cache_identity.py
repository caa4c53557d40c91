"""What a teacher cache is keyed by: its samples (`sample_keys`), the teacher that wrote it (`teacher_identity`) and
that teacher's tokenizer (`teacher_tokenizer_identity`). The cache writer (`teacher.cache`) and every reader
(`distill.distiller`, the ablation runner) call these, so their identities compare equal."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from common.config import config_hash
from common.feature_store import SubsetView
from common.stages import file_stamps
from teacher.build import SalmonnConfig
from teacher.cache_store import tokenizer_identity
from teacher.checkpoint import MODEL_CONFIG, read_model_config
from teacher.tokenizer import encoding_identity


def sample_keys(dataset) -> list[str]:
    """One key per entry: index, task, audio path and a hash of the reference text (same data → same keys).
    A subset of a split (`common.feature_store.SubsetView`) has its entries' keys in the whole split."""
    if isinstance(dataset, SubsetView):
        keys = sample_keys(dataset.dataset)
        return [keys[i] for i in dataset.indices]
    keys = []
    for i, ex in enumerate(dataset.examples):
        digest = hashlib.sha1(ex.text.encode()).hexdigest()[:12]
        keys.append(f"{i:07d}|{ex.task}|{ex.path}|{digest}")
    return keys


def teacher_identity(teacher_folder: str, teacher_cfg: SalmonnConfig | None = None) -> dict:
    """Names, sizes and mtimes of the teacher folder's files (cheap even for 26 GB of weights) and its resolved
    `beats.padding_features`, or the hash of the config that builds the teacher from the official checkpoints."""
    if teacher_folder:
        stamps = file_stamps(teacher_folder)
        identity = {"folder": str(Path(teacher_folder)), "files": hashlib.sha256(repr(stamps).encode()).hexdigest()}
        if (Path(teacher_folder) / MODEL_CONFIG).is_file():
            # Not in the files when an old folder's salmonn.yaml lacks it, and it changes what the teacher computes.
            identity["beats_padding"] = read_model_config(teacher_folder).beats.padding_features
        return identity
    return {"config": config_hash(asdict(teacher_cfg))}


def teacher_tokenizer_identity(tokenizer) -> dict:
    """The cache's tokenizer identity: vocabulary and how it encodes (`teacher.tokenizer.encoding_identity`)."""
    return tokenizer_identity("teacher", tokenizer.get_vocab(), encoding_identity(tokenizer))
