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
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("bigtrain")

MARKER = "COMPLETE"
STATE_FILE = "bigtrain_state.json"
INCOMING = "incoming-"  # a save in progress: complete only once renamed to step_*
REPLACED = "replaced-"  # the checkpoint being replaced, for the moment between two renames
TRASH = "trash-"  # a directory renamed out of the way, being deleted in the background


@dataclass
class Progress:
    """How far the model got: what a rollback restores (with the model and optimizer state)."""

    step: int = 0
    """Optimizer steps completed (including steps DeepSpeed skipped on overflow)."""
    cursor: int = 0
    """Stream index of the next sample (see bigtrain.sampler): the data position."""
    tokens: int = 0
    """Training tokens consumed."""
    monitor: dict = field(default_factory=dict)
    """The spike monitor's statistics at this step."""


@dataclass
class History:
    """What was learned about the run: survives a rollback (a rollback must not forget what it skips,
    how it changed the optimizer, or the compute it threw away)."""

    skipped: list[list[int]] = field(default_factory=list)
    """Half-open stream ranges skipped once: the window of an optimizer rollback, or of a data rollback
    that repeats one in its region (samples passed over to move the model past the region, mostly
    good ones, so they come back in later epochs). Checkpoints of
    bigtrain <= 0.1 hold every skip in this form; they are honoured as they are (not converted to ids)."""
    skipped_samples: list[int] = field(default_factory=list)
    """Sample ids never to be trained on, in any epoch (spike recovery; see bigtrain.sampler.SkipSet)."""
    manual_skips: list[list[int]] = field(default_factory=list)
    """``train.skip_steps`` ranges already applied (their stream ranges are in ``skipped``)."""
    skipped_docs: list[int] = field(default_factory=list)
    """Document indices judged bad; every block of theirs is in ``skipped_samples``."""
    eps: float = 1e-8
    lr_scale: float = 1.0
    """LR multiplier set by the last rollback; see ``spike.lr_cooldown_steps``."""
    lr_scale_step: int = 0
    """Step at which ``lr_scale`` was set (the restored step): the cool-down starts there."""
    beta2: float = 0.95
    escalation: dict = field(default_factory=dict)
    ds_skipped_steps: int = 0
    """Steps DeepSpeed skipped (fp16 overflow, bf16 non-finite gradients)."""
    rollbacks: int = 0
    screens: int = 0
    """Steps whose noise screen skipped something (bigtrain.recovery.screen)."""
    screened_blocks: int = 0
    """Blocks the noise screens skipped (held to ``spike.noise_max_total_blocks``)."""
    wasted_steps: int = 0
    """Optimizer steps thrown away by rollbacks."""
    executed_steps: int = 0
    """Optimizer steps executed, including thrown-away ones."""
    faults: dict = field(default_factory=dict)
    """Fault injection's own state (bigtrain.faults.FaultInjector.state_dict): what fired, what is poisoned."""


# Fault-injection fields of checkpoints written before they moved into History.faults.
_LEGACY_FAULT_KEYS = {"poisoned": "poisoned", "poisoned_docs": "poisoned_docs", "faults_fired": "fired"}


