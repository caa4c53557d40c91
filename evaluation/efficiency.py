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
  - Analytic costs (`evaluation.analytic`): FLOPs and bytes moved per decode step (at the timed steps' mean context)
    and per prefill, from the model's shapes; with the machine's memory bandwidth (a large copy, ~1 s) they give
    the TPOT floor, bytes per step / bandwidth, beside the measured TPOT.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from common.model import AudioLanguageModel, Batch, batch_size_of, concat_batches, move_batch
from common.sizes import count_parameters, weight_bytes

MIB = 2**20

PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "careful": {"warmup_runs": 3, "timed_runs": 20, "input_seconds": None, "statistic": "median"},
    # The hackathon's evaluator: 10 s inputs, 10 warm-ups, 100 timed runs, means.
    "hackathon": {"warmup_runs": 10, "timed_runs": 100, "input_seconds": 10.0, "statistic": "mean"},
}

RATIO_KEYS = ("params", "weight_bytes", "peak_memory_mb", "ttft_ms", "tpot_ms", "throughput_clips_per_s",
              "decode_flops", "decode_bytes", "prefill_flops", "prefill_bytes")
"""Per-model numbers that `compare` divides by the reference model's."""

ATTENTION_CHOICES = ("sdpa_math", "sdpa", "eager")
"""Attention of the Hugging Face parts: SDPA limited to its math kernel (what a V100 without FlashAttention runs
everywhere; the limit itself is set around the timed region by the caller), SDPA as it picks, or HF's eager code."""


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


# ---------------------------------------------------------------------------------------------------
# Parameters and weight bytes


# ---------------------------------------------------------------------------------------------------
# Peak memory


class PeakMemoryMeter:
    """Largest growth of memory in use between `start()` and `stop()`, bytes.

    CUDA: `torch.cuda.reset_peak_memory_stats` at start, then `max_memory_allocated` minus what was
    allocated at start (tensor memory from PyTorch's allocator; the allocator's cache and the CUDA
    context are not counted). The raw peak is kept in `device_peak_bytes`.

    CPU, method "clear_refs" (the default where Linux allows it; it does on the machine this was
    written on): writing "5" to /proc/self/clear_refs resets the process' VmHWM (peak resident set) to
    its current RSS; growth = VmHWM at stop − VmRSS at start. Before the reset, glibc's `malloc_trim`
    hands freed heap pages back to the OS: otherwise memory freed by earlier runs (or other models)
    stays resident, gets reused without raising RSS, and the growth reads too low.
    CPU, method "sampling" (fallback): a thread reads VmRSS every `interval_s` and keeps the maximum;
    it can miss peaks shorter than the interval.
    Without /proc (not Linux), and on accelerators other than CUDA, `stop()` returns None.
    """

    def __init__(self, device: torch.device, method: Literal["auto", "clear_refs", "sampling"] = "auto",
                 interval_s: float = 0.001) -> None:
        self.device = device
        self.interval_s = interval_s
        if device.type != "cpu":
            self.method = "cuda" if device.type == "cuda" else None
        elif method == "auto":
            self.method = _default_cpu_method()
        else:
            self.method = method
        self.device_peak_bytes: int | None = None
        self._start_bytes = 0
        self._sampled_peak = 0
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    @property
    def description(self) -> str:
        return {
            "cuda": "cuda max_memory_allocated − memory_allocated at run start (reset_peak_memory_stats)",
            "clear_refs": "cpu VmHWM − VmRSS at run start (VmHWM reset via /proc/self/clear_refs, "
                          "malloc_trim first)",
            "sampling": f"cpu max VmRSS sampled every {self.interval_s * 1e3:g} ms − VmRSS at run start "
                        "(malloc_trim first)",
            None: f"unavailable: no peak-memory counter for {self.device.type} here",
        }[self.method]

    def start(self) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
        elif self.method is not None:
            _malloc_trim()
            if self.method == "clear_refs":
                _reset_peak_rss()
            self._start_bytes = _read_proc_kb("VmRSS") * 1024
            if self.method == "sampling":
                self._start_sampling()

    def stop(self) -> int | None:
        """Growth since `start()`, bytes (None where unmeasurable)."""
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return self.device_peak_bytes - self._start_bytes
        if self.method == "clear_refs":
            return _read_proc_kb("VmHWM") * 1024 - self._start_bytes
        if self.method == "sampling":
            return self._stop_sampling_thread() - self._start_bytes
        return None

    def _start_sampling(self) -> None:
        self._sampled_peak = self._start_bytes
        self._stop_sampling.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop_sampling.wait(self.interval_s):
            self._sampled_peak = max(self._sampled_peak, _read_proc_kb("VmRSS") * 1024)

    def _stop_sampling_thread(self) -> int:
        self._sampled_peak = max(self._sampled_peak, _read_proc_kb("VmRSS") * 1024)
        self._stop_sampling.set()
        self._sampler.join()
        return self._sampled_peak


