"""The training loop: resume -> loop {batch -> step -> observe -> act -> log -> eval -> save} -> final save.

Every function here runs on every rank; decisions come from globally reduced numbers only, so all
ranks take the same branch and every DeepSpeed save/load stays collective.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from bigtrain import checkpoint, snapshot
from bigtrain.checkpoint import CheckpointStore, TrainState
from bigtrain.config import Config, ConfigError, upgrade_saved
from bigtrain.data import LABEL, PackedData, build_dataset, build_tokenizer
from bigtrain.distributed import init_distributed, node_local_rank, setup_logging
from bigtrain.engine import (build_engine, check_hparams, keep_loss_scale, loss_scale, lr_at, optimizer_hparams,
                             resolve_ds_config, set_hparams, zero_stage)
from bigtrain.faults import FaultInjector, poison_rows
from bigtrain.memory import MemoryReport, format_mb, return_freed_memory
from bigtrain.preflight import check_resume, preflight
from bigtrain.metrics import Recorder
from bigtrain.model import build_model
from bigtrain.sampler import Sampler, SkipSet, blocks_of_documents, implicated_documents
from bigtrain.stopfile import EXIT_PREEMPTED, mark_stop_requested
from bigtrain.spike import (CAUSE_INCIDENT, DATA, OPTIMIZER, SKIP_UPDATE, Attribution, Escalation, RecoveryPlan,
                            Verdict, attribute, build_monitor)

log = logging.getLogger("bigtrain")

EXIT_GAVE_UP = 3  # the spike budget was spent: a person should look (spikes.jsonl, `bigtrain report`)

# Rows with these keys are always logged, whatever train.log_interval says.
extra_keys = {"eval_loss", "snapshot_seconds", "checkpoint_seconds"}


@dataclass
class Layout:
    """Who trains on what: the global batch of one step is split rank-major into micro-batches."""

    rank: int
    world: int
    micro: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def local(self, stream: list[int]) -> list[list[int]]:
        per_rank = self.micro * self.accum
        mine = stream[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.accum)]


def skip_window(sampler: Sampler, cursor: int, skipped: list, rolled_back_steps: int, global_batch: int,
                multiplier: int, margin_batches: int, skips: SkipSet | None = None) -> tuple[list[int], int]:
    """The stream indices a rollback skips, and the end of its range: from the restored ``cursor``,
    ``multiplier`` times the samples the rolled-back steps drew plus ``margin_batches`` batches,
    counted among samples not skipped already. Counting in stream span instead multiplied earlier
    skips at each escalation level: one range grew to 1.65M samples in the benchmark."""
    count = (multiplier * rolled_back_steps + margin_batches) * global_batch
    return sampler.take(cursor, count, skipped, skips)


def attribute_spike(monitor, verdict: Verdict, cfg, per_rank: int) -> Attribution | None:
    """Which samples of the spiked steps stand out (bigtrain's monitor only; None for the competitors,
    which skip a window as they always did). Every rank holds the same per-sample losses (they came
    through the step's all-reduce), so every rank reaches the same attribution."""
    samples = getattr(monitor, "samples", None)
    if samples is None or verdict.kind == SKIP_UPDATE:
        return None
    _, sums, counts = samples.suspects(verdict.onset_step if verdict.onset_step is not None else 0)
    return attribute(sums, counts, samples.reference(cfg.mad_floor), cfg, incident=verdict.kind == "incident",
                     per_rank=per_rank, band=monitor.loss_band())


@dataclass
class Quarantine:
    rows: list[dict]
    """One quarantine.jsonl row per newly skipped sample id (why: outlier / document / window)."""
    event: dict
    """The spike event's fields about cause and skips."""


def quarantine(state: TrainState, sampler: Sampler, data: PackedData, attribution: Attribution | None,
               suspects: tuple[list[int], list[float], list[float]], window: tuple[int, int, int, int, int],
               max_document_blocks: int = 0, max_convicted_blocks: int = 0) -> Quarantine:
    """Add to what ``state`` skips what this recovery skips, by cause:
    - data (outliers explain the spike): the outlier samples, plus every block of the documents they
      convict (:func:`bigtrain.sampler.implicated_documents`), wherever those blocks lie in the stream,
      by sample id (``state.skipped_samples``: out in every epoch, at any batch or world size);
    - incident: the outlier samples (non-finite ones included), nothing else;
    - optimizer, or no attribution: the outliers if any, by id, plus the old window (``skip_window``:
      from the restored cursor, ``window`` = (cursor, rolled-back steps, global batch, multiplier,
      margin)) as a half-open *stream range* in ``state.skipped``. The window's samples are not bad
      data - most are good samples skipped once so the model state moves past the region that blew up
      (as in the PaLM recipe) - so they are skipped for that one pass only and come back in later
      epochs; banning them by id would add ~180k ids per rollback at a global batch of 1,024.
    ``max_convicted_blocks`` > 0: documents are convicted (in order) only while their blocks total at
    most this; the rest lose only their flagged blocks. So each rollback adds at most
    (suspect samples + ``max_convicted_blocks``) ids."""
    ids, sums, counts = suspects
    cause = attribution.cause if attribution is not None else OPTIMIZER
    outliers = attribution.outliers if attribution is not None else []
    offending = sorted({ids[i] for i in outliers})
    docs = (implicated_documents(data.train_docs, offending, max_document_blocks)
            if cause != CAUSE_INCIDENT and offending and not attribution.rank_aligned else [])
    doc_blocks: list[int] = []
    if docs and max_convicted_blocks > 0:
        kept = []
        for d in docs:
            blocks = blocks_of_documents(data.train_docs, [d])
            if len(doc_blocks) + len(blocks) <= max_convicted_blocks:
                kept.append(d)
                doc_blocks += blocks
        docs, doc_blocks = kept, sorted(set(doc_blocks))
    elif docs:
        doc_blocks = blocks_of_documents(data.train_docs, docs)
    new: dict[int, dict] = {}
    for i in outliers:
        loss = sums[i] / counts[i] if counts[i] else None
        loss = loss if loss is None or math.isfinite(loss) else str(loss)  # JSON has no NaN/inf
        new.setdefault(ids[i], {"sample_id": ids[i], "why": "outlier", "loss": loss})
    for sid in doc_blocks:
        new.setdefault(sid, {"sample_id": sid, "why": "document"})
    event = {"cause": cause, "offending_samples": offending, "offending_documents": docs,
             "offending_document_names": [data.doc_names[d] for d in docs],
             "offending_share": round(len(offending) / max(1, len(ids)), 4), "suspect_samples": len(ids),
             "rank_aligned": bool(attribution and attribution.rank_aligned),
             "attribution": attribution.stats if attribution is not None else {}}
    existing = set(state.skipped_samples)
    rows = [row for sid, row in new.items() if sid not in existing]
    state.skipped_samples = sorted(existing | new.keys())
    state.skipped_docs = sorted(set(state.skipped_docs) | set(docs))
    if cause == OPTIMIZER:
        cursor, rolled, global_batch, multiplier, margin = window
        stream, end = skip_window(sampler, cursor, state.skipped, rolled, global_batch, multiplier, margin,
                                  SkipSet(state.skipped_samples))
        rows += [{"sample_id": sid, "why": "window", "stream_index": i}
                 for i, sid in zip(stream, sampler.sample_ids(stream)) if sid not in new]
        state.skipped = [list(r) for r in Sampler.merge_ranges([*map(tuple, state.skipped), (cursor, end)])]
        event["skipped_range"] = [cursor, end]
    event["skipped_samples"] = len(rows)
    return Quarantine(rows, event)


def lr_multiplier(cfg: Config, state: TrainState) -> float:
    """The rollback LR multiplier now: ``lr_scale`` right after the rollback, back to 1 linearly over
    ``spike.lr_cooldown_steps`` (0: it stays)."""
    cooldown = cfg.spike.lr_cooldown_steps
    if state.lr_scale >= 1.0 or cooldown == 0:
        return state.lr_scale
    progress = min(1.0, max(0, state.step - state.lr_scale_step) / cooldown)
    return state.lr_scale + (1.0 - state.lr_scale) * progress


def apply_hparams(cfg: Config, engine, lr: float, state: TrainState) -> None:
    """Every optimizer hyper-parameter: lr/eps/beta2 from the run's state (recovery changes them),
    beta1 and weight decay from the config (a resume with a new value applies it)."""
    set_hparams(engine, lr, state.eps, state.beta2, beta1=cfg.optim.beta1, weight_decay=cfg.optim.weight_decay)


def assert_hparams(cfg: Config, engine, state: TrainState) -> None:
    check_hparams(engine, state.eps, state.beta2, beta1=cfg.optim.beta1, weight_decay=cfg.optim.weight_decay)


def lr_for(cfg: Config, state: TrainState) -> float:
    """The LR of the next update: the schedule (a pure function of the step) x the rollback multiplier."""
    return lr_at(state.step, cfg.optim, cfg.train.steps) * lr_multiplier(cfg, state)


def build_data(cfg: Config, tokenizer, local_rank: int) -> PackedData:
    """Every rank calls build_dataset. The first process to take the cache entry's file lock prepares
    it; the others block on that lock, not in a collective, so no distributed timeout can kill a long
    preparation; then every rank memory-maps the same read-only files. ``local_rank`` is unused and
    kept for callers."""
    return build_dataset(cfg.data, tokenizer, cfg.train.seed, cfg.model.path)


def prepare_run_dir(cfg: Config, run_dir: Path, resume: str | None, rank: int) -> Path | None:
    """Resolve --resume, refuse to mix two runs in one directory, write the resolved config. On
    resume, checkpoints newer than the resumed one (an abandoned timeline) are moved aside."""
    ckpt_root = run_dir / "checkpoints"
    # Rank 0 alone finishes interrupted swaps and resolves --resume; its choice (or its error) goes to
    # every rank: ranks must never resume from different checkpoints, and an error raised on one rank
    # only would leave the others waiting in the next collective until its timeout.
    choice: list = [None, None]
    if rank == 0:
        try:
            checkpoint.finish_swaps(ckpt_root)
            path = checkpoint.resolve_resume(resume, ckpt_root) if resume else None
            if resume is None and (checkpoint.complete_checkpoints(ckpt_root) or (run_dir / "metrics.jsonl").exists()):
                raise ConfigError(f"run_dir {run_dir} already holds a run: continue it with --resume auto, "
                                  "or choose another run_dir=...")
            if path is not None:
                world = dist.get_world_size()
                saved = checkpoint.read_state(path)
                check_resume(cfg, saved, zero_stage(resolve_ds_config(cfg, world)), path, world)
                checkpoint.set_aside_newer(ckpt_root, saved.step)
            choice[0] = str(path) if path else None
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        except Exception as exc:  # noqa: BLE001 - any failure here is every rank's, through the broadcast
            choice[1] = f"{exc}" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    return Path(choice[0]) if choice[0] else None


def _truncate_jsonl(path: Path, keep) -> int:
    """Keep the rows ``keep(row)`` accepts; drop unparseable lines (the torn last line of a killed
    run or a full disk) with a warning instead of failing: rank 0 alone runs this, and an exception
    on one rank ends the run for all. Returns the rows dropped."""
    if not path.exists():
        return 0
    rows, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict) and keep(row):
            rows.append(line)
    if torn:
        log.warning("%s: dropped %d unreadable line(s) (a torn write of the killed run)", path, torn)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)
    return torn


