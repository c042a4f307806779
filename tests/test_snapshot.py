"""The snapshot ring's budget (computed, printed, refused with the fix) and its removal on exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bigtrain.config import CheckpointConfig, ConfigError
from bigtrain.snapshot import check_budget, ring_bytes

BF16 = {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
FP32 = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}


def test_ring_cost_per_parameter():
    # bf16 module (2) + fp32 master, exp_avg, exp_avg_sq (12) = 14 bytes/param; fp32 module: 16.
    assert ring_bytes(10**9, BF16, 1) == pytest.approx(14e9 * 1.05)
    assert ring_bytes(10**9, FP32, 5) == pytest.approx(5 * 16e9 * 1.05)
    # Node-local: one node of 8 holds its eighth of the optimizer partitions (the module in full).
    assert ring_bytes(10**9, BF16, 1, local_fraction=1 / 8) == pytest.approx((2 + 1.5) * 1e9 * 1.05)


def test_a_ring_that_does_not_fit_is_refused_with_the_fixes(tmp_path):
    cfg = CheckpointConfig(snapshot_interval=10, snapshot_keep=4)
    # 7B params, Docker's default 64 MB /dev/shm.
    with pytest.raises(ConfigError) as err:
        check_budget(cfg, tmp_path / "snaps", 7 * 10**9, BF16, 1.0, free_bytes=64 * 2**20)
    msg = str(err.value)
    for fix in ("checkpoint.snapshot_dir=", "checkpoint.snapshot_keep=", "checkpoint.snapshot_interval=0"):
        assert fix in msg
    assert "5 copies" in msg
    assert check_budget(cfg, tmp_path / "snaps", 10**6, BF16, 1.0, free_bytes=10**9) > 0
    assert check_budget(CheckpointConfig(snapshot_interval=0), tmp_path, 7 * 10**9, BF16, 1.0, free_bytes=0) == 0


def test_a_ring_in_tmpfs_is_bounded_by_the_ram_the_node_has(tmp_path, monkeypatch):
    """tmpfs reports half the RAM as free whatever the ranks use; its pages are RAM. The ring is
    checked against MemAvailable, less the optimizer state ZeRO-Offload will put in host memory."""
    import bigtrain.snapshot as snapshot

    cfg = CheckpointConfig(snapshot_interval=10, snapshot_keep=1, async_snapshots=False)  # 2 x 100M params: 2.94 GB
    monkeypatch.setattr(snapshot, "ram_backed", lambda path: True)
    monkeypatch.setattr(snapshot, "mem_available", lambda: int(2.5e9))
    with pytest.raises(ConfigError, match="available RAM"):
        check_budget(cfg, tmp_path / "snaps", 10**8, BF16, 1.0)
    monkeypatch.setattr(snapshot, "mem_available", lambda: int(4e9))
    if __import__("shutil").disk_usage(tmp_path).free > 3e9:
        assert check_budget(cfg, tmp_path / "snaps", 10**8, BF16, 1.0) > 0
    offload = {**BF16, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="1.20 GB of offloaded optimizer state"):  # 4 - 1.2 < 2.94
        check_budget(cfg, tmp_path / "snaps", 10**8, offload, 1.0)
    # Asynchronous snapshots also hold one snapshot's host buffers (1.47 GB here): 4 - 1.47 < 2.94.
    with pytest.raises(ConfigError, match="1.47 GB of snapshot host buffers"):
        check_budget(CheckpointConfig(snapshot_interval=10, snapshot_keep=1), tmp_path / "snaps", 10**8, BF16, 1.0)
    if Path("/dev/shm").is_dir() and " /dev/shm tmpfs " in Path("/proc/mounts").read_text():
        assert snapshot.ram_backed(Path("/dev/shm") / "bigtrain-x" / "y")


def test_asynchronous_snapshots_host_buffers_must_fit_in_ram_with_a_ring_on_disk(tmp_path, monkeypatch):
    """A ring on disk still has one snapshot's host buffers in RAM (pinned on a GPU)."""
    import bigtrain.snapshot as snapshot

    monkeypatch.setattr(snapshot, "ram_backed", lambda path: False)
    monkeypatch.setattr(snapshot, "mem_available", lambda: int(1e9))  # < the 1.47 GB of buffers
    with pytest.raises(ConfigError, match="checkpoint.async_snapshots=false"):
        check_budget(CheckpointConfig(snapshot_interval=10, snapshot_keep=1), tmp_path / "snaps", 10**8, BF16, 1.0)
    sync = CheckpointConfig(snapshot_interval=10, snapshot_keep=1, async_snapshots=False)
    assert check_budget(sync, tmp_path / "snaps", 10**8, BF16, 1.0, free_bytes=10**10) > 0
    if __import__("shutil").disk_usage(tmp_path).free > 3e9:
        assert check_budget(sync, tmp_path / "snaps", 10**8, BF16, 1.0) > 0  # no host buffers to hold
    monkeypatch.setattr(snapshot, "mem_available", lambda: int(2e9))
    if __import__("shutil").disk_usage(tmp_path).free > 3e9:
        assert check_budget(CheckpointConfig(snapshot_interval=10, snapshot_keep=1), tmp_path / "snaps", 10**8,
                            BF16, 1.0) > 0
    # 70B on 64 ranks, 8 per node, a ring on a shared disk (local_fraction 1): the node holds its 8
    # ranks' buffers (~257 GB: the bf16 module, counted in full, and an eighth of the optimizer), not 64's.
    monkeypatch.setattr(snapshot, "mem_available", lambda: int(900e9))
    cfg70 = CheckpointConfig(snapshot_interval=10, snapshot_keep=1)
    with pytest.raises(ConfigError, match="checkpoint.async_snapshots=false"):  # 64 ranks' worth: ~1 TB
        check_budget(cfg70, tmp_path / "snaps", 70 * 10**9, BF16, 1.0, free_bytes=None, node_fraction=1.0)
    monkeypatch.setattr(snapshot.shutil, "disk_usage", lambda p: __import__("collections").namedtuple(
        "u", "total used free")(10**15, 0, 10**15))
    assert check_budget(cfg70, tmp_path / "snaps", 70 * 10**9, BF16, 1.0, node_fraction=8 / 64) > 0


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_the_snapshot_directory_is_removed_on_exit(tmp_path, ending):
    root = tmp_path / "snaps"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "x.pt").write_bytes(b"0" * 100)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from bigtrain.snapshot import clean_on_exit
        clean_on_exit(Path({str(root)!r}))
        if {ending == "raise"}:
            raise RuntimeError("a crash in the loop")
    """)
    subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert not root.exists()


@pytest.mark.slow
def test_snapshot_bytes_match_the_estimate(tmp_path, data_cache):
    """The per-parameter figure is what DeepSpeed really writes (1-rank tiny run, bf16, ZeRO-2)."""
    from helpers import TINY, run_bigtrain

    run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={tmp_path / 'run'}", "train.steps=2",
                  "checkpoint.snapshot_interval=1", "checkpoint.interval=1", "train.deepspeed=zero2"], nproc=1)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    written = sum(p.stat().st_size for p in ckpt.rglob("*.pt"))
    from bigtrain.config import ModelConfig
    from bigtrain.data import build_tokenizer
    from bigtrain.model import build_model
    n = sum(p.numel() for p in build_model(ModelConfig(), build_tokenizer(None), 32, 0).parameters())
    assert 14 * n <= written <= ring_bytes(n, BF16, 1) * 1.3, (written / n)
