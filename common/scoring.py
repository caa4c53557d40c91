"""Quality of a model on a split: decode the chosen clips (`common.decode`) and score them, WER for ASR
(`common.asr_metrics`) and CIDEr-D, SPICE, ... for captions (`common.caption_metrics`). Evaluation and validation
during training both score through `score_clips`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from common.asr_metrics import NORMALIZER_NAME, asr_scores
from common.decode import GenerationConfig, decode
from common.model import AudioLanguageModel


def select_clips(dataset, max_per_task: int) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """Per task, the dataset indices to decode (one per unique clip) and each clip's references.

    AAC clips appear once per reference caption; they are decoded once and scored against all captions.
    """
    chosen: dict[str, list[int]] = {}
    refs: dict[str, list[str]] = {}
    first: dict[tuple[str, str], int] = {}
    for i, ex in enumerate(dataset.examples):
        key = (ex.task, ex.path)
        if key not in first:
            if max_per_task and len(chosen.get(ex.task, [])) >= max_per_task:
                continue
            first[key] = i
            chosen.setdefault(ex.task, []).append(i)
        refs.setdefault(f"{ex.task}|{ex.path}", []).append(ex.text)
    return chosen, refs


def score_clips(model: AudioLanguageModel, dataset, out_dir: Path, cache_dir: Path | None, max_clips_per_task: int,
                batch_size: int, generation: GenerationConfig) -> tuple[dict, dict, dict]:
    """Decode the chosen clips (`select_clips`: up to `max_clips_per_task` per task, 0 = all; `batch_size` at a time),
    write `<out_dir>/predictions.jsonl`, return (metrics, settings, unavailable). `cache_dir`: where the caption
    metrics' jars are linked (None: the default)."""
    # Imported here: aac-metrics (installed apart, see scripts/setup_env.sh) is not needed to time models (gpu_check).
    from common.caption_metrics import caption_scores

    chosen, refs = select_clips(dataset, max_clips_per_task)
    metrics, unavailable = {}, {}
    lines = []
    asr = chosen.get("asr", [])
    if asr:
        hyps = decode(model, dataset, asr, batch_size, generation)
        gold = [dataset.examples[i].text for i in asr]
        scores = asr_scores(hyps, gold)
        metrics.update(wer=scores["wer"], cer=scores["cer"], wer_ortho=scores["wer_ortho"], asr_clips=len(asr))
        lines += [{"task": "asr", "path": dataset.examples[i].path, "prediction": h, "references": [g]}
                  for i, h, g in zip(asr, hyps, gold, strict=True)]
    else:
        unavailable.update(wer="no asr clips in the test split", cer="no asr clips in the test split")
    aac = chosen.get("audiocaption", [])
    if len(aac) >= 2:
        cands = decode(model, dataset, aac, batch_size, generation)
        clip_refs = [refs[f"audiocaption|{dataset.examples[i].path}"] for i in aac]
        scores = caption_scores(cands, clip_refs, cache_dir=cache_dir)
        for key in ("cider_d", "spice", "spider", "meteor", "bleu_4", "rouge_l"):
            if scores[key] is None:
                unavailable[key] = scores["unavailable"][key]
            else:
                metrics[key] = scores[key]
        metrics["aac_clips"] = len(aac)
        per_clip = scores.get("cider_d_per_clip") or [None] * len(aac)
        lines += [{"task": "audiocaption", "path": dataset.examples[i].path, "prediction": c, "references": r,
                   "cider_d": s} for i, c, r, s in zip(aac, cands, clip_refs, per_clip, strict=True)]
    else:
        for key in ("cider_d", "spice", "spider"):
            unavailable[key] = "fewer than 2 audiocaption clips in the test split"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    settings = {"wer": {"normalizer": NORMALIZER_NAME, "library": "jiwer"},
                "captions": {"library": "aac-metrics", "references_per_clip": "all"},
                "generation": asdict(generation)}
    return metrics, settings, unavailable
