"""Reference points for the quality numbers: what a model that ignores the audio would score.

    python -m evaluation.baselines --config configs/toy/baselines.yaml

- captioning: "caption the mean": one fixed caption for every test clip; among the most frequent training captions
  the one with the best CIDEr-D on the valid split is chosen, then scored on the test split;
- ASR: the most frequent training transcript for every test clip (WER of a model that never listens).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aac_metrics.functional import cider_d

from common.annotations import DataReport, read_examples
from common.asr_metrics import asr_scores
from common.caption_metrics import caption_scores, default_cache_dir, locate_java, prepare_cache_dir, ptb_tokenize
from common.cli import run
from common.config import parse_cli, save_resolved
from common.dataset import DataConfig


@dataclass
class JobConfig:
    """Score audio-blind baselines on the test split."""

    data: DataConfig = field(default_factory=DataConfig)
    candidates: int = 30
    """Most frequent training captions tried as the constant caption."""
    output_dir: str = "outputs/toy/eval/baselines"


def _by_clip(examples, task: str) -> dict[str, list[str]]:
    clips: dict[str, list[str]] = {}
    for ex in examples:
        if ex.task == task:
            clips.setdefault(ex.path, []).append(ex.text)
    return clips


def constant_caption(train, valid, test, candidates: int) -> dict:
    counts = Counter(ex.text for ex in train if ex.task == "audiocaption")
    pool = [text for text, _ in counts.most_common(candidates)]
    valid_refs = list(_by_clip(valid, "audiocaption").values())
    # One Java run tokenizes every candidate and reference; CIDEr-D itself is pure Python.
    tok_pool, tok_refs = ptb_tokenize(pool, valid_refs, locate_java(), prepare_cache_dir(default_cache_dir()))
    valid_cider = [cider_d([c] * len(tok_refs), tok_refs)[0]["cider_d"].item() for c in tok_pool]
    best = pool[max(range(len(pool)), key=valid_cider.__getitem__)]
    test_refs = list(_by_clip(test, "audiocaption").values())
    scores = caption_scores([best] * len(test_refs), test_refs)
    return {"caption": best, "cider_d": scores["cider_d"], "bleu_4": scores["bleu_4"], "clips": len(test_refs)}


def constant_transcript(train, test) -> dict:
    counts = Counter(ex.text for ex in train if ex.task == "asr")
    best = counts.most_common(1)[0][0]
    refs = [ex.text for ex in test if ex.task == "asr"]
    scores = asr_scores([best] * len(refs), refs)
    return {"transcript": best, "wer": scores["wer"], "cer": scores["cer"], "clips": len(refs)}


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_cli(JobConfig, argv)
    read = lambda sources: read_examples(sources, cfg.data.tasks, cfg.data.on_error, DataReport(),
                                           cfg.data.hf_options())
    train, valid, test = read(cfg.data.train), read(cfg.data.valid), read(cfg.data.test)
    results = {"audiocaption": constant_caption(train, valid, test, cfg.candidates),
               "asr": constant_transcript(train, test)}
    out = Path(cfg.output_dir)
    save_resolved(cfg, out)
    (out / "baselines.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run(main)