def truncate_metrics(run_dir: Path, state: TrainState) -> None:
    """On resume (rank 0), drop what the killed run logged after its checkpoint, since the resumed
    run redoes it: metrics rows and events after the step, quarantine rows of rollbacks the
    checkpoint does not hold. Otherwise `bigtrain report` counts them twice."""
    _truncate_jsonl(run_dir / "metrics.jsonl", lambda r: r.get("step", 0) <= state.step)
    _truncate_jsonl(run_dir / "spikes.jsonl", lambda r: keep_event(r, state))
    _truncate_jsonl(run_dir / "quarantine.jsonl", lambda r: r.get("rollback", 0) <= state.rollbacks)


def keep_event(row: dict, state: TrainState) -> bool:
    """Whether a spikes.jsonl event belongs to the history a checkpoint continues. A rollback is
    identified by its ordinal (``rollback``), not its step: a checkpoint saved after a rollback to an
    earlier step holds that rollback although the event's step is later than the checkpoint's. A
    give-up or stop ended a process: never redone, always kept. Other rows: by step."""
    if "rollback" in row:
        return row["rollback"] <= state.rollbacks
    return row.get("event") in ("give_up", "stop") or row.get("step", 0) <= state.step


def hf_writers(engine_model, tokenizer) -> dict:
    """Model config + tokenizer saved with every checkpoint, so `bigtrain export` needs nothing else."""
    def write(path: Path) -> None:
        engine_model.config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return {"hf": write}


