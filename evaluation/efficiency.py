"""Efficiency of an `AudioLanguageModel`: parameters, weight bytes, peak memory, TTFT, TPOT, throughput.

Every stage is measured by this code, and stages are compared in one process run (`compare`), with
models interleaved so that drift (thermal, other processes on a shared CPU) falls on all of them alike;
besides the ratio of the headline statistics, `compare` gives paired ratios (the median over repetitions
of model / reference within the same repetition). `python -m evaluation.repeatability` checks that two
evaluations back to back agree.

What each number counts (batch 1, the batch already on the model's device, `torch.inference_mode`,
the device synchronized before and after every timed region):
  - TTFT: `encode_audio` + `prefill` (prompt wrapping, tokenization, LLM prefill) + argmax of the
    first token. One sample per timed run.
  - TPOT: one `decode_step` + argmax. Each timed run continues from its own fresh prefill cache for a
    fixed `decode_steps` steps and times every step, so the cache lengths seen are the same in every
    run and for every model; the statistics pool all steps of all runs. Decoding never stops early at
    an end symbol here (timing only).
  - Peak memory: the model's weight bytes plus the largest growth of memory in use during one latency
    run above what was in use when it began (see `PeakMemoryMeter`), in MiB (2^20 bytes), metered in
    `memory_runs` runs after the timed ones (their times discarded). Adding the
    weights, rather than reading the device's absolute peak, keeps the number to this model when several
    share a process. On CUDA the raw `max_memory_allocated` is reported beside it.
  - Throughput: full `generate` on batches of `throughput_batch_size` clips, clips per second.
  - Speed-ups (`cfg.speedups`, none by default): the attention code, a static KV cache and `torch.compile` of the
    decode step and the encoders (`evaluation.inference_options`) apply to the timed runs and throughput; the
    analytic costs stay the model's own. `python -m evaluation.speedups` measures which help.
  - Analytic costs (`evaluation.analytic`): FLOPs and bytes moved per decode step (at the timed steps' mean context)
    and per prefill, from the model's shapes; with the machine's memory bandwidth (a large copy, ~1 s) they give
    the TPOT floor, bytes per step / bandwidth, beside the measured TPOT.

Three rooms: `evaluation.timing` holds the protocol (`EfficiencyConfig`, the interleaved timed runs, raw samples),
`evaluation.memory` the peak-memory meter, and this module measures models with them and reports (`compare`,
`measure`, `ratios`, the analytic columns, the attention setting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from common.model import AudioLanguageModel, Batch, move_batch
from common.sizes import count_parameters, weight_bytes
from evaluation.inference_options import attention_applied, with_option
from evaluation.memory import MIB, PeakMemoryMeter
from evaluation.timing import (
    EfficiencyConfig,
    Samples,
    check_clips,
    evaluating,
    run_latency,
    run_throughput,
    summarize,
    threads,
    timed,
)

RATIO_KEYS = ("params", "weight_bytes", "peak_memory_mb", "ttft_ms", "tpot_ms", "throughput_clips_per_s",
              "decode_flops", "decode_bytes", "prefill_flops", "prefill_bytes")
"""Per-model numbers that `compare` divides by the reference model's."""

ATTENTION_CHOICES = ("sdpa_math", "sdpa", "eager")
"""Attention of the Hugging Face parts: SDPA limited to its math kernel (what a V100 without FlashAttention runs
everywhere; the limit itself is set around the timed region by the caller), SDPA as it picks, or HF's eager code."""


def compare(models: Mapping[str, AudioLanguageModel], clips: Sequence[Batch], cfg: EfficiencyConfig,
            reference: str | None = None) -> dict[str, Any]:
    """Measure several models in one process run, interleaved, and their ratios to `reference`.

    Args:
        models: name → model, each already on its device and in its dtype.
        clips: fixed collated clips of batch size 1 (whatever each model's collator produced; all
            models must accept the same batches). Run i uses `clips[i % len(clips)]`.
        cfg: what to measure and how often.
        reference: the model the ratios divide by (the teacher); default the first.

    Returns `{"settings": {...}, "reference": str, "models": {name: report}, "ratios": {name: {key: float |
    None}}}`: each report as described in `_report`; ratios over `RATIO_KEYS`, model / reference (None
    where either is unavailable or the reference is 0).
    """
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference '{reference}' is not among the models {names}")
    check_clips(clips)
    inputs = {name: [move_batch(clip, model.device) for clip in clips] for name, model in models.items()}
    samples = {name: Samples() for name in names}
    gc.collect()
    with evaluating(list(models.values())), threads(cfg.threads), contextlib.ExitStack() as stack:
        attention = {name: stack.enter_context(attention_applied(model, cfg.speedups.attention))
                     for name, model in models.items()}
        timed_models = {name: with_option(model, cfg.speedups, inputs[name], cfg.prompt, cfg.decode_steps)
                        for name, model in models.items()}
        run_latency(timed_models, inputs, cfg, samples)
        if cfg.throughput_runs:
            run_throughput(timed_models, inputs, cfg, samples)
        costs = {name: _analytic(model, inputs[name][0], cfg) for name, model in models.items()}
    bandwidth = _bandwidths(models, cfg)
    reports = {name: _report(model, samples[name], cfg, costs[name], bandwidth.get(str(model.device)))
               for name, model in models.items()}
    return {
        "settings": {**_settings(models, clips, cfg), "attention": attention, "memory_bandwidth": bandwidth},
        "reference": reference,
        "models": reports,
        "ratios": {name: {**ratios(reports[name], reports[reference]),
                          **paired_ratios(samples[name], samples[reference])} for name in names},
    }


