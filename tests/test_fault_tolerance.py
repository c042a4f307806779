"""Kill it, corrupt it, fill the disk: nothing is lost, and the run continues where it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from bigtrain.checkpoint import complete_checkpoints, resolve_resume, verify
from helpers import BIN, TINY, read_jsonl, run_bigtrain

pytestmark = pytest.mark.slow


def weights(ckpt):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def start(args, max_restarts=0):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PATH": f"{BIN}:{os.environ['PATH']}"}
    # --standalone (c10d rendezvous): restarts are new rounds; the static one failed to reconnect.
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "-m", "bigtrain", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training to start")


def workers(proc):
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "bigtrain" in " ".join(c.cmdline())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """An uninterrupted run to compare with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=40",
                  "checkpoint.interval=5"])
    return run_dir


@pytest.mark.parametrize("sig,interval", [(signal.SIGTERM, 5), (signal.SIGUSR1, 1)])
def test_stop_signal_on_one_rank_saves_on_all_and_resume_matches(tmp_path, data_cache, reference, sig, interval):
    """interval=1: the stop lands on a step the interval just saved, which must not be written twice
    (at 70B a second full save is minutes of SLURM's 120 s warning)."""
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=40",
            f"checkpoint.interval={interval}"]
    proc = start(args)
    wait_for_step(run_dir, 12, proc)
    workers(proc)[-1].send_signal(sig)  # one rank only, like SLURM's warning to one task
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "exitcode  : 143" in out, "every rank exits with the requeue status"
    assert "stop requested by a signal" in out
    stopped = resolve_resume("auto", run_dir / "checkpoints")
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    assert stopped.name == f"step_{last:08d}", "the stop checkpoint is the step the run stopped at"
    assert out.count(f"checkpoint {stopped} saved in") == 1, out[-3000:]
    assert last < 40
    run_bigtrain([*args, "--resume", "auto"])
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 41))
    assert same_weights(run_dir / "checkpoints" / "step_00000040", reference / "checkpoints" / "step_00000040")


def test_kill_9_under_torchrun_restarts_and_ends_identical(tmp_path, data_cache, reference):
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=40", "checkpoint.interval=5",
            "--resume", "auto"]
    proc = start(args, max_restarts=2)
    wait_for_step(run_dir, 17, proc)
    os.kill(workers(proc)[0].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41)), "metrics were truncated to the checkpoint on resume"
    assert same_weights(run_dir / "checkpoints" / "step_00000040", reference / "checkpoints" / "step_00000040")


def test_corrupted_checkpoint_is_detected_and_the_previous_one_used(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "checkpoint.interval=4", "train.steps=8"]
    run_bigtrain(args, nproc=1)
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a torn write
    assert "truncated or corrupted" in verify(newest)
    assert resolve_resume("auto", run_dir / "checkpoints").name == "step_00000004"
    bad = run_bigtrain([*args, "--resume", str(newest)], nproc=1, check=False)
    assert bad.returncode == 2 and "checkpoint is corrupted" in bad.stderr
    resumed = run_bigtrain([*args, "train.steps=10", "--resume", "auto"], nproc=1)
    assert "skipping checkpoint" in resumed.stderr and "resumed from" in resumed.stderr
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")][-6:] == [5, 6, 7, 8, 9, 10]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); disk-full is untested on this machine")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(small_disk, data_cache):
    run_dir = small_disk / "run"
    args = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "checkpoint.interval=2", "checkpoint.keep=5",
            "train.steps=40", "checkpoint.snapshot_interval=0"]
    proc = run_bigtrain(args, check=False, timeout=240)
    assert proc.returncode != 0
    errors = ["saving checkpoint" + part.split("\n")[0]
              for part in proc.stderr.split("bigtrain: error: saving checkpoint")[1:]]
    assert len(errors) == 2, f"both ranks stop with the same clear error:\n{proc.stderr[-3000:]}"
    assert "MiB free on that disk" in errors[0] and "is intact" in errors[0] and "--resume auto" in errors[0]
    good = resolve_resume("auto", run_dir / "checkpoints")
    assert good is not None and verify(good) is None
    # The failed save was written aside and never renamed to step_*: no step_* directory is partial.
    partial = sorted((run_dir / "checkpoints").glob("incoming-step_*"))[-1]
    assert partial.name[len("incoming-"):] > good.name and not (partial / "COMPLETE").exists()
