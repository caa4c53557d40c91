"""Predict what a SALMONN teacher and each smolt student stage need on a GPU, before any weight is on disk.

    python -m scale estimate --config configs/salmonn13b-gemma2b/estimate.yaml --gpu v100-32gb [key=value ...]

Parameter counts and weight bytes are exact for the architectures (`scale.architectures` builds the real modules on
the meta device from the preset's teacher and distill configs). Everything else is a model, stated here and in
the docstrings (bytes; tables print GB = 10⁹ bytes):

- stages: the teacher as SALMONN loads it (LoRA unmerged); the students as exported (LoRA merged): distilled,
  pruned by `prune.structured` with every ratio at 25 / 50 % (`scale.architectures.build_meta`), and int8.
- weights: fp16 = 2 bytes per element of every distinct state tensor; int8 = `prune.quantize`'s default, torchao's
  `Int8WeightOnlyConfig` on every `nn.Linear` of the LLM, Whisper and BEATs except the LM head (1 byte per weight,
  one fp32 scale and one int8 zero point per output row); embeddings, LM head, Q-Former and projection stay fp16.
- decode (TPOT floor): one cached step reads every LLM weight once (the input embedding only one row, unless it is
  the tied LM head) plus the whole KV cache: TPOT ≥ (LLM bytes read + KV bytes) / memory bandwidth.
- KV cache: 2 (K and V) × layers × KV heads × head size × tokens × batch × 2 bytes (fp16).
- training, per GPU (mixed precision, AdamW): 16 bytes per trainable parameter (Rajbhandari et al. 2020: fp16
  weight 2 + fp16 gradient 2 + fp32 master weight, momentum and variance 12; without DeepSpeed, fit keeps fp32
  weights and gradients: 4 + 4 + 8).
  ZeRO-0 (one GPU, or DDP: `fit` without DeepSpeed) keeps it all on every GPU, plus an fp16 autocast copy of every
  fp32 weight; ZeRO-2 keeps the fp16 weights and shards the other 14 bytes over the GPUs; ZeRO-3 shards all 16 and
  the frozen weights, and gathers two layers at a time. Frozen weights cost their dtype as built (fp16 LLM base,
  fp32 encoders) without DeepSpeed and fp16 under it.
- activations (training, per micro-batch, fp16, no recomputation, eager attention: a V100 has no FlashAttention):
  per transformer layer b·s·(c_h·h + c_q·q + c_f·f + …) + c_s·b·heads·s² bytes in the manner of Korthikanti et al.
  (2022), with coefficients traced from our layers (`ACTIVATIONS`); only stacks at or after the first trainable
  part keep them. Logits: fp16 logits, their fp32 copy and fp32 log-softmax over the whole LLM sequence (10 bytes
  per element), and the fp32 KD rows and their log-softmax over the answer (8 bytes).
- online teacher: fp16 weights (replicated, or sharded under ZeRO-3) and its forward's transient memory.
- a job fits when its total is at most the GPU's memory less `reserve_gib` (CUDA context, allocator slack).
- int8-frozen LoRA training (`llm.int8_frozen`, `whisper.int8_frozen`; `common.int8_frozen`), one GPU without
  DeepSpeed: every frozen `nn.Linear` of those parts (the LM head too, unless tied to the embeddings; not the LoRA
  adapters) costs 1 byte per weight + one fp32 scale per output row (torchao keeps fp32 scales for fp16 weights too),
  instead of the LLM's dtype, or fp32 + its fp16 autocast copy for Whisper; torchao dequantizes one layer at a time
  in the forward (transient, not counted). Adapters, their gradients and AdamW states stay as above (fp32).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: quiet their known third-party noise
    from common.cli import quiet_third_party_logs

    quiet_third_party_logs()

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from common.cli import run
from common.config import ConfigError, load_config, load_job_config
from scale.architectures import MetaSalmonn, beats_config, build_meta, llm_config, whisper_config
from student.token_pruning import layer_token_counts, patch_tokens
from teacher.build import SalmonnConfig
from teacher.qformer import FRAMES_PER_SECOND, num_windows

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    memory_gib: float
    """Device memory, GiB (as sold: a "32 GB" V100 holds 32 GiB)."""
    bandwidth_gbs: float
    """Peak memory bandwidth, GB/s (10⁹ bytes per second)."""
    bf16: bool


GPUS = {
    "v100-32gb": GPU(32, 900, False),
    "v100-16gb": GPU(16, 900, False),
    "a100-40gb": GPU(40, 1555, True),
    "a100-80gb": GPU(80, 2039, True),
    "h100-80gb": GPU(80, 3350, True),
    "h100-pcie": GPU(80, 2000, True),
}


@dataclass
class JobConfig:
    """Estimate parameters, memory and the TPOT floor of a real-scale preset on one GPU type."""

    teacher_config: str = "configs/salmonn13b-gemma2b/teacher.yaml"
    """A teacher job YAML whose `model:` is the SALMONN teacher (teacher.assemble, teacher.inspect, teacher.train)."""
    distill_config: str = "configs/salmonn13b-gemma2b/distill.yaml"
    """The distill.train YAML: the student's shape, trainable parts, batch, precision and cached or online KD."""
    zero_configs: dict[str, str] = field(default_factory=lambda: {"2": "configs/deepspeed/zero2.json",
                                                                  "3": "configs/deepspeed/zero3.json"})
    """DeepSpeed JSON per ZeRO stage, read for their communication bucket sizes."""
    gpu: str = "v100-32gb"
    """One of GPUS (`--gpu` on the command line)."""
    world_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    zero_stages: list[int] = field(default_factory=lambda: [0, 2, 3])
    prune_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5])
    audio_seconds: float = 30.0
    """Audio per clip (Whisper always hears its 30 s window)."""
    prompt_tokens: int = 24
    """Prompt tokens around the audio tokens (template and instruction)."""
    target_tokens: int = 96
    """Answer tokens per clip in training (a 30 s transcript is about 80–100 tokens)."""
    decode_context: int = 256
    """Tokens in the KV cache at the decode step the TPOT floor is taken at (prompt + audio + answer so far)."""
    decode_batch: int = 1
    reserve_gib: float = 1.0
    """GPU memory not available to tensors: CUDA context and allocator slack, GiB."""


