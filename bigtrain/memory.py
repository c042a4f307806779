"""Where the bytes go: host RSS (and on CUDA the GPU's allocated/peak bytes) at each start-up phase,
max over ranks, for the start-up log and summary.json."""

from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist

PHASES = ("after_model_load", "after_engine_init", "after_first_step")


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
