"""Checkpoints that exist only when complete, plus a ring of fast snapshots for rollback.

Layout of one checkpoint (durable: RUN_DIR/checkpoints/step_00000100; snapshot: SNAP_DIR/step_00000100):
  DeepSpeed's files (model states, ZeRO optimizer partitions)
  bigtrain_state.json   TrainState (JSON, not pickle: bigtrain's own state executes nothing on load)
  rng_rank{R}.json      every rank's RNG states
  hf/                   model config + tokenizer (what `bigtrain export` needs)
  COMPLETE              manifest (file sizes), written by rank 0 last, after a barrier: only a directory
                        with this marker is a checkpoint. DeepSpeed's own `latest` is written before its
                        final barrier and is not proof of completeness.

Every save and load here is collective: all ranks must call it (DeepSpeed's save hangs if rank 0
calls it alone).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("bigtrain")

MARKER = "COMPLETE"
STATE_FILE = "bigtrain_state.json"


@dataclass
class TrainState:
    """Everything a restart needs besides DeepSpeed's own state (nanochat's loop_state)."""

    step: int = 0
    """Optimizer steps completed (including steps DeepSpeed skipped on overflow)."""
    cursor: int = 0
    """Stream index of the next sample (see bigtrain.sampler): the data position."""
    tokens: int = 0
    """Training tokens consumed."""
    skipped: list[list[int]] = field(default_factory=list)
    """Half-open stream ranges never to be trained on: written by bigtrain <= 0.1 only (they do not hold
    across epochs); still honoured when such a checkpoint is resumed."""
    skipped_samples: list[int] = field(default_factory=list)
    """Sample ids never to be trained on, in any epoch (spike recovery; see bigtrain.sampler.SkipSet)."""
    skipped_docs: list[int] = field(default_factory=list)
    """Document indices judged bad; every block of theirs is in ``skipped_samples``."""
    eps: float = 1e-8
    lr_scale: float = 1.0
    """LR multiplier set by the last rollback; see ``spike.lr_cooldown_steps``."""
    lr_scale_step: int = 0
    """Step at which ``lr_scale`` was set (the restored step): the cool-down starts there."""
    beta2: float = 0.95
    monitor: dict = field(default_factory=dict)
    escalation: dict = field(default_factory=dict)
    ds_skipped_steps: int = 0
    """Steps DeepSpeed skipped (fp16 overflow, bf16 non-finite gradients)."""
    rollbacks: int = 0
    wasted_steps: int = 0
    """Optimizer steps thrown away by rollbacks."""
    executed_steps: int = 0
    """Optimizer steps executed, including thrown-away ones."""
    poisoned: list[list[int]] = field(default_factory=list)
    """Fault injection: half-open sample-id ranges whose blocks are garbage (bad data stays bad)."""
    poisoned_docs: list[int] = field(default_factory=list)
    """Fault injection: the documents made garbage (ground truth for the quarantine's precision)."""
    faults_fired: list[str] = field(default_factory=list)
    fingerprint: str = ""
    world_size: int = 1
    zero_stage: int = 0
    config: dict = field(default_factory=dict)

    # Fields that survive a rollback: what was learned about the run, not the model's state.
    PERSISTENT = ("skipped", "skipped_samples", "skipped_docs", "poisoned_docs", "eps", "lr_scale", "lr_scale_step", "beta2", "escalation", "ds_skipped_steps", "rollbacks",
                  "wasted_steps", "executed_steps", "poisoned", "faults_fired")

    def advance(self, cursor: int, tokens: int, applied: bool) -> None:
        """One optimizer step done (or skipped by DeepSpeed, which is counted and logged)."""
        self.step += 1
        self.executed_steps += 1
        self.cursor, self.tokens = cursor, self.tokens + tokens
        if not applied:
            self.ds_skipped_steps += 1
            log.warning("step %d: DeepSpeed skipped the update (overflow / non-finite gradients); %d so far",
                        self.step, self.ds_skipped_steps)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        return cls(**data)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    state = {"torch": _encode(torch.get_rng_state()), "python": repr(random.getstate()),
             "numpy": repr(np.random.get_state(legacy=True)[1].tolist()), "numpy_pos": np.random.get_state()[2]}
    if torch.cuda.is_available():
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(_decode(state["torch"]))
    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys = np.array(ast.literal_eval(state["numpy"]), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step_") and is_complete(p)),
                  key=lambda p: p.name)


def verify(path: Path) -> str | None:
    """None if every file the manifest lists is there with its recorded size; else what is wrong.
    Catches truncated files and files lost after the save (a torn copy, a half-synced disk)."""
    try:
        manifest = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable {MARKER} manifest ({exc})"
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size} (truncated or corrupted)"
    return None


def _manifest(path: Path, step: int) -> str:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != MARKER and ".tmp" not in p.name}
    return json.dumps({"step": step, "time": time.time(), "files": files}, indent=1)


def resolve_resume(arg: str, root: Path) -> Path | None:
    """``auto`` -> the newest complete checkpoint under root that verifies (None if there is none;
    corrupted ones are reported and passed over); else the given path, which must verify."""
    if arg == "auto":
        for path in reversed(complete_checkpoints(root)):
            problem = verify(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
        return None
    path = Path(arg)
    if not path.is_dir() or not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume {arg}: not a bigtrain checkpoint directory (no {STATE_FILE}); "
                         f"use --resume auto or a path like {root}/step_00000100")
    if not is_complete(path):
        raise ValueError(f"--resume {arg}: checkpoint is incomplete (no {MARKER} marker; the save was "
                         "interrupted): pick an older one or use --resume auto")
    problem = verify(path)
    if problem is not None:
        raise ValueError(f"--resume {arg}: checkpoint is corrupted: {problem}. Use an older one or --resume auto")
    return path