def snapshot_root(cfg: Config, run_dir: Path, world: int, local_world: int) -> Path:
    if cfg.checkpoint.snapshot_dir:
        return Path(cfg.checkpoint.snapshot_dir)
    # /dev/shm is node-local: only usable when every rank is on this node.
    if Path("/dev/shm").is_dir() and world == local_world:
        # hashlib, not hash(): str hashes differ between processes, and every rank must agree.
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
        return Path("/dev/shm") / f"bigtrain-{run_id}"
    return run_dir / "snapshots"


def check_snapshot_budget(cfg: Config, root: Path, model, ds_config: dict, world: int, local_world: int) -> None:
    """Print the snapshot ring's cost; refuse on every rank when any rank's filesystem cannot hold it.
    Collective (one all-reduce). Node-local /dev/shm holds only its node's optimizer partitions; any
    other directory is counted as holding them all (it may be shared)."""
    local_fraction = local_world / world if str(root).startswith("/dev/shm") else 1.0
    error = None
    try:
        snapshot.check_budget(cfg.checkpoint, root, snapshot.count_parameters(model), ds_config, local_fraction,
                              node_fraction=local_world / world)
    except Exception as exc:  # any failure (an unreadable /proc/meminfo too) is agreed, never one rank's alone
        error = exc if isinstance(exc, ConfigError) else ConfigError(f"checking the snapshot ring's budget failed: "
                                                                     f"{exc!r}")
    if not checkpoint.all_ok(error is None):
        raise error or ConfigError("the snapshot ring does not fit on another rank's filesystem (see its log): "
                                   "set checkpoint.snapshot_dir=, checkpoint.snapshot_keep= or "
                                   "checkpoint.snapshot_interval=0")


def micro_batch(data: PackedData, sampler: Sampler, stream: list[int], poisoned: list[list[int]],
                vocab: int) -> dict[str, torch.Tensor]:
    """Model inputs (input_ids, labels, and position_ids for packed examples) of the samples at these
    stream positions, copied out of the memory-mapped blocks."""
    ids = sampler.sample_ids(stream)
    batch = data.batch(ids)
    x = poison_rows(batch["input_ids"], list(ids), poisoned, vocab)  # injected bad data, if any
    if batch["labels"] is batch["input_ids"]:
        batch["labels"] = x
    else:  # masked labels follow the poisoned tokens where they carry a loss
        batch["labels"] = torch.where(batch["labels"] != -100, x, -100)
    batch["input_ids"] = x
    return batch