def paired_ratios(samples: Samples, reference: Samples) -> dict[str, float]:
    """Medians over repetitions of (this model's time / the reference's time in the same repetition): TTFT, and
    TPOT as each run's median step. Runs of one repetition sit next to each other in time, so drift slower than a
    repetition cancels in each quotient."""
    ttft = np.asarray(samples.ttft_ms) / np.asarray(reference.ttft_ms)
    def run_medians(runs: Samples) -> np.ndarray:
        return np.median(np.asarray(runs.tpot_ms_by_run), axis=1)

    tpot = run_medians(samples) / run_medians(reference)
    return {"ttft_ms_paired": float(np.median(ttft)), "tpot_ms_paired": float(np.median(tpot))}


def measure(model: AudioLanguageModel, clips: Sequence[Batch], cfg: EfficiencyConfig) -> dict[str, Any]:
    """One model's report (see `_report`) with a `settings` block: `compare` with a single model."""
    result = compare({"model": model}, clips, cfg)
    return {"settings": result["settings"], **result["models"]["model"]}


def _analytic(model: AudioLanguageModel, clip: Batch, cfg: EfficiencyConfig) -> dict[str, Any] | None:
    if not cfg.analytic:
        return None
    from evaluation.analytic import model_costs  # imported on use: FLOP counting is needed only here

    return model_costs(model, clip, cfg.prompt, cfg.decode_steps)


def _bandwidths(models: Mapping[str, AudioLanguageModel], cfg: EfficiencyConfig) -> dict[str, dict[str, Any]]:
    if cfg.bandwidth_seconds <= 0:
        return {}
    return {device: measure_bandwidth(torch.device(device), cfg.bandwidth_seconds) for device in sorted({str(m.device)
                                                                                  for m in models.values()})}