@dataclass
class Stage:
    name: str
    model: MetaSalmonn
    precision: str
    """fp16 or int8 weights."""


# ----- weights ------------------------------------------------------------------------------------------------


def _tensors(module: nn.Module) -> dict[int, object]:
    """Distinct state tensors (parameters and persistent buffers; tied and aliased ones once)."""
    return {id(t): t for t in module.state_dict(keep_vars=True).values()}


def count_params(module: nn.Module) -> int:
    """Distinct parameters, elements."""
    return sum(p.numel() for p in module.parameters())


def fp16_bytes(module: nn.Module) -> int:
    """Weights stored in fp16: 2 bytes per floating-point element, integer buffers at their own size."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in _tensors(module).values())


INT8_ROW_BYTES = 5
"""torchao Int8WeightOnlyConfig stores one fp32 scale and one int8 zero point per output row."""
INT8_PARTS = ("llm", "speech_encoder", "audio_encoder")
"""Parts whose linear layers `prune.quantize` turns to int8 by default (its `skip: [lm_head]` keeps the head)."""


def int8_bytes(module: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """`module`'s weights after int8 weight-only quantization of its nn.Linear layers (bar those named in `skip`)."""
    total = fp16_bytes(module)
    seen = set()
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear) or name.split(".")[-1] in skip or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        out_features, in_features = m.weight.shape
        total += out_features * in_features + INT8_ROW_BYTES * out_features - 2 * m.weight.numel()
    return total


def weight_bytes(model: MetaSalmonn, precision: str) -> int:
    """A stage's weights: all fp16, or int8 linear layers in INT8_PARTS (see the module docstring)."""
    if precision != "int8":
        return fp16_bytes(model)
    parts = model.parts()
    return fp16_bytes(model) + sum(int8_bytes(parts[p]) - fp16_bytes(parts[p]) for p in INT8_PARTS if p in parts)


def _llm_core(model: MetaSalmonn) -> nn.Module:
    llm = model.llm
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def decode_read_bytes(model: MetaSalmonn, precision: str) -> int:
    """LLM bytes one cached decode step reads: every LLM weight, the input embedding only as the tied LM head."""
    core = _llm_core(model)
    embedding = core.get_input_embeddings().weight
    tied = core.get_output_embeddings().weight is embedding
    total = int8_bytes(model.llm) if precision == "int8" else fp16_bytes(model.llm)
    if not tied:  # the (fp16) input embedding is read one row per token
        total -= 2 * embedding.numel() - 2 * embedding.shape[1]
    return total


