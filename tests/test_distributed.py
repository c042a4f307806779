"""Rank layout under every launcher: the device is selected before the first collective, srun's
per-node task count is mapped, and torchrun restarts agree on one store prefix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import BIN, free_port
from bigtrain.distributed import map_slurm_env, slurm_tasks_on_node, stale_extension_locks, warn_stale_extension_locks

# Records the accelerator's set_device and the process group's creation/first collective in order,
# through a fake accelerator (no GPU needed), then runs bigtrain's real init_distributed.
ORDER_SCRIPT = textwrap.dedent("""
    import os, sys
    import deepspeed.accelerator, torch.distributed as dist
    calls = []
    real = deepspeed.accelerator.get_accelerator()

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)
        def set_device(self, index):
            calls.append(("set_device", index))
        if os.environ.get("FAKE_ONE_VISIBLE_GPU"):  # srun --gpus-per-task=1: this task sees one device
            def device_name(self, index=None):
                return "cuda"
            def device_count(self):
                return 1

    deepspeed.accelerator.get_accelerator = lambda: Recording()
    for name in ("init_process_group", "broadcast_object_list", "barrier", "all_reduce"):
        orig = getattr(dist, name)
        def wrapped(*a, _orig=orig, _name=name, **k):
            calls.append((_name,))
            return _orig(*a, **k)
        setattr(dist, name, wrapped)
    if sys.argv[1] == "elastic":  # torchrun's agent store: a TCPStore server the workers join as clients
        server = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), is_master=True)
    from bigtrain.distributed import init_distributed
    init_distributed()
    dist.barrier()
    print(calls)
    print(os.environ["LOCAL_RANK"], os.environ.get("BIGTRAIN_NODE_LOCAL_RANK"))
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("launcher", ["torchrun", "elastic", "deepspeed"])
def test_device_is_selected_before_the_first_collective(launcher):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    if launcher == "elastic":  # the restart path: join through the agent store under a round prefix
        env.update(TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="2")
    if launcher == "deepspeed":
        env.update(LOCAL_SIZE="1")
    out = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, launcher], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = eval(out.stdout.strip().splitlines()[-2])
    assert ("set_device", 3) in calls, f"cuda:LOCAL_RANK never selected: {calls}"
    first_group_call = min(i for i, c in enumerate(calls) if c[0] != "set_device")
    assert calls.index(("set_device", 3)) < first_group_call, calls


def test_a_task_that_sees_only_its_own_gpu_uses_device_0(monkeypatch):
    """srun --gpus-per-task=1: every task sees one GPU (device 0) while LOCAL_RANK runs 0..7."""
    import deepspeed.accelerator

    from bigtrain.distributed import device_index, select_device

    calls = []

    class OneVisibleGpu:
        def device_name(self, index=None):
            return "cuda"

        def device_count(self):
            return 1

        def set_device(self, index):
            calls.append(index)

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: OneVisibleGpu())
    assert select_device(3) == 0
    assert calls == [0]
    assert [device_index(r, 8) for r in range(8)] == list(range(8))  # one process per node sees all 8
    assert device_index(3, 0) == 3  # CPU: nothing to count, the index is passed through
    with pytest.raises(RuntimeError, match="sees only 4 devices"):
        device_index(5, 4)


def test_one_visible_gpu_maps_local_rank_for_deepspeed_and_keeps_the_node_role():
    """DeepSpeed's engine selects cuda:LOCAL_RANK again: LOCAL_RANK must name the visible device (0),
    and the node-local role (who cleans the node's snapshots) stays in BIGTRAIN_NODE_LOCAL_RANK."""
    from bigtrain.distributed import node_local_rank

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo", "FAKE_ONE_VISIBLE_GPU": "1"}
    out = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, "torchrun"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert ("set_device", 0) in eval(lines[-2]) and lines[-1] == "0 3"
    assert node_local_rank() == int(os.environ.get("LOCAL_RANK", "0"))


def test_srun_maps_the_per_node_task_count():
    assert slurm_tasks_on_node("8", 0) == 8
    assert [slurm_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "8(x2)", "MASTER_ADDR": "node-a"}
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "MASTER_ADDR": "node-a"}
    map_slurm_env(env)
    assert env["LOCAL_WORLD_SIZE"] == "8"


# Round 0: rank 1 dies after rank 0 has joined (as a worker crashing in import or CUDA init would);
# torchrun restarts both. Round 1 must form one group and all-reduce.
RESTART_SCRIPT = textwrap.dedent("""
    import os, sys, time
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
        time.sleep(3)
        sys.exit(1)
    import torch, torch.distributed as dist
    from bigtrain.distributed import init_distributed
    init_distributed()
    t = torch.ones(1)
    dist.all_reduce(t)
    out = sys.argv[1] + "/rank" + os.environ["RANK"]
    open(out, "w").write(f"round {os.environ['TORCHELASTIC_RESTART_COUNT']} sum {int(t.item())}")
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_a_worker_dead_before_joining_does_not_split_the_next_round(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(RESTART_SCRIPT)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "1", "--master_port",
           str(free_port()), str(script), str(tmp_path)]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            popen.terminate()  # torchrun stops its workers (they run in sessions of their own)
            try:
                stdout, stderr = popen.communicate(timeout=60)
            finally:
                os.killpg(popen.pid, 9)
            raise AssertionError(f"round 1 hung (ranks split across store prefixes)\n{stderr[-3000:]}")
    assert popen.returncode == 0, stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["round 1 sum 2"] * 2


QUIET_SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from bigtrain.distributed import _SHM_BUILT, _without_line, quiet_libraries
    quiet_libraries()
    import deepspeed, torch  # DeepSpeed warns at import on a CPU machine
    logging.getLogger("DeepSpeed").warning("another DeepSpeed warning")
    warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning,
                           "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
    warnings.warn("another FutureWarning", FutureWarning)
    with _without_line(_SHM_BUILT):
        print(_SHM_BUILT)
        print("another line")
    print("cpu build", torch.version.cuda is None and torch.version.hip is None)
""")


def test_library_noise_is_silenced_message_by_message():
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "another DeepSpeed warning" in out and "another FutureWarning" in out and "another line" in out
    assert "all_gather_into_tensor" not in out and "built successfully" not in out
    if "cpu build True" in out:
        assert "Setting accelerator to CPU" not in out


def test_a_stale_extension_lock_is_named_with_the_fix_before_the_silent_wait(tmp_path, monkeypatch, capsys):
    """A process killed while loading DeepSpeed's JIT op leaves ``<build dir>/lock``; torch then waits
    for it forever in every later process, with no output (a CI run hung 90 minutes on exactly this)."""
    import time

    build = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.touch()
    assert stale_extension_locks(str(tmp_path)) == []  # a build under way holds a fresh one
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert stale_extension_locks(str(tmp_path)) == [str(lock)]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    warn_stale_extension_locks()
    err = capsys.readouterr().err
    assert str(lock) in err and f"rm {lock}" in err
    monkeypatch.setenv("LOCAL_RANK", "1")  # one line per node, not one per rank
    warn_stale_extension_locks()
    assert capsys.readouterr().err == ""
