"""Gemma-2 in fp16: activation ranges, overflow detection, and an exact guard.

    python -m prune.fp16_check --config configs/toy/fp16_check.yaml [key=value ...]

A V100 runs fp16 (no bf16), whose largest finite value is 65504. This job runs the same inputs through a model in
fp32 and in fp16 and records, per decoder layer, the largest |x| at the sites where Gemma-2 is known to get large:

    layer{i}.attn_logits       q·kᵀ, the logits before the 1/√d scale and soft-capping: eager attention
                               computes this product first, in the activations' dtype
    layer{i}.attn_v            v_proj output
    layer{i}.attn_out          o_proj output, before post_attention_layernorm
    layer{i}.mlp_gate          gate_proj output (before the activation)
    layer{i}.mlp_up            up_proj output
    layer{i}.mlp_intermediate  act(gate) · up, the input of down_proj
    layer{i}.mlp_out           down_proj output, before post_feedforward_layernorm
    layer{i}.output            the residual stream after the layer

(and every Whisper / BEATs layer's output for a student). A site overflows when its fp16 values are not finite or
its fp32 maximum exceeds 65504. It runs on the student (its whole forward on test clips, teacher-forced on the
references) and on one full-width Gemma-2-2B decoder layer with random weights (hidden 2304, MLP 9216, 8 heads,
4 KV heads, head_dim 256), built on the meta device and materialised alone, without the 256k-token embeddings.

An overflow of q·kᵀ is reported apart, as harmless in Gemma-2: its eager attention soft-caps the scaled logits
(50 · tanh(x / 50)), so an fp16 inf becomes 50, the value the fp32 logit saturates to anyway once q·kᵀ · scaling
≫ 50, which holds above 65504 · scaling (4094 at query_pre_attn_scalar 256). A model without soft-capping (LLaMA)
would get NaN from it.

The guard (`guard_gemma2`) uses Gemma-2's sandwich norms: an RMSNorm follows the attention and the MLP, and
RMSNorm(x / s) = RMSNorm(x) (up to its eps), so dividing weights by a power of two s is exact in fp32 and
shrinks the fp16 activations before that norm by s:

- MLP: up_proj / s → up_proj's output, act(gate) · up and down_proj's output shrink by s;
- attention output: v_proj / s → the values, the attention output and o_proj's output shrink by s;

Each site gets the smallest s that brings its fp32 maximum under 65504 / headroom. gate_proj's output feeds a
non-linear activation and cannot be rescaled: it is measured and reported only. The weights are changed, so a
guarded student folder (`guarded_output`) is an ordinary folder that behaves identically in fp32.
`install_residual_clamp` adds T5's fp16 practice as a run-time fallback for the residual stream itself (clamp to
±(65504 − 1000) after each layer), which no rescaling can shrink.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: answer --help from the source, quiet known noise
    from common.cli import before_imports

    before_imports()

import copy
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.cli import run
from common.config import parse_cli, save_resolved
from common.dataset import AudioTextCollator, DataConfig, scan_split
from common.features import FeatureConfig

FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class Gemma2LayerProbe:
    """One Gemma-2 decoder layer with random weights (defaults: Gemma-2-2B's widths)."""

    enabled: bool = True
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    tokens: int = 32
    weight_std: float = 0.02
    """Std of the normal init of every linear weight (Gemma-2's initializer_range)."""
    input_std: float = 1.0
    """Std of the random input hidden states."""
    seed: int = 0


@dataclass
class JobConfig:
    """Measure fp16 activation ranges of a student's LLM and of one Gemma-2-2B layer; optionally guard the student."""

    model: str = "outputs/toy/student/model"
    """A student folder ("" skips the student)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Its `test` split supplies the clips (teacher-forced on their references)."""
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_store: str = ""
    clips: int = 8
    batch_size: int = 4
    gemma2_layer: Gemma2LayerProbe = field(default_factory=Gemma2LayerProbe)
    headroom: float = 4.0
    """The guard keeps every guarded site below 65504 / headroom (measured in fp32)."""
    guarded_output: str = ""
    """Write the guarded student folder here (empty: measure only)."""
    output_dir: str = "outputs/toy/fp16"


# ----- measuring --------------------------------------------------------------------------------------------------


class RangeProbe:
    """Forward hooks that record, per site, the largest |x| and the count of non-finite values over all runs."""

    def __init__(self) -> None:
        self.max_abs: dict[str, float] = defaultdict(float)
        self.nonfinite: dict[str, int] = defaultdict(int)
        self.handles: list = []

    def record(self, site: str, x: torch.Tensor) -> None:
        x = x.detach()
        finite = torch.isfinite(x)
        self.nonfinite[site] += int((~finite).sum())
        if finite.any():
            self.max_abs[site] = max(self.max_abs[site], float(x[finite].abs().max()))

    def output_hook(self, site: str):
        def hook(module, args, output):
            self.record(site, output[0] if isinstance(output, tuple) else output)
        return hook

    def input_hook(self, site: str):
        def hook(module, args):
            self.record(site, args[0])
        return hook

    def attach_decoder(self, llm: nn.Module, prefix: str = "") -> None:
        """Hooks on every decoder layer of a Gemma-2 / LLaMA causal LM (or a list of decoder layers)."""
        layers = llm if isinstance(llm, (list, nn.ModuleList)) else llm.model.layers
        for i, layer in enumerate(layers):
            name = f"{prefix}layer{i}"
            attn = layer.self_attn
            self.handles += [
                attn.register_forward_pre_hook(self.logits_hook(f"{name}.attn_logits"), with_kwargs=True),
                attn.v_proj.register_forward_hook(self.output_hook(f"{name}.attn_v")),
                attn.o_proj.register_forward_hook(self.output_hook(f"{name}.attn_out")),
                layer.mlp.gate_proj.register_forward_hook(self.output_hook(f"{name}.mlp_gate")),
                layer.mlp.up_proj.register_forward_hook(self.output_hook(f"{name}.mlp_up")),
                layer.mlp.down_proj.register_forward_pre_hook(self.input_hook(f"{name}.mlp_intermediate")),
                layer.mlp.register_forward_hook(self.output_hook(f"{name}.mlp_out")),
                layer.register_forward_hook(self.output_hook(f"{name}.output")),
            ]

    def logits_hook(self, site: str):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.record(site, attention_logits(module, hidden, kwargs["position_embeddings"]))
        return hook

    def attach_layers(self, layers, prefix: str) -> None:
        """Output hooks on encoder layers (`{prefix}{i}.output`)."""
        self.handles += [layer.register_forward_hook(self.output_hook(f"{prefix}{i}.output"))
                         for i, layer in enumerate(layers)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@torch.no_grad()
def attention_logits(attn: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """q·kᵀ `[batch, heads, q, k]` with rotary embeddings, in the activations' dtype: the product eager attention
    computes before multiplying by its scale (so an fp16 overflow shows here first), soft-capping and masking."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return torch.matmul(q, repeat_kv(k, attn.num_key_value_groups).transpose(2, 3))


def compare(fp32: RangeProbe, fp16: RangeProbe) -> dict[str, dict]:
    """Per site: fp32 and fp16 maxima, fp16 non-finite count, whether it overflows, headroom (65504 / fp32 max)."""
    sites = {}
    for site in fp32.max_abs.keys() | fp16.max_abs.keys() | fp16.nonfinite.keys():
        high = fp32.max_abs.get(site, 0.0)
        bad = fp16.nonfinite.get(site, 0)
        sites[site] = {"fp32_max_abs": high, "fp16_max_abs": fp16.max_abs.get(site, 0.0), "fp16_nonfinite": bad,
                       "overflow": bad > 0 or high > FP16_MAX, "headroom": FP16_MAX / high if high else None}
    return dict(sorted(sites.items(), key=_site_order))


def _site_order(item) -> tuple:
    site = item[0]
    head, _, rest = site.partition(".")
    digits = "".join(c for c in head if c.isdigit())
    return (head.rstrip("0123456789"), int(digits) if digits else -1, rest)


def summary(sites: dict[str, dict], soft_capped_logits: bool = False) -> dict:
    """Worst site and the overflowing sites of a `compare` result; with `soft_capped_logits` (Gemma-2), q·kᵀ
    overflows are listed apart as harmless (see the module docstring)."""
    worst = max(sites.items(), key=lambda kv: kv[1]["fp32_max_abs"]) if sites else (None, {})
    overflowing = [s for s, v in sites.items() if v["overflow"]]
    capped = [s for s in overflowing if soft_capped_logits and s.endswith(".attn_logits")]
    return {"sites": len(sites), "overflowing": [s for s in overflowing if s not in capped],
            "soft_capped_logit_overflows": capped, "largest_site": worst[0],
            "largest_fp32_max_abs": worst[1].get("fp32_max_abs")}


def soft_capped(llm: nn.Module) -> bool:
    return bool(getattr(llm.config, "attn_logit_softcapping", None))


def run_twice(model: nn.Module, attach, run) -> tuple[RangeProbe, RangeProbe]:
    """`run(model)` in fp32 and on an fp16 copy, with `attach(probe, model)` hooks; returns both probes."""
    probes = []
    for dtype in (torch.float32, torch.float16):
        copy_ = copy.deepcopy(model).to(dtype).eval()
        probe = RangeProbe()
        attach(probe, copy_)
        with torch.no_grad():
            run(copy_, dtype)
        probe.remove()
        probes.append(probe)
        del copy_
    return probes[0], probes[1]


# ----- the Gemma-2-2B layer -----------------------------------------------------------------------------------------


def gemma2_layer(cfg: Gemma2LayerProbe):
    """(decoder layer, its rotary embedding, config): built on the meta device, then materialised on the CPU with
    normal(0, weight_std) linear weights and zero RMSNorm weights (Gemma's norms scale by 1 + w)."""
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RotaryEmbedding

    config = Gemma2Config(vocab_size=256, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                          num_hidden_layers=1, num_attention_heads=cfg.num_attention_heads,
                          num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                          query_pre_attn_scalar=cfg.head_dim, layer_types=["full_attention"],
                          attn_implementation="eager")
    with torch.device("meta"):
        layer = Gemma2DecoderLayer(config, layer_idx=0)
    layer = layer.to_empty(device="cpu")
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * cfg.weight_std)
            elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
                module.weight.zero_()
    return layer.eval(), Gemma2RotaryEmbedding(config), config


def probe_gemma2_layer(cfg: Gemma2LayerProbe) -> dict:
    """fp32 vs fp16 ranges of one random Gemma-2 layer on random hidden states `[1, tokens, hidden]`, causal."""
    layer, rotary, config = gemma2_layer(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    hidden = torch.randn(1, cfg.tokens, cfg.hidden_size, generator=g) * cfg.input_std
    positions = torch.arange(cfg.tokens)[None]

    def run(model, dtype):
        x = hidden.to(dtype)
        mask = torch.full((cfg.tokens, cfg.tokens), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]
        model[0](x, attention_mask=mask, position_embeddings=rotary(x, positions), position_ids=positions)

    fp32, fp16 = run_twice(nn.ModuleList([layer]), lambda probe, model: probe.attach_decoder(model), run)
    sites = compare(fp32, fp16)
    widths = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads", "head_dim")}
    return {"config": widths, "tokens": cfg.tokens, "weight_std": cfg.weight_std, "input_std": cfg.input_std,
            "summary": summary(sites, soft_capped_logits=True), "sites": sites}


# ----- the student --------------------------------------------------------------------------------------------------


def student_batches(cfg: JobConfig, tokenizer) -> list[dict]:
    """Up to `clips` test clips, collated with references (teacher forcing), shortest first."""
    from common.feature_store import with_feature_store

    if not cfg.data.test:
        raise SystemExit("config error: data.test is empty; the student is measured on test clips")
    dataset = scan_split(cfg.data, cfg.features, "test", cfg.output_dir)
    if cfg.feature_store:
        dataset = with_feature_store(dataset, cfg.features, cfg.feature_store, "test")
    step = max(1, len(dataset) // max(1, cfg.clips))
    chosen = sorted(range(0, len(dataset), step)[: cfg.clips], key=lambda i: dataset.durations[i])
    collate = AudioTextCollator(tokenizer)
    return [collate([dataset[i] for i in chosen[k:k + cfg.batch_size]]) for k in range(0, len(chosen), cfg.batch_size)]


def probe_student(model, batches: list[dict]) -> dict[str, dict]:
    """fp32 vs fp16 ranges of a Salmonn student's whole teacher-forced forward on `batches`."""

    def attach(probe: RangeProbe, m) -> None:
        probe.attach_decoder(m.llm, "llm.")
        probe.attach_layers(m.speech_encoder.layers, "whisper.layer")
        if m.audio_encoder is not None:
            probe.attach_layers(m.audio_encoder.encoder.layers, "beats.layer")

    def run(m, dtype):
        for batch in batches:
            m({k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()})

    fp32, fp16 = run_twice(model, attach, run)
    return compare(fp32, fp16)


# ----- the guard ------------------------------------------------------------------------------------------------------


def power_of_two_above(ratio: float) -> int:
    """Smallest power of two ≥ ratio (1 when ratio ≤ 1)."""
    return 1 if ratio <= 1 else 2 ** math.ceil(math.log2(ratio))


@torch.no_grad()
def guard_gemma2(llm: nn.Module, sites: dict[str, dict], headroom: float = 4.0, prefix: str = "") -> dict:
    """Fold power-of-two scales into a Gemma-2's weights so that every guarded site stays below 65504 / headroom.

    `sites` are fp32 maxima from `compare` (keys `{prefix}layer{i}.<site>`). Returns the scales applied per layer:
    `{"mlp": {layer: s}, "attention": {layer: s}}` (up_proj / s, v_proj / s).
    """
    if llm.config.model_type != "gemma2":
        raise ValueError(f"the fp16 guard relies on Gemma-2's post-norms; got a {llm.config.model_type} LLM")
    limit = FP16_MAX / headroom
    applied = {"mlp": {}, "attention": {}}
    peak = lambda i, *names: max(sites.get(f"{prefix}layer{i}.{n}", {}).get("fp32_max_abs", 0.0) for n in names)
    for i, layer in enumerate(llm.model.layers):
        s = power_of_two_above(peak(i, "mlp_up", "mlp_intermediate", "mlp_out") / limit)
        if s > 1:
            layer.mlp.up_proj.weight.div_(s)
            applied["mlp"][i] = s
        s = power_of_two_above(peak(i, "attn_v", "attn_out") / limit)
        if s > 1:
            layer.self_attn.v_proj.weight.div_(s)
            if layer.self_attn.v_proj.bias is not None:
                layer.self_attn.v_proj.bias.div_(s)
            applied["attention"][i] = s
    return applied


def install_residual_clamp(llm: nn.Module) -> list:
    """T5's fp16 practice on the residual stream: in fp16, clamp every decoder layer's output to ±(65504 − 1000)
    (an inf becomes the largest safe value; the next layer's RMSNorm works in fp32). Returns the hook handles."""
    bound = FP16_MAX - 1000.0

    def clamp(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.dtype != torch.float16:
            return output
        hidden = hidden.clamp(-bound, bound)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [layer.register_forward_hook(clamp) for layer in llm.model.layers]


# ----- the job --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_cli(JobConfig, argv)
    out = Path(cfg.output_dir)
    save_resolved(cfg, out)
    report: dict = {"fp16_max": FP16_MAX, "headroom": cfg.headroom}
    if cfg.model:
        from prune.skeleton import read_salmonn_config
        from student.build import load_student_folder, save_student_folder

        model = load_student_folder(cfg.model)
        batches = student_batches(cfg, model.tokenizer)
        sites = probe_student(model, batches)
        report["student"] = {"model": cfg.model, "clips": sum(len(b["texts"]) for b in batches),
                             "summary": summary(sites, soft_capped(model.llm)), "sites": sites}
        print(f"student {cfg.model}: {json.dumps(report['student']['summary'])}")
        if cfg.guarded_output:
            applied = guard_gemma2(model.llm, sites, cfg.headroom, prefix="llm.")
            guarded = probe_student(model, batches)
            save_student_folder(model, read_salmonn_config(Path(cfg.model)), cfg.guarded_output)
            report["student"]["guard"] = {"applied": applied, "output": cfg.guarded_output,
                                          "summary": summary(guarded, soft_capped(model.llm)), "sites": guarded}
            print(f"guarded student → {cfg.guarded_output}: {applied}; after: "
                  f"{json.dumps(report['student']['guard']['summary'])}")
    if cfg.gemma2_layer.enabled:
        report["gemma2_layer"] = probe_gemma2_layer(cfg.gemma2_layer)
        print(f"Gemma-2 layer {report['gemma2_layer']['config']}: {json.dumps(report['gemma2_layer']['summary'])}")
    (out / "fp16_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out / 'fp16_report.json'}")
    return report


if __name__ == "__main__":
    run(main)