# ----- shapes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int


def llm_shape(model: MetaSalmonn) -> LLMShape:
    c = _llm_core(model).config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return LLMShape(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads or
                    c.num_attention_heads, head_dim, c.intermediate_size, c.vocab_size)


def kv_cache_bytes(shape: LLMShape, tokens: int, batch: int) -> int:
    """fp16 K and V of every layer for `tokens` positions of `batch` sequences, bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * 2


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes one transformer layer keeps for backward in fp16 (no recomputation, eager attention): per token
    `hidden`·h + `q`·(heads × head size) + `ffn`·f + `heads`·heads + `const`, and `score` per attention score."""

    hidden: int
    q: int
    ffn: int
    heads: int
    const: int
    score: int


ACTIVATIONS = {
    # Calibrated by tracing the saved tensors of each layer's forward (tests/test_scale_estimate.py re-measures
    # them): K and V count at the query width because eager attention repeats the KV heads; LLaMA and Gemma-2
    # norms keep an fp32 copy, softmax runs in fp32 (score: fp32 output + fp16 copy, Gemma-2 also its tanh
    # soft-cap); gated MLPs keep gate, up, activation and product; BEATs keeps its gated relative position bias.
    "whisper": ActivationBytes(hidden=10, q=8, ffn=4, heads=0, const=8, score=2),
    "beats": ActivationBytes(hidden=10, q=8, ffn=6, heads=16, const=8, score=8),
    "llama": ActivationBytes(hidden=16, q=8, ffn=8, heads=0, const=8, score=6),
    "gemma2": ActivationBytes(hidden=36, q=8, ffn=8, heads=0, const=32, score=8),
}


def layer_activations(kind: ActivationBytes, tokens: int, batch: int, hidden: int, heads: int, q_dim: int,
                      ffn: int) -> int:
    """Bytes one layer keeps for backward over `batch` sequences of `tokens` (see ActivationBytes)."""
    per_token = kind.hidden * hidden + kind.q * q_dim + kind.ffn * ffn + kind.heads * heads + kind.const
    return batch * tokens * per_token + kind.score * batch * heads * tokens * tokens


@dataclass(frozen=True)
class Workload:
    audio_seconds: float
    prompt_tokens: int
    target_tokens: int
    batch: int

    def whisper_frames(self) -> int:
        return int(self.audio_seconds * FRAMES_PER_SECOND)

    def llm_tokens(self, model: MetaSalmonn) -> int:
        windows = num_windows(self.whisper_frames(), model.qformer.cfg) * model.qformer.cfg.num_query_token
        return self.prompt_tokens + windows + self.target_tokens


def stack_activations(model: MetaSalmonn, work: Workload, beats_pruning=None) -> dict[str, int]:
    """Training activations per stack for one micro-batch, bytes (`layer_activations`; the Q-Former, under 1 % of
    the total, as a BERT layer on one query plus its cross-attention over each window's frames)."""
    w = model.speech_encoder.config
    frames = work.whisper_frames()
    whisper = w.encoder_layers * layer_activations(ACTIVATIONS["whisper"], frames, work.batch, w.d_model,
                                                   w.encoder_attention_heads, w.d_model, w.encoder_ffn_dim)
    whisper += 12 * work.batch * w.d_model * frames  # conv stem: both convolutions' outputs and GELUs, fp16
    out = {"speech_encoder": whisper}
    if model.audio_encoder is not None:
        b = model.audio_encoder.cfg
        tokens = patch_tokens(b, work.audio_seconds)
        counts = (layer_token_counts(tokens, beats_pruning, b.encoder_layers) if beats_pruning is not None
                  else [tokens] * b.encoder_layers)
        out["audio_encoder"] = sum(layer_activations(ACTIVATIONS["beats"], t, work.batch, b.encoder_embed_dim,
                                                     b.encoder_attention_heads, b.encoder_embed_dim,
                                                     b.encoder_ffn_embed_dim) for t in counts)
    q = model.qformer.cfg
    windows = num_windows(frames, q) * work.batch
    kernel = model.qformer.kernel
    encoder_dim = model.qformer.qformer.config.encoder_hidden_size
    per_layer = layer_activations(ACTIVATIONS["whisper"], q.num_query_token, windows, q.hidden_size,
                                  q.num_attention_heads, q.hidden_size, q.intermediate_size)
    per_layer += windows * kernel * (2 * encoder_dim + 4 * q.hidden_size + 2 * q.num_attention_heads)
    out["qformer"] = q.num_hidden_layers * per_layer
    s = llm_shape(model)
    tokens = work.llm_tokens(model)
    kind = ACTIVATIONS.get(_llm_core(model).config.model_type, ACTIVATIONS["llama"])
    out["llm"] = s.layers * layer_activations(kind, tokens, work.batch, s.hidden, s.heads, s.heads * s.head_dim,
                                              s.ffn)
    # fp16 logits, their fp32 copy and fp32 log-softmax over the sequence; fp32 KD rows and log-softmax over answers
    out["logits"] = work.batch * s.vocab * (10 * tokens + 8 * work.target_tokens)
    return out


