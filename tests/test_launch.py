"""The launch scripts in launch/, exercised exactly as a user runs them (STYLE.md point 9).

Fast tier: every script parses (`bash -n`), is executable, the hostfile example parses with
DeepSpeed's own parser, and slurm.sbatch hands the right command and environment to srun (with
stub `srun`/`scontrol`) and requeues on USR1. Slow tier (`-m slow`): real 2-rank CPU/gloo runs
through launch/deepspeed.sh, two torchrun "nodes" on localhost via launch/torchrun_multinode.sh,
and launch/local.sh with NPROC=2.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))

STEPS, MICRO_BATCH = 6, 2
TIMEOUT_S = 240  # per launcher run; each takes ~15-30 s on 2 cores


def _tiny_args(run_dir: Path, cache_dir: Path) -> list[str]:
    """A few steps of the default tiny model on a small slice of the stdlib corpus."""
    return [
        f"run_dir={run_dir}",
        f"train.steps={STEPS}",
        f"train.micro_batch={MICRO_BATCH}",
        "data.max_bytes=200000",
        f"data.cache_dir={cache_dir}",  # session-wide: the tokenization is done once
        "optim.warmup_steps=2",  # the default warmup (20) must not exceed train.steps
        "checkpoint.snapshot_interval=0",
        "train.eval_interval=0",
    ]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The scripts call python/torchrun/deepspeed from PATH: use this interpreter's venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["GLOO_SOCKET_IFNAME"] = "lo"  # CPU ranks talk over loopback
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run a launcher with output in a file (no pipe to fill); return (exit code, output)."""
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    return rc, log.read_text(errors="replace")


def _check_run(run_dir: Path, world: int, output: str) -> None:
    """metrics.jsonl has every step with a finite loss; `samples` proves `world` ranks took part."""
    tail = output[-6000:]
    metrics = run_dir / "metrics.jsonl"
    assert metrics.exists(), f"no {metrics}\n{tail}"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"steps {steps}\n{tail}"
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(math.isfinite(x) for x in losses), f"losses {losses}\n{tail}"
    # global batch = micro_batch x world (no grad accumulation), so samples counts the ranks
    assert rows[-1]["samples"] == STEPS * MICRO_BATCH * world, f"last row {rows[-1]}\n{tail}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS, f"summary {summary}\n{tail}"
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists(), tail


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


# ---------------------------------------------------------------- fast tier


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_executable(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
    assert "Usage" in script.read_text(), f"{script} has no usage header"


def test_launch_dir_has_every_script() -> None:
    names = {p.name for p in LAUNCH.iterdir()}
    assert {"local.sh", "deepspeed.sh", "torchrun_multinode.sh", "slurm.sbatch", "hostfile.example"} <= names


def test_hostfile_example_parses() -> None:
    from deepspeed.launcher.runner import _parse_hostfile

    pool = _parse_hostfile((LAUNCH / "hostfile.example").read_text().splitlines())
    assert pool and all(slots > 0 for slots in pool.values()), pool


def _stub_slurm(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Fake `scontrol` and `srun` on PATH; srun records its arguments and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n'
        'if [[ "$1 $2" == "show hostnames" ]]; then printf "node-a\\nnode-b\\n"; fi\n'
        'if [[ "$1" == requeue ]]; then echo "$2" > "$STUB_DIR/requeued"; fi\n'
    )
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\n'
        'printf "%s\\n" "$@" > "$STUB_DIR/srun_args"\n'
        'env > "$STUB_DIR/srun_env"\n'
        # With STUB_HOLD set, behave like a long step until the job is requeued (max ~20 s).
        'if [[ -n "${STUB_HOLD:-}" ]]; then\n'
        '  for _ in $(seq 200); do [[ -e "$STUB_DIR/requeued" ]] && exit 0; sleep 0.1; done; exit 3\n'
        'fi\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(STUB_DIR=str(tmp_path), SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2",
               SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("NPROC_PER_NODE", None)
    env.pop("SLURM_GPUS_ON_NODE", None)
    return bin_dir, env


def test_slurm_sbatch_hands_srun_the_torchrun_script(tmp_path: Path) -> None:
    _, env = _stub_slurm(tmp_path)
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "run_dir=runs/x", "train.steps=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = (tmp_path / "srun_args").read_text().split()
    assert args == ["launch/torchrun_multinode.sh", "--resume", "auto", "run_dir=runs/x", "train.steps=3"]
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "srun_env").read_text().splitlines() if "=" in line)
    assert srun_env["RDZV_ENDPOINT"] == "node-a:29500"
    assert srun_env["MASTER_ADDR"] == "node-a"
    assert srun_env["NNODES"] == "2"
    assert srun_env["RDZV_ID"] == "4242"
    assert srun_env["NPROC_PER_NODE"] == "1"
    assert srun_env["PWD"] == str(REPO), "the script must cd to SLURM_SUBMIT_DIR"


