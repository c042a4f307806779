"""Process-group set-up for every launcher (plain python, torchrun, deepspeed, SLURM) and rank-0 logging."""

from __future__ import annotations

import logging
import os
import socket
import sys

import torch.distributed as dist

log = logging.getLogger("bigtrain")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group; returns (rank, world_size, local_world_size).

    torchrun and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_ADDR; under plain ``srun`` we map
    SLURM's variables; a plain process becomes a group of one on a free local port.
    """
    import deepspeed

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise RuntimeError("under srun set MASTER_ADDR to the first node's hostname (launch/slurm.sbatch does)")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not dist.is_initialized() and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_elastic_round(env)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
    world = dist.get_world_size()
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    return dist.get_rank(), world, local_world


def _init_elastic_round(env) -> None:
    """Join the process group through torchrun's agent store under a per-round key prefix.

    After torchrun restarts its workers (--max-restarts), the agent's store still holds the dead
    round's keys, and with torch 2.13 + gloo the new workers read a dead peer's address and fail
    ("Gloo connectFullMesh failed ... Connection refused"; cf. pytorch#167288). A store counter that
    every joining worker increments gives all ranks, on all nodes, the same fresh round number.
    """
    from datetime import timedelta

    from deepspeed.accelerator import get_accelerator

    world = int(env["WORLD_SIZE"])
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(minutes=10))
    joined = base.add("bigtrain/joined", 1)  # atomic: 1..world in round 0, world+1..2*world in round 1, ...
    store = dist.PrefixStore(f"bigtrain/round{(joined - 1) // world}", base)
    dist.init_process_group(get_accelerator().communication_backend_name(), store=store,
                            rank=int(env["RANK"]), world_size=world)


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
