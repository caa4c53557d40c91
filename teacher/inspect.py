"""Print a SALMONN's parameters per part, the token ids and pieces of its wrapped prompt, and the checkpoint key
report; exit 1 if a trained key is missing.

    python -m teacher.inspect --config configs/teacher/salmonn-13b.yaml [instruction="Describe the audio."]

The prompt ids are the ones the LLM reads around the audio tokens (`[BOS] + before`, `after`), to compare with the
official code's `llama_tokenizer(p_before / p_after, add_special_tokens=False)`.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import sys
from dataclasses import dataclass, field

from common.cli import run
from common.config import parse_cli
from common.sizes import count_parameters, weight_bytes
from teacher.build import CheckpointError, SalmonnConfig, build_salmonn


@dataclass
class JobConfig:
    """Inspect a SALMONN built from local checkpoints."""

    model: SalmonnConfig = field(default_factory=SalmonnConfig)
    instruction: str = "Recognize the speech and give me the transcription."
    """The instruction whose wrapped prompt is printed (one of SALMONN's ASR prompts)."""


def describe(model) -> str:
    parts = model.parts()
    counts = count_parameters(model, parts)
    sizes = weight_bytes(model, parts)
    lines = [f"{'part':<20}{'params':>16}{'weight MB':>12}"]
    for name, n in counts["per_part"].items():
        lines.append(f"{name:<20}{n:>16,}{sizes['per_part'].get(name, 0) / 2**20:>12.1f}")
    lines.append(f"{'total':<20}{counts['total']:>16,}{sizes['total'] / 2**20:>12.1f}")
    lines.append(f"{'trainable':<20}{counts['trainable']:>16,}")
    return "\n".join(lines)


def describe_prompt(model, instruction: str) -> str:
    """The wrapped prompt's text and, before and after the audio tokens, its token ids and pieces."""
    before, after = model.prompt_ids(instruction)
    tok = model.tokenizer
    text = model.prompt_cfg.template.format(model.prompt_cfg.audio_wrapper + instruction.strip())
    lines = [f"prompt {text!r} ({type(tok).__name__}, beats.padding_features: {model.beats_padding})"]
    for name, ids in (("before audio", before), ("after audio", after)):
        lines.append(f"  {name}: {len(ids)} ids {ids}")
        lines.append(f"  {'':<{len(name)}}  pieces {tok.convert_ids_to_tokens(ids)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(JobConfig, argv)
    try:
        model, report = build_salmonn(cfg.model)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(model))
    print(describe_prompt(model, cfg.instruction))
    if report is None:
        print("no SALMONN checkpoint configured (model.checkpoint): the Q-Former, projection and LoRA are fresh")
        return 0
    print(report.summary())
    return 1 if report.missing_trained else 0


if __name__ == "__main__":
    run(main)
