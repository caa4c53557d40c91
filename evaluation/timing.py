"""The timing protocol: how TTFT, TPOT and throughput are timed (`EfficiencyConfig`), run by run, with models
interleaved in every repetition so that drift falls on all of them alike (`run_latency`, `run_throughput`), into
raw `Samples`; `summarize` gives a series' statistics. `evaluation.efficiency` turns the samples into reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from common.model import AudioLanguageModel, Batch, batch_size_of, concat_batches
from evaluation.inference_options import InferenceOption
from evaluation.memory import PeakMemoryMeter

PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "careful": {"warmup_runs": 3, "timed_runs": 20, "input_seconds": None, "statistic": "median"},
    # The hackathon's evaluator: 10 s inputs, 10 warm-ups, 100 timed runs, means.
    "hackathon": {"warmup_runs": 10, "timed_runs": 100, "input_seconds": 10.0, "statistic": "mean"},
}


@dataclass
class EfficiencyConfig:
    """How to measure. Fields left as None take the protocol's default (`PROTOCOL_DEFAULTS`)."""

    protocol: Literal["careful", "hackathon"] = "careful"
    """"careful": few warm-ups, medians and p90 as headline numbers. "hackathon": the hackathon
    evaluator's settings (10 warm-ups, 100 runs, means), to set our numbers beside its table."""
    warmup_runs: int | None = None
    """Untimed runs (TTFT + decode steps) per model before timing: 3 careful, 10 hackathon."""
    timed_runs: int | None = None
    """Timed runs per model; each gives one TTFT and `decode_steps` TPOT samples: 20 careful, 100
    hackathon."""
    decode_steps: int = 8
    """Cached decode steps timed after each prefill (fixed, so the KV cache grows alike everywhere)."""
    input_seconds: float | None = None
    """Length of the clips the caller passes, seconds. The harness never looks inside a batch, so it
    records this rather than checks it: None (careful) = whatever the caller passes; 10.0 (hackathon)."""
    prompt: str = "Describe the audio."
    """Instruction given with every clip (the model wraps it in its template)."""
    throughput_batch_size: int = 8
    """Clips per `generate` call for throughput; batches are built by cycling through the clips."""
    throughput_runs: int = 3
    """Timed `generate` calls per model for throughput (after one untimed); 0 skips throughput."""
    max_new_tokens: int = 32
    """Generation length limit for throughput."""
    num_beams: int = 1
    """Beam width for throughput."""
    statistic: Literal["median", "mean", "min"] | None = None
    """Which statistic is the headline `ttft_ms` / `tpot_ms`: median careful, mean hackathon. Mean,
    median, min and p90 are always reported."""
    threads: int = 0
    """torch CPU threads while measuring (restored after); 0 leaves the current setting. Times are comparable only at
    equal threads, and a fixed count keeps another process' load from changing torch's choice."""
    memory_runs: int = 1
    """Runs per model, after the timed ones, that meter peak memory; their times are discarded. The meter hands freed
    heap pages back to the OS before a run (`malloc_trim`), which the run then faults in again: inside a timed run
    that costs time that depends on what ran before. 0 meters the timed runs themselves (the earlier protocol)."""
    analytic: bool = True
    """Add FLOPs and bytes per decode step and per prefill from the model's shapes (`evaluation.analytic`)."""
    bandwidth_seconds: float = 1.0
    """How long to measure the device's memory bandwidth (repeated large copies) for the TPOT floor; 0 skips it."""
    speedups: InferenceOption = dataclasses.field(default_factory=InferenceOption)
    """Inference speed-ups applied while timing (`evaluation.inference_options`): `attention` ("" as loaded, eager,
    sdpa), `static_cache`, `compile_decode` (needs static_cache), `compile_encoders`; the defaults change nothing.
    `python -m evaluation.speedups` measures which ones help."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_DEFAULTS:
            raise ValueError(f"protocol must be one of {list(PROTOCOL_DEFAULTS)}, got {self.protocol!r}")
        for name, default in PROTOCOL_DEFAULTS[self.protocol].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.statistic not in ("median", "mean", "min"):
            raise ValueError(f"statistic must be 'median', 'mean' or 'min', got {self.statistic!r}")
        minimums = {"warmup_runs": 0, "timed_runs": 1, "decode_steps": 1, "throughput_batch_size": 1,
                    "throughput_runs": 0, "max_new_tokens": 1, "num_beams": 1, "threads": 0, "memory_runs": 0}
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {getattr(self, name)}")


@dataclass
class Samples:
    """Raw measurements of one model, appended to run by run."""

    ttft_ms: list[float] = dataclasses.field(default_factory=list)
    tpot_ms_by_run: list[list[float]] = dataclasses.field(default_factory=list)
    memory_growth_bytes: list[int] = dataclasses.field(default_factory=list)
    device_peak_bytes: list[int] = dataclasses.field(default_factory=list)
    generate_seconds: list[float] = dataclasses.field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read after this includes them (CUDA launches are async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


def timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """`fn(*args, **kwargs)` and its wall time in ms, the device synchronized on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def _first_token(model: AudioLanguageModel, clip: Batch, prompt: str) -> tuple[Tensor, Any]:
    """What TTFT times: audio → first generated token `[1, 1]`, and the cache."""
    logits, cache = model.prefill(model.encode_audio(clip), [prompt])
    return logits.argmax(dim=-1, keepdim=True), cache