@dataclass
class TrainState:
    """Everything a restart needs besides DeepSpeed's own state (nanochat's loop_state): the model's
    ``progress`` (a rollback restores it: ``state.progress = old.progress``), the run's ``history``
    (kept across a rollback), and the run's identity. Saved as one flat JSON object."""

    progress: Progress = field(default_factory=Progress)
    history: History = field(default_factory=History)
    fingerprint: str = ""
    world_size: int = 1
    zero_stage: int = 0
    config: dict = field(default_factory=dict)

    def advance(self, cursor: int, tokens: int, applied: bool) -> None:
        """One optimizer step done (or skipped by DeepSpeed, which is counted and logged)."""
        p, h = self.progress, self.history
        p.step += 1
        h.executed_steps += 1
        p.cursor, p.tokens = cursor, p.tokens + tokens
        if not applied:
            h.ds_skipped_steps += 1
            log.warning("step %d: DeepSpeed skipped the update (overflow / non-finite gradients); %d so far",
                        p.step, h.ds_skipped_steps)

    def to_json(self) -> dict[str, Any]:
        identity = {k: v for k, v in asdict(self).items() if k not in ("progress", "history")}
        return {**asdict(self.progress), **asdict(self.history), **identity}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        data = dict(data)
        legacy = {new: data.pop(old) for old, new in _LEGACY_FAULT_KEYS.items() if old in data}
        if legacy and not data.get("faults"):
            data["faults"] = legacy
        parts = {}
        for name, part in (("progress", Progress), ("history", History)):
            keys = {f.name for f in fields(part)}
            parts[name] = part(**{k: data.pop(k) for k in list(data) if k in keys})
        return cls(**parts, **data)


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


_discards: list[threading.Thread] = []


def _delete_in_background(path: Path) -> None:
    thread = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, daemon=True,
                              name="bigtrain-discard")
    thread.start()
    _discards.append(thread)


def _discard(path: Path) -> None:
    """Remove a checkpoint directory without making the ranks wait for it: one rename out of the way
    (O(1) on any filesystem), then deletion in a background thread. A 70B checkpoint is ~1 TB in
    thousands of files, minutes of unlinks on a shared filesystem, which rank 0 used to do while every
    other rank waited in the save's closing barrier. A kill mid-deletion leaves a ``trash-*``
    directory, which the next start removes (``finish_swaps``)."""
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return
    _delete_in_background(trash)


def wait_for_discards() -> None:
    """Join the background deletions (at the end of a run, so no trash outlives it)."""
    while _discards:
        _discards.pop().join()


def _swap_in(incoming: Path, path: Path) -> None:
    """Rename a complete ``incoming`` into ``path``, replacing what is there. Two renames (atomic
    each, O(1) on a shared filesystem whatever the checkpoint size): if the process dies between
    them, ``finish_swaps`` completes the swap on the next start, so a complete copy always exists."""
    aside = path.with_name(REPLACED + path.name)
    if path.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(path, aside)
    os.rename(incoming, path)
    _discard(aside)


def finish_swaps(root: Path) -> None:
    """Rank 0, before anyone lists ``root``: finish a swap a crash interrupted (a complete
    ``incoming-`` whose target is gone is renamed into place; otherwise the replaced copy goes back),
    and drop save leftovers that never completed."""
    if not root.is_dir():
        return
    for incoming in root.glob(INCOMING + "step_*"):
        path = root / incoming.name[len(INCOMING):]
        if not path.exists() and is_complete(incoming):
            log.warning("finishing the interrupted replacement of %s", path)
            os.rename(incoming, path)
        else:
            shutil.rmtree(incoming, ignore_errors=True)
    for aside in root.glob(REPLACED + "step_*"):
        path = root / aside.name[len(REPLACED):]
        if not path.exists():
            os.rename(aside, path)
        else:
            _discard(aside)
    for trash in root.glob(TRASH + "*"):  # deletions a killed process left unfinished
        _delete_in_background(trash)


def set_aside_newer(root: Path, step: int, why: str = "") -> Path | None:
    """Rank 0, on resume from ``step`` (or on giving up, back to the last healthy ``step``): move every
    checkpoint of ``root`` newer than ``step`` into ``root/abandoned-<time>/``. They belong to a
    timeline that is abandoned (a later save of the same step must not meet them, and ``--resume auto``
    must not pick them); kept, not deleted, so a person can still go back to them. Returns the folder,
    or None when there was nothing to move."""
    newer = [p for p in root.glob("step_*") if p.is_dir() and int(p.name[5:]) > step] if root.is_dir() else []
    if not newer:
        return None
    dest = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-from-{tag_for(step)}"
    dest.mkdir(exist_ok=True)
    for p in sorted(newer):
        os.rename(p, dest / p.name)
    log.warning("%s: moved the %d newer checkpoint(s) of the abandoned timeline (%s) to %s",
                why or f"resuming from step {step}", len(newer), ", ".join(p.name for p in sorted(newer)), dest)
    return dest


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


