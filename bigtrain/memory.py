"""Where the bytes go: host RSS (and on CUDA the GPU's allocated/peak bytes) at each start-up phase,
max over ranks, for the start-up log and summary.json."""

from __future__ import annotations

import ctypes
import os
import resource
import sys

import torch
import torch.distributed as dist

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> str:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own mmap, so that the
    memory of a freed tensor goes back to the system at once. Returns what was done, for the log.

    By default glibc raises its mmap threshold to the size of each mmapped block freed (up to 32 MiB):
    after ZeRO-3 frees its first gathered parameter, same-sized blocks come from the heap, and freed
    heap memory is kept while anything above it lives (mallopt(3), M_MMAP_THRESHOLD). Measured on a
    162M-parameter model directory on 2 CPU ranks (docs/memory.md): ZeRO-3's model load added
    2.38 bytes/param to a rank as glibc adjusts it, 1.25 fixed at 1 MiB (the rank's bf16 partition is
    1.0), and the run's peak fell from 3,390 to 2,972 MB; 128 KiB made CPU steps ~40% slower, 1 MiB
    showed no difference beyond the noise of two runs each. The user's own setting wins: a
    ``MALLOC_MMAP_THRESHOLD_`` or ``glibc.malloc.mmap_threshold`` tunable, another allocator
    preloaded (jemalloc, tcmalloc), or ``threshold`` 0."""
    if threshold <= 0:
        return "left to glibc (train.malloc_mmap_threshold=0)"
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left as the environment sets it"
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "not glibc's allocator (LD_PRELOAD)"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(int(threshold)))
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 / no mallopt)
        return "not glibc"
    return f"glibc mmap threshold {threshold:,} bytes" if ok else "glibc refused the mmap threshold"


def rss_mb() -> float:
    """This process's resident set now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class MemoryReport:
    """Local readings per phase; ``reduce`` takes the max over ranks (one all-reduce, collective)."""

    def __init__(self) -> None:
        self.readings: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.readings[phase] = rss_mb()
        self.readings[f"peak_at_{phase}"] = peak_rss_mb()
        if torch.cuda.is_available():
            self.readings[f"gpu_allocated_{phase}"] = torch.cuda.memory_allocated() / 2**20
            self.readings[f"gpu_peak_at_{phase}"] = torch.cuda.max_memory_allocated() / 2**20

    def added(self, name: str, before: str, after: str) -> None:
        """What this rank's phase added (RSS after - before), so the max over ranks is one rank's own
        addition, not the difference of two ranks' maxima."""
        self.readings[name] = self.readings[after] - self.readings[before]

    def reduce(self, device) -> dict[str, float]:
        """Max over ranks of every reading taken so far, plus the peak now. Collective: every rank must
        call it with the same phases marked."""
        readings = {**self.readings, "peak": peak_rss_mb()}
        if torch.cuda.is_available():
            readings["gpu_peak"] = torch.cuda.max_memory_allocated() / 2**20
        keys = list(readings)  # the same order on every rank: same phases marked in the same order
        values = torch.tensor([readings[k] for k in keys], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return {k: round(v, 1) for k, v in zip(keys, values.tolist())}


def format_mb(report: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.0f} MB" for k, v in report.items())
