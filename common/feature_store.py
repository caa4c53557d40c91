"""Precomputed features of a whole split in one safetensors file, shared by every stage that reads the split.

Computing Whisper's log-mel and BEATs' fbank costs tens of milliseconds per clip on a CPU, several times what a
toy model's training step spends on the clip, so the toy pipeline computes them once per split (in parallel)
and every stage (teacher training, teacher cache, distillation, evaluation) memory-maps the same file.
The file name carries a hash of the clips and the feature settings, so a change of either rebuilds it.

Outputs of frozen encoders (SALMONN's Whisper and BEATs never change while the Q-Former, projection and LoRA
train) are cached the same way (`with_encoder_outputs`): computed once per distinct clip, read by every epoch
and by the teacher cache, in a file whose name also carries a fingerprint of the encoders' weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from multiprocessing import get_context
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common.audio import load_audio
from common.cleaning import Cleaner, ClipPlan, clip_identity, options_key
from common.dataset import AudioTextCollator, AudioTextDataset
from common.features import AudioFeaturizer, FeatureConfig
from common.views import DatasetView


def unique_clips(dataset: AudioTextDataset) -> tuple[list, list[int]]:
    """(one example per distinct audio, row of each dataset item in that list).

    Captioning clips appear once per reference caption; their features are stored once.
    """
    rows: dict[str, int] = {}
    unique, index = [], []
    for ex in dataset.examples:
        if ex.path not in rows:
            rows[ex.path] = len(unique)
            unique.append(ex)
        index.append(rows[ex.path])
    return unique, index


def _cleaner(dataset) -> Cleaner | None:
    """The `Cleaner` of the `AudioTextDataset` under `dataset`'s views."""
    while not hasattr(dataset, "cleaner") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "cleaner", None)


def store_key(dataset: AudioTextDataset, feature_cfg: FeatureConfig) -> str:
    """Hash of the clip list (paths, sizes, modification times), of the feature settings and, when cleaning changes
    the audio (VAD, loudness), of the cleaning options."""
    # "fbank_tail": stores written before it (without the tails) get another name, so they are rebuilt.
    h = hashlib.sha256(json.dumps({**vars(feature_cfg), "fbank_tail": 1}, sort_keys=True).encode())
    cleaner = _cleaner(dataset)
    if cleaner is not None and cleaner.cfg.changes_audio:
        h.update(f"clean|{options_key(cleaner.cfg)}".encode())
    for ex in unique_clips(dataset)[0]:
        h.update(clip_identity(ex.path, ex.audio_bytes).encode())
    return h.hexdigest()[:16]


_WORKER: dict = {}


def _init_worker(feature_cfg: FeatureConfig) -> None:
    torch.set_num_threads(1)
    _WORKER["featurizer"] = AudioFeaturizer(feature_cfg)


def _featurize(job: tuple[str, bytes | None, ClipPlan | None]) -> dict[str, torch.Tensor]:
    path, data, plan = job
    wav = load_audio(path, data=data)
    return _WORKER["featurizer"](plan.apply(wav) if plan is not None else wav)


def _plan(cleaner: Cleaner | None, ex) -> ClipPlan | None:
    """The clip's cleaning plan (made when the split was scanned), None when cleaning leaves audio alone."""
    if cleaner is None or not cleaner.cfg.changes_audio:
        return None
    return cleaner.plan(ex.path, ex.audio_bytes, ex.task)