def _read_proc_kb(field: str) -> int:
    """A `kB` field of /proc/self/status (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _default_cpu_method() -> Literal["clear_refs", "sampling"] | None:
    if _clear_refs_works():
        return "clear_refs"
    return "sampling" if _read_proc_kb("VmRSS") else None


@functools.cache
def _clear_refs_works() -> bool:
    """Whether writing /proc/self/clear_refs resets VmHWM here (Linux ≥ 4.0, and not forbidden)."""
    try:
        _reset_peak_rss()
    except OSError:
        return False
    return _read_proc_kb("VmHWM") > 0


@functools.cache
def _malloc_trim_function() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _malloc_trim() -> None:
    trim = _malloc_trim_function()
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------------------------
# Timed runs


@dataclass
class _Samples:
    """Raw measurements of one model, appended to run by run."""

    ttft_ms: list[float] = dataclasses.field(default_factory=list)
    tpot_ms_by_run: list[list[float]] = dataclasses.field(default_factory=list)
    memory_growth_bytes: list[int] = dataclasses.field(default_factory=list)
    device_peak_bytes: list[int] = dataclasses.field(default_factory=list)
    generate_seconds: list[float] = dataclasses.field(default_factory=list)


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read after this includes them (CUDA launches are async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


def _timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """`fn(*args, **kwargs)` and its wall time in ms, the device synchronized on both sides."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    _synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def _first_token(model: AudioLanguageModel, clip: Batch, prompt: str) -> tuple[Tensor, Any]:
    """What TTFT times: audio → first generated token `[1, 1]`, and the cache."""
    logits, cache = model.prefill(model.encode_audio(clip), [prompt])
    return logits.argmax(dim=-1, keepdim=True), cache


def _next_token(model: AudioLanguageModel, token: Tensor, cache: Any) -> tuple[Tensor, Any]:
    """What TPOT times: one cached step → next token `[1, 1]`, and the longer cache."""
    logits, cache = model.decode_step(token, cache)
    return logits.argmax(dim=-1, keepdim=True), cache


def _latency_run(model: AudioLanguageModel, clip: Batch, cfg: EfficiencyConfig) -> tuple[float, list[float]]:
    """One run: (TTFT ms, [TPOT ms of each of `cfg.decode_steps` steps])."""
    device = model.device
    (token, cache), ttft = _timed(device, _first_token, model, clip, cfg.prompt)
    tpot = []
    for _ in range(cfg.decode_steps):
        (token, cache), step_ms = _timed(device, _next_token, model, token, cache)
        tpot.append(step_ms)
    return ttft, tpot


def _measured_latency_run(model: AudioLanguageModel, clip: Batch, cfg: EfficiencyConfig,
                          samples: _Samples, keep_times: bool = True) -> None:
    """A run with its peak memory metered (its times kept in `samples` when `keep_times`)."""
    meter = PeakMemoryMeter(model.device)
    meter.start()
    ttft, tpot = _latency_run(model, clip, cfg)
    growth = meter.stop()
    if keep_times:
        samples.ttft_ms.append(ttft)
        samples.tpot_ms_by_run.append(tpot)
    if growth is not None:
        samples.memory_growth_bytes.append(growth)
    if meter.device_peak_bytes is not None:
        samples.device_peak_bytes.append(meter.device_peak_bytes)


