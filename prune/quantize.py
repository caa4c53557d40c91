"""int8 weights for the student's LLM and encoder linear layers (torchao), saved as safetensors and loaded back.

    python -m prune.quantize --config configs/toy/quantize.yaml [key=value ...]

Every `nn.Linear` of the chosen parts gets a per-output-channel symmetric int8 weight (`prune.int8` describes the
schemes): `int8_weight_only` (torchao; the GPU scheme, float16 compute on a V100), `int8_dynamic` (torchao, int8
activations through `torch._int_mm`) or `int8_dynamic_x86` (FBGEMM's int8 GEMM; the CPU scheme). Embeddings and the
LM head stay in floating point (Gemma-2 ties the head to the embeddings).

The folder (`<output_dir>/model`) holds no floating-point copy of the quantized weights:

    model.safetensors    every tensor of the student; torchao's int8 weights flattened by its safetensors support
                         (`<module>._weight_qdata`, `<module>._weight_scale`, ... plus their metadata); x86 ones as
                         plain tensors (`<module>.weight` int8, `.weight_scale`, `.weight_zero_point`, `.bias`)
    quantization.json    the marker: scheme, torchao version, quantized module names, tied-weight aliases
    salmonn.yaml, whisper/config.json, beats_config.json, token_pruning.yaml, llm/ (config + tokenizer)

`prune.int8.load_int8_folder` (an `evaluation.run` loader: `prune.int8:load_int8_folder`) builds the student from those
configs, quantizes the same modules and assigns the stored tensors; the job checks that the reloaded model gives
exactly the logits of the one it saved.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import run
from common.config import parse_cli, save_resolved
from common.sizes import weight_bytes
from common.stages import mark_stage_done, stage_is_current
from prune.int8 import Scheme, linear_names, llm_logits, load_int8_folder, quantize_modules, save_int8_folder
from prune.skeleton import merge_lora, read_salmonn_config
from student.build import load_student_folder
from teacher.checkpoint import MODEL_CONFIG


@dataclass
class JobConfig:
    """Quantize a saved student's linear weights to int8."""

    model: str = "outputs/toy/student/model"
    """The student folder (e.g. a pruned one: outputs/toy/pruned-25/model)."""
    output_dir: str = "outputs/toy/student-int8"
    parts: list[str] = field(default_factory=lambda: ["llm", "speech_encoder", "audio_encoder"])
    """Parts whose nn.Linear layers are quantized: any of llm, speech_encoder, audio_encoder, qformer, projector."""
    scheme: Scheme = "int8_weight_only"
    """int8_weight_only (torchao; weights int8, matmul in the activation dtype: the GPU scheme, float16 compute on a
    V100), int8_dynamic (torchao; int8 activations too, `torch._int_mm`) or int8_dynamic_x86 (the CPU scheme: FBGEMM's
    int8 GEMM on int8 weights and per-call quantized activations; x86 CPUs only). On a CPU the torchao schemes decode
    slower than float32 (they cast or quantize per call); int8_dynamic_x86 is faster where the layers are wide enough
    (`python -m evaluation.int8_speed` measures all three)."""
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    """Module names (or name suffixes after a dot) left in floating point."""
    check_text: str = "USER: Describe the audio.\nASSISTANT: a high tone followed by three short beeps"
    """Text whose LLM logits compare the floating-point and int8 models (reported in quantization.json)."""


def main(argv: list[str] | None = None) -> int:
    import torchao

    cfg, force = parse_cli(JobConfig, argv)
    source = Path(cfg.model)
    if not (source / MODEL_CONFIG).is_file():
        raise SystemExit(f"config error: model {cfg.model!r} is not a student folder (no {MODEL_CONFIG})")
    out = Path(cfg.output_dir)
    if stage_is_current(cfg, out / "model", inputs=[cfg.model]) and not force:
        print(f"int8 student up to date: {out / 'model'} (use --force to quantize again)")
        return 0
    if force:
        shutil.rmtree(out, ignore_errors=True)
    save_resolved(cfg, out)
    model = load_student_folder(source)
    salmonn_cfg = merge_lora(model, read_salmonn_config(source))
    try:
        names = linear_names(model, cfg.parts, cfg.skip)
    except ValueError as err:
        raise SystemExit(f"config error: {err}") from None
    parts = model.parts()
    before = weight_bytes(model, parts)
    reference = llm_logits(model, cfg.check_text)
    quantize_modules(model, names, cfg.scheme)
    after = weight_bytes(model, parts)
    logits = llm_logits(model, cfg.check_text)
    diff = (logits - reference).abs().max().item()
    info = {"torchao": torchao.__version__, "scheme": cfg.scheme, "parts": cfg.parts, "skip": cfg.skip,
            "modules": names, "source": str(source), "weight_bytes_before": before, "weight_bytes_after": after,
            "check": {"text": cfg.check_text, "max_abs_logit_diff_vs_float": diff,
                      "logit_range_float": [reference.min().item(), reference.max().item()]}}
    save_int8_folder(model, dataclasses.replace(salmonn_cfg), out / "model", info)
    again = load_int8_folder(out / "model")
    if not torch.equal(llm_logits(again, cfg.check_text), logits):
        raise SystemExit(f"{out / 'model'}: the reloaded int8 model does not reproduce the saved one's logits")
    mark_stage_done(cfg, out / "model", inputs=[cfg.model])
    print(f"{len(names)} linear layers → int8 ({cfg.scheme}); weights {before['total']:,} → {after['total']:,} bytes; "
          f"max |Δ logit| vs float on the check text {diff:.4g}; reload reproduces the logits → {out / 'model'}")
    return 0


if __name__ == "__main__":
    run(main)