def build_store(dataset: AudioTextDataset, feature_cfg: FeatureConfig, path: Path, workers: int = 2) -> None:
    """Featurize every distinct clip of `dataset` and write `mel` [N, n_mels, frames] and the concatenated
    `fbank` [Σ frames_i, 128] with `fbank_offsets` [N + 1] and `fbank_tail` with `fbank_tail_offsets` (float16) to
    `path`, atomically."""
    cleaner = _cleaner(dataset)
    jobs = [(ex.path, ex.audio_bytes, _plan(cleaner, ex)) for ex in unique_clips(dataset)[0]]
    mels, fbanks, tails = [], [], []
    ctx = get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(feature_cfg,)) as pool:
        for item in tqdm(pool.imap(_featurize, jobs, chunksize=16), total=len(jobs), desc=f"features {path.name}",
                         unit="clip", disable=None):  # None: no bar when stderr is not a terminal (a log file)
            mels.append(item["mel"].half())
            if "fbank" in item:
                fbanks.append(item["fbank"].half())
                tails.append(item["fbank_tail"].half())
    tensors = {"mel": torch.stack(mels)}
    for key, seqs in (("fbank", fbanks), ("fbank_tail", tails)):
        if seqs:
            lengths = torch.tensor([0] + [f.shape[0] for f in seqs])
            tensors[key] = torch.cat(seqs)
            tensors[f"{key}_offsets"] = torch.cumsum(lengths, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"clips": str(len(jobs))})
    tmp.replace(path)