def _next_token(model: AudioLanguageModel, token: Tensor, cache: Any) -> tuple[Tensor, Any]:
    """What TPOT times: one cached step → next token `[1, 1]`, and the longer cache."""
    logits, cache = model.decode_step(token, cache)
    return logits.argmax(dim=-1, keepdim=True), cache


def latency_run(model: AudioLanguageModel, clip: Batch, cfg: EfficiencyConfig) -> tuple[float, list[float]]:
    """One run: (TTFT ms, [TPOT ms of each of `cfg.decode_steps` steps])."""
    device = model.device
    (token, cache), ttft = timed(device, _first_token, model, clip, cfg.prompt)
    tpot = []
    for _ in range(cfg.decode_steps):
        (token, cache), step_ms = timed(device, _next_token, model, token, cache)
        tpot.append(step_ms)
    return ttft, tpot


def measured_latency_run(model: AudioLanguageModel, clip: Batch, cfg: EfficiencyConfig,
                          samples: Samples, keep_times: bool = True) -> None:
    """A run with its peak memory metered (its times kept in `samples` when `keep_times`)."""
    meter = PeakMemoryMeter(model.device)
    meter.start()
    ttft, tpot = latency_run(model, clip, cfg)
    growth = meter.stop()
    if keep_times:
        samples.ttft_ms.append(ttft)
        samples.tpot_ms_by_run.append(tpot)
    if growth is not None:
        samples.memory_growth_bytes.append(growth)
    if meter.device_peak_bytes is not None:
        samples.device_peak_bytes.append(meter.device_peak_bytes)


def generate_seconds(model: AudioLanguageModel, batch: Batch, cfg: EfficiencyConfig) -> float:
    prompts = [cfg.prompt] * batch_size_of(batch)
    _, ms = timed(model.device, model.generate, batch, prompts,
                   max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    return ms / 1e3


def throughput_batches(clips: Sequence[Batch], cfg: EfficiencyConfig) -> list[Batch]:
    """`1 + throughput_runs` batches (the first for warm-up), cycling through the clips."""
    size = cfg.throughput_batch_size
    return [
        concat_batches([clips[(run * size + row) % len(clips)] for row in range(size)])
        for run in range(1 + cfg.throughput_runs)
    ]


def interleaved(names: Sequence[str], repetition: int) -> list[str]:
    """Forward order on even repetitions, reversed on odd: linear drift then hits every model alike."""
    return list(names) if repetition % 2 == 0 else list(reversed(names))


@contextlib.contextmanager
def evaluating(models: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode (no dropout) and inference mode for the measurement. Every submodule's training flag
    is restored after, since a model in training may hold frozen parts in eval mode."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def summarize(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """`{"mean_ms", "median_ms", "min_ms", "p90_ms", "n"}` of timing samples in ms (p90: linear interpolation)."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "mean_ms": float(values.mean()),
        "median_ms": float(np.median(values)),
        "min_ms": float(values.min()),
        "p90_ms": float(np.percentile(values, 90)),
        "n": int(values.size),
    }


def check_clips(clips: Sequence[Batch]) -> None:
    if not clips:
        raise ValueError("no clips to measure on")
    sizes = [batch_size_of(clip) for clip in clips]
    if any(size != 1 for size in sizes):
        raise ValueError(f"latency is measured at batch size 1; clips have batch sizes {sizes}")


def run_latency(models: Mapping[str, AudioLanguageModel], inputs: Mapping[str, list[Batch]],
                 cfg: EfficiencyConfig, samples: Mapping[str, Samples]) -> None:
    """Warm-ups (the same runs untimed: kernels chosen, caches and the allocator's pools at their working size), timed
    runs, then memory runs; models interleaved in each repetition. The garbage collector is kept out of the timed
    runs (collected between repetitions instead): a collection inside a decode step is noise, not the model."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for repetition in range(cfg.warmup_runs):
            for name in interleaved(list(models), repetition):
                clips = inputs[name]
                latency_run(models[name], clips[repetition % len(clips)], cfg)
        for repetition in range(cfg.timed_runs):
            gc.collect()
            for name in interleaved(list(models), repetition):
                clips = inputs[name]
                if cfg.memory_runs:
                    ttft, tpot = latency_run(models[name], clips[repetition % len(clips)], cfg)
                    samples[name].ttft_ms.append(ttft)
                    samples[name].tpot_ms_by_run.append(tpot)
                else:
                    measured_latency_run(models[name], clips[repetition % len(clips)], cfg, samples[name])
        for repetition in range(cfg.memory_runs):
            gc.collect()
            for name in interleaved(list(models), repetition):
                clips = inputs[name]
                measured_latency_run(models[name], clips[repetition % len(clips)], cfg, samples[name],
                                      keep_times=False)
    finally:
        if gc_was_enabled:
            gc.enable()


def run_throughput(models: Mapping[str, AudioLanguageModel], inputs: Mapping[str, list[Batch]],
                    cfg: EfficiencyConfig, samples: Mapping[str, Samples]) -> None:
    batches = {name: throughput_batches(inputs[name], cfg) for name in models}
    for name in models:  # warm-up at the throughput batch size (new shapes, new kernels)
        generate_seconds(models[name], batches[name][0], cfg)
    for repetition in range(cfg.throughput_runs):
        for name in interleaved(list(models), repetition):
            batch = batches[name][1 + repetition]
            samples[name].generate_seconds.append(generate_seconds(models[name], batch, cfg))
