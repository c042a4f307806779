"""Process-group set-up for every launcher (plain python, torchrun, deepspeed, SLURM) and rank-0 logging."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import warnings

import torch.distributed as dist

log = logging.getLogger("bigtrain")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group; returns (rank, world_size, local_world_size).

    torchrun and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_ADDR; under plain ``srun`` we map
    SLURM's variables; a plain process becomes a group of one on a free local port. The accelerator
    device ``LOCAL_RANK`` is selected before the group exists, so no collective (bigtrain's first is a
    ``broadcast_object_list`` in ``prepare_run_dir``) ever runs with every local rank on device 0:
    NCCL refuses two ranks on one GPU, and object tensors go to the *current* device.
    """
    quiet_libraries()
    warn_stale_extension_locks()
    import deepspeed

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        map_slurm_env(env)
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    index = select_device(local_rank)
    if index != local_rank:
        # DeepSpeed's engine selects cuda:LOCAL_RANK again (engine.py _configure_with_arguments /
        # _set_distributed_vars): it must name the visible device. The node-local role stays here.
        env["BIGTRAIN_NODE_LOCAL_RANK"] = str(local_rank)
        env["LOCAL_RANK"] = str(index)
    if not dist.is_initialized() and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_elastic_round(env)
    # Also after the elastic join: DeepSpeed's comm layer must know the group before zero.Init (under
    # ZeRO-3 the model is built before deepspeed.initialize), or it sizes batches for a world of 1.
    with _without_line(_SHM_BUILT):
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
    world = dist.get_world_size()
    # torchrun: LOCAL_WORLD_SIZE; deepspeed launcher: LOCAL_SIZE; srun: mapped by map_slurm_env.
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    return dist.get_rank(), world, local_world


def quiet_libraries() -> None:
    """Silence, at the source, what the libraries say on every rank that no user can act on; called
    before DeepSpeed is imported (it warns at import). Each filter names one message: every other
    warning still shows."""
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        # torch's CPU build can use no other device: DeepSpeed's "Setting accelerator to CPU. If you
        # have GPU ..., we were unable to detect it" tells nothing (a CUDA build on a machine without
        # a GPU still shows it: there it may be news).
        logging.getLogger("DeepSpeed").addFilter(_not_cpu_fallback)
    # DeepSpeed's ZeRO gathers call the deprecated name; torch warns on every rank and the fix is DeepSpeed's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning, module=r"torch\.distributed\.c10d_logger")


