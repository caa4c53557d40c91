"""Export a student for deployment: the LLM in Hugging Face format, the audio side in safetensors, a model card.

    python -m prune.export --config configs/toy/export.yaml [key=value ...]

The folder (`output_dir`):

    llm/                           the LLM (LoRA merged) and its tokenizer: AutoModelForCausalLM.from_pretrained
    encoders.safetensors           speech_encoder.* (Whisper encoder) and audio_encoder.* (BEATs)
    qformer_projector.safetensors  qformer.*, ln_speech.*, ln_audio.*, projector.*
    whisper/config.json, beats_config.json, token_pruning.yaml, salmonn.yaml   the shapes (`prune.skeleton`)
    config.yaml                    this job's resolved config
    README.md                      the model card: shapes, parameters, measured numbers and the commands behind them

`load_export(folder)` (also an `evaluation.run` loader: `prune.export:load_export`) returns the student as a
`teacher.salmonn.Salmonn`. The job reloads what it wrote and checks that the LLM alone (`from_pretrained`) and the
whole student reproduce the exported model's logits exactly.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from common.cli import run
from common.config import parse_cli, read_yaml, save_resolved
from common.results import format_summary, load_results
from common.sizes import count_parameters, weight_bytes
from common.stages import mark_stage_done, stage_is_current
from prune.skeleton import build_skeleton, check_keys, flat_state, merge_lora, read_salmonn_config, write_configs
from student.build import load_student_folder
from teacher.build import DTYPES
from teacher.checkpoint import MODEL_CONFIG
from teacher.salmonn import Salmonn

ENCODERS = "encoders.safetensors"
BRIDGE = "qformer_projector.safetensors"
_ENCODER_PREFIXES = ("speech_encoder.", "audio_encoder.")
_BRIDGE_PREFIXES = ("qformer.", "ln_speech.", "ln_audio.", "projector.")


@dataclass
class JobConfig:
    """Export a saved student (distilled, pruned) for deployment."""

    model: str = "outputs/toy/student/model"
    """The student folder to export."""
    output_dir: str = "outputs/toy/export"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights are stored in this dtype (float16 for a V100; see prune.fp16_check for Gemma-2's ranges)."""
    results: str = ""
    """An evaluation results.json of this model (`python -m evaluation.run`); its numbers go into the model card."""
    name: str = "smolt student"
    """Title of the model card."""


