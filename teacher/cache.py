"""Run the teacher once over a split, teacher-forced on the references, and cache what distillation needs.

    python -m teacher.cache --config configs/toy/cache.yaml [--force] [key=value ...]

Per sample: the target token ids (the teacher's tokenization of the reference plus its end token), a sparse
next-token distribution at every target position (top-k, or k importance-sampled tokens, see teacher.sparse),
and the Q-Former outputs `[windows, dim]`. Storage, resume and verification are `teacher.cache_store`'s.
An interrupted run resumes without recomputing finished shards.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from common.cli import run
from common.config import config_hash, parse_cli
from common.dataset import AudioTextCollator, DataConfig, scan_split
from common.device import InferenceDtype, place_for_inference
from common.feature_store import with_feature_store
from common.features import FeatureConfig
from common.model import move_batch
from common.stages import DONE, clear_marker, mark_stage_done, stage_is_current
from teacher.build import LLMConfig, SalmonnConfig, build_salmonn, load_tokenizer
from teacher.cache_identity import sample_keys, teacher_identity, teacher_tokenizer_identity
from teacher.cache_store import (
    MANIFEST,
    CachedSample,
    CacheIdentity,
    CacheReader,
)
from teacher.cache_writer import CacheWriter
from teacher.checkpoint import load_model_folder
from teacher.encoder_store import with_cached_encoders
from teacher.qformer import num_windows
from teacher.salmonn import shift_for_next_token
from teacher.sparse import sampled_sparse, topk_sparse


@dataclass
class JobConfig:
    """Build the teacher cache for one split."""

    teacher_folder: str = ""
    """A teacher saved by teacher.train (`.../model`); when empty, `teacher` is built from its config."""
    teacher: SalmonnConfig = field(default_factory=SalmonnConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_store: str = ""
    encoder_store: str = ""
    """Folder of cached frozen-encoder outputs (`teacher.train`'s `encoder_store`): the teacher's training already
    wrote them for the same clips and encoder weights, so this job reads them instead of running the encoders."""
    split: Literal["train", "valid", "test"] = "train"
    mode: Literal["topk", "sampled"] = "topk"
    k: int = 32
    """Vocabulary entries kept per target position."""
    dtype: Literal["float16", "float32"] = "float16"
    shard_size: int = 512
    batch_size: int = 16
    device: str = "auto"
    """auto (the GPU if there is one), cpu, cuda or cuda:N."""
    inference_dtype: InferenceDtype = "auto"
    """The teacher's weights: auto is float16 on a GPU (a V100 has no bf16), float32 on the CPU. (`dtype` is
    the cache's storage dtype.)"""
    seed: int = 0
    """Seeds the importance sampling (each shard from seed + shard index, so a resumed run draws the same)."""
    output_dir: str = "outputs/toy/cache/train"


def cache_identity(cfg: JobConfig, tokenizer) -> CacheIdentity:
    relevant = {"split": cfg.split, "data": asdict(cfg.data), "features": asdict(cfg.features), "seed": cfg.seed}
    return CacheIdentity(teacher=teacher_identity(cfg.teacher_folder, cfg.teacher),
                         tokenizer=teacher_tokenizer_identity(tokenizer),
                         config_hash=config_hash(relevant), mode=cfg.mode, k=cfg.k, dtype=cfg.dtype)


def finished_cache_matches(cfg: JobConfig, out_dir: Path) -> bool:
    """Whether the cache in `out_dir` records the teacher and tokenizer identity this code computes now. The folder's
    files can be unchanged while what the teacher computes is not (a folder written before
    `beats.padding_features`, a tokenizer now read with sentencepiece's semantics); such a cache is stale."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return False
    header = json.loads(manifest.read_text())
    llm = LLMConfig(path=str(Path(cfg.teacher_folder) / "llm")) if cfg.teacher_folder else cfg.teacher.llm
    identity = cache_identity(cfg, load_tokenizer(llm))
    return header.get("teacher") == identity.teacher and header.get("tokenizer") == identity.tokenizer


def load_teacher(cfg: JobConfig):
    if cfg.teacher_folder:
        model = load_model_folder(cfg.teacher_folder)
    else:
        model, report = build_salmonn(cfg.teacher)
        if report is not None and report.missing_trained:
            raise SystemExit(f"teacher checkpoint lacks trained keys:\n{report.summary()}")
    return place_for_inference(model, cfg.device, cfg.inference_dtype)


@torch.inference_mode()
def teacher_outputs(model, batch: dict, cfg: JobConfig, generator: torch.Generator) -> list[CachedSample]:
    """Teacher-forced pass → one CachedSample per row (targets, sparse distribution, Q-Former outputs)."""
    out = model(batch, target_logits_only=True)
    logits, labels = shift_for_next_token(out.logits, out.labels)
    windows = own_windows(batch["mel_frames"], model.qformer.cfg, out.qformer_out.shape[1])
    samples = []
    for row in range(logits.shape[0]):
        keep = labels[row] != -100
        row_logits = logits[row][keep].float()
        if cfg.mode == "topk":
            ids, values = topk_sparse(row_logits, cfg.k)
        else:
            ids, values = sampled_sparse(row_logits, cfg.k, generator)
        samples.append(CachedSample(target_ids=labels[row][keep].cpu(), sparse_ids=ids.cpu(),
                                    sparse_values=values.cpu(),
                                    qformer=out.qformer_out[row, : windows[row]].float().cpu()))
    return samples


def own_windows(mel_frames: torch.Tensor, qformer_cfg, available: int) -> list[int]:
    """Q-Former windows that cover each clip's own audio (the rest only see padding, and are not cached)."""
    frames = [math.ceil(int(n) / 2) for n in mel_frames]  # Whisper halves the 10 ms mel frames
    return [min(available, max(1, num_windows(f, qformer_cfg))) for f in frames]


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    out_dir = Path(cfg.output_dir)
    inputs = [cfg.teacher_folder]
    if stage_is_current(cfg, out_dir, inputs=inputs) and finished_cache_matches(cfg, out_dir) and not force:
        print(f"teacher cache up to date: {out_dir} (use --force to rebuild)")
        return 0
    dataset = scan_split(cfg.data, cfg.features, cfg.split, out_dir)
    if cfg.feature_store:
        dataset = with_feature_store(dataset, cfg.features, cfg.feature_store, cfg.split)
    model = load_teacher(cfg)
    if cfg.encoder_store:
        dataset = with_cached_encoders(model, dataset, cfg.features, cfg.encoder_store, cfg.split)
    collate = AudioTextCollator(model.tokenizer)
    # A finished cache of another config or teacher is this stage's own stale output: rebuilt, as every stage
    # reruns when its inputs change. An unfinished one resumes, and the writer refuses it if it was another's.
    stale = (out_dir / DONE).is_file()
    if stale and not force:
        print(f"{out_dir}: the finished cache there was built from another config or teacher; rebuilding it")
    writer = CacheWriter(out_dir, cache_identity(cfg, model.tokenizer), sample_keys(dataset), cfg.shard_size,
                         force=force or stale)
    clear_marker(out_dir)  # an interrupted rebuild then resumes instead of starting over
    pending = writer.pending_shards()
    print(f"{len(pending)} of {writer.num_shards} shards to compute")
    for shard in tqdm(pending, desc="cache shards", unit="shard", disable=None):
        generator = torch.Generator(model.device).manual_seed(cfg.seed + shard.index)
        indices = list(shard.sample_indices)
        samples = []
        for start in range(0, len(indices), cfg.batch_size):
            batch = move_batch(collate([dataset[i] for i in indices[start : start + cfg.batch_size]]), model.device)
            samples.extend(teacher_outputs(model, batch, cfg, generator))
        writer.write_shard(shard.index, samples)
    reader = CacheReader(out_dir, expect_teacher=writer.identity.teacher, expect_tokenizer=writer.identity.tokenizer)
    print(reader.stats().summary())
    mark_stage_done(cfg, out_dir, inputs=inputs)
    return 0


if __name__ == "__main__":
    run(main)
