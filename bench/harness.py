"""What every benchmark needs to run bigtrain jobs: a free port, the jobs' environment, a watchdog that
ends a whole job (torchrun and its workers), and a record of the machine and the code measured.

Imports nothing heavy (no torch), so a benchmark's driver stays light; run from the repository root
or from ``bench/`` (the benchmarks put ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's torchrun sits beside its python


def free_port() -> int:
    """A TCP port free on this machine now, for a job's ``--master_port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(omp_threads: int | str = 1, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's jobs: this venv's tools first on PATH, this checkout's bigtrain
    first on PYTHONPATH, gloo on loopback unless set, ``omp_threads`` OpenMP threads per process, no
    tokenizer threads, no datasets progress bars (they fill the captured logs); ``extra`` on top."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "OMP_NUM_THREADS": str(omp_threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    """Start a job in its own session, so ``stop`` can end torchrun and its workers together."""
    return subprocess.Popen(cmd, env=env, start_new_session=True, **popen)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the job's process group (torchrun + workers), SIGKILL what is left after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def watch(proc: subprocess.Popen, t0: float, timeout: float | None, reason: Callable[[], str | None] = lambda: None,
          interval: float = 1.0) -> str | None:
    """Wait for the job, polling every ``interval`` s; stop it when ``reason()`` names one, or after
    ``timeout`` s from ``t0`` (``time.monotonic()``). Returns why it was stopped, or None."""
    while proc.poll() is None:
        time.sleep(interval)
        why = reason()
        if why is None and timeout is not None and time.monotonic() - t0 > timeout:
            why = f"killed by the benchmark: timeout ({timeout} s)"
        if why is not None:
            stop(proc)
            return why
    return None


def run(cmd: list[str], env: dict[str, str], timeout: float | None = None, cwd: Path | str | None = None,
        capture: bool = True) -> subprocess.CompletedProcess:
    """``subprocess.run`` for jobs: on a timeout (``subprocess.TimeoutExpired``, with the output so
    far) or an interrupt the whole job is stopped, where ``subprocess.run`` kills torchrun alone and
    leaves its workers running."""
    pipe = subprocess.PIPE if capture else None
    proc = start(cmd, env, cwd=cwd, stdout=pipe, stderr=pipe, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:  # KeyboardInterrupt: the job is in its own session, the terminal's ^C missed it
        stop(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def group_rss(pid: int) -> int:
    """Resident bytes of a job: the process ``pid`` and all its descendants."""
    import psutil  # a DeepSpeed dependency

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


# ------------------------------------------------------------------------------------------------
# What was measured, on what


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def versions(packages: tuple[str, ...] = ("torch", "deepspeed", "transformers")) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# Bench code that bigtrain's jobs execute: the launch script registering the spike benchmark's
# competitor monitors and its modadd task (bench/bench_entry.py), and those plug-ins.
PLUGINS = ("bench/bench_entry.py", "bench/competitors.py", "bench/modadd.py")


# Bench code that decides what the runs do without being executed by the jobs: the spike benchmark's
# scenarios, policies and restart rules, and the launcher they go through.
DRIVERS = ("bench/spike_bench.py", "bench/harness.py")


CODE = ("bigtrain", "ds_configs", *PLUGINS, *DRIVERS)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def code_version(paths: tuple[str, ...] = CODE) -> tuple[str, bool]:
    """The commit that last changed ``paths`` (by default the code the spike benchmark's runs depend
    on: bigtrain/, ds_configs/, the bench plug-ins and drivers) along the first-parent line to HEAD,
    12 hex digits, and whether the checkout's files under ``paths`` differ from HEAD's (changed or new
    files). A commit of results or docs alone leaves the commit as it was, so invocations spread over
    sessions, with their results committed in between, still name one commit. "unknown" outside git
    or when no commit touched ``paths``; " (shallow clone)" is appended where the history is cut, since
    the boundary commit then counts as changing every file."""
    try:
        full = _git("rev-list", "-1", "--first-parent", "HEAD", "--", *paths)  # plumbing: no user log config
        commit = _git("rev-parse", "--short=12", full) if full else "unknown"
        if _git("rev-parse", "--is-shallow-repository") == "true":
            commit += " (shallow clone)"
        dirty = _git("status", "--porcelain", "--untracked-files=all", "--", *paths) != ""
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, dirty


def code_sha256(paths: tuple[str, ...] = CODE) -> str:
    """Hash of the files under ``paths`` as they are on disk (tracked and untracked, git's ignores
    left out; names included), so a change in the middle of a benchmark is noticed. Outside git:
    bigtrain/**/*.py, ds_configs/*.json and the bench code by glob."""
    try:
        # -z: names as they are (git quotes non-ASCII names otherwise, and a quoted name is no file)
        names = sorted(set(_git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths)
                           .split("\0")) - {""})
        files = [REPO / n for n in names if (REPO / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = sorted([*REPO.glob("bigtrain/**/*.py"), *REPO.glob("ds_configs/*.json"),
                        *(REPO / f for f in (*PLUGINS, *DRIVERS))])
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment() -> dict[str, str]:
    """The machine, library versions and code of a benchmark, as one flat record."""
    commit, dirty = code_version()
    return {"python": platform.python_version(), **versions(), "cpu": cpu_model(), "cores": str(os.cpu_count()),
            "os": platform.platform(), "bigtrain": commit + (" + uncommitted changes in bigtrain/, ds_configs/ or the bench code" if dirty else ""),
            "code_sha256": code_sha256()}