def forward_transient(model: MetaSalmonn, work: Workload) -> int:
    """Peak extra memory of a no-grad forward (inference, teacher cache, online teacher): the largest single
    layer's activations (freed layer by layer) plus the fp16 logits and fp32 answer rows, bytes."""
    acts = stack_activations(model, work)
    s = llm_shape(model)
    layers = {"speech_encoder": model.speech_encoder.config.encoder_layers, "llm": s.layers,
              "qformer": model.qformer.cfg.num_hidden_layers}
    if model.audio_encoder is not None:
        layers["audio_encoder"] = model.audio_encoder.cfg.encoder_layers
    largest = max(acts[k] // layers[k] for k in layers)
    tokens = work.llm_tokens(model)
    return largest + work.batch * s.vocab * (2 * tokens + 4 * work.target_tokens)


# ----- training memory ----------------------------------------------------------------------------------------

TRAIN_PARTS = {"speech_encoder": ("speech_encoder.",), "audio_encoder": ("audio_encoder.",),
               "glue": ("qformer.", "ln_speech.", "ln_audio.", "projector."), "llm": ("llm.",)}


def trainable_split(model: MetaSalmonn, train_whisper: bool, train_beats: bool, train_llm: bool
                    ) -> dict[str, dict[str, int]]:
    """Parameters per part, split into trainable and frozen (LoRA adapters train whenever they exist)."""
    flags = {"speech_encoder": train_whisper, "audio_encoder": train_beats, "glue": True, "llm": train_llm}
    out = {part: {"trainable": 0, "frozen": 0} for part in TRAIN_PARTS}
    for name, p in model.named_parameters():
        part = next(k for k, prefixes in TRAIN_PARTS.items() if name.startswith(prefixes))
        trains = flags[part] or ".lora_" in name
        out[part]["trainable" if trains else "frozen"] += p.numel()
    return out


@dataclass(frozen=True)
class TrainingSetup:
    zero: int
    world: int
    mode: str
    """"configured": the distill config's trainable parts (frozen LLM + LoRA); "full": every parameter trains."""


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the largest module that holds parameters directly (what ZeRO-3 gathers at once)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def training_memory(student: MetaSalmonn, split: dict, setup: TrainingSetup, work: Workload, acts: dict[str, int],
                    teacher: MetaSalmonn | None, teacher_work: Workload | None, buckets: dict[int, int]
                    ) -> dict[str, float]:
    """Per-GPU bytes of one distillation job: model states, activations, online teacher, total."""
    trainable = sum(v["trainable"] for v in split.values())
    frozen = {k: v["frozen"] for k, v in split.items()}
    n = setup.world
    if setup.zero == 0:
        fp32 = trainable + sum(v for k, v in frozen.items() if k != "llm")
        llm_frozen = frozen["llm"] * (2 if student.llm_dtype in ("float16", "bfloat16") else 4)
        states = 16 * trainable + 4 * (fp32 - trainable) + llm_frozen + 2 * fp32  # + autocast fp16 copies
    elif setup.zero == 2:
        states = 2 * trainable + 14 * trainable / n + 2 * sum(frozen.values()) + buckets.get(2, 0)
    else:
        states = 16 * trainable / n + 2 * sum(frozen.values()) / n + 2 * 2 * largest_layer_params(student)
        states += buckets.get(3, 0)
    first_trainable = [k for k in ("speech_encoder", "audio_encoder") if split[k]["trainable"]]
    kept = {k: v for k, v in acts.items() if k in ("qformer", "llm", "logits") or k in first_trainable}
    activations = sum(kept.values())
    teacher_bytes = 0.0
    if teacher is not None:
        teacher_bytes = fp16_bytes(teacher) / (n if setup.zero == 3 else 1) + forward_transient(teacher, teacher_work)
    return {"states": states, "activations": activations, "teacher": teacher_bytes,
            "total": states + activations + teacher_bytes}


def frozen_linears(part: nn.Module) -> tuple[int, int]:
    """(weights, output rows) of the `nn.Linear` layers `common.int8_frozen.quantize_frozen` turns to int8 in a
    frozen part: all but LoRA adapters and a head tied to an embedding."""
    embeddings = {id(m.weight) for m in part.modules() if isinstance(m, nn.Embedding)}
    weights = rows = 0
    for name, m in part.named_modules():
        if isinstance(m, nn.Linear) and ".lora_" not in name and id(m.weight) not in embeddings:
            weights += m.weight.numel()
            rows += m.weight.shape[0]
    return weights, rows


def int8_frozen_saving(model: MetaSalmonn, parts: tuple[str, ...], today: dict[str, float]) -> int:
    """Bytes that holding `parts`' frozen linear weights in int8 saves against `today` (bytes per weight as the
    ZeRO-0 training estimate counts them: {"llm": LLM dtype, "speech_encoder": fp32 + fp16 autocast copy = 6}; an
    online teacher's fp16 weights: 2). Every output row adds one fp32 scale (4 bytes)."""
    saved = 0
    for part in parts:
        weights, rows = frozen_linears(getattr(model, part))
        per_weight = today[part]
        saved += int(weights * (per_weight - 1) - rows * 4)
    return saved


def int8_frozen_lines(cfg: JobConfig, teacher: MetaSalmonn, distill, student: MetaSalmonn, acts: dict[str, int],
                      work: Workload, usable: float, buckets: dict[int, int], teacher_online: bool) -> list[str]:
    """The int8-frozen LoRA table (module docstring): each job today and with its frozen LLM (and Whisper) in int8,
    on one GPU of `cfg.gpu` without DeepSpeed."""
    t_cfg = _load(cfg.teacher_config, "teacher_config").model
    llm_bytes = lambda m: 2 if m.llm_dtype in ("float16", "bfloat16") else 4
    fit = lambda total: "yes" if total <= usable else "NO"
    lines = ["", f"Int8-frozen LoRA training on one {cfg.gpu} (fit without DeepSpeed; llm.int8_frozen, "
                 "whisper.int8_frozen: frozen linear weights at 1 byte + an fp32 scale per row, adapters and AdamW "
                 "fp32; torchao int8 weight-only runs with fp16 activations, bitsandbytes is not used):",
             f"{'job':<52}{'int8 parts':<30}{'today GB':>9}{'int8 GB':>9}  fits today / int8"]
    setup = TrainingSetup(0, 1, "configured")
    rows = []
    if t_cfg.lora.enabled or t_cfg.llm.freeze:
        t_split = trainable_split(teacher, not t_cfg.whisper.freeze, not t_cfg.beats.freeze,
                                  not t_cfg.llm.freeze and not t_cfg.lora.enabled)
        t_acts = stack_activations(teacher, work)
        now = training_memory(teacher, t_split, setup, work, t_acts, None, None, buckets)["total"]
        parts = ("llm",) + (("speech_encoder",) if t_cfg.whisper.freeze else ())
        saved = int8_frozen_saving(teacher, parts, {"llm": llm_bytes(teacher), "speech_encoder": 6})
        rows.append((f"SALMONN teacher: LoRA fine-tuning, micro-batch {work.batch}", ", ".join(parts), now,
                     now - saved))
    s = distill.student
    if s.lora.enabled or s.llm.freeze:
        split = trainable_split(student, not s.freeze_whisper, not s.freeze_beats, not s.llm.freeze and not
                                s.lora.enabled)
        mem = training_memory(student, split, setup, work, acts, teacher if teacher_online else None, work, buckets)
        parts = ("llm",) + (("speech_encoder",) if s.freeze_whisper else ())
        saved = int8_frozen_saving(student, parts, {"llm": llm_bytes(student), "speech_encoder": 6})
        teacher_note = ""
        if teacher_online:  # the online teacher is frozen throughout: its LLM and Whisper can be int8 too
            saved += int8_frozen_saving(teacher, ("llm", "speech_encoder"), {"llm": 2, "speech_encoder": 2})
            teacher_note = " + teacher llm, speech_encoder"
        rows.append((f"distillation of the student, micro-batch {work.batch}", ", ".join(parts) + teacher_note,
                     mem["total"], mem["total"] - saved))
    for job, parts, now, int8 in rows:
        lines.append(f"{job:<52}{parts:<30}{now / GB:>9.2f}{int8 / GB:>9.2f}  {fit(now)} / {fit(int8)}")
    if not rows:
        lines.append("(no job of these configs has a frozen LLM: nothing to hold in int8)")
    return lines


# ----- the report ---------------------------------------------------------------------------------------------


def _load(path: str, kind: str):
    try:
        return load_job_config(path)
    except ConfigError as err:
        raise ConfigError(f"{kind}: {err}") from None


def _buckets(cfg: JobConfig) -> dict[int, int]:
    """fp16 bytes of DeepSpeed's communication buffers per ZeRO stage, from the JSON configs."""
    out = {}
    for stage, path in cfg.zero_configs.items():
        if not Path(path).is_file():
            raise ConfigError(f"zero_configs.{stage}: {path} not found; point it at a DeepSpeed JSON")
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
        elements = (zero.get("reduce_bucket_size", 5e8) + zero.get("allgather_bucket_size", 0) if int(stage) == 2
                    else zero.get("reduce_bucket_size", 5e8) + zero.get("stage3_prefetch_bucket_size", 5e7))
        out[int(stage)] = int(2 * elements)
    return out


def build_models(cfg: JobConfig):
    """(teacher, distill job config, the student as trained (with LoRA), inference stages), on the meta device."""
    teacher_job = _load(cfg.teacher_config, "teacher_config")
    distill = _load(cfg.distill_config, "distill_config")
    if not hasattr(teacher_job, "model") or not isinstance(teacher_job.model, SalmonnConfig):
        raise ConfigError(f"teacher_config: {cfg.teacher_config} has no `model:` SALMONN config (use a "
                          "teacher.assemble, teacher.inspect or teacher.train YAML)")
    if not hasattr(distill, "student"):
        raise ConfigError(f"distill_config: {cfg.distill_config} is not a distill.train YAML")
    t = teacher_job.model
    where = cfg.teacher_config
    whisper = whisper_config(t.whisper, f"{where}: model.whisper.path")
    beats = beats_config(t.beats, f"{where}: model.beats.path")
    teacher = build_meta(whisper, beats, t.qformer, llm_config(t.llm, f"{where}: model.llm.path"), t.llm.dtype,
                         t.lora)
    s = distill.student
    student_llm = llm_config(s.llm, f"{cfg.distill_config}: student.llm.path")
    trained = build_meta(whisper, beats, t.qformer, student_llm, s.llm.dtype, s.lora, whisper_layers=s.whisper_layers)
    stages = [Stage("teacher", teacher, "fp16")]
    merged = dataclasses.replace(s.lora, enabled=False)  # exported students carry LoRA merged into the LLM
    pruned = {}
    for ratio in [0.0, *cfg.prune_ratios]:
        pruned[ratio] = build_meta(whisper, beats, t.qformer, student_llm, s.llm.dtype, merged,
                                   whisper_layers=s.whisper_layers, prune_ratio=ratio)
        stages.append(Stage("student distilled" if not ratio else f"student pruned {ratio:.0%}", pruned[ratio],
                            "fp16"))
    for ratio in cfg.prune_ratios:
        stages.append(Stage(f"student pruned {ratio:.0%} int8", pruned[ratio], "int8"))
    return teacher, distill, trained, stages


def report(cfg: JobConfig) -> str:
    if cfg.gpu not in GPUS:
        raise ConfigError(f"--gpu {cfg.gpu}: unknown; one of {', '.join(GPUS)}")
    gpu = GPUS[cfg.gpu]
    usable = (gpu.memory_gib - cfg.reserve_gib) * GIB
    teacher, distill, student, stages = build_models(cfg)
    lines = [f"GPU {cfg.gpu}: {gpu.memory_gib:g} GiB ({usable / GB:.1f} GB usable after {cfg.reserve_gib:g} GiB "
             f"reserve), {gpu.bandwidth_gbs:g} GB/s, bf16 {'yes' if gpu.bf16 else 'no'}",
             f"teacher: {cfg.teacher_config}; student: {cfg.distill_config}",
             "",
             f"Inference, batch {cfg.decode_batch}, {cfg.audio_seconds:g} s audio, KV cache at {cfg.decode_context} "
             "tokens (TPOT floor = (LLM bytes read + KV bytes) / bandwidth):",
             f"{'stage':<26}{'params':>15}{'weights GB':>11}{'LLM read GB':>12}{'KV MB':>8}{'TPOT floor ms':>14}"
             f"{'peak GB':>9}  fits"]
    infer = Workload(cfg.audio_seconds, cfg.prompt_tokens, 0, cfg.decode_batch)
    for st in stages:
        weights = weight_bytes(st.model, st.precision)
        shape = llm_shape(st.model)
        kv = kv_cache_bytes(shape, cfg.decode_context, cfg.decode_batch)
        read = decode_read_bytes(st.model, st.precision)
        tpot = (read + kv) / (gpu.bandwidth_gbs * GB) * 1e3
        peak = weights + kv + forward_transient(st.model, infer)
        lines.append(f"{st.name:<26}{count_params(st.model):>15,}{weights / GB:>11.2f}{read / GB:>12.2f}"
                     f"{kv / 2**20:>8.0f}{tpot:>14.2f}{peak / GB:>9.2f}  {'yes' if peak <= usable else 'NO'}")
    work = Workload(cfg.audio_seconds, cfg.prompt_tokens, cfg.target_tokens, distill.loop.batch_size)
    teacher_online = distill.kd.teacher == "online" or distill.kd.hidden_weight > 0
    acts = stack_activations(student, work, distill.student.token_pruning)
    s = distill.student
    lines += ["", f"Teacher forward (teacher cache job, or online KD), batch {work.batch}, fp16: "
              f"{(fp16_bytes(teacher) + forward_transient(teacher, work)) / GB:.2f} GB "
              f"({'fits' if fp16_bytes(teacher) + forward_transient(teacher, work) <= usable else 'does NOT fit'} "
              "on one GPU; ZeRO-3 shards it over the GPUs of an online-KD run)",
              "",
              f"Distillation training per GPU ({cfg.distill_config}: micro-batch {work.batch}, "
              f"{work.llm_tokens(student)} LLM tokens, teacher {'online' if teacher_online else 'from the cache'}; "
              "activations " + ", ".join(f"{k} {v / GB:.2f}" for k, v in acts.items()) + " GB):",
              f"{'trainable':<24}{'ZeRO':>5}{'GPUs':>5}{'trainable params':>18}{'states GB':>10}{'activ. GB':>10}"
              f"{'teacher GB':>11}{'total GB':>9}  fits"]
    buckets = _buckets(cfg)
    for mode in ("configured", "full"):
        if mode == "configured":
            split = trainable_split(student, not s.freeze_whisper, not s.freeze_beats,
                                    not s.llm.freeze and not s.lora.enabled)
            label = "as configured" + (" (LoRA)" if s.lora.enabled else "")
        else:
            split = trainable_split(student, True, True, True)
            label = "full fine-tuning"
        trainable = sum(v["trainable"] for v in split.values())
        for zero in cfg.zero_stages:
            for world in cfg.world_sizes:
                mem = training_memory(student, split, TrainingSetup(zero, world, mode), work, acts,
                                      teacher if teacher_online else None, work, buckets)
                lines.append(f"{label:<24}{zero:>5}{world:>5}{trainable:>18,}{mem['states'] / GB:>10.2f}"
                             f"{mem['activations'] / GB:>10.2f}{mem['teacher'] / GB:>11.2f}{mem['total'] / GB:>9.2f}"
                             f"  {'yes' if mem['total'] <= usable else 'NO'}")
    lines += int8_frozen_lines(cfg, teacher, distill, student, acts, work, usable, buckets, teacher_online)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale estimate", description=JobConfig.__doc__)
    parser.add_argument("--config", required=True, help="a scale.estimate YAML (configs/<preset>/estimate.yaml)")
    parser.add_argument("--gpu", help=f"one of {', '.join(GPUS)} (default: the config's gpu)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (world_sizes=[1,4], decode_context=512)")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.overrides) + ([f"gpu={args.gpu}"] if args.gpu else [])
        cfg = load_config(JobConfig, args.config, overrides)
        print(report(cfg))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run(main)