class SubsetView(DatasetView):
    """The entries `indices` of a dataset (any of the views here), renumbered: item `i` is the wrapped dataset's
    item `indices[i]` with `index` = i. Feature and encoder stores stay those of the whole split."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset = dataset
        self.indices = list(indices)
        self._examples = [dataset.examples[i] for i in self.indices]
        self._durations = [dataset.durations[i] for i in self.indices]

    @property
    def examples(self):
        return self._examples

    @property
    def durations(self):
        return self._durations

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[self.indices[index]]
        item["index"] = index
        return item


class StoredFeatureDataset(DatasetView):
    """An `AudioTextDataset` whose features come from a feature store instead of the audio files.

    Items are the same dicts (`mel`, `fbank`, `text`, `task`, `prompt`, `path`, `duration`, `index`), with
    features as float32.
    """

    def __init__(self, dataset: AudioTextDataset, path: Path):
        self.dataset = dataset
        self.path = path
        self.rows = unique_clips(dataset)[1]
        self._file = None

    def _open(self):
        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        return self._file

    def __getitem__(self, index: int) -> dict:
        f = self._open()
        ex = self.dataset.examples[index]
        row = self.rows[index]
        item = {"mel": f.get_slice("mel")[row : row + 1][0].float()}
        for key in ("fbank", "fbank_tail"):
            if key in f.keys():
                offsets = f.get_slice(f"{key}_offsets")[row : row + 2].tolist()
                item[key] = f.get_slice(key)[offsets[0] : offsets[1]].float()
        item.update(text=ex.text, task=ex.task, prompt=self.prompt(ex), path=ex.path,
                    duration=self.dataset.durations[index], index=index)
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None  # safe_open handles do not pickle; reopen in the worker
        return state


def with_feature_store(dataset: AudioTextDataset, feature_cfg: FeatureConfig, store_dir: str | Path,
                       name: str, workers: int = 2) -> StoredFeatureDataset:
    """The dataset backed by `store_dir/<name>-<hash>.safetensors`, building that file if it is missing."""
    path = Path(store_dir) / f"{name}-{store_key(dataset, feature_cfg)}.safetensors"
    if not path.is_file():
        build_store(dataset, feature_cfg, path, workers)
    return StoredFeatureDataset(dataset, path)


# ----- cached outputs of frozen encoders ---------------------------------------------------------------------


def build_encoder_store(dataset, encode: Callable[[dict], dict[str, list[torch.Tensor]]],
                        path: Path | Mapping[str, tuple[Path, str]], batch_size: int = 16,
                        dtype: torch.dtype = torch.float16) -> None:
    """Run `encode` over every distinct clip of `dataset` once and write its outputs to `path`, atomically.

    `encode(batch)` maps a collated batch (`AudioTextCollator`) to `{key: [[frames_i, dim] per row]}`. Clips go in
    order of duration, so batches hold similar lengths. The file holds, per key, the rows concatenated
    (`key` `[Σ frames_i, dim]`) and their offsets (`key_offsets` `[N + 1]`), N = distinct clips. `path` may
    instead map each key `encode` returns to `(file, name)`: that key's rows go to their own file under `name`
    (several outputs of one pass, each stored where its own fingerprint names it); keys it does not map are dropped.
    """
    unique, index = unique_clips(dataset)
    first = {}
    for item, row in enumerate(index):
        first.setdefault(row, item)
    order = sorted(range(len(unique)), key=lambda row: dataset.durations[first[row]])
    collate = AudioTextCollator()
    outputs: dict[str, list] = {}
    label = path.name if isinstance(path, Path) else ", ".join(sorted(Path(f).name for f, _ in path.values()))
    for start in tqdm(range(0, len(order), batch_size), desc=f"encoder outputs {label}", unit="batch",
                      disable=None):
        rows = order[start : start + batch_size]
        batch = collate([dataset[first[row]] for row in rows])
        for key, tensors in encode(batch).items():
            slots = outputs.setdefault(key, [None] * len(unique))
            for row, tensor in zip(rows, tensors, strict=True):
                slots[row] = tensor.to(dtype).contiguous()
    files: dict[Path, dict[str, list]] = {}
    for key, rows in outputs.items():
        if isinstance(path, Path):
            files.setdefault(path, {})[key] = rows
        elif key in path:
            file, name = path[key]
            files.setdefault(Path(file), {})[name] = rows
    for file, keyed in files.items():
        tensors = {}
        for key, rows in keyed.items():
            lengths = torch.tensor([0] + [t.shape[0] for t in rows])
            tensors[key] = torch.cat(rows)
            tensors[f"{key}_offsets"] = torch.cumsum(lengths, 0)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"clips": str(len(unique)), "keys": ",".join(sorted(keyed))})
        tmp.replace(file)


class EncoderOutputDataset(DatasetView):
    """A dataset whose items also carry cached encoder outputs of their clip (`[frames, dim]` float32 per key).

    Everything else (`examples`, `durations`, `report`, `prompt`, items' features and texts) is the wrapped
    dataset's."""

    def __init__(self, dataset, path: Path):
        self.dataset = dataset
        self.path = path
        self.rows = unique_clips(dataset)[1]
        with safe_open(str(path), framework="pt") as f:
            self.keys = sorted(k for k in f.keys() if not k.endswith("_offsets"))
        self._file = None

    def __getitem__(self, index: int) -> dict:
        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        item = self.dataset[index]
        row = self.rows[index]
        for key in self.keys:
            start, end = self._file.get_slice(f"{key}_offsets")[row : row + 2].tolist()
            item[key] = self._file.get_slice(key)[start:end].float()
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state


def with_encoder_outputs(dataset, encode: Callable[[dict], dict[str, list[torch.Tensor]]], fingerprint: str,
                         feature_cfg: FeatureConfig, store_dir: str | Path, name: str, batch_size: int = 16,
                         dtype: torch.dtype = torch.float16) -> EncoderOutputDataset:
    """`dataset` with each clip's encoder outputs from `store_dir/<name>-<clips hash>-<fingerprint>.safetensors`,
    computed by `encode` if that file is missing.

    `fingerprint` must change whenever the outputs would (the encoders' weights and output rules, e.g.
    `Salmonn.encoder_fingerprint`); the clips hash covers the clip list and the feature settings.
    """
    path = encoder_store_path(dataset, fingerprint, feature_cfg, store_dir, name)
    if not path.is_file():
        build_encoder_store(dataset, encode, path, batch_size, dtype)
    return EncoderOutputDataset(dataset, path)


def encoder_store_path(dataset, fingerprint: str, feature_cfg: FeatureConfig, store_dir: str | Path,
                       name: str) -> Path:
    """`store_dir/<name>-<clips hash>-<fingerprint>.safetensors`: where `with_encoder_outputs` keeps them."""
    return Path(store_dir) / f"{name}-{store_key(dataset, feature_cfg)}-{fingerprint}.safetensors"
