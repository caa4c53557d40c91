"""Sequence-level KD data (Kim & Rush 2016): the teacher's generated text becomes the student's target.

    python -m distill.sequence_kd --config configs/toy/sequence_kd.yaml

The teacher decodes every training clip once (greedy or beam, as configured); the result is a SALMONN
annotation JSON (`output_dir/train.json`, audio paths relative to it, the reference kept as `reference_text`)
that `distill.train` reads like any other training data (with `kd.kd_weight=0`: plain CE on the teacher's text).
It is the baseline that token-level logit KD must beat; across tokenizers it needs no alignment at all.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import run
from common.config import parse_cli, save_resolved
from common.dataset import DataConfig, scan_split
from common.decode import GenerationConfig, decode
from common.feature_store import with_feature_store
from common.features import FeatureConfig
from common.scoring import select_clips
from common.stages import mark_stage_done, stage_is_current
from distill.cross_tokenizer import sequence_kd_records
from teacher.checkpoint import load_model_folder


@dataclass
class JobConfig:
    """Decode the training split with the teacher and write it as annotation JSON."""

    teacher_folder: str = "outputs/toy/teacher/model"
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_store: str = ""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 24
    threads: int = 0
    output_dir: str = "outputs/toy/sequence_kd"


def records_for(dataset, texts: dict[tuple[str, str], str], out_json: Path) -> list[dict]:
    """One annotation record per dataset entry, its text replaced by the teacher's text for that clip.

    AAC clips listed once per reference caption keep one entry per caption (all with the teacher's caption), so
    the task mix of the training data is unchanged."""
    records = []
    for ex in dataset.examples:
        if "[" in ex.path and not Path(ex.path).exists():
            raise SystemExit(f"sequence KD: {ex.source} holds its audio inside a HF dataset; write the training data "
                             "as annotation JSON (common.annotations) to use sequence-level KD")
        record = {"path": os.path.relpath(ex.path, out_json.parent), "text": ex.text, "task": ex.task}
        if ex.prompt:
            record["Q"] = ex.prompt
        records.append(record)
    teacher_texts = [texts[(ex.task, ex.path)] for ex in dataset.examples]
    return sequence_kd_records(records, teacher_texts)


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    out_dir = Path(cfg.output_dir)
    out_json = out_dir / "train.json"
    if stage_is_current(cfg, out_dir, inputs=[cfg.teacher_folder]) and out_json.is_file() and not force:
        print(f"sequence-KD data up to date: {out_json} (use --force to redo)")
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    save_resolved(cfg, out_dir)
    dataset = scan_split(cfg.data, cfg.features, "train", out_dir)
    if cfg.feature_store:
        dataset = with_feature_store(dataset, cfg.features, cfg.feature_store, "train")
    teacher = load_model_folder(cfg.teacher_folder).eval()
    chosen, _ = select_clips(dataset, 0)
    texts: dict[tuple[str, str], str] = {}
    for task, indices in chosen.items():
        outputs = decode(teacher, dataset, indices, cfg.batch_size, cfg.generation)
        texts.update({(task, dataset.examples[i].path): text for i, text in zip(indices, outputs, strict=True)})
        print(f"{task}: {len(indices)} clips decoded by the teacher")
    records = records_for(dataset, texts, out_json)
    empty = sum(not r["text"].strip() for r in records)
    if empty:
        print(f"warning: the teacher produced empty text for {empty} of {len(records)} entries; they are dropped "
              "when distill.train scans the file (see its data report)")
    tmp = out_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"annotation": records}, indent=1) + "\n")
    tmp.replace(out_json)
    mark_stage_done(cfg, out_dir, inputs=[cfg.teacher_folder])
    print(f"sequence-KD training data: {len(records)} entries → {out_json}")
    return 0


if __name__ == "__main__":
    run(main)