def label_counts(data: PackedData, ids: list[int]) -> list[float]:
    """Tokens that carry a loss in each sample of the global batch (their sum normalises the step's
    loss; each one turns a sample's loss sum into its mean for the attribution). Every rank computes
    them from the sample ids it already knows: no communication, one read of the batch's label flags
    per step (GB x T uint8 from the memory-mapped flags: 4 MB at GB 1,024 x 4,096 tokens, the read the
    global token count always cost; done once for both uses). Without flags every position but the
    last carries a loss: nothing is read. The same rule as ``PackedData.label_count``, per row."""
    if data.train_flags is None:
        return [float(data.train.shape[1] - 1)] * len(ids)
    flags = data.train_flags[np.asarray(ids, dtype=np.int64)][:, 1:]
    return ((flags & LABEL) != 0).sum(1).astype(np.float64).tolist()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] next-token cross-entropy of every position (0 where the label is -100 or past the end).

    The same computation as transformers' ForCausalLMLoss (loss_utils.py: logits upcast to float32,
    labels shifted by padding, ignore_index -100), kept per token instead of summed, so the step's loss
    and every sample's loss come from one cross-entropy: no second pass over the logits. Memory is
    HF's own: the float32 copy of the logits (4 bytes x vocab per token: 0.5 MB at a 128k vocab, which
    autograd keeps for the backward) is the one HF's loss makes too; the per-token result adds 4
    bytes per token."""
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, shift.reshape(-1).to(flat.device), ignore_index=-100,
                                             reduction="none").view(shift.shape)


def check_loss_function(model) -> None:
    """bigtrain computes the loss itself (:func:`token_losses`, to get every sample's loss from the same
    cross-entropy), so it must be the model's own: refuse a model whose ``loss_function`` is not
    transformers' ForCausalLMLoss (a custom ``loss_type``, or one set on the model) instead of
    silently training a different objective."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    fn = getattr(model, "loss_function", ForCausalLMLoss)
    if fn is not ForCausalLMLoss:
        raise ConfigError(f"model {type(model).__name__} uses loss_function {getattr(fn, '__name__', fn)!r} "
                          "(config loss_type or a model override); bigtrain trains causal-LM cross-entropy only "
                          "(transformers.loss.loss_utils.ForCausalLMLoss): use a model with the default loss")


def aux_loss_coef(engine) -> float:
    """Weight of a mixture-of-experts router's load-balancing loss (``router_aux_loss_coef``, as HF's
    Mixtral/Qwen-MoE forward adds it to the loss when given labels); 0 for dense models."""
    model = getattr(engine, "module", engine)
    return float(getattr(model, "router_aux_loss_coef", None) or
                 getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0)


def train_mode(engine) -> None:
    """Put the model in train mode. ``from_pretrained`` returns it in eval mode, and HF turns dropout and
    activation checkpointing off unless ``module.training``: called before the loop, after every load
    (resume, rollback); ``evaluate`` restores it itself."""
    engine.train()


def train_step(engine, batches: list[dict[str, torch.Tensor]], norm: float,
               faults: FaultInjector, first_slot: int = 0, global_batch: int = 0) -> torch.Tensor:
    """Forward/backward over the micro-batches and one optimizer step. Returns the *local* tensor
    [loss_sum, nonfinite, grad_norm / world, stop, per-sample loss sums of the global batch] for one
    all-reduce. No host sync in here.

    Loss normalisation: each micro-batch's summed token loss is divided by ``norm`` = global tokens /
    (accum * world); DeepSpeed then divides by accum and averages over ranks, so the gradient is that of
    (sum of token losses over the whole global batch) / (global tokens) - not a mean of micro-batch means.

    Per-sample losses: this rank writes each of its samples' summed token loss into the sample's slot
    of a ``global_batch`` vector (slot = position in the step's stream, from ``first_slot`` on) and
    zeros elsewhere, so the step's one all-reduce gives every rank every sample's loss: 4 bytes per
    sample on the wire (4 KB at a global batch of 1,024), no extra collective.
    """
    device = engine.device
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    per_sample = torch.zeros(global_batch, dtype=torch.float32, device=device)
    slot = first_slot
    coef = aux_loss_coef(engine)
    for batch in batches:  # input_ids, labels and, for packed examples, position_ids (see micro_batch)
        x, labels = batch["input_ids"], batch["labels"]
        out = engine(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        sums = token_losses(out.logits, labels).sum(1)
        ce = faults.scale_loss(sums.sum() / norm)
        loss = ce
        aux = getattr(out, "aux_loss", None)  # MoE models with output_router_logits: into the gradient,
        if aux is not None and coef:  # not into the reported/monitored loss (cross-entropy only)
            loss = ce + coef * aux.to(ce.device)
        engine.backward(loss)
        engine.step()  # DeepSpeed updates only at the accumulation boundary
        loss_sum += ce.detach().float() * norm  # stays on the device: no sync per micro-batch
        if global_batch:
            per_sample[slot:slot + len(x)] = sums.detach()
        slot += len(x)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else grad_norm
    grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=device)
    nonfinite = (~torch.isfinite(loss_sum)).float()
    stop = torch.tensor(float(StopRequest.signum > 0), device=device)
    # On the device: NCCL reduces only device tensors (gloo on CPU takes either).
    return torch.cat([torch.stack([loss_sum, nonfinite, grad_norm / dist.get_world_size(), stop]), per_sample])