def extension_root() -> str:
    """Where torch JIT-builds extensions (DeepSpeed's ops): TORCH_EXTENSIONS_DIR or torch's cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


STALE_LOCK_SECONDS = 600


def stale_extension_locks(root: str, now: float | None = None, older_than: float = STALE_LOCK_SECONDS) -> list[str]:
    """Lock files under ``root`` older than ``older_than`` seconds. torch's JIT build takes
    ``<build dir>/lock`` in every process that loads an op (also when the op is cached: ninja checks it
    under the lock) and removes it in a ``finally``; a process killed inside that window (SIGKILL, or a
    SIGTERM before bigtrain's handler is installed) leaves it, and every later process that loads the op
    waits for it to go, forever and silently (torch/utils/file_baton.py FileBaton.wait)."""
    import glob
    import time

    now = time.time() if now is None else now
    found = []
    for lock in glob.glob(os.path.join(glob.escape(root), "*", "lock")) + \
            glob.glob(os.path.join(glob.escape(root), "*", "*", "lock")):
        try:
            if now - os.path.getmtime(lock) > older_than:
                found.append(lock)
        except OSError:  # released meanwhile
            pass
    return sorted(found)


def warn_stale_extension_locks() -> None:
    """Say so (node-local rank 0, on stderr, before the wait that would otherwise hang unexplained)."""
    if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) != "0":
        return
    for lock in stale_extension_locks(extension_root()):
        print(f"bigtrain: WARNING {lock} is more than {STALE_LOCK_SECONDS // 60} minutes old: a process "
              "was killed while building or loading that op, and every process that loads it now waits for "
              f"this file to go, forever. If no build is running on any machine sharing this directory, delete it: rm {lock}",
              file=sys.stderr, flush=True)


def load_comm_op() -> None:
    """Build (or check the cached build of) DeepSpeed's CPU shared-memory comm op, after naming any stale
    lock that would make it wait forever: ``make install`` and the test session call it, so the op is
    not built inside the first run's ranks. A no-op where the accelerator has no such op."""
    warn_stale_extension_locks()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()


def _not_cpu_fallback(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU.")


# DeepSpeed prints it on every rank at every start, also when it loads its cached build
# (deepspeed/comm/torch.py build_shm_op).
_SHM_BUILT = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"


@contextlib.contextmanager
def _without_line(line: str):
    """Pass on what the block prints to stdout as it comes, line by line, less the lines equal to
    ``line``: a rendezvous that hangs inside the block still shows what it printed."""
    real = sys.stdout

    class Filter(io.TextIOBase):
        def __init__(self):
            self.partial = ""

        def write(self, s: str) -> int:
            *whole, self.partial = (self.partial + s).split("\n")
            for kept in whole:
                if kept != line:
                    real.write(kept + "\n")
            real.flush()
            return len(s)

    out = Filter()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        if out.partial and out.partial != line:
            real.write(out.partial)


def select_device(local_rank: int) -> int:
    """``cuda:LOCAL_RANK`` (through DeepSpeed's accelerator, so other accelerators work too) as this
    process's current device (a no-op on CPU); returns the device index used."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    index = device_index(local_rank, acc.device_count() if acc.device_name() != "cpu" else 0)
    acc.set_device(index)
    return index


def node_local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK may have been mapped to a device index)."""
    return int(os.environ.get("BIGTRAIN_NODE_LOCAL_RANK", os.environ.get("LOCAL_RANK", "0")))


def device_index(local_rank: int, visible: int) -> int:
    """This local rank's device among the ``visible`` ones (0: no accelerator to count). Under srun
    with ``--gpus-per-task=1`` (or GPUs bound per task by cgroups) each task sees only its own GPU, as
    device 0, while SLURM_LOCALID still counts 0..7: ``set_device(LOCAL_RANK)`` would fail with
    "invalid device ordinal" on every task but the first of each node."""
    if visible <= 0 or local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(f"LOCAL_RANK={local_rank} but this process sees only {visible} devices: start one rank per "
                       "visible device (srun --ntasks-per-node=<GPUs per node>, or --gpus-per-task=1)")


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's task count from SLURM_TASKS_PER_NODE, e.g. ``"4(x2),3"`` = 4, 4, 3 on nodes 0, 1, 2."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        n, _, times = part.partition("(x")
        counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
    if not 0 <= node_id < len(counts):
        raise RuntimeError(f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def map_slurm_env(env) -> None:
    """torch's variables from plain ``srun``'s. LOCAL_WORLD_SIZE matters: it tells whether every rank
    is on this node (node-local /dev/shm snapshots are only usable then)."""
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "SLURM_NTASKS_PER_NODE" in env:  # set when --ntasks-per-node was given
        env["LOCAL_WORLD_SIZE"] = env["SLURM_NTASKS_PER_NODE"]
    elif "SLURM_TASKS_PER_NODE" in env:  # always set by srun
        env["LOCAL_WORLD_SIZE"] = str(slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"],
                                                          int(env.get("SLURM_NODEID", "0"))))
    else:
        raise RuntimeError("under srun neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set: "
                           "launch with srun --ntasks-per-node=N (launch/slurm.sbatch does)")
    env.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in env:
        raise RuntimeError("under srun set MASTER_ADDR to the first node's hostname (launch/slurm.sbatch does)")


def _init_elastic_round(env) -> None:
    """Join the process group through torchrun's agent store under a per-round key prefix.

    After torchrun restarts its workers (--max-restarts), the agent's store still holds the dead
    round's keys, and with torch 2.13 + gloo the new workers read a dead peer's address and fail
    ("Gloo connectFullMesh failed ... Connection refused"; cf. pytorch#167288). The round is
    torchrun's TORCHELASTIC_RESTART_COUNT, which the agents set identically for every worker of a
    round on every node. A store counter incremented by each joining worker is not safe: a worker that
    dies before joining (import error, CUDA init) leaves it off a multiple of the world size, and every
    later round splits its ranks across two prefixes and hangs until the store timeout.
    """
    from datetime import timedelta

    from deepspeed.accelerator import get_accelerator

    world = int(env["WORLD_SIZE"])
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(minutes=10))
    store = dist.PrefixStore(elastic_prefix(env), base)
    dist.init_process_group(get_accelerator().communication_backend_name(), store=store,
                            rank=int(env["RANK"]), world_size=world)


def elastic_prefix(env) -> str:
    """The store prefix of this elastic round: the same for every worker of the round."""
    return f"bigtrain/round{int(env.get('TORCHELASTIC_RESTART_COUNT', '0'))}"


def shutdown(barrier: bool) -> None:
    """Destroy the process group before the interpreter exits. Left to finalization, gloo's worker
    threads can outlive the interpreter and abort the process ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#190489): seen on one rank at the end of a finished run in CI.
    ``barrier``: every rank got here on the same path, so wait for the others first (a rank that
    leaves early must not close connections the others still use)."""
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def setup_logging(rank: int) -> None:
    """INFO from rank 0, warnings from every rank (OLMo-core's filter): handled once, here."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [bigtrain r{rank}] %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
