"""Spike recovery: roll back to the newest checkpoint before the onset, apply the plan the escalation
decided (skip what the per-sample losses convict, or a window; keep or change the optimizer's
settings), record it; or give up, saving only a healthy state.

Every function here runs on every rank with the same inputs (the per-sample losses came through the
step's all-reduce), so every rank takes the same branch and every load and save stays collective.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bigtrain import checkpoint
from bigtrain.checkpoint import CheckpointStore, History
from bigtrain.data import PackedData
from bigtrain.engine import apply_hparams, keep_loss_scale, loss_scale, lr_multiplier, token_losses
from bigtrain.run import Layout, Run
from bigtrain.sampler import Sampler, SkipSet, blocks_of_documents, implicated_documents
from bigtrain.spike import (CAUSE_INCIDENT, DATA, NOISE, OPTIMIZER, SKIP_UPDATE, Attribution, RecoveryPlan, Verdict,
                            attribute, noise_bar, noise_samples, uniform_like)

log = logging.getLogger("bigtrain")

Suspects = tuple[list[int], list[float], list[float]]


def skip_window(sampler: Sampler, cursor: int, skipped: list, rolled_back_steps: int, global_batch: int,
                multiplier: int, margin_batches: int, skips: SkipSet | None = None) -> tuple[list[int], int]:
    """The stream indices a rollback skips, and the end of its range: from the restored ``cursor``,
    ``multiplier`` times the samples the rolled-back steps drew plus ``margin_batches`` batches,
    counted among samples not skipped already. Counting in stream span instead multiplied earlier
    skips at each escalation level: one range grew to 1.65M samples in the benchmark."""
    count = (multiplier * rolled_back_steps + margin_batches) * global_batch
    return sampler.take(cursor, count, skipped, skips)


@dataclass
class Evidence:
    """What the monitor knew at the spike, taken before the rollback replaces its state."""

    ids: list[int]
    sums: list[float]
    counts: list[float]
    """Sample ids, loss sums and label counts of the unaccepted steps from the onset on."""
    reference: tuple[float, float] | None
    band: float | None


def gather_evidence(monitor, verdict: Verdict, cfg) -> Evidence | None:
    """bigtrain's monitor only (None for the competitors, which skip a window as they always did, and
    for a skip-update verdict). Every rank holds the same per-sample losses (they came through the
    step's all-reduce), so every rank gathers the same evidence."""
    samples = getattr(monitor, "samples", None)
    if samples is None or verdict.kind == SKIP_UPDATE:
        return None
    ids, sums, counts = samples.suspects(verdict.onset_step if verdict.onset_step is not None else 0)
    return Evidence(ids, sums, counts, samples.reference(cfg.mad_floor), monitor.loss_band())


def rescore_positions(n: int, layout: Layout, rank: int) -> list[int]:
    """Positions among ``n`` suspects (whole global batches, rank-major) that ``rank`` scores again: those
    its neighbour ``rank - 1`` trained on."""
    gb, per_rank, world = layout.global_batch, layout.per_rank, layout.world
    return [i for i in range(n) if ((i % gb) // per_rank + 1) % world == rank]


def control_ids(run: Run) -> list[int]:
    """The samples the restored state trained on last: the last (up to) one global batch of samples
    not skipped in the stream before the restored cursor, looking back at most 4 batches. The monitor
    accepted their step, so sound weights score them at the usual level (``attribute``'s ``control``)."""
    cursor, gb = run.state.progress.cursor, run.layout.global_batch
    start = max(0, cursor - 4 * gb)
    stream, _ = run.sampler.take(start, min(4 * gb, cursor - start), run.state.history.skipped, run.skips)
    return run.sampler.sample_ids([i for i in stream if i < cursor][-gb:])


@torch.no_grad()
def rescore(run: Run, ids: list[int], as_of: int | None = None) -> list[float]:
    """Each sample's summed token loss under the weights just restored (forward only, eval mode), in
    the order of ``ids``; identical on every rank (one all-reduce of 4 bytes per sample; the label
    counts are ``PackedData.label_counts``, known on every rank). ``as_of``: injected poison as of that step (``FaultInjector.corrupt``).

    Each rank scores the samples its neighbour trained on (the suspects are whole global batches,
    rank-major): a fault of one rank's arithmetic does not follow its samples, bad data does. Every
    rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each), padding
    with a repeat whose result is dropped. Cost, once per rollback: the forward passes, about a third
    of a training step per global batch scored; ``attribute_spike`` scores the suspect steps (at most
    ``SampleLosses.max_pending_steps``, 16) and one control batch, so at most ~6 steps' compute, against
    the tens of steps a rollback discards."""
    layout, engine = run.layout, run.engine
    n = len(ids)
    rounds = max(-(-len(rescore_positions(n, layout, r)) // layout.micro) for r in range(layout.world)) if n else 0
    mine = rescore_positions(n, layout, layout.rank)
    out = torch.zeros(n, dtype=torch.float32, device=engine.device)
    engine.eval()
    try:
        for k in range(rounds):
            part = mine[k * layout.micro:(k + 1) * layout.micro]
            sids = [ids[i] for i in part] or ids[:1]  # a rank with nothing left still joins the forward
            batch = run.faults.corrupt(run.data.batch(sids), sids, as_of)  # data-bound poison is part of the data
            labels = batch.pop("labels")
            sums = token_losses(engine(**{k: v.to(engine.device) for k, v in batch.items()}).logits, labels).sum(1)
            if part:
                out[part] = sums.float()
    finally:
        engine.train()
    dist.all_reduce(out)
    return out.tolist()


def attribute_spike(run: Run, verdict: Verdict, evidence: Evidence | None) -> tuple[Attribution | None, Suspects]:
    """Which samples of the spiked steps stand out (:func:`bigtrain.spike.attribute`), judged again by
    the restored weights (:func:`rescore`) when ``spike.rescore``. Returns the attribution with the
    suspects it judged (sample ids, loss sums, label counts)."""
    if evidence is None:
        return None, ([], [], [])
    cfg = run.cfg.spike
    rescored = control = None
    if cfg.rescore and evidence.ids and evidence.reference:
        rescored = rescore(run, evidence.ids)
        # the same on every rank, so every rank makes the same calls; an incident's cause is fixed
        usual = control_ids(run) if verdict.kind != "incident" else []
        if usual:
            # judged against the level the monitor saw when they were trained (restored with the
            # weights): a loss that fell since the restored step does not read as damage
            then = run.monitor.samples.reference(cfg.mad_floor) or evidence.reference
            control = (rescore(run, usual, as_of=run.state.progress.step), run.data.label_counts(usual), then[0])
    attribution = attribute(evidence.sums, evidence.counts, evidence.reference, cfg,
                            incident=verdict.kind == "incident", per_rank=run.layout.per_rank, band=evidence.band,
                            rescored=rescored, control=control)
    return attribution, (evidence.ids, evidence.sums, evidence.counts)


@dataclass
class Quarantine:
    rows: list[dict]
    """One quarantine.jsonl row per newly skipped sample id (why: outlier / document / window)."""
    event: dict
    """The spike event's fields about cause and skips."""


def quarantine(history: History, sampler: Sampler, data: PackedData, attribution: Attribution | None,
               suspects: tuple[list[int], list[float], list[float]], window: tuple[int, int, int, int, int],
               max_document_blocks: int = 0, max_convicted_blocks: int = 0, why: str = "outlier",
               skip_stream: bool | None = None) -> Quarantine:
    """Add to what ``history`` skips what this recovery skips, by cause:
    - data (outliers explain the spike): the outlier samples, plus every block of the documents they
      convict (:func:`bigtrain.sampler.implicated_documents`), wherever those blocks lie in the stream,
      by sample id (``history.skipped_samples``: out in every epoch, at any batch or world size);
    - incident: the outlier samples (non-finite ones included), nothing else;
    - optimizer, or no attribution: the outliers if any, by id, plus the old window (``skip_window``:
      from the restored cursor, ``window`` = (cursor, rolled-back steps, global batch, multiplier,
      margin)) as a half-open *stream range* in ``history.skipped``. The window's samples are not bad
      data - most are good samples skipped once so the model state moves past the region that blew up
      (as in the PaLM recipe) - so they are skipped for that one pass only and come back in later
      epochs; banning them by id would add ~180k ids per rollback at a global batch of 1,024.
    ``skip_stream`` (None: when the cause is optimizer) adds the window for any cause: a data rollback
    that repeats one in its region (``RecoveryPlan.skip_stream``) skips the stream ahead as well.
    ``max_convicted_blocks`` > 0: documents are convicted (in order) only while their blocks total at
    most this; the rest lose only their flagged blocks. So each rollback adds at most
    (suspect samples + ``max_convicted_blocks``) ids. ``why``: the reason the flagged samples' rows give."""
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
        new.setdefault(ids[i], {"sample_id": ids[i], "why": why, "loss": loss})
    for sid in doc_blocks:
        new.setdefault(sid, {"sample_id": sid, "why": "document"})
    event = {"cause": cause, "offending_samples": offending, "offending_documents": docs,
             "offending_document_names": [data.doc_names[d] for d in docs],
             "offending_share": round(len(offending) / max(1, len(ids)), 4), "suspect_samples": len(ids),
             "rank_aligned": bool(attribution and attribution.rank_aligned),
             "attribution": attribution.stats if attribution is not None else {}}
    existing = np.asarray(history.skipped_samples, dtype=np.int64)  # sorted
    fresh = np.fromiter(new.keys(), dtype=np.int64, count=len(new))
    known = set(fresh[np.isin(fresh, existing)].tolist())
    rows = [row for sid, row in new.items() if sid not in known]
    history.skipped_samples = np.union1d(existing, fresh).tolist()  # C-speed merge: screens may run often
    history.skipped_docs = sorted(set(history.skipped_docs) | set(docs))
    if cause == OPTIMIZER if skip_stream is None else skip_stream:
        cursor, rolled, global_batch, multiplier, margin = window
        stream, end = skip_window(sampler, cursor, history.skipped, rolled, global_batch, multiplier, margin,
                                  SkipSet(history.skipped_samples))
        rows += [{"sample_id": sid, "why": "window", "stream_index": i}
                 for i, sid in zip(stream, sampler.sample_ids(stream)) if sid not in new]
        history.skipped = [list(r) for r in Sampler.merge_ranges([*map(tuple, history.skipped), (cursor, end)])]
        event["skipped_range"] = [cursor, end]
    event["skipped_samples"] = len(rows)
    return Quarantine(rows, event)


def screen(run: Run, ids: list[int], sums: list[float], counts: list[float], level: float | None) -> bool:
    """The noise screen of a step that is not rolled back (:func:`bigtrain.spike.noise_samples`): its
    noise samples, and every block of the documents they convict, are skipped from the next step on,
    by id, in every epoch, without a rollback (the step already trained on them; what is left of their
    documents is not). ``level``: the monitor's per-sample level from before this step. Recorded as a
    "screen" event in spikes.jsonl and rows in quarantine.jsonl. Every rank holds the same per-sample
    losses, rows and history, so every rank skips the same ids. Returns whether anything new is skipped.

    Noise: a sample that scores no better than a uniform guess over the tokenizer's vocabulary and
    whose labelled tokens are as varied as uniform draws (:func:`bigtrain.spike.uniform_like`, read
    from the data: the candidates' rows only). A screen convicts at most ``spike.noise_max_blocks``
    blocks of documents; once the screens have skipped ``spike.noise_max_total_blocks``, the screen
    turns off (a ``screen_off`` event).

    Cost per step: one comparison per sample of the global batch, on values the step's all-reduce
    already brought (no communication); only a step with candidates reads their rows, and only one
    with noise pays for the document lookup and the skip set's rebuild (a sort of the skipped ids)."""
    cfg, h = run.cfg.spike, run.state.history
    budget = cfg.noise_max_total_blocks
    if h.screened_blocks >= budget:
        return False
    candidates = noise_samples(sums, counts, level, run.vocab, cfg)
    if not candidates:
        return False
    sids = [ids[i] for i in candidates]
    labels = run.faults.corrupt(run.data.batch(sids), sids)["labels"][:, 1:]  # the targets as trained
    flagged = [i for i, row in zip(candidates, labels) if uniform_like(row[row != -100].tolist(), run.vocab, cfg)]
    if not flagged:
        return False
    bar = noise_bar(level, run.vocab, cfg)
    attribution = Attribution(DATA, flagged, {"noise_bar": round(bar, 4)})
    skip = quarantine(h, run.sampler, run.data, attribution, (ids, sums, counts), (0, 0, 0, 0, 0),
                      document_cap(run, cfg.noise_max_blocks), cfg.noise_max_blocks, why=NOISE)
    if not skip.rows:
        return False
    run.skips = SkipSet(h.skipped_samples)
    h.screens += 1
    h.screened_blocks += len(skip.rows)
    step = run.state.progress.step
    run.rec.quarantine({**r, "sources": run.data.sources(r["sample_id"]), "step": step, "screen": h.screens}
                       for r in skip.rows)
    run.rec.event({"event": "screen", "step": step, "screen": h.screens, **skip.event, "cause": NOISE,
                   "reason": f"{len(flagged)} sample(s) at >= {bar:.3g} mean token loss: no better than a "
                             f"uniform guess over {run.vocab} tokens"})
    log.warning("step %d: noise screen: %d sample(s), %d document(s) skipped from now on", step, len(flagged),
                len(skip.event["offending_documents"]))
    if h.screened_blocks >= budget:
        reason = (f"the noise screens have skipped {h.screened_blocks} blocks, >= spike.noise_max_total_blocks "
                  f"{budget}: the screen is off for the rest of the run; look at the data (quarantine.jsonl, "
                  f"why noise)")
        run.rec.event({"event": "screen_off", "step": step, "screen": h.screens, "reason": reason})
        log.warning("step %d: %s", step, reason)
    return True


def pick_target(stores: list[CheckpointStore], onset: int) -> tuple[int, CheckpointStore] | None:
    """The newest snapshot or checkpoint strictly before the onset that verifies on every rank. A
    snapshot still being written is finished first (collective), so it can be the target."""
    for s in stores:
        try:
            s.finish()
        except checkpoint.CheckpointError as exc:  # agreed on every rank (all_ok): all take this branch
            log.warning("the newest snapshot could not be written (%s); rolling back to an older one", exc)
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


@dataclass
class GiveUp:
    """Why recovery stopped. ``restored``: the state was rolled back to a healthy target (safe to
    save); otherwise it still holds the spiked weights. ``onset``: the first bad step."""

    reason: str
    restored: bool
    onset: int


def give_up(run: Run, reason: GiveUp) -> None:
    """Save the state only when it is healthy (rolled back); never save spiked weights as the last
    healthy state (collective: every rank reaches here with the same ``reason``). Durable checkpoints
    from the onset on hold the spike (the onset can precede the detection by several steps): they are
    moved aside, so ``--resume auto`` continues from a healthy one."""
    durable, moved = run.durable, True
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
    step = run.state.progress.step
    if reason.restored:
        path = run.save(durable)
        log.error("gave up: %s. The last healthy state (step %d) is saved at %s; see spikes.jsonl",
                  reason.reason, step, path)
        return
    healthy = durable.latest_before(reason.onset)
    where = (f"{durable.root / checkpoint.tag_for(healthy)} (step {healthy})" if healthy is not None
             else "none: no checkpoint predates the incident; restart the run")
    log.error("gave up: %s. No checkpoint was written: the weights at step %d are not healthy. The last healthy "
              "checkpoint is %s; see spikes.jsonl", reason.reason, step, where)


def plan_recovery(run: Run, verdict: Verdict, onset: int, target_step: int, step: int, cause: str) -> RecoveryPlan:
    """The escalation's plan for a spike at ``step``, from the run's settings after the restore. The LR
    multiplier is read at the restored step: the cool-down is a function of the step, and a rollback
    takes it back to where it was on the timeline restored (a data rollback then changes nothing).
    Budgets count steps run: progress kept so far (every executed step not already discarded); the
    restored step would call the first interval's incident "7 of 7 steps discarded"."""
    h = run.state.history
    kept = h.executed_steps - h.wasted_steps - (step - target_step)
    return run.escalation.decide(step, onset, target_step, kept, h.eps, lr_multiplier(run.cfg, run.state), h.beta2,
                                 cause, kind=verdict.kind)


def restore(run: Run, store: CheckpointStore, step: int, restore_monitor: bool) -> float:
    """Load the target (collective) and put the run's progress back to it: one assignment, since the
    history (what was learned, what is skipped) survives. The fp16 loss scale is kept (see
    ``keep_loss_scale``); the model goes back to train mode. Returns the load's seconds."""
    spike_step, scale, t0 = run.state.progress.step, loss_scale(run.engine), time.perf_counter()
    old = checkpoint.load(run.engine, store.root / checkpoint.tag_for(step))
    load_seconds = time.perf_counter() - t0
    keep_loss_scale(run.engine, scale)
    run.engine.train()
    run.faults.after_rollback(spike_step)
    run.state.progress = old.progress
    if restore_monitor:
        run.monitor.load_state_dict(old.progress.monitor)  # statistics from before the onset
    run.monitor.reset_pending()
    return load_seconds


def recover(run: Run, verdict: Verdict, row: dict) -> GiveUp | None:
    """Roll back to the newest checkpoint before the spike's onset and treat the cause the per-sample
    losses point to (``attribute_spike``): data -> skip the offending samples and their documents (a
    repeat in the region: the stream window ahead too), hyper-parameters unchanged; optimizer -> skip the window from there to the spike and climb the
    eps/LR/beta2 ladder; incident -> rewind only. Returns the reason when the budget is spent (the
    state is then the last healthy one; the caller saves and exits): never loops."""
    t0, spike_step = time.time(), run.state.progress.step
    onset = verdict.onset_step if verdict.onset_step is not None else spike_step
    event = {"step": spike_step, "onset_step": onset, "verdict": verdict.kind, "reason": verdict.reason,
             "severity": verdict.severity, "stats": verdict.stats, "loss": row["loss"], "grad_norm": row["grad_norm"]}
    target = pick_target(run.stores, onset)
    if target is None:
        reason = f"no intact checkpoint before the onset step {onset} to roll back to"
        run.rec.event({**event, "event": "give_up", "action": "stop", "reason": reason})
        return GiveUp(reason, restored=False, onset=onset)
    target_step, store = target
    evidence = gather_evidence(run.monitor, verdict, run.cfg.spike)  # before the load replaces the monitor's
    event["load_seconds"] = round(restore(run, store, target_step, verdict.kind != SKIP_UPDATE), 4)
    t1 = time.perf_counter()
    attribution, suspects = attribute_spike(run, verdict, evidence)
    event["attribution_seconds"] = round(time.perf_counter() - t1, 4)
    plan = plan_recovery(run, verdict, onset, target_step, spike_step, attribution.cause if attribution else OPTIMIZER)
    if plan.stop:
        run.rec.event({**event, "event": "give_up", "action": "stop", "restored_step": target_step,
                       "reason": plan.reason, "level": plan.level})
        apply_hparams(run.cfg, run.engine, run.state)
        return GiveUp(plan.reason, restored=True, onset=onset)
    skip = skip_samples(run, plan, attribution, suspects, spike_step)
    before = apply_plan(run, plan)
    run.rec.quarantine({**r, "sources": run.data.sources(r["sample_id"]), "rollback": run.state.history.rollbacks}
                       for r in skip.rows)
    record_rollback(run, event, plan, skip, before, store, time.time() - t0)
    return None


def document_cap(run: Run, cap: int) -> int:
    """Blocks a document may have and still be convicted whole: ``spike.max_document_share`` of the
    training blocks, at most ``cap``, at least 1."""
    return max(1, min(int(run.cfg.spike.max_document_share * run.data.train.shape[0]), cap))


def skip_samples(run: Run, plan: RecoveryPlan, attribution: Attribution | None, suspects: Suspects,
                 spike_step: int) -> Quarantine:
    """What this rollback skips (``quarantine``), from the restored cursor; the run's skip set rebuilt."""
    cfg, h = run.cfg.spike, run.state.history
    window = (run.state.progress.cursor, spike_step - plan.restored_step, run.layout.global_batch,
              plan.skip_multiplier, plan.margin_batches)
    skip = quarantine(h, run.sampler, run.data, attribution, suspects, window, document_cap(run, cfg.max_convicted_blocks),
                      cfg.max_convicted_blocks, skip_stream=plan.skip_stream)
    run.skips = SkipSet(h.skipped_samples)
    return skip


def apply_plan(run: Run, plan: RecoveryPlan) -> dict:
    """The plan's settings into the run's history and the optimizer; checkpoints newer than the
    target forgotten. Returns the settings before (for the event)."""
    h = run.state.history
    before = {"eps": h.eps, "lr_scale": lr_multiplier(run.cfg, run.state), "beta2": h.beta2}
    h.eps, h.lr_scale, h.beta2, h.lr_scale_step = plan.eps, plan.lr_scale, plan.beta2, plan.restored_step
    h.rollbacks += 1
    h.wasted_steps += plan.wasted_steps
    apply_hparams(run.cfg, run.engine, run.state, check=True)  # DeepSpeed's load restored the old eps: prove it is set
    for s in run.stores:
        s.drop_after(plan.restored_step)
    return before


def record_rollback(run: Run, event: dict, plan: RecoveryPlan, skip: Quarantine, before: dict,
                    store: CheckpointStore, seconds: float) -> None:
    h = run.state.history
    changed = "".join(f"+{k}" for k, key in (("eps", "eps"), ("lr", "lr_scale"), ("beta2", "beta2"))
                      if getattr(plan, key) != before[key])
    run.rec.event({**event, "event": "rollback" if plan.budgeted else "skip_update", "action": "rollback+skip" + changed,
                   "rollback": h.rollbacks, "level": plan.level, "escalation": plan.reason,
                   "restored_step": plan.restored_step,
                   "restored_from": str(store.root), **skip.event,
                   "eps_before": before["eps"], "eps_after": h.eps, "lr_scale_before": before["lr_scale"],
                   "lr_scale_after": h.lr_scale, "beta2_before": before["beta2"], "beta2_after": h.beta2,
                   "wasted_steps": plan.wasted_steps, "recover_seconds": round(seconds, 3)})
    log.warning("step %d: %s -> cause %s, rolled back to step %d, skipping %d samples (%d documents), eps %.3g -> %.3g",
                event["step"], event["reason"], skip.event.get("cause"), plan.restored_step,
                skip.event["skipped_samples"], len(skip.event.get("offending_documents", [])), before["eps"], h.eps)