class HostBuffers:
    """Host buffers reused from one snapshot to the next (one snapshot's worth, kept by the store).
    A fresh allocation costs page faults and zeroing as large as the copy itself (on a CPU box that is
    most of a torch.save into tmpfs); a reused, already-mapped buffer costs only the memcpy. Device
    tensors get pinned buffers, so their copies can run asynchronously on the stream."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lock = threading.Lock()  # taken by the loop's thread, given back by the writer's

    def take(self, t: torch.Tensor) -> torch.Tensor:
        pinned = t.device.type == "cuda"
        with self.lock:
            bufs = self.free.get((t.dtype, tuple(t.shape), pinned))
            if bufs:
                return bufs.pop()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)

    def give_back(self, bufs: list[torch.Tensor]) -> None:
        with self.lock:
            for b in bufs:
                self.free.setdefault((b.dtype, tuple(b.shape), b.is_pinned()), []).append(b)


def _host_copy(obj: Any, copies: dict[int, torch.Tensor], buffers: HostBuffers) -> None:
    """Fill ``copies`` (id -> host copy) for every tensor in the containers of ``obj``. A tensor object
    met twice is copied once, so the copy keeps that aliasing (DeepSpeed's module state dict hands tied
    weights over as separate detached tensors, which are copied, and written, once each). Device tensors:
    a D2H copy into pinned memory, ordered on the current stream (the optimizer's next in-place update,
    on the same stream, runs after it); host tensors: a memcpy (the next step mutates them in place)."""
    if torch.is_tensor(obj):
        if id(obj) not in copies:
            t = obj.detach()
            if t.device.type not in ("cpu", "cuda"):
                copies[id(obj)] = t.to("cpu", copy=True)  # synchronous: no pinned memory to order it
            else:
                host = buffers.take(t)
                host.copy_(t, non_blocking=t.device.type == "cuda")
                copies[id(obj)] = host
    elif isinstance(obj, dict):
        for v in obj.values():
            _host_copy(v, copies, buffers)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _host_copy(v, copies, buffers)


class SnapshotEngine:
    """DeepSpeed checkpoint engine for snapshots (duck-typed like deepspeed 0.19's
    runtime/checkpoint_engine/checkpoint_engine.py CheckpointEngine): ``save`` makes a private host
    copy of the state dict and queues it; ``write`` (the background thread) ``torch.save``s the copies.
    The copy is the only part the training loop waits for. DeepSpeed's own engines do not fit here:
    the decoupled one hands the live tensors to a process (the optimizer mutates them while it writes,
    a torn snapshot) and needs the aio op; the torch one writes synchronously."""

    name = "bigtrain-snapshot"

    def __init__(self, zipfile_serialization: bool = False, buffers: HostBuffers | None = None):
        self.zipfile_serialization = zipfile_serialization
        self.buffers = buffers or HostBuffers()
        self.cancelled = False  # set by CheckpointStore.abandon: stop after the file in progress
        self.jobs: list[tuple[Any, str, list[torch.Tensor]]] = []

    # CheckpointEngine's interface, as DeepSpeed's save_checkpoint calls it.
    def create(self, info) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        import copy

        copies: dict[int, torch.Tensor] = {}
        _host_copy(state_dict, copies, self.buffers)
        # deepcopy for the rest (param groups, ds_config, scalars): small, and the originals may change
        # at the next step. The tensors come from ``copies`` through deepcopy's memo.
        memo: dict[int, Any] = dict(copies)
        memo[id(memo)] = [state_dict]  # keep the originals alive while the memo refers to their ids
        self.jobs.append((copy.deepcopy(state_dict, memo), path, list(copies.values())))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed would clone once more (on the device) before handing us the state

    def cleanup(self) -> None:
        pass

    def write(self) -> None:
        """Background thread: write every queued copy, in order; drop each as soon as it is written."""
        while self.jobs and not self.cancelled:
            state_dict, path, bufs = self.jobs.pop(0)
            torch.save(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            del state_dict
            self.buffers.give_back(bufs)  # only once written: the next snapshot overwrites them


class PendingSnapshot:
    """A snapshot whose files are being written by this rank's background thread. Not a rollback
    target (not in ``CheckpointStore.saved``, no marker) until ``CheckpointStore.finish``."""

    def __init__(self, step: int, incoming: Path, path: Path, writer: SnapshotEngine, done_event):
        self.step, self.incoming, self.path, self.writer = step, incoming, path, writer
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done_event = done_event  # device work (the D2H copies) the writer must wait for
        self.thread = threading.Thread(target=self._run, name=f"snapshot-{step}")
        # Not a daemon: at exit the interpreter waits for the write to end before the atexit handlers
        # (snapshot.clean_on_exit) remove the directory, so no write races the removal.
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.done_event is not None:
                self.done_event.synchronize()
            self.writer.write()
        except BaseException as exc:  # noqa: BLE001 - reported on every rank by CheckpointStore.finish
            self.error = exc
        finally:
            self.writer.jobs.clear()
            self.seconds = time.perf_counter() - t0

    def join(self) -> BaseException | None:
        self.thread.join()
        return self.error


class CheckpointStore:
    """One directory of checkpoints with a keep-K policy. Used for durable checkpoints and for the
    snapshot ring alike; ``saved`` (steps, same on every rank) is the rollback catalogue, so no rank
    ever decides from a directory listing another rank may be pruning."""

    def __init__(self, root: Path, keep: int, hf_files: dict[str, Any] | None = None, log_saves: bool = False,
                 asynchronous: bool = False, interval: int = 0, timing_key: str = "checkpoint_seconds"):
        self.root = root
        self.keep = keep
        self.interval = interval  # maybe_save: every ``interval`` steps (0: never)
        self.timing_key = timing_key  # the metrics-row key of the loop's wait for one save
        self.hf_files = hf_files or {}
        self.log_saves = log_saves  # durable checkpoints: one INFO line per save (snapshots are too frequent)
        # Snapshots: the loop waits only for a host copy of the state; a background thread writes it and
        # the snapshot joins ``saved`` at the next ``finish`` (next save, a rollback, the end of the run).
        self.asynchronous = asynchronous
        self.pending: PendingSnapshot | None = None  # same on every rank (set and cleared collectively)
        self.last_write_seconds: float | None = None  # the last finished background write's duration
        self.buffers = HostBuffers()  # one snapshot's host copy, reused (RAM: 14 bytes/param of the rank's share)
        saved = [[int(p.name[5:]) for p in complete_checkpoints(root)]]
        if dist.is_initialized():  # rank 0's listing for all: the catalogue must be identical everywhere
            dist.broadcast_object_list(saved, src=0)
        self.saved: list[int] = saved[0]

    def maybe_save(self, step: int, save: Callable[["CheckpointStore"], Path], row: dict, allowed: bool = True,
                   final_step: int | None = None) -> Path | None:
        """Save through ``save(self)`` when ``step`` is a multiple of ``interval`` (and ``allowed``, and
        not ``final_step``, which the end of the run saves anyway). Times itself into ``row``: the
        loop's wait, and the previous background write's duration when one finished."""
        if not (self.interval and step % self.interval == 0 and allowed and step != final_step):
            return None
        t0 = time.perf_counter()
        path = save(self)
        row[self.timing_key] = round(time.perf_counter() - t0, 4)
        if self.last_write_seconds is not None:  # the previous snapshot's write, in the background
            row["snapshot_write_seconds"] = round(self.last_write_seconds, 4)
            self.last_write_seconds = None
        return path

    def remove(self, wait_for_discards_too: bool = False) -> None:
        """Delete the whole directory (rank 0; the others wait, collective): a snapshot ring at the start
        (an earlier, killed process's snapshots are not ours and must not count as used space) and at
        the end of a run. ``wait_for_discards_too`` (the end of a run only): rank 0 also waits, after the
        barrier, for the background deletions of pruned checkpoints, so no trash outlives a finished
        run. Never at the start: a requeued job's rank 0 would make every rank wait for a killed run's
        trash (a 70B checkpoint is ~1 TB of files)."""
        if _rank() == 0:
            shutil.rmtree(self.root, ignore_errors=True)
        _barrier()
        self.saved = []
        if wait_for_discards_too and _rank() == 0:
            wait_for_discards()

    def save(self, engine, state: TrainState) -> Path:
        """Write ``state`` and the engine's state as the checkpoint of its step, always in full.

        Written aside under ``incoming-<tag>`` and renamed into place once complete, so a directory
        named ``step_*`` is never half-written and an existing checkpoint of the same step (a stale
        one from an abandoned timeline, a torn one) is replaced only by a complete one. Never
        "refresh" a directory in place: steps are not deterministic in general (GPU kernels, a changed
        config), and recomputing a manifest over old files would launder a torn checkpoint."""
        self.finish()  # the previous snapshot's write, before anything here touches the directory
        tag = tag_for(state.progress.step)
        path, incoming = self.root / tag, self.root / f"{INCOMING}{tag}"
        rank, t0 = _rank(), time.perf_counter()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            _discard(incoming)  # a leftover of an interrupted save of the same step
        _barrier()
        error, copier = None, None
        if self.asynchronous:
            original = engine.checkpoint_engine
            copier = SnapshotEngine(bool(getattr(original, "zipfile_serialization", False)), self.buffers)
            engine.checkpoint_engine = copier  # read by DeepSpeed only inside save_checkpoint
        try:
            # Collective: every rank writes its partition (64 ranks: 64 files into one tag directory).
            # Asynchronous: every rank copies its partition to host memory; the files come later.
            engine.save_checkpoint(str(self.root), tag=incoming.name, client_state={"bigtrain_step": state.progress.step},
                                   save_latest=False)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
            # DeepSpeed's save ends with a barrier that the other ranks are waiting in: meet them
            # there (deepspeed 0.19 runtime/engine.py save_checkpoint), then fail together below.
            error = exc
            _barrier()
        finally:
            if copier is not None:
                engine.checkpoint_engine = original
        try:
            if error is None:
                _atomic_write(incoming / f"rng_rank{rank}.json", json.dumps(rng_state()))
                if rank == 0:
                    _atomic_write(incoming / STATE_FILE, json.dumps(state.to_json()))
                    for name, writer in self.hf_files.items():
                        writer(incoming / name)
        except OSError as exc:
            error = exc
        # Every rank has written (or failed): now, and only now, the checkpoint may exist.
        if not all_ok(error is None):
            self._fail(path, error)
        if copier is not None:
            # Device copies are ordered on the current stream; the writer waits for them (event), the
            # loop does not.
            event = None
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                event = torch.cuda.Event()
                event.record()
            self.pending = PendingSnapshot(state.progress.step, incoming, path, copier, event)
            return path
        self._complete(state.progress.step, incoming, path)
        if self.log_saves:
            log.info("checkpoint %s saved in %.1f s", path, time.perf_counter() - t0)
        return path

    def finish(self) -> None:
        """Collective: wait for the pending snapshot's write on this rank, agree that it succeeded on
        every rank, then (only then) mark it complete and make it a rollback target. A write that failed
        anywhere is removed and raised as CheckpointError on every rank. No-op when nothing is pending
        (on every rank alike: ``pending`` is set and cleared at the same collective points)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        error = pending.join()
        self.last_write_seconds = pending.seconds
        if not all_ok(error is None):
            if _rank() == 0:
                shutil.rmtree(pending.incoming, ignore_errors=True)
            self._fail(pending.path, error)
        self._complete(pending.step, pending.incoming, pending.path)

    def abandon(self) -> None:
        """The process is about to stop (a stop signal, a stop verdict): a pending snapshot is worthless
        after the exit, so its write ends after the file in progress instead of competing with the
        stop's durable save for the disk inside SLURM's warning window. Local, not collective: the
        snapshot is never marked complete, and the ring is removed at exit."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.writer.cancelled = True
            pending.join()

    def _fail(self, path: Path, error: BaseException | None) -> None:
        previous = self.saved[-1] if self.saved else None
        where = f"{self.root / tag_for(previous)} is intact" if previous is not None else "none was saved before"
        free = shutil.disk_usage(self.root).free / 2**20 if self.root.exists() else float("nan")
        raise CheckpointError(
            f"saving checkpoint {path} failed ({error or 'on another rank'}; {free:.1f} MiB free on that "
            f"disk); it is incomplete and will never be loaded. The previous complete checkpoint {where}: "
            "free space (or fix the directory) and continue with --resume auto") from error

    def _complete(self, step: int, incoming: Path, path: Path) -> None:
        """Every rank has written its files: marker (last), rename into place, catalogue, prune."""
        if _rank() == 0:
            _atomic_write(incoming / MARKER, _manifest(incoming, step))
            _swap_in(incoming, path)
        self.saved = sorted(set(self.saved) | {step})
        self._prune()
        _barrier()  # no rank returns (and may load or list) before the rename is done

    def _prune(self) -> None:
        """Delete the oldest complete checkpoints beyond ``keep`` (a newer one is complete by now), and
        incomplete leftovers older than the newest complete one."""
        drop, self.saved = self.saved[:-self.keep], self.saved[-self.keep:]
        if _rank() != 0:
            return
        for step in drop:
            _discard(self.root / tag_for(step))
        newest = self.saved[-1]
        for p in self.root.glob("step_*"):
            if not is_complete(p) and p.name < tag_for(newest):
                _discard(p)

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
                _discard(self.root / tag_for(s))


def load(engine, path: Path) -> TrainState:
    """Collective load of DeepSpeed state + this rank's RNG; returns the saved TrainState. The caller
    must re-apply eps/betas/lr afterwards (DeepSpeed's load restores the saved ones)."""
    rank = _rank()
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
    if load_path is None:  # DeepSpeed returns (None, ...) on failure instead of raising
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    _set_rng_from(path, rank)
    return TrainState.from_json(json.loads((path / STATE_FILE).read_text()))


def _set_rng_from(path: Path, rank: int) -> None:
    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.is_file():  # after a change of world size, new ranks keep their seeded state
        set_rng_state(json.loads(rng_file.read_text()))


UNIVERSAL = "universal"  # <checkpoints>/universal/<tag>: DeepSpeed universal conversions
SOURCE_FILE = "bigtrain_source.txt"  # in a conversion: the key of the checkpoint it was made from


def source_key(path: Path) -> str:
    """Identity of a complete checkpoint: the hash of its manifest (file sizes and save time). Two
    checkpoints of the same step from different timelines differ; a tag name alone does not."""
    return hashlib.sha256((path / MARKER).read_bytes()).hexdigest()[:32]


def checkpoint_bytes(path: Path) -> int:
    """Bytes of a complete checkpoint, from its manifest (no file is read)."""
    return sum(json.loads((path / MARKER).read_text()).get("files", {}).values())


def universal_for(path: Path, out_root: Path) -> Path | None:
    """The complete conversion of exactly this checkpoint under ``out_root``, else None."""
    out = out_root / path.name
    try:
        if is_complete(out) and (out / SOURCE_FILE).read_text() == source_key(path):
            return out
    except OSError:
        pass
    return None


def to_universal(path: Path, out_root: Path, workers: int = 4) -> Path:
    """Convert the ZeRO checkpoint at ``path`` with DeepSpeed's ``ds_to_universal`` (per parameter
    fp32 weights and Adam moments, independent of the number of ranks) into ``out_root/<tag>``;
    a complete conversion of this very checkpoint (same manifest) is reused, any other one replaced.
    Reads every partition once and writes ~12 bytes per parameter (7B: ~84 GB)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    done = universal_for(path, out_root)
    if done is not None:
        return done
    out = out_root / path.name
    if out.exists():
        shutil.rmtree(out)
    out_root.mkdir(parents=True, exist_ok=True)
    # inject_missing_state: bigtrain's models carry no universal-checkpoint metadata (plain data
    # parallelism, no tensor-parallel slices), which is what the injected default describes.
    args = argparse.Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    _atomic_write(out / SOURCE_FILE, source_key(path))
    _atomic_write(out / MARKER, _manifest(out, read_state(path).progress.step))  # last: marks it complete
    return out


def check_inline_conversion(path: Path, saved: TrainState, world: int, max_gb: float) -> None:
    """Refuse a resume (``saved``: the state at ``path``) on another number of ranks that would convert
    a checkpoint too large to convert while the other ranks wait in a collective. Reads only small files."""
    if saved.world_size == world or universal_for(path, path.parent / UNIVERSAL) is not None:
        return
    size = checkpoint_bytes(path)
    if size > max_gb * 1e9:
        raise ValueError(
            f"--resume {path}: saved by {saved.world_size} rank(s), this run has {world}, so it must be converted "
            f"to a universal checkpoint, and at {size / 1e9:.1f} GB (> checkpoint.convert_inline_max_gb={max_gb:g}) "
            f"that is too long for the other ranks to wait in a collective: run `bigtrain convert {path}` once "
            f"first (it writes {path.parent / UNIVERSAL / path.name}, which the resume then loads), or relaunch "
            f"with {saved.world_size} rank(s)")


def load_resume(engine, path: Path, world: int, scratch: Path) -> TrainState:
    """Collective load for a resume. Same number of ranks: ``load``. Another number: rank 0 converts
    the checkpoint to DeepSpeed's universal format under ``scratch`` (the others wait), every rank
    loads it with ``load_universal_checkpoint`` (its own slice of every parameter), and the
    conversion is deleted. The data position and skip lists are sample indices in TrainState, so
    they carry over exactly whatever the number of ranks."""
    saved = read_state(path)
    if saved.world_size == world:
        return load(engine, path)
    rank = _rank()
    # Rank 0 decides for all whether a conversion (made by `bigtrain convert`) is there to load: a rank
    # deciding from its own view of a shared filesystem could load a directory nobody wrote.
    found = [universal_for(path, path.parent / UNIVERSAL) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    universal, error = found[0], None
    converted_here = universal is None
    if converted_here:
        log.warning("resume: %s was saved by %d rank(s), this run has %d: converting it to a universal checkpoint "
                    "(deepspeed.checkpoint.ds_to_universal) under %s", path, saved.world_size, world, scratch)
        universal = scratch / path.name
        if rank == 0:
            try:
                universal = to_universal(path, scratch)
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = exc
    else:
        log.warning("resume: %s was saved by %d rank(s), this run has %d: loading its universal conversion %s",
                    path, saved.world_size, world, universal)
    if not all_ok(error is None):
        raise RuntimeError(f"converting {path} to a universal checkpoint failed ({error or 'on rank 0'}); "
                           f"relaunch with {saved.world_size} rank(s) to resume it as it is") from error
    engine._config.load_universal_checkpoint = True  # read by DeepSpeed only inside load_checkpoint
    try:
        load_path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name,
                                              load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False  # later loads (rollbacks) are ordinary ones
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")
    _set_rng_from(path, rank)
    _barrier()  # every rank has read it
    if rank == 0 and converted_here:  # only this one: others there (`bigtrain convert`'s) are the user's
        shutil.rmtree(universal, ignore_errors=True)
    return saved


def read_state(path: Path) -> TrainState:
    return TrainState.from_json(json.loads((path / STATE_FILE).read_text()))