def test_slurm_preemption_reaches_the_ranks_and_requeues_after_their_save(tmp_path: Path) -> None:
    """Issue 11.8: USR1 (SLURM's warning, 120 s before the limit) used to requeue at once while the
    ranks never heard of it. Now it goes srun -> launch/torchrun_multinode.sh -> the ranks (never to
    torchrun itself, which has no USR1 handler), and the requeue waits until the ranks saved and
    exited. Stubs: srun forwards signals to its task as the real one does; torchrun runs one "rank"
    that saves on USR1."""
    bin_dir, env = _stub_slurm(tmp_path)
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\n'
        '"$@" & task=$!\n'
        'trap \'kill -USR1 $task\' USR1\n'
        'trap \'kill -TERM $task\' TERM\n'
        'rc=0; wait $task || rc=$?\n'
        'while kill -0 $task 2>/dev/null; do rc=0; wait $task || rc=$?; done\n'
        'exit $rc\n'
    )
    # The "rank" is a Python process, as real ranks are: torchrun runs with USR1 ignored, which its
    # children inherit, and only a program that sets its own handler (not a shell trap) takes it back.
    rank = ("import os, signal, sys, time\n"
            "d = os.environ['STUB_DIR']\n"
            "def stop(*_):\n"
            "    open(d + '/log', 'a').write('saved\\n'); time.sleep(1); open(d + '/log', 'a').write('exited\\n')\n"
            "    sys.exit(143)\n"
            "signal.signal(signal.SIGUSR1, stop)\n"
            "open(d + '/ready', 'w').write('ready')\n"
            "time.sleep(30); sys.exit(3)\n")
    (bin_dir / "rank.py").write_text(rank)
    (bin_dir / "torchrun").write_text(
        '#!/usr/bin/env bash\n'
        f'{sys.executable} {bin_dir / "rank.py"} &\n'
        'wait $!\n'
    )
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n'
        'if [[ "$1 $2" == "show hostnames" ]]; then printf "node-a\\nnode-b\\n"; fi\n'
        'if [[ "$1" == requeue ]]; then echo "requeued $2" >> "$STUB_DIR/log"; fi\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "run_dir=runs/x"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists():  # the rank is up (the traps are set before srun starts)
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends 120 s before the time limit
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert (tmp_path / "log").read_text().split("\n")[:3] == ["saved", "exited", "requeued 4242"], out