def split_state(model: Salmonn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(encoder tensors, Q-Former/projection tensors, aliases of shared tensors left out), contiguous on the CPU."""
    state, aliases = flat_state(model)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    encoders = {k: v for k, v in state.items() if k.startswith(_ENCODER_PREFIXES)}
    bridge = {k: v for k, v in state.items() if k.startswith(_BRIDGE_PREFIXES)}
    other = sorted(set(state) - set(encoders) - set(bridge) - {k for k in state if k.startswith("llm.")})
    if other:
        raise ValueError(f"tensors outside the LLM, the encoders and the Q-Former/projection: {other[:5]}")
    return encoders, bridge, {k: v for k, v in aliases.items() if not k.startswith("llm.")}


AUDIO_SIDE = ("speech_encoder", "audio_encoder", "ln_speech", "ln_audio", "qformer", "projector")


def cast_audio_side(model: Salmonn, dtype: torch.dtype) -> None:
    """Everything but the LLM to `dtype` (the LLM's dtype is Hugging Face's business, see `llm_in_dtype`)."""
    for name in AUDIO_SIDE:
        part = getattr(model, name)
        if part is not None:
            part.to(dtype)


def llm_in_dtype(llm: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The LLM as `from_pretrained(..., dtype=dtype)` builds it: parameters in `dtype`, while buffers follow HF's
    own rules (rotary `inv_freq` stays fp32; `llm.to(float16)` would round it)."""
    if llm.get_input_embeddings().weight.dtype == dtype:
        return llm
    fresh = AutoModelForCausalLM.from_config(llm.config, dtype=dtype)
    fresh.load_state_dict({k: v.to(dtype) for k, v in llm.state_dict().items()})
    fresh.generation_config = llm.generation_config
    return fresh.eval()


def load_export(folder: str | Path) -> Salmonn:
    """The exported student, in eval mode on the CPU, in the dtype it was exported in."""
    folder = Path(folder)
    cfg = read_salmonn_config(folder)
    dtype = DTYPES[cfg.llm.dtype]
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm", dtype=dtype)
    model = build_skeleton(folder, llm=llm)
    cast_audio_side(model, dtype)
    state = {**load_file(str(folder / ENCODERS)), **load_file(str(folder / BRIDGE))}
    with safe_open(str(folder / ENCODERS), "pt") as handle:
        aliases = json.loads(handle.metadata().get("aliases", "{}"))
    llm_keys = {k for k in model.state_dict() if k.startswith("llm.")}
    check_keys(model, set(state), f"{folder}/{ENCODERS} + {BRIDGE}", may_lack=llm_keys | set(aliases))
    model.load_state_dict(state, strict=False)
    return model.eval()


def export(model: Salmonn, salmonn_cfg, out: Path, dtype: str) -> None:
    """Write the export folder (without the model card) for `model`, cast to `dtype`."""
    model.llm = llm_in_dtype(model.llm, DTYPES[dtype])
    cast_audio_side(model, DTYPES[dtype])
    salmonn_cfg = dataclasses.replace(salmonn_cfg, llm=dataclasses.replace(salmonn_cfg.llm, dtype=dtype))
    write_configs(model, salmonn_cfg, out, llm_weights=True)
    encoders, bridge, aliases = split_state(model)
    save_file(encoders, str(out / ENCODERS), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    save_file(bridge, str(out / BRIDGE), metadata={"format": "pt"})


@torch.inference_mode()
def check_reload(model: Salmonn, out: Path) -> dict[str, bool]:
    """Reload the export both ways and compare logits with `model` exactly (random audio, a fixed prompt)."""
    ids = model.tokenizer("USER: Describe the audio.\nASSISTANT: a tone", return_tensors="pt")["input_ids"]
    llm = AutoModelForCausalLM.from_pretrained(out / "llm", dtype=model.llm_dtype).eval()
    same_llm = torch.equal(llm(input_ids=ids).logits, model.llm(input_ids=ids).logits)
    again = load_export(out)
    batch = probe_batch(model)
    a = again.prefill(again.encode_audio(batch), batch["prompts"])[0]
    b = model.prefill(model.encode_audio(batch), batch["prompts"])[0]
    return {"llm_from_pretrained_identical": same_llm, "student_identical": torch.equal(a, b)}


def probe_batch(model: Salmonn, seconds: float = 1.0) -> dict:
    """One random clip of `seconds` (mel `[1, n_mels, 2 × max_source_positions]`, fbank `[1, frames, 128]`)."""
    g = torch.Generator().manual_seed(0)
    config = model.speech_encoder.config
    dtype = next(model.speech_encoder.parameters()).dtype
    frames = int(seconds * 100) - 2
    return {"mel": torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions, generator=g).to(dtype),
            "mel_frames": torch.tensor([int(seconds * 100)]),
            "fbank": torch.randn(1, frames, 128, generator=g).to(dtype),
            "fbank_padding_mask": torch.zeros(1, frames, dtype=torch.bool), "prompts": ["Describe the audio."]}


def provenance(folder: Path) -> list[str]:
    """The commands that made a model or results folder, from the resolved configs saved beside them."""
    lines = []
    for path in (folder / "config.yaml", folder.parent / "config.yaml"):
        if path.is_file():
            job = read_yaml(path).get("job")
            if job:
                lines.append(f"python -m {job} --config {path}")
                break
    return lines


def model_card(cfg: JobConfig, model: Salmonn, checks: dict[str, bool], out: Path) -> str:
    """README.md of the export: what is in it, how to load it, shapes, measured numbers and their commands."""
    w, b, q = model.speech_encoder.config, model.audio_encoder, model.llm.config
    params = count_parameters(model, model.parts())
    nbytes = weight_bytes(model, model.parts())
    heads = model.speech_encoder.layers[0].self_attn.num_heads
    lines = [f"# {cfg.name}", "",
             "A SALMONN-style audio language model (Whisper encoder ⊕ BEATs → window-level Q-Former → "
             f"{q.model_type} LLM) distilled and compressed by smolt. Weights in {cfg.dtype}.", "",
             "## Files", "",
             "| file | holds |", "|---|---|",
             "| `llm/` | the LLM and its tokenizer (Hugging Face format) |",
             f"| `{ENCODERS}` | `speech_encoder.*` (Whisper encoder), `audio_encoder.*` (BEATs) |",
             f"| `{BRIDGE}` | `qformer.*`, `ln_speech.*`, `ln_audio.*`, `projector.*` |",
             f"| `whisper/config.json`, `beats_config.json`, `token_pruning.yaml`, `{MODEL_CONFIG}` | shapes, "
             "BEATs token pruning, prompt |",
             "| `config.yaml` | the export job's resolved config |", "",
             "## Load", "",
             "```python",
             "from prune.export import load_export          # smolt (BEATs and the window-level Q-Former live there)",
             f'model = load_export("{out}")   # teacher.salmonn.Salmonn; model.generate(batch, prompts)',
             "",
             "from transformers import AutoModelForCausalLM  # the LLM alone",
             f'llm = AutoModelForCausalLM.from_pretrained("{out / "llm"}")',
             "```", "",
             f"Reload checks at export time: LLM via `from_pretrained` reproduces the logits exactly: "
             f"{checks['llm_from_pretrained_identical']}; whole student via `load_export`: "
             f"{checks['student_identical']}.", "",
             "## Shapes", "",
             f"- Whisper encoder: {w.encoder_layers} layers, d_model {w.d_model}, {heads} heads of "
             f"{w.d_model // w.encoder_attention_heads}, MLP {w.encoder_ffn_dim}",
             ]
    if b is not None:
        pruning = json.dumps(dataclasses.asdict(b.pruning_config)) if hasattr(b, "pruning_config") else "none"
        lines.append(f"- BEATs: {b.cfg.encoder_layers} layers, d {b.cfg.encoder_embed_dim}, "
                     f"MLP {b.cfg.encoder_ffn_embed_dim}, token pruning {pruning}")
    lines += [f"- LLM ({q.model_type}): {q.num_hidden_layers} layers, hidden {q.hidden_size}, MLP "
              f"{q.intermediate_size}, {q.num_attention_heads} query / {q.num_key_value_heads} KV heads of "
              f"{q.head_dim}, vocabulary {q.vocab_size}",
              f"- parameters: {params['total']:,} ({', '.join(f'{k} {v:,}' for k, v in params['per_part'].items())})",
              f"- weight bytes: {nbytes['total']:,}", "",
              "## Measured", ""]
    if cfg.results:
        results = load_results(cfg.results)
        lines += ["```", format_summary(results), "```", "",
                  f"From `{cfg.results}`, measured by:", "", "```"]
        lines += provenance(Path(cfg.results).parent) or ["(no resolved config beside the results)"]
        lines += ["```", ""]
    else:
        lines += ["No evaluation results were given (`results=<results.json>`); run `python -m evaluation.run` "
                  f"with a model entry `{{loader: prune.export:load_export, path: {out}}}`.", ""]
    lines += ["## How it was made", "", "```"]
    lines += provenance(Path(cfg.model)) or [f"(no resolved config beside {cfg.model})"]
    lines += [f"python -m prune.export --config {out / 'config.yaml'}", "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg, force = parse_cli(JobConfig, argv)
    source = Path(cfg.model)
    if not (source / MODEL_CONFIG).is_file():
        raise SystemExit(f"config error: model {cfg.model!r} is not a student folder (no {MODEL_CONFIG})")
    if cfg.results and not Path(cfg.results).is_file():
        raise SystemExit(f"config error: results {cfg.results!r} is not a file (an evaluation results.json, or empty)")
    out = Path(cfg.output_dir)
    if stage_is_current(cfg, out, inputs=[cfg.model]) and not force:
        print(f"export up to date: {out} (use --force to export again)")
        return 0
    shutil.rmtree(out, ignore_errors=True)
    save_resolved(cfg, out)
    model = load_student_folder(source)
    salmonn_cfg = merge_lora(model, read_salmonn_config(source))
    export(model, salmonn_cfg, out, cfg.dtype)
    checks = check_reload(model, out)
    (out / "README.md").write_text(model_card(cfg, model, checks, out))
    if not all(checks.values()):
        raise SystemExit(f"{out}: the export does not reproduce the model: {checks}")
    mark_stage_done(cfg, out, inputs=[cfg.model])
    print(f"exported {cfg.model} → {out} ({cfg.dtype}); reload checks {checks}")
    return 0


if __name__ == "__main__":
    run(main)