def _generate_seconds(model: AudioLanguageModel, batch: Batch, cfg: EfficiencyConfig) -> float:
    prompts = [cfg.prompt] * batch_size_of(batch)
    _, ms = _timed(model.device, model.generate, batch, prompts,
                   max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    return ms / 1e3


def _throughput_batches(clips: Sequence[Batch], cfg: EfficiencyConfig) -> list[Batch]:
    """`1 + throughput_runs` batches (the first for warm-up), cycling through the clips."""
    size = cfg.throughput_batch_size
    return [
        concat_batches([clips[(run * size + row) % len(clips)] for row in range(size)])
        for run in range(1 + cfg.throughput_runs)
    ]


def _interleaved(names: Sequence[str], repetition: int) -> list[str]:
    """Forward order on even repetitions, reversed on odd: linear drift then hits every model alike."""
    return list(names) if repetition % 2 == 0 else list(reversed(names))


@contextlib.contextmanager
def _evaluating(models: Sequence[nn.Module]) -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------------------
# Public entry points


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
    _check_clips(clips)
    inputs = {name: [move_batch(clip, model.device) for clip in clips] for name, model in models.items()}
    samples = {name: _Samples() for name in names}
    gc.collect()
    with _evaluating(list(models.values())), _threads(cfg.threads):
        _run_latency(models, inputs, cfg, samples)
        if cfg.throughput_runs:
            _run_throughput(models, inputs, cfg, samples)
        costs = {name: _analytic(model, inputs[name][0], cfg) for name, model in models.items()}
    bandwidth = _bandwidths(models, cfg)
    reports = {name: _report(model, samples[name], cfg, costs[name], bandwidth.get(str(model.device)))
               for name, model in models.items()}
    return {
        "settings": {**_settings(models, clips, cfg), "memory_bandwidth": bandwidth},
        "reference": reference,
        "models": reports,
        "ratios": {name: {**ratios(reports[name], reports[reference]),
                          **paired_ratios(samples[name], samples[reference])} for name in names},
    }


def paired_ratios(samples: _Samples, reference: _Samples) -> dict[str, float]:
    """Medians over repetitions of (this model's time / the reference's time in the same repetition): TTFT, and
    TPOT as each run's median step. Runs of one repetition sit next to each other in time, so drift slower than a
    repetition cancels in each quotient."""
    ttft = np.asarray(samples.ttft_ms) / np.asarray(reference.ttft_ms)
    def run_medians(runs: _Samples) -> np.ndarray:
        return np.median(np.asarray(runs.tpot_ms_by_run), axis=1)

    tpot = run_medians(samples) / run_medians(reference)
    return {"ttft_ms_paired": float(np.median(ttft)), "tpot_ms_paired": float(np.median(tpot))}


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(model: AudioLanguageModel, clips: Sequence[Batch], cfg: EfficiencyConfig) -> dict[str, Any]:
    """One model's report (see `_report`) with a `settings` block: `compare` with a single model."""
    result = compare({"model": model}, clips, cfg)
    return {"settings": result["settings"], **result["models"]["model"]}


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


def _check_clips(clips: Sequence[Batch]) -> None:
    if not clips:
        raise ValueError("no clips to measure on")
    sizes = [batch_size_of(clip) for clip in clips]
    if any(size != 1 for size in sizes):
        raise ValueError(f"latency is measured at batch size 1; clips have batch sizes {sizes}")


def _run_latency(models: Mapping[str, AudioLanguageModel], inputs: Mapping[str, list[Batch]],
                 cfg: EfficiencyConfig, samples: Mapping[str, _Samples]) -> None:
    """Warm-ups (the same runs untimed: kernels chosen, caches and the allocator's pools at their working size), timed
    runs, then memory runs; models interleaved in each repetition. The garbage collector is kept out of the timed
    runs (collected between repetitions instead): a collection inside a decode step is noise, not the model."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for repetition in range(cfg.warmup_runs):
            for name in _interleaved(list(models), repetition):
                clips = inputs[name]
                _latency_run(models[name], clips[repetition % len(clips)], cfg)
        for repetition in range(cfg.timed_runs):
            gc.collect()
            for name in _interleaved(list(models), repetition):
                clips = inputs[name]
                if cfg.memory_runs:
                    ttft, tpot = _latency_run(models[name], clips[repetition % len(clips)], cfg)
                    samples[name].ttft_ms.append(ttft)
                    samples[name].tpot_ms_by_run.append(tpot)
                else:
                    _measured_latency_run(models[name], clips[repetition % len(clips)], cfg, samples[name])
        for repetition in range(cfg.memory_runs):
            gc.collect()
            for name in _interleaved(list(models), repetition):
                clips = inputs[name]
                _measured_latency_run(models[name], clips[repetition % len(clips)], cfg, samples[name],
                                      keep_times=False)
    finally:
        if gc_was_enabled:
            gc.enable()


def _run_throughput(models: Mapping[str, AudioLanguageModel], inputs: Mapping[str, list[Batch]],
                    cfg: EfficiencyConfig, samples: Mapping[str, _Samples]) -> None:
    batches = {name: _throughput_batches(inputs[name], cfg) for name in models}
    for name in models:  # warm-up at the throughput batch size (new shapes, new kernels)
        _generate_seconds(models[name], batches[name][0], cfg)
    for repetition in range(cfg.throughput_runs):
        for name in _interleaved(list(models), repetition):
            batch = batches[name][1 + repetition]
            samples[name].generate_seconds.append(_generate_seconds(models[name], batch, cfg))


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


def _report(model: AudioLanguageModel, samples: _Samples, cfg: EfficiencyConfig,
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


def _memory_summary(model: AudioLanguageModel, weights: int, samples: _Samples) -> dict[str, Any]:
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
        _, ms = _timed(device, dst.copy_, src)
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


def attention_implementations(model: nn.Module) -> dict[str, str]:
    """Class name → attention implementation of the Hugging Face models inside `model` (what actually runs)."""
    from transformers import PreTrainedModel

    return {type(m).__name__: m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)}


def release_memory() -> None:
    """Give freed tensors' memory back (host garbage, and the CUDA caching allocator's blocks) between models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        "attention": {name: attention_implementations(model) for name, model in models.items()},
    }