def _report(model: AudioLanguageModel, samples: Samples, cfg: EfficiencyConfig,
            costs: dict[str, Any] | None = None, bandwidth: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's numbers.

    Keys: `device`; `params`, `trainable_params` (elements), `params_per_part`; `weight_bytes`,
    `weight_bytes_per_part`; `peak_memory_mb` (MiB; weights + largest run-time growth; None if
    unmeasurable) and `peak_memory` (its parts, `device_peak_mb` on CUDA, `method`); `ttft_ms`,
    `tpot_ms` (the protocol's headline statistic) and `ttft`, `tpot` (`summarize` of all samples, plus
    `samples_ms`; `tpot` also `runs`, `steps_per_run`, `median_ms_by_step`); `throughput_clips_per_s`
    and `throughput` (None when skipped); `decode_flops`, `decode_bytes` (per output token), `prefill_flops`,
    `prefill_bytes` (encoders + LLM prefill of one clip) and `analytic` (their parts; see `evaluation.analytic`),
    None where not computed; `tpot_floor_ms` (decode bytes / measured bandwidth, ms) and `tpot_over_floor`.
    """
    parts = model.parts()
    params = count_parameters(model, parts)
    weights = weight_bytes(model, parts)
    ttft = {**summarize(samples.ttft_ms), "samples_ms": samples.ttft_ms}
    tpot = _tpot_summary(samples.tpot_ms_by_run)
    headline = f"{cfg.statistic}_ms"
    memory = _memory_summary(model, weights["total"], samples)
    throughput = _throughput_summary(samples.generate_seconds, cfg)
    return {
        "device": str(model.device),
        "params": params["total"],
        "trainable_params": params["trainable"],
        "params_per_part": params["per_part"],
        "weight_bytes": weights["total"],
        "weight_bytes_per_part": weights["per_part"],
        "peak_memory_mb": memory["peak_mb"],
        "peak_memory": memory,
        "ttft_ms": ttft[headline],
        "ttft": ttft,
        "tpot_ms": tpot[headline],
        "tpot": tpot,
        "throughput_clips_per_s": throughput and throughput["clips_per_s"],
        "throughput": throughput,
        **_analytic_columns(costs, bandwidth, tpot[headline]),
    }


def _analytic_columns(costs: dict[str, Any] | None, bandwidth: dict[str, Any] | None,
                      tpot_ms: float) -> dict[str, Any]:
    if costs is None:
        return {"decode_flops": None, "decode_bytes": None, "prefill_flops": None, "prefill_bytes": None,
                "analytic": None, "tpot_floor_ms": None, "tpot_over_floor": None}
    floor = None if bandwidth is None else costs["decode"]["bytes"] / (bandwidth["gb_per_s"] * 1e9) * 1e3
    return {
        "decode_flops": costs["decode"]["flops"], "decode_bytes": costs["decode"]["bytes"],
        "prefill_flops": costs["prefill"]["flops"], "prefill_bytes": costs["prefill"]["bytes"],
        "analytic": costs, "tpot_floor_ms": floor, "tpot_over_floor": None if floor is None else tpot_ms / floor,
    }


def _tpot_summary(tpot_ms_by_run: list[list[float]]) -> dict[str, Any]:
    flat = [ms for run in tpot_ms_by_run for ms in run]
    by_step = np.median(np.asarray(tpot_ms_by_run), axis=0)  # shows how steps slow as the cache grows
    return {
        **summarize(flat),
        "runs": len(tpot_ms_by_run),
        "steps_per_run": len(tpot_ms_by_run[0]),
        "median_ms_by_step": [float(ms) for ms in by_step],
        "samples_ms": flat,
    }


def _memory_summary(model: AudioLanguageModel, weights: int, samples: Samples) -> dict[str, Any]:
    method = PeakMemoryMeter(model.device).description
    if not samples.memory_growth_bytes:
        return {"peak_mb": None, "weights_mb": weights / MIB, "runtime_growth_mb": None,
                "device_peak_mb": None, "method": method}
    growth = max(samples.memory_growth_bytes)
    device_peak = max(samples.device_peak_bytes) / MIB if samples.device_peak_bytes else None
    return {
        "peak_mb": (weights + growth) / MIB,
        "weights_mb": weights / MIB,
        "runtime_growth_mb": growth / MIB,
        "device_peak_mb": device_peak,
        "method": f"weight bytes + max over timed runs of ({method})",
    }


def _throughput_summary(seconds: list[float], cfg: EfficiencyConfig) -> dict[str, Any] | None:
    if not seconds:
        return None
    clips = cfg.throughput_batch_size * len(seconds)
    return {
        "clips_per_s": clips / sum(seconds),
        "batch_size": cfg.throughput_batch_size,
        "runs": len(seconds),
        "clips": clips,
        "seconds": sum(seconds),
        "seconds_per_batch": summarize([s * 1e3 for s in seconds]),
    }


def ratios(report: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float | None]:
    """`report / reference` over `RATIO_KEYS` (None where either is unavailable or the reference is 0)."""
    out = {}
    for key in RATIO_KEYS:
        value, base = report.get(key), reference.get(key)
        out[key] = None if value is None or base is None or base == 0 else value / base
    return out


def measure_bandwidth(device: torch.device, seconds: float = 1.0, megabytes: int = 128) -> dict[str, Any]:
    """Memory bandwidth of `device`: the best of repeated `dst.copy_(src)` of `megabytes` MB (each copy reads and
    writes it: 2 × bytes moved), repeated for about `seconds`. The best, not the median: the floor is what the
    machine can do, and other processes only slow a copy down. Returns `{"gb_per_s", "copies", "bytes", "method"}`
    (GB = 1e9 bytes)."""
    device = torch.device(device)
    elements = megabytes * 10**6 // 4
    src = torch.ones(elements, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are no bandwidth
    best, copies, deadline = float("inf"), 0, time.perf_counter() + seconds
    while copies < 3 or time.perf_counter() < deadline:
        _, ms = timed(device, dst.copy_, src)
        best, copies = min(best, ms), copies + 1
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return {"gb_per_s": moved / (best / 1e3) / 1e9, "copies": copies, "bytes": moved,
            "method": f"best of {copies} copies of {megabytes} MB (read + write) on {device}"}


def set_attention(model: nn.Module, attention: str) -> nn.Module:
    """Set the attention code of every Hugging Face model inside `model`: "eager" for HF's eager attention, "sdpa"
    or "sdpa_math" for torch's `scaled_dot_product_attention` (the math-only limit is `sdpa_kernel` around the
    timed region). Parts that are not HF models (BEATs, the Q-Former glue) keep theirs. Returns `model`."""
    from transformers import PreTrainedModel

    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {list(ATTENTION_CHOICES)}, got {attention!r}")
    implementation = "eager" if attention == "eager" else "sdpa"
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation != implementation:
            try:
                module.set_attn_implementation(implementation)
            except ValueError:  # no SDPA for this architecture in transformers (Gemma-2: logit soft-capping)
                pass
    return model


def _settings(models: Mapping[str, AudioLanguageModel], clips: Sequence[Batch],
              cfg: EfficiencyConfig) -> dict[str, Any]:
    devices = {str(model.device) for model in models.values()}
    cuda_names = sorted({torch.cuda.get_device_name(d) for d in devices if d.startswith("cuda")})
    return {
        **dataclasses.asdict(cfg),
        "clips": len(clips),
        "order": "interleaved, reversed every other repetition",
        "ttft": "encode_audio + prefill + first-token argmax, batch 1, batch on device beforehand",
        "tpot": f"one decode_step + argmax, steps 1..{cfg.decode_steps} after each run's own prefill",
        "devices": sorted(devices),
        "cuda_devices": cuda_names,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
