"""Peak memory of a model run: the largest growth of memory in use between two points (`PeakMemoryMeter`), on
CUDA from PyTorch's allocator, on a CPU from the process's resident set; and `release_memory` between models."""

from __future__ import annotations

import ctypes
import functools
import gc
import re
import threading
from collections.abc import Callable
from typing import Literal

import torch

MIB = 2**20


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


def release_memory() -> None:
    """Give freed tensors' memory back (host garbage, and the CUDA caching allocator's blocks) between models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
