"""The training loop: set up -> loop {batch -> step -> observe -> act -> eval -> save -> log} -> finish.

Every function here runs on every rank; decisions come from globally reduced numbers only, so all
ranks take the same branch and every DeepSpeed save/load stays collective.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from bigtrain import checkpoint, snapshot
from bigtrain.checkpoint import CheckpointStore, TrainState
from bigtrain.config import Config, ConfigError, upgrade_saved
from bigtrain.data import PackedData, build_dataset, build_tokenizer
from bigtrain.distributed import init_distributed, node_local_rank, setup_logging
from bigtrain.engine import (apply_hparams, build_engine, lr_at, optimizer_hparams, resolve_ds_config, token_losses,
                             zero_stage)
from bigtrain.faults import FaultInjector
from bigtrain.memory import MemoryReport, format_mb, return_freed_memory
from bigtrain.metrics import Recorder
from bigtrain.model import build_model
from bigtrain.preflight import check_resume, preflight
from bigtrain.recovery import GiveUp, give_up, recover, screen
from bigtrain.run import Layout, Run
from bigtrain.sampler import Sampler, SkipSet
from bigtrain.spike import ANOMALOUS, OK, SKIP_UPDATE, STOP, Escalation, Verdict, build_monitor
from bigtrain.stopfile import EXIT_PREEMPTED, mark_stop_requested

log = logging.getLogger("bigtrain")

EXIT_GAVE_UP = 3  # the spike budget was spent: a person should look (spikes.jsonl, `bigtrain report`)


def train(cfg: Config, resume: str | None = None) -> int:
    run = setup(cfg, resume)
    state, t, rec = run.state, cfg.train, run.rec
    evaluator = Evaluator(run.engine, run.data, run.layout, t)
    StopRequest.install()  # only around the loop: before it, SIGTERM must simply kill a stuck start-up
    row: dict = {}
    while state.progress.step < t.steps:
        skip_steps(run)
        row, verdict, stop = step(run)
        if verdict.recover or verdict.kind == SKIP_UPDATE:
            rec.step(row)
            if (reason := recover(run, verdict, row)) is not None:
                return finish(run, EXIT_GAVE_UP, reason)
            continue
        if verdict.kind == STOP:  # a monitor whose rule ends the run
            rec.step(row)
            rec.event({"event": "stop", "step": state.progress.step, "onset_step": verdict.onset_step,
                       "reason": verdict.reason, "severity": verdict.severity})
            return finish(run, EXIT_GAVE_UP, verdict.reason)
        evaluator.maybe_eval(state.progress.step, row)
        run.snaps.maybe_save(state.progress.step, run.save, row, allowed=verdict.kind == "ok")
        saved = run.durable.maybe_save(state.progress.step, run.save, row, final_step=t.steps)
        rec.maybe_log(row)
        if stop:
            return finish(run, EXIT_PREEMPTED, "stop requested by a signal", saved=saved)
    return finish(run, 0, "done", row=row, eval_loss=evaluator.last)


def skip_steps(run: Run) -> None:
    """``train.skip_steps``: at the first step of a range, pass over the global batches its steps would
    draw, once (a stream range in ``history.skipped``, as the monitor's windows). The same on every
    rank: the ranges, the cursor and the skip set are."""
    h, p, gb = run.state.history, run.state.progress, run.layout.global_batch
    for first, last in run.cfg.train.skip_steps:
        if first != p.step + 1 or [first, last] in h.manual_skips:
            continue
        stream, end = run.sampler.take(p.cursor, (last - first + 1) * gb, h.skipped, run.skips)
        h.skipped = [list(r) for r in Sampler.merge_ranges([*map(tuple, h.skipped), (p.cursor, end)])]
        h.manual_skips.append([first, last])
        run.rec.event({"event": "skip_steps", "step": first, "range": [first, last], "skipped_range": [p.cursor, end],
                       "skipped_samples": len(stream), "reason": f"train.skip_steps: the data of steps {first}-{last}"})
        log.warning("step %d: skipping the data of steps %d-%d (%d samples), as train.skip_steps asks", first, first,
                    last, len(stream))


def step(run: Run) -> tuple[dict, Verdict, bool]:
    """One optimizer step of the global batch at the cursor, observed by the monitor: the metrics row,
    the verdict, and whether any rank was asked to stop. One all-reduce, one host sync."""
    t0, cfg, state, layout, engine = time.perf_counter(), run.cfg, run.state, run.layout, run.engine
    h = state.history
    stream, cursor = run.sampler.take(state.progress.cursor, layout.global_batch, h.skipped, run.skips)
    run.faults.begin_step(state.progress, run.sampler, h.skipped, layout.global_batch, layout.per_rank, engine,
                          run.skips)
    batches = [micro_batch(run.data, run.sampler, s, run.faults) for s in layout.local(stream)]
    ids = run.sampler.sample_ids(stream)
    counts = run.data.label_counts(ids)
    global_tokens = int(sum(counts))
    lr = apply_hparams(cfg, engine, state)
    stepped = optimizer_hparams(engine)  # what DeepSpeed steps with, read back (not bigtrain's own state)
    del stepped["lr"]
    local = train_step(engine, batches, global_tokens / (layout.accum * layout.world), run.faults,
                       layout.rank * layout.per_rank, layout.global_batch)
    dist.all_reduce(local)  # the one collective of the step: every rank sees the same numbers
    loss_sum, nonfinite, grad_norm, stop, *sample_sums = local.tolist()  # the one host sync of the step
    applied = engine.was_step_applied()
    if "after_first_step" not in run.memory.readings:
        run.memory.mark("after_first_step")
    state.advance(cursor, layout.global_batch * cfg.data.seq_len, applied)
    loss = loss_sum / global_tokens
    verdict = run.monitor.observe(state.progress.step, loss, grad_norm, nonfinite > 0, not applied)
    if (samples := getattr(run.monitor, "samples", None)) is not None:  # per-sample reference (bigtrain's)
        reference = samples.reference(cfg.spike.mad_floor)  # before this step's samples join it
        samples.observe(state.progress.step, ids, sample_sums, counts, verdict.kind == "ok")
        if verdict.kind in (OK, ANOMALOUS):  # every step not rolled back; noise too thin to spike one
            screen(run, ids, sample_sums, counts, reference[0] if reference else None)
    row = {"step": state.progress.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
           "tokens_per_sec": layout.global_batch * cfg.data.seq_len / (time.perf_counter() - t0),
           "samples": state.progress.cursor, "tokens": state.progress.tokens, **stepped, "step_applied": applied,
           "verdict": verdict.kind}
    return row, verdict, stop > 0


def finish(run: Run, code: int, reason: str | GiveUp, saved: Path | None = None, row: dict | None = None,
           eval_loss: float | None = None) -> int:
    """The one way out of the loop, taken by every rank at the same step (decisions are collective).
    0, done: the final checkpoint, the summary, the snapshot ring removed. EXIT_GAVE_UP: recovery gave
    up (``reason`` a GiveUp: only a healthy state is saved) or the monitor's rule stops the run (saved
    as it is). EXIT_PREEMPTED: a signal asked to stop; saved (unless this very step just was), so a
    requeue or a restart continues with --resume auto."""
    if isinstance(reason, GiveUp):
        give_up(run, reason)
    elif code == 0:
        summarise(run, row or {}, eval_loss)
    else:
        run.snaps.abandon()  # its background write would compete with this save for the disk
        # Not a second full write of the step just saved: at 70B that is minutes of a grace period.
        path = saved or run.save(run.durable)
        if code == EXIT_PREEMPTED:
            log.warning("%s: saved %s at step %d; exiting with %d so a requeue or a restart continues with "
                        "--resume auto", reason, path, run.state.progress.step, code)
            if (problem := mark_stop_requested()) is not None:
                log.warning(problem)
    run.rec.close()
    return code


def summarise(run: Run, row: dict, eval_loss: float | None) -> None:
    """The end of a finished run: final checkpoint, memory report, snapshot ring removed, summary.json."""
    run.snaps.finish()  # collective: no snapshot write may still run when the ring is removed below
    t_save = time.perf_counter()
    final = run.save(run.durable)
    save_seconds = time.perf_counter() - t_save
    memory_mb = run.memory.reduce(run.engine.device)  # collective: every rank reaches the end of the loop
    log.info("memory (host RSS, max over ranks): %s", format_mb(memory_mb))
    run.snaps.remove(wait_for_discards_too=True)  # no trash outlives a finished run
    p, h = run.state.progress, run.state.history
    summary = {"steps": p.step, "seconds": round(time.time() - run.started, 1), "final_loss": row.get("loss"),
               "eval_loss": eval_loss, "rollbacks": h.rollbacks, "wasted_steps": h.wasted_steps,
               "ds_skipped_steps": h.ds_skipped_steps, "skipped_ranges": h.skipped,
               "skipped_samples": len(h.skipped_samples), "skipped_docs": len(h.skipped_docs),
               "checkpoint": str(final), "final_save_seconds": round(save_seconds, 3),
               "peak_rss_mb_max_rank": memory_mb["peak"], "memory_mb": memory_mb,
               "parameters": snapshot.count_parameters(run.model), "resume_load_seconds": run.resume_load_seconds}
    log.info("done: %s", json.dumps(summary))
    run.rec.write_json("summary.json", summary)


def setup(cfg: Config, resume: str | None) -> Run:
    """Everything the loop needs, in the order the collectives require: process group, run directory
    (and --resume, resolved on rank 0 for all), data, model, snapshot ring budget, engine, resumed
    state, the first rollback target."""
    allocator = return_freed_memory(cfg.train.malloc_mmap_threshold)  # before the model: ZeRO-3's frees
    rank, world, local_world = init_distributed()
    setup_logging(rank)
    log.info("host allocator: %s", allocator)
    # Config-only checks (bigtrain.cli runs them before heavy imports too, before any rank joined the group).
    # Not --resume here: rank 0 may already be finishing swaps in the checkpoint directory; prepare_run_dir
    # checks the resume on rank 0 for all.
    preflight(cfg, world, None)
    run_dir, t, ck = Path(cfg.run_dir), cfg.train, cfg.checkpoint
    resume_path = prepare_run_dir(cfg, run_dir, resume, rank)
    tokenizer = build_tokenizer(cfg.model.path)
    # Every rank calls build_dataset: the first to take the cache entry's file lock prepares it, the
    # others block on that lock (not in a collective, so no distributed timeout can kill a long
    # preparation); then every rank memory-maps the same read-only files.
    data = build_dataset(cfg.data, tokenizer, t.seed, cfg.model.path)
    ds_config = resolve_ds_config(cfg, world)
    memory = MemoryReport()
    memory.mark("before_model_load")
    model = build_model(cfg.model, tokenizer, cfg.data.seq_len, t.seed, ds_config)
    memory.mark("after_model_load")
    memory.added("model_load_added", "before_model_load", "after_model_load")
    check_loss_function(model)
    snaps = CheckpointStore(snapshot_root(cfg, run_dir, world, local_world), ck.snapshot_keep,
                            asynchronous=ck.async_snapshots, interval=ck.snapshot_interval,
                            timing_key="snapshot_seconds")
    snaps.remove()  # an earlier (killed) process's snapshots are not ours, and must not count as used space
    check_snapshot_budget(cfg, snaps.root, model, ds_config, world, local_world)  # before the optimizer exists
    engine, ds_config = build_engine(cfg, model, world, ds_config, local_world)
    memory.mark("after_engine_init")
    log.info("memory (host RSS, max over ranks): %s", format_mb(memory.reduce(engine.device)))  # collective
    rec = Recorder(run_dir, rank == 0, t.steps, t.log_interval)
    rec.write_json("ds_config.json", ds_config)
    durable = CheckpointStore(run_dir / "checkpoints", ck.keep, hf_writers(model, tokenizer), log_saves=True,
                              interval=ck.interval)
    if node_local_rank() == 0:
        snapshot.clean_on_exit(snaps.root)  # every exit path: done, gave up, preempted, exception
    state = TrainState(fingerprint=cfg.fingerprint(), world_size=world, zero_stage=zero_stage(ds_config),
                       config=cfg.to_dict())
    state.history.eps, state.history.beta2 = cfg.optim.eps, cfg.optim.beta2
    vocab = len(tokenizer)  # the ids the data holds (the model's vocab_size may be padded past it)
    run = Run(cfg, engine, model, state, Layout(rank, world, t.micro_batch, t.grad_accum), data,
              Sampler(data.train.shape[0], t.seed, cfg.data.shuffle), build_monitor(cfg.spike, t.steps),
              Escalation(cfg.spike), FaultInjector(cfg.faults, rank, data.train_docs, vocab), rec, snaps, durable,
              memory, vocab=vocab)
    if resume_path is not None:
        resume_from(run, resume_path)
    apply_hparams(cfg, engine, run.state, check=True)
    engine.train()  # from_pretrained returns eval mode; HF turns dropout and activation checkpointing off there
    rec.start(run.state, resumed=resume_path is not None)
    log.info("run_dir %s | %d rank(s) | ZeRO-%d %s | global batch %d x %d tokens | %d train / %d eval blocks",
             run_dir, world, zero_stage(ds_config), t.precision, run.layout.global_batch, cfg.data.seq_len,
             data.train.shape[0], data.eval.shape[0])
    # The initial state is a rollback target too: without it an incident before the first checkpoint
    # could only end the run. Without snapshots it goes to the durable store (one checkpoint's bytes,
    # pruned by checkpoint.keep like any other).
    if ck.snapshot_interval or not durable.saved:
        run.save(snaps if ck.snapshot_interval else durable)
    run.started = time.time()  # summary.json's seconds: the loop's, not the start-up's
    return run


def resume_from(run: Run, path: Path) -> None:
    """Load a checkpoint into the run (collective): DeepSpeed's state, bigtrain's state, the monitor's,
    the escalation's and the fault injector's; config changes since the checkpoint applied."""
    cfg, t_load = run.cfg, time.perf_counter()
    state = checkpoint.load_resume(run.engine, path, run.layout.world,
                                   Path(cfg.run_dir) / "checkpoints" / checkpoint.UNIVERSAL)
    run.resume_load_seconds = round(time.perf_counter() - t_load, 4)
    apply_changes(cfg, state, path)
    state.config, state.world_size, state.zero_stage = cfg.to_dict(), run.state.world_size, run.state.zero_stage
    run.monitor.load_state_dict(state.progress.monitor)
    run.escalation.load_state_dict(state.history.escalation)
    run.faults.load_state_dict(state.history.faults)
    run.state = state
    run.skips = SkipSet(state.history.skipped_samples)
    log.info("resumed from %s at step %d (samples %d)", path, state.progress.step, state.progress.cursor)


def micro_batch(data: PackedData, sampler: Sampler, stream: list[int], faults: FaultInjector | None = None
                ) -> dict[str, torch.Tensor]:
    """Model inputs (input_ids, labels, and position_ids for packed examples) of the samples at these
    stream positions, copied out of the memory-mapped blocks (poisoned rows garbled by fault injection)."""
    ids = sampler.sample_ids(stream)
    batch = data.batch(ids)
    return faults.corrupt(batch, list(ids)) if faults is not None else batch


class Evaluator:
    """Held-out loss and next-token accuracy every ``train.eval_interval`` steps and at the last step,
    every rank on its own shard, the same number of forwards per rank (ZeRO-3 gathers parameters
    collectively). One all-reduce."""

    def __init__(self, engine, data: PackedData, layout: Layout, cfg):
        self.engine, self.data, self.layout = engine, data, layout
        self.interval, self.batches, self.total = cfg.eval_interval, cfg.eval_batches, cfg.steps
        self.last: float | None = None

    def maybe_eval(self, step: int, row: dict) -> None:
        if self.interval and step % self.interval == 0 or step == self.total:
            self.last, row["eval_accuracy"] = self.evaluate()
            row["eval_loss"] = self.last

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean loss, share of labelled tokens whose argmax prediction is right) over the eval shard.
        The argmax reads the logits the forward already made (no extra memory beyond one bool per token)."""
        engine, layout = self.engine, self.layout
        engine.eval()
        total = torch.zeros(3, dtype=torch.float64, device=engine.device)
        m = self.data.eval.shape[0]
        for b in range(self.batches):
            start = (b * layout.world + layout.rank) * layout.micro
            rows = [(start + j) % m for j in range(layout.micro)]
            batch = {k: v.to(engine.device) for k, v in self.data.batch(rows, "eval").items()}
            out = engine(**batch)
            target = batch["labels"][:, 1:]
            mask = target != -100
            n = mask.sum().double()
            right = ((out.logits[:, :-1].argmax(-1) == target) & mask).sum().double()
            total += torch.stack([out.loss.double() * n, n, right])
        dist.all_reduce(total)
        engine.train()
        return (total[0] / total[1]).item(), (total[2] / total[1]).item()


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
                checkpoint.set_aside_newer(ckpt_root, saved.progress.step)
            choice[0] = str(path) if path else None
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        except Exception as exc:  # noqa: BLE001 - any failure here is every rank's, through the broadcast
            choice[1] = f"{exc}" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    return Path(choice[0]) if choice[0] else None



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
    h, step = state.history, state.progress.step
    if "optim.eps" in changed:
        log.warning("resume: optim.eps replaces the run's eps %g (recovery may have lowered it) with %g",
                    h.eps, cfg.optim.eps)
        h.eps = cfg.optim.eps
    if "optim.beta2" in changed:
        log.warning("resume: optim.beta2 replaces the run's beta2 %g with %g", h.beta2, cfg.optim.beta2)
        h.beta2 = cfg.optim.beta2
    if "train.steps" in changed and before.get("optim.lr") is not None and not cfg.optim.decay_steps:
        old_steps = changed["train.steps"][0]
        old_lr = lr_at(step, cfg.optim, old_steps)
        log.warning("resume: train.steps %d -> %d stretches the LR schedule: the LR of step %d is %.4g, was %.4g "
                    "(set optim.decay_steps to keep one schedule across legs)",
                    old_steps, cfg.train.steps, step + 1, lr_at(step, cfg.optim, cfg.train.steps), old_lr)