class CheckpointError(RuntimeError):
    """A save failed on some rank (disk full, permissions). The previous checkpoints are intact."""


def all_ok(ok: bool) -> bool:
    """Collective AND of a per-rank flag, so a failure on one rank stops every rank the same way."""
    if not dist.is_initialized():
        return ok
    from deepspeed.accelerator import get_accelerator

    # On the accelerator: NCCL reduces only device tensors.
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=get_accelerator().current_device_name())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class CheckpointStore:
    """One directory of checkpoints with a keep-K policy. Used for durable checkpoints and for the
    snapshot ring alike; ``saved`` (steps, same on every rank) is the rollback catalogue, so no rank
    ever decides from a directory listing another rank may be pruning."""

    def __init__(self, root: Path, keep: int, hf_files: dict[str, Any] | None = None):
        self.root = root
        self.keep = keep
        self.hf_files = hf_files or {}
        saved = [[int(p.name[5:]) for p in complete_checkpoints(root)]]
        if dist.is_initialized():  # rank 0's listing for all: the catalogue must be identical everywhere
            dist.broadcast_object_list(saved, src=0)
        self.saved: list[int] = saved[0]

    def save(self, engine, state: TrainState) -> Path:
        tag = tag_for(state.step)
        path = self.root / tag
        rank = _rank()
        # Collective: one rank seeing a stale complete directory must not send it down another path.
        complete = all_ok(is_complete(path))  # also: every rank has looked before rank 0 touches it
        if complete:
            # Steps are deterministic and newer checkpoints are dropped on rollback, so a complete
            # checkpoint of this step holds this engine state: refresh only bigtrain's state (skip list,
            # eps, ...). Never delete a complete checkpoint to rewrite it.
            if rank == 0:
                _atomic_write(path / STATE_FILE, json.dumps(state.to_json()))
                _atomic_write(path / MARKER, _manifest(path, state.step))
            _barrier()
            return path
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an incomplete leftover of an interrupted save of the same step
                shutil.rmtree(path)
        _barrier()
        error = None
        try:
            # Collective: every rank writes its partition.
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"bigtrain_step": state.step},
                                   save_latest=False)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
            # DeepSpeed's save ends with a barrier that the other ranks are waiting in: meet them
            # there (deepspeed 0.19 runtime/engine.py save_checkpoint), then fail together below.
            error = exc
            _barrier()
        try:
            if error is None:
                _atomic_write(path / f"rng_rank{rank}.json", json.dumps(rng_state()))
                if rank == 0:
                    _atomic_write(path / STATE_FILE, json.dumps(state.to_json()))
                    for name, writer in self.hf_files.items():
                        writer(path / name)
        except OSError as exc:
            error = exc
        # Every rank has written (or failed): now, and only now, the checkpoint may exist.
        if not all_ok(error is None):
            previous = self.saved[-1] if self.saved else None
            where = f"{self.root / tag_for(previous)} is intact" if previous is not None else "none was saved before"
            free = shutil.disk_usage(self.root).free / 2**20
            raise CheckpointError(
                f"saving checkpoint {path} failed ({error or 'on another rank'}; {free:.1f} MiB free on that "
                f"disk); it is incomplete and will never be loaded. The previous complete checkpoint {where}: "
                "free space (or fix the directory) and continue with --resume auto") from error
        if rank == 0:
            _atomic_write(path / MARKER, _manifest(path, state.step))
        self.saved = sorted(set(self.saved) | {state.step})
        self._prune()
        _barrier()
        return path

    def _prune(self) -> None:
        """Delete the oldest complete checkpoints beyond ``keep`` (a newer one is complete by now), and
        incomplete leftovers older than the newest complete one."""
        drop, self.saved = self.saved[:-self.keep], self.saved[-self.keep:]
        if _rank() != 0:
            return
        for step in drop:
            shutil.rmtree(self.root / tag_for(step), ignore_errors=True)
        newest = self.saved[-1]
        for p in self.root.glob("step_*"):
            if not is_complete(p) and p.name < tag_for(newest):
                shutil.rmtree(p, ignore_errors=True)

    def latest_before(self, step: int) -> int | None:
        """Newest saved step strictly before ``step`` (a rollback target must predate the onset)."""
        older = [s for s in self.saved if s < step]
        return older[-1] if older else None

    def drop_after(self, step: int) -> None:
        """Forget (and delete) checkpoints newer than ``step``: after a rollback they hold the spike."""
        newer = [s for s in self.saved if s > step]
        self.saved = [s for s in self.saved if s <= step]
        if _rank() == 0:
            for s in newer:
                shutil.rmtree(self.root / tag_for(s), ignore_errors=True)


def load(engine, path: Path) -> TrainState:
    """Collective load of DeepSpeed state + this rank's RNG; returns the saved TrainState. The caller
    must re-apply eps/betas/lr afterwards (DeepSpeed's load restores the saved ones)."""
    rank = _rank()
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
    if load_path is None:  # DeepSpeed returns (None, ...) on failure instead of raising
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return TrainState.from_json(json.loads((path / STATE_FILE).read_text()))


def read_state(path: Path) -> TrainState:
    return TrainState.from_json(json.loads((path / STATE_FILE).read_text()))