def test_train_does_not_start_after_a_requested_stop(tmp_path: Path) -> None:
    """launch/torchrun_multinode.sh touches BIGTRAIN_STOP_FILE on USR1: a worker group torchrun
    restarts afterwards (MAX_RESTARTS>0) must exit at once with the preemption code, not train on."""
    stop = tmp_path / "stop"
    stop.touch()
    env = _env(BIGTRAIN_STOP_FILE=str(stop))
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", f"run_dir={tmp_path / 'run'}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert "a stop was requested before this start" in proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- slow tier: real 2-rank runs


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    env = _env(NUM_GPUS="2", MASTER_PORT=str(_free_port()))
    rc, out = _run([str(LAUNCH / "deepspeed.sh"), *_tiny_args(run_dir, data_cache)], env, tmp_path / "log")
    assert rc == 0, f"launch/deepspeed.sh exited {rc}\n{out[-6000:]}"
    _check_run(run_dir, world=2, output=out)


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost(tmp_path: Path, data_cache: Path) -> None:
    """Two agents, one rank each, meet at one c10d rendezvous: what two real nodes do."""
    run_dir = tmp_path / "run"
    env = _env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}",
               RDZV_ID=f"test-{os.getpid()}")
    cmd = [str(LAUNCH / "torchrun_multinode.sh"), *_tiny_args(run_dir, data_cache)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    files = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT) for f in files]
    try:
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=TIMEOUT_S))
            except subprocess.TimeoutExpired:
                codes.append(-1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    out = "\n".join(f"--- node {i} ---\n{log.read_text(errors='replace')[-4000:]}" for i, log in enumerate(logs))
    assert codes == [0, 0], f"exit codes {codes}\n{out}"
    _check_run(run_dir, world=2, output=out)


@pytest.mark.slow
def test_local_two_processes(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    rc, out = _run([str(LAUNCH / "local.sh"), *_tiny_args(run_dir, data_cache)], _env(NPROC="2"), tmp_path / "log")
    assert rc == 0, f"launch/local.sh exited {rc}\n{out[-6000:]}"
    _check_run(run_dir, world=2, output=out)


@pytest.mark.slow
def test_torchrun_restarts_do_not_undo_a_slurm_stop(tmp_path: Path, data_cache: Path) -> None:
    """With MAX_RESTARTS>0 torchrun counts the ranks' exit 143 after USR1 as a failure and restarts
    them; the restarted group must not resume and train on into SLURM's kill. The USR1 reaches every
    process of the step: torchrun must not die of it, nor a rank of getting it twice."""
    run_dir = tmp_path / "run"
    args = [a for a in _tiny_args(run_dir, data_cache) if not a.startswith("train.steps=")]
    env = _env(NNODES="1", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}",
               RDZV_ID=f"test-{os.getpid()}", MAX_RESTARTS="2", TMPDIR=str(tmp_path))
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(LAUNCH / "torchrun_multinode.sh"), "--resume", "auto", *args, "train.steps=100000",
                                 "checkpoint.interval=0", "checkpoint.snapshot_interval=0"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-4000:]
                time.sleep(0.2)
            # What SLURM's step daemon may do with the warning srun forwards: signal every process of
            # the step (the wrapper, torchrun, the ranks), so each rank gets it twice.
            os.killpg(proc.pid, signal.SIGUSR1)
            rc = proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text(errors="replace")
    assert rc == 143, output[-6000:]
    assert output.count("a stop was requested before this start") >= 2, output[-6000:]  # 2 ranks, restarted
    assert output.count("rank(s) | ZeRO") == 1, output[-6000:]  # trained once, never resumed
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved[0] == 0 and len(saved) == 2 and 0 < saved[1] < 100000, saved  # the initial state, the stop
    assert not list(tmp_path.glob("bigtrain-stop-*")), "the stop file outlives the job"


def test_a_repeated_usr1_does_not_kill_a_rank_but_a_second_sigterm_does(tmp_path: Path) -> None:
    """Under SLURM the warning can reach a rank twice (the step daemon signals every process of the
    step, and launch/torchrun_multinode.sh forwards it too): the rank must go on to save. A second
    SIGTERM still ends a rank that may be stuck in a collective."""
    script = (
        "import os, signal, sys, time\n"
        "from bigtrain.train import StopRequest\n"
        "StopRequest.install()\n"
        "first = getattr(signal, sys.argv[1])\n"
        "os.kill(os.getpid(), first); os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n"
        "print('alive', StopRequest.signum == first, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5)\n"
        "print('survived a second SIGTERM', flush=True)\n")
    for first in ("SIGUSR1", "SIGTERM"):
        proc = subprocess.run([sys.executable, "-c", script, first], cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert "alive True" in proc.stdout, proc.stderr[-2000:]
        assert "survived" not in proc.stdout and proc.returncode == -signal.SIGTERM, (first, proc.stdout)
