"""The snapshot ring's budget and lifetime: what it costs (bytes per parameter x parameters x copies),
whether its filesystem can hold it, and its removal on every exit path."""

from __future__ import annotations

import atexit
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from bigtrain.config import CheckpointConfig, ConfigError

log = logging.getLogger("bigtrain")

# Adam's fp32 master weights + exp_avg + exp_avg_sq, which every ZeRO stage saves (partitioned).
OPTIMIZER_BYTES_PER_PARAM = 12
# Headroom for DeepSpeed's per-file overhead, the RNG/state JSON and tmpfs rounding.
SLACK = 1.05


def module_bytes_per_param(ds_config: dict[str, Any]) -> int:
    """The module weights DeepSpeed saves, in the training dtype (2 bytes in bf16/fp16, 4 in fp32)."""
    half = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    return 2 if half else 4


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters, also when ZeRO-3 has partitioned them (``ds_numel`` is the full count)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def ring_bytes(n_params: int, ds_config: dict[str, Any], copies: int, local_fraction: float = 1.0) -> int:
    """Bytes the ring needs on one filesystem: ``copies`` snapshots of (module + optimizer) bytes per
    parameter; ``local_fraction`` is the share of ranks writing to it (node-local storage holds only
    its own node's partitions; ZeRO-1/2 write the whole module from rank 0 alone, counted in full)."""
    per_param = module_bytes_per_param(ds_config) + OPTIMIZER_BYTES_PER_PARAM * local_fraction
    return int(n_params * per_param * copies * SLACK)


def check_budget(cfg: CheckpointConfig, root: Path, n_params: int, ds_config: dict[str, Any],
                 local_fraction: float, free_bytes: int | None = None, node_fraction: float | None = None) -> int:
    """Print the ring's cost and refuse (ConfigError naming the fixes) when ``root``'s filesystem
    cannot hold it. ``snapshot_keep`` + 1 copies: the newest is written before the oldest is pruned.
    ``local_fraction``: the share of the ranks writing into ``root``'s filesystem; ``node_fraction``: this
    node's share of the ranks (default ``local_fraction``), for what lives in this node's RAM whatever
    the ring's location (host buffers, offloaded optimizer state). Returns the bytes needed (0 when
    snapshots are off)."""
    node_fraction = local_fraction if node_fraction is None else node_fraction
    if not cfg.snapshot_interval:
        return 0
    copies = cfg.snapshot_keep + 1
    need = ring_bytes(n_params, ds_config, copies, local_fraction)
    note = ""
    if free_bytes is None:
        existing = root
        while not existing.exists():
            existing = existing.parent
        free_bytes = shutil.disk_usage(existing).free
        # What lives in this node's RAM wherever the ring is: an offloaded optimizer (allocated after this
        # check) and asynchronous snapshots' host buffers (one snapshot of the node's ranks' shares; pinned
        # on a GPU, never swapped out).
        offloaded = int(n_params * OPTIMIZER_BYTES_PER_PARAM * node_fraction) if offloads_optimizer(ds_config) else 0
        buffers = ring_bytes(n_params, ds_config, 1, node_fraction) if cfg.async_snapshots else 0
        if ram_backed(existing):
            # tmpfs pages are RAM: its size (half the RAM by default) promises more than the node has once
            # the ranks' own memory is counted.
            room = mem_available() - offloaded - buffers
            if room < free_bytes:
                free_bytes = max(0, room)
                held = [f"{offloaded / 1e9:.2f} GB of offloaded optimizer state"] if offloaded else []
                held += [f"{buffers / 1e9:.2f} GB of snapshot host buffers"] if buffers else []
                note = " (the node's available RAM" + (" less " + " and ".join(held) if held else "") + \
                    ": tmpfs lives in RAM)"
        elif buffers and buffers + offloaded > (available := mem_available()):
            raise ConfigError(
                f"asynchronous snapshots hold one snapshot in host memory ({buffers / 1e9:.2f} GB for this "
                f"node's ranks{f', besides {offloaded / 1e9:.2f} GB of offloaded optimizer state' if offloaded else ''}"
                f") but the node has {available / 1e9:.2f} GB available: set "
                "checkpoint.async_snapshots=false (the loop then waits for each write), or turn snapshots off "
                "with checkpoint.snapshot_interval=0")
    per_param = need / max(1, n_params * copies)
    log.info("snapshot ring: %d copies x %.1f bytes/param x %.3g params = %.2f GB in %s (%.2f GB free%s)",
             copies, per_param, n_params, need / 1e9, root, free_bytes / 1e9, note)
    if need > free_bytes:
        raise ConfigError(
            f"the snapshot ring needs {need / 1e9:.2f} GB in {root} ({copies} copies x {per_param:.1f} bytes/param "
            f"x {n_params:,} params) but only {free_bytes / 1e9:.2f} GB is free there{note}: point "
            "checkpoint.snapshot_dir= at a larger (node-local) disk, lower checkpoint.snapshot_keep= "
            f"(now {cfg.snapshot_keep}), or turn snapshots off with checkpoint.snapshot_interval=0")
    return need


def ram_backed(path: Path) -> bool:
    """Whether ``path`` lies on a tmpfs/ramfs mount (the longest mount point above it in /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = path.resolve()
    best, fstype = "", ""
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) > len(best):
            best, fstype = point, kind
    return fstype in ("tmpfs", "ramfs")


def mem_available() -> int:
    """The kernel's estimate of RAM available without swapping (MemAvailable, bytes)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """ZeRO-Offload/Infinity with the optimizer state in host memory."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device") == "cpu"


def clean_on_exit(root: Path) -> None:
    """Remove the snapshot directory when this process exits, however it exits (return, exception,
    SIGTERM handled into a return): snapshots in tmpfs would otherwise hold RAM for the next job on the
    node. Only SIGKILL (and a second, fatal signal) escape; the next run of the same run_dir removes
    those at start-up."""
    atexit.register(shutil.rmtree, root, ignore_errors=True)