@torch.no_grad()
def evaluate(engine, data: PackedData, layout: Layout, batches: int) -> float:
    """Held-out loss, every rank on its own shard; same number of forwards per rank (ZeRO-3 gathers
    parameters collectively). One all-reduce."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    m = data.eval.shape[0]
    for b in range(batches):
        start = (b * layout.world + layout.rank) * layout.micro
        rows = [(start + j) % m for j in range(layout.micro)]
        batch = {k: v.to(engine.device) for k, v in data.batch(rows, "eval").items()}
        out = engine(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += torch.stack([out.loss.double() * n, torch.tensor(n, dtype=torch.float64, device=engine.device)])
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


class StopRequest:
    """SIGTERM (preemption, torchrun/SLURM shutdown) and SIGUSR1 (SLURM's warning signal) set a flag;
    the loop all-reduces it with the step's numbers, so every rank saves and exits at the same step,
    whichever rank got the signal."""

    signum = 0

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            # A second SIGTERM: the process may be stuck in a collective; die now. A repeated USR1 is
            # not a second request: under SLURM the warning can reach a rank twice (from the step
            # daemon, which signals every process of the step, and from the launcher's forwarding).
            if cls.signum and signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            cls.signum = cls.signum or signum
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    @classmethod
    def uninstall(cls) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


def train(cfg: Config, resume: str | None = None) -> int:
    # Before the model is loaded: ZeRO-3's gathers and frees otherwise stay in the heap.
    allocator = return_freed_memory(cfg.train.malloc_mmap_threshold)
    rank, world, local_world = init_distributed()
    setup_logging(rank)
    log.info("host allocator: %s", allocator)
    # Config-only checks (bigtrain.cli runs them before heavy imports too, before any rank joined the group).
    # Not --resume here: rank 0 may already be finishing swaps in the checkpoint directory; prepare_run_dir
    # checks the resume on rank 0 for all.
    preflight(cfg, world, None)
    run_dir = Path(cfg.run_dir)
    resume_path = prepare_run_dir(cfg, run_dir, resume, rank)
    t, sc = cfg.train, cfg.spike
    layout = Layout(rank, world, t.micro_batch, t.grad_accum)

    tokenizer = build_tokenizer(cfg.model.path)
    data = build_data(cfg, tokenizer, node_local_rank())
    ds_config = resolve_ds_config(cfg, world)
    memory = MemoryReport()
    memory.mark("before_model_load")
    model = build_model(cfg.model, tokenizer, cfg.data.seq_len, t.seed, ds_config)
    memory.mark("after_model_load")
    memory.added("model_load_added", "before_model_load", "after_model_load")
    check_loss_function(model)
    snap_root = snapshot_root(cfg, run_dir, world, local_world)
    if rank == 0:  # snapshots of an earlier (killed) process are not ours, and must not count as used space
        shutil.rmtree(snap_root, ignore_errors=True)
    dist.barrier()
    check_snapshot_budget(cfg, snap_root, model, ds_config, world, local_world)  # before the optimizer exists
    engine, ds_config = build_engine(cfg, model, world, ds_config, local_world)
    memory.mark("after_engine_init")
    log.info("memory (host RSS, max over ranks): %s", format_mb(memory.reduce(engine.device)))  # collective
    if rank == 0:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    vocab = model.config.get_text_config().vocab_size
    sampler = Sampler(data.train.shape[0], t.seed, cfg.data.shuffle)
    monitor, escalation = build_monitor(sc, t.steps), Escalation(sc)
    faults = FaultInjector(cfg.faults, rank, data.train_docs)
    durable = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep, hf_writers(model, tokenizer),
                              log_saves=True)
    snaps = CheckpointStore(snap_root, cfg.checkpoint.snapshot_keep, asynchronous=cfg.checkpoint.async_snapshots)
    if node_local_rank() == 0:
        snapshot.clean_on_exit(snaps.root)  # every exit path: done, gave up, preempted, exception
    stores = [snaps, durable] if cfg.checkpoint.snapshot_interval else [durable]

    state = TrainState(eps=cfg.optim.eps, beta2=cfg.optim.beta2, fingerprint=cfg.fingerprint(), world_size=world,
                       zero_stage=zero_stage(ds_config), config=cfg.to_dict())
    resume_load_seconds = None
    if resume_path is not None:
        t_load = time.perf_counter()
        state = checkpoint.load_resume(engine, resume_path, world, run_dir / "checkpoints" / checkpoint.UNIVERSAL)
        resume_load_seconds = round(time.perf_counter() - t_load, 4)
        apply_changes(cfg, state, resume_path)
        state.config, state.world_size, state.zero_stage = cfg.to_dict(), world, zero_stage(ds_config)
        monitor.load_state_dict(state.monitor)
        escalation.load_state_dict(state.escalation)
        log.info("resumed from %s at step %d (samples %d)", resume_path, state.step, state.cursor)
        if rank == 0:
            truncate_metrics(run_dir, state)
    apply_hparams(cfg, engine, lr_for(cfg, state), state)
    assert_hparams(cfg, engine, state)
    train_mode(engine)

    rec = Recorder(run_dir, rank == 0, t.steps, state.step)
    log.info("run_dir %s | %d rank(s) | ZeRO-%d %s | global batch %d x %d tokens | %d train / %d eval blocks",
             run_dir, world, zero_stage(ds_config), t.precision, layout.global_batch, cfg.data.seq_len,
             data.train.shape[0], data.eval.shape[0])
    if cfg.checkpoint.snapshot_interval:
        save(snaps, engine, state, monitor, escalation)
    elif not durable.saved:
        # The initial state is a rollback target too: without it an incident before the first
        # checkpoint could only end the run. Without snapshots it goes to the durable store
        # (one checkpoint's bytes, pruned by checkpoint.keep like any other).
        save(durable, engine, state, monitor, escalation)
    t_start, eval_loss, last = time.time(), None, {}
    skips = SkipSet(state.skipped_samples)  # rebuilt after each recovery, the only place it grows
    samples = getattr(monitor, "samples", None)  # per-sample reference (bigtrain's monitor only)
    StopRequest.install()  # only around the loop: before it, SIGTERM must simply kill a stuck start-up

    while state.step < t.steps:
        t0 = time.perf_counter()
        stream, cursor = sampler.take(state.cursor, layout.global_batch, state.skipped, skips)
        faults.begin_step(state, sampler, layout.global_batch, t.micro_batch * t.grad_accum, engine, skips)
        batches = [micro_batch(data, sampler, s, state.poisoned, vocab) for s in layout.local(stream)]
        ids = sampler.sample_ids(stream)
        counts = label_counts(data, ids)
        global_tokens = int(sum(counts))
        lr = lr_for(cfg, state)
        apply_hparams(cfg, engine, lr, state)
        stepped = optimizer_hparams(engine)  # what DeepSpeed steps with, read back (not bigtrain's own state)
        del stepped["lr"]
        local = train_step(engine, batches, global_tokens / (t.grad_accum * world), faults,
                           rank * t.micro_batch * t.grad_accum, layout.global_batch)
        dist.all_reduce(local)  # the one collective of the step: every rank sees the same numbers
        loss_sum, nonfinite, grad_norm, stop, *sample_sums = local.tolist()  # the one host sync of the step
        applied = engine.was_step_applied()
        if "after_first_step" not in memory.readings:
            memory.mark("after_first_step")
        state.advance(cursor, layout.global_batch * cfg.data.seq_len, applied)
        verdict = monitor.observe(state.step, loss_sum / global_tokens, grad_norm, nonfinite > 0, not applied)
        if samples is not None:
            samples.observe(state.step, ids, sample_sums, counts, verdict.kind == "ok")
        last = {"step": state.step, "loss": loss_sum / global_tokens, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_sec": layout.global_batch * cfg.data.seq_len / (time.perf_counter() - t0),
                "samples": state.cursor, "tokens": state.tokens, **stepped, "step_applied": applied,
                "verdict": verdict.kind}

        if verdict.recover or verdict.kind == SKIP_UPDATE:
            rec.step(last)
            faults.expire(state, state.step)
            reason = recover(cfg, engine, stores, state, verdict, last, monitor, escalation, sampler, data, rec,
                             faults)
            skips = SkipSet(state.skipped_samples)
            if reason is not None:
                give_up(reason, durable, engine, state, monitor, escalation)
                rec.close()
                return EXIT_GAVE_UP
            continue
        if verdict.kind == "stop":  # a kill-the-run policy (llm-foundry's rule, for comparison)
            rec.step(last)
            rec.event({"event": "stop", "step": state.step, "reason": verdict.reason, "severity": verdict.severity})
            snaps.abandon()
            save(durable, engine, state, monitor, escalation)
            rec.close()
            return EXIT_GAVE_UP
        if t.eval_interval and state.step % t.eval_interval == 0 or state.step == t.steps:
            eval_loss = evaluate(engine, data, layout, t.eval_batches)
            last["eval_loss"] = eval_loss
        if cfg.checkpoint.snapshot_interval and state.step % cfg.checkpoint.snapshot_interval == 0 \
                and verdict.kind == "ok":
            t_save = time.perf_counter()
            save(snaps, engine, state, monitor, escalation)
            last["snapshot_seconds"] = round(time.perf_counter() - t_save, 4)  # the loop's wait
            if snaps.last_write_seconds is not None:  # the previous snapshot's write, in the background
                last["snapshot_write_seconds"] = round(snaps.last_write_seconds, 4)
                snaps.last_write_seconds = None
        saved_now = None
        if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0 and state.step != t.steps:
            t_save = time.perf_counter()
            saved_now = save(durable, engine, state, monitor, escalation)
            last["checkpoint_seconds"] = round(time.perf_counter() - t_save, 4)
        if state.step % t.log_interval == 0 or state.step == t.steps or extra_keys & last.keys():
            rec.step(last)
        if stop:
            snaps.abandon()  # its background write would compete with this save for the disk
            # Not a second full write of the step just saved: at 70B that is minutes of a grace period.
            path = saved_now or save(durable, engine, state, monitor, escalation)
            rec.close()
            log.warning("stop requested by a signal: saved %s at step %d; exiting with %d so a requeue or a "
                        "restart continues with --resume auto", path, state.step, EXIT_PREEMPTED)
            if (problem := mark_stop_requested()) is not None:
                log.warning(problem)
            return EXIT_PREEMPTED

    snaps.finish()  # collective: no snapshot write may still run when rank 0 removes the ring below
    t_save = time.perf_counter()
    final = save(durable, engine, state, monitor, escalation)
    save_seconds = time.perf_counter() - t_save
    memory_mb = memory.reduce(engine.device)  # collective: every rank reaches the end of the loop
    log.info("memory (host RSS, max over ranks): %s", format_mb(memory_mb))
    if rank == 0:
        shutil.rmtree(snaps.root, ignore_errors=True)
        checkpoint.wait_for_discards()  # pruned checkpoints: no trash outlives a finished run
    rec.close()
    summary = {"steps": state.step, "seconds": round(time.time() - t_start, 1), "final_loss": last.get("loss"),
               "eval_loss": eval_loss, "rollbacks": state.rollbacks, "wasted_steps": state.wasted_steps,
               "ds_skipped_steps": state.ds_skipped_steps, "skipped_ranges": state.skipped,
               "skipped_samples": len(state.skipped_samples), "skipped_docs": len(state.skipped_docs),
               "checkpoint": str(final), "final_save_seconds": round(save_seconds, 3),
               "resume_load_seconds": resume_load_seconds,
               "peak_rss_mb_max_rank": memory_mb["peak"], "memory_mb": memory_mb,
               "parameters": snapshot.count_parameters(model)}
    log.info("done: %s", json.dumps(summary))
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_changes(cfg: Config, state: TrainState, path: Path) -> None:
    """After a resume's load: log every config value that differs from the checkpoint's, and apply
    the deliberate ones. lr, beta1 and weight decay are set from the config after every load anyway;
    eps and beta2 are the run's state (recovery lowers them), so a changed config value replaces them
    here. A new train.steps reshapes the cosine schedule: its effect on the next LR is logged."""
    before, after = _flat(upgrade_saved(state.config)), _flat(cfg.to_dict())
    changed = {k: (before.get(k), v) for k, v in after.items() if k in before and before[k] != v}
    for key, (old, new) in sorted(changed.items()):
        log.warning("resume from %s: %s changed %r -> %r (applied)", path, key, old, new)
    if "optim.eps" in changed:
        log.warning("resume: optim.eps replaces the run's eps %g (recovery may have lowered it) with %g",
                    state.eps, cfg.optim.eps)
        state.eps = cfg.optim.eps
    if "optim.beta2" in changed:
        log.warning("resume: optim.beta2 replaces the run's beta2 %g with %g", state.beta2, cfg.optim.beta2)
        state.beta2 = cfg.optim.beta2
    if "train.steps" in changed and before.get("optim.lr") is not None and not cfg.optim.decay_steps:
        old_steps = changed["train.steps"][0]
        old_lr = lr_at(state.step, cfg.optim, old_steps)
        log.warning("resume: train.steps %d -> %d stretches the LR schedule: the LR of step %d is %.4g, was %.4g "
                    "(set optim.decay_steps to keep one schedule across legs)",
                    old_steps, cfg.train.steps, state.step + 1, lr_at(state.step, cfg.optim, cfg.train.steps), old_lr)


@dataclass
class GiveUp:
    """Why recovery stopped. ``restored``: the state was rolled back to a healthy target (safe to
    save); otherwise it still holds the spiked weights. ``onset``: the first bad step."""

    reason: str
    restored: bool
    onset: int


def give_up(reason: GiveUp, durable: CheckpointStore, engine, state: TrainState, monitor, escalation) -> None:
    """Save the state only when it is healthy (rolled back); never save spiked weights as the last
    healthy state (collective: every rank reaches here with the same ``reason``). Durable checkpoints
    from the onset on hold the spike (the onset can precede the detection by several steps): they are
    moved aside, so ``--resume auto`` continues from a healthy one."""
    moved = True
    if checkpoint._rank() == 0:
        try:
            checkpoint.set_aside_newer(durable.root, reason.onset - 1,
                                       f"giving up: the spike's onset is step {reason.onset}")
        except OSError as exc:  # reported, and agreed below: rank 0 alone must not leave the others waiting
            log.error("giving up: could not move the checkpoints from the onset on aside (%s): do not resume "
                      "from a step >= %d", exc, reason.onset)
            moved = False
    checkpoint.all_ok(moved)  # also the barrier: no rank saves or lists the directory while it changes
    durable.saved = [s for s in durable.saved if s < reason.onset]
    if reason.restored:
        path = save(durable, engine, state, monitor, escalation)
        log.error("gave up: %s. The last healthy state (step %d) is saved at %s; see spikes.jsonl",
                  reason.reason, state.step, path)
        return
    healthy = durable.latest_before(reason.onset)
    where = (f"{durable.root / checkpoint.tag_for(healthy)} (step {healthy})" if healthy is not None
             else "none: no checkpoint predates the incident; restart the run")
    log.error("gave up: %s. No checkpoint was written: the weights at step %d are not healthy. The last healthy "
              "checkpoint is %s; see spikes.jsonl", reason.reason, state.step, where)


def save(store: CheckpointStore, engine, state: TrainState, monitor, escalation) -> Path:
    state.monitor = monitor.state_dict()
    state.escalation = escalation.state_dict()
    return store.save(engine, state)


def pick_target(stores: list[CheckpointStore], onset: int) -> tuple[int, CheckpointStore] | None:
    """The newest snapshot or checkpoint strictly before the onset that verifies on every rank."""
    while True:
        targets = [(s.latest_before(onset), -i, s) for i, s in enumerate(stores)]
        targets = [t for t in targets if t[0] is not None]
        if not targets:
            return None
        step, _, store = max(targets, key=lambda t: t[:2])
        problem = checkpoint.verify(store.root / checkpoint.tag_for(step))
        if checkpoint.all_ok(problem is None):
            return step, store
        log.warning("rollback target %s is not usable (%s); trying an older one",
                    store.root / checkpoint.tag_for(step), problem or "on another rank")
        store.saved.remove(step)


def recover(cfg: Config, engine, stores: list[CheckpointStore], state: TrainState, verdict: Verdict,
            signals: dict, monitor, escalation: Escalation, sampler: Sampler, data: PackedData,
            rec: Recorder, faults: FaultInjector) -> GiveUp | None:
    """Roll back to the newest checkpoint before the spike's onset and treat the cause the per-sample
    losses point to (``attribute_spike``): data -> skip the offending samples and their documents,
    hyper-parameters unchanged; optimizer -> skip the window from there to the spike and climb the
    eps/LR/beta2 ladder; incident -> rewind only. Mutates ``state`` in place. Returns the reason when the
    budget is spent (state is then the last healthy one; the caller saves and exits): never loops."""
    t0 = time.time()
    onset = verdict.onset_step if verdict.onset_step is not None else state.step
    for s in stores:
        try:
            s.finish()  # collective: a snapshot still being written becomes a target (or fails) on every rank
        except checkpoint.CheckpointError as exc:  # agreed on every rank (all_ok): all take this branch
            log.warning("the newest snapshot could not be written (%s); rolling back to an older one", exc)
    target = pick_target(stores, onset)
    event = {"step": state.step, "onset_step": onset, "verdict": verdict.kind, "reason": verdict.reason,
             "severity": verdict.severity, "stats": verdict.stats, "loss": signals["loss"],
             "grad_norm": signals["grad_norm"]}
    if target is None:
        reason = f"no intact checkpoint before the onset step {onset} to roll back to"
        rec.event({**event, "event": "give_up", "action": "stop", "reason": reason})
        return GiveUp(reason, restored=False, onset=onset)
    target_step, store = target
    if verdict.kind == SKIP_UPDATE:
        # OLMo-core's rule skips one update and changes nothing else; with snapshots every step this
        # restores the state before it (with sparser snapshots it rewinds further). No budget applies.
        plan = RecoveryPlan(stop=False, reason=verdict.reason, level=0, skip_multiplier=1, eps=state.eps,
                            lr_scale=lr_multiplier(cfg, state), beta2=state.beta2,
                            wasted_steps=state.step - target_step)
    attribution = attribute_spike(monitor, verdict, cfg.spike, cfg.train.micro_batch * cfg.train.grad_accum)
    suspects = monitor.samples.suspects(onset) if attribution is not None else ([], [], [])
    if verdict.kind != SKIP_UPDATE:
        # Budgets count steps run: progress kept so far (every executed step not already discarded);
        # the restored step would call the first interval's incident "7 of 7 steps discarded".
        kept = state.executed_steps - state.wasted_steps - (state.step - target_step)
        plan = escalation.decide(state.step, onset, target_step, kept, state.eps, lr_multiplier(cfg, state),
                                 state.beta2, attribution.cause if attribution else OPTIMIZER)
    spike_step = state.step
    persistent = {k: getattr(state, k) for k in TrainState.PERSISTENT}
    scale = loss_scale(engine)
    t_load = time.perf_counter()
    old = checkpoint.load(engine, store.root / checkpoint.tag_for(target_step))  # collective
    load_seconds = time.perf_counter() - t_load
    keep_loss_scale(engine, scale)
    train_mode(engine)
    faults.maybe_crash()
    for k, v in persistent.items():
        setattr(state, k, v)
    for k in ("step", "cursor", "tokens", "monitor"):
        setattr(state, k, getattr(old, k))
    if verdict.kind != SKIP_UPDATE:
        monitor.load_state_dict(old.monitor)  # statistics from before the onset
    else:
        # OLMo-core keeps the flagged value in its window (skip_step_optimizer.py): restoring the
        # window would flag the same step again and again.
        state.monitor = monitor.state_dict()
    monitor.reset_pending()
    if plan.stop:
        rec.event({**event, "event": "give_up", "action": "stop", "restored_step": target_step,
                   "reason": plan.reason, "level": plan.level})
        state.escalation = escalation.state_dict()
        apply_hparams(cfg, engine, lr_for(cfg, state), state)
        return GiveUp(plan.reason, restored=True, onset=onset)
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * dist.get_world_size()
    margin = cfg.spike.skip_margin_batches if verdict.kind != SKIP_UPDATE else 0
    window = (old.cursor, spike_step - target_step, global_batch, plan.skip_multiplier, margin)
    max_blocks = max(1, min(int(cfg.spike.max_document_share * data.train.shape[0]), cfg.spike.max_convicted_blocks))
    skip = quarantine(state, sampler, data, attribution, suspects, window, max_blocks, cfg.spike.max_convicted_blocks)
    before = {"eps": state.eps, "lr_scale": lr_multiplier(cfg, state), "beta2": state.beta2}
    state.eps, state.lr_scale, state.beta2 = plan.eps, plan.lr_scale, plan.beta2
    state.lr_scale_step = target_step
    state.rollbacks += 1
    state.wasted_steps += spike_step - target_step
    apply_hparams(cfg, engine, lr_for(cfg, state), state)
    assert_hparams(cfg, engine, state)  # DeepSpeed's load restored the old eps: prove it is set
    for s in stores:
        s.drop_after(target_step)
    rec.quarantine({**row, "sources": data.sources(row["sample_id"]), "rollback": state.rollbacks}
                   for row in skip.rows)
    rec.event({**event, "event": "rollback" if verdict.kind != SKIP_UPDATE else "skip_update", "action": "rollback+skip" + ("+eps" if plan.eps != before["eps"] else "")
               + ("+lr" if plan.lr_scale != before["lr_scale"] else "") + ("+beta2" if plan.beta2 != before["beta2"] else ""),
               "rollback": state.rollbacks, "level": plan.level, "restored_step": target_step,
               "restored_from": str(store.root),
               **skip.event,
               "eps_before": before["eps"], "eps_after": state.eps, "lr_scale_before": before["lr_scale"],
               "lr_scale_after": state.lr_scale, "beta2_before": before["beta2"], "beta2_after": state.beta2,
               "wasted_steps": spike_step - target_step, "recover_seconds": round(time.time() - t0, 3),
               "load_seconds": round(load_seconds, 4)})
    log.warning("step %d: %s -> cause %s, rolled back to step %d, skipping %d samples (%d documents), eps %.3g -> %.3g",
                spike_step, verdict.reason, skip.event.get("cause"), target_step, skip.event["skipped_samples"],
                len(skip.event.get("offending_documents", [])), before["eps"], state.eps)
    return None
