"""Injected faults are detected and recovered under ZeRO 1/2/3 with 2 ranks, also when only one rank
sees them; the skipped data is exactly what spikes.jsonl records; resume keeps skips, eps and monitor."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

from bigtrain.checkpoint import read_state
from bigtrain.sampler import Sampler
from helpers import TINY, read_jsonl, run_bigtrain

STEPS = 44
FAULTS = ["faults.nan_steps=[14]", "faults.scale_grad_steps=[20]", "faults.corrupt_weights_step=26",
          "faults.poison_steps=[32,33,34,35]"]


def fault_run(run_dir, data_cache, stage: int, ranks: str, extra=()):
    return run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", f"train.steps={STEPS}",
                         f"train.deepspeed=zero{stage}", "checkpoint.interval=0", "checkpoint.snapshot_interval=4",
                         "spike.warmup=8", *FAULTS, f"faults.ranks={ranks}", *extra])


def surviving(rows):
    """Metrics rows on the final path (rows later undone by a rollback removed)."""
    out = []
    for row in rows:
        while out and out[-1]["step"] >= row["step"]:
            out.pop()
        out.append(row)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,ranks", [(1, "[1]"), (2, "[0]"), (3, "[1]")])
def test_faults_on_one_rank_are_recovered(tmp_path, data_cache, stage, ranks):
    run_dir = tmp_path / "run"
    import re

    proc = fault_run(run_dir, data_cache, stage, ranks)
    n_train = int(re.search(r"(\d+) train / \d+ eval blocks", proc.stdout + proc.stderr).group(1))
    events = read_jsonl(run_dir / "spikes.jsonl")
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [e["event"] for e in events] == ["rollback"] * len(events), events
    # Every injected fault is caught at its own step (poison: within the poisoned steps).
    onsets = [e["onset_step"] for e in rollbacks]
    assert onsets[:3] == [14, 20, 26], events
    # Poison stays in its samples: a rollback that skips only the outliers may meet the rest again.
    assert len(onsets) >= 4 and all(32 <= o <= STEPS for o in onsets[3:]) and onsets[3] <= 35, events
    for e in rollbacks:
        assert e["restored_step"] < e["onset_step"]

    rows = read_jsonl(run_dir / "metrics.jsonl")
    path = surviving(rows)
    assert [r["step"] for r in path] == list(range(1, STEPS + 1)), "training continued to the end"
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in path), "no spike left on the final path"

    # Escalation by cause: only an optimizer spike changes hyper-parameters.
    causes = [e["cause"] for e in rollbacks]
    assert causes[0] == "incident" and causes[1] == "optimizer", events  # NaN; loss x1000 with normal samples
    for e in rollbacks:
        if e["cause"] == "optimizer":
            assert e["eps_after"] < e["eps_before"] and "skipped_range" in e
        else:
            assert (e["eps_after"], e["lr_scale_after"]) == (e["eps_before"], e["lr_scale_before"]), e

    # Skips are sample ids: the summary, the checkpoint and the quarantine file agree, and every
    # poisoned sample the run met is quarantined with its source documents.
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = read_state(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    state = saved.history
    quarantine = read_jsonl(run_dir / "quarantine.jsonl")
    banned = {q["sample_id"] for q in quarantine if q["why"] != "window"}
    assert summary["skipped_samples"] == len(state.skipped_samples) == len(banned)
    assert set(state.skipped_samples) == banned
    offending = {i for e in rollbacks for i in e["offending_samples"]}
    poisoned = {i for a, b in state.faults["poisoned"] for i in range(a, b)}
    assert poisoned and offending & poisoned and offending <= set(state.skipped_samples)
    # every poisoned sample the run reached (first epoch: below the final cursor) is quarantined, by id
    # or passed over in an optimizer window; rollbacks moved some of the poison past the run's end
    order = Sampler(n_train, seed=1234).sample_ids(range(saved.progress.cursor))  # train.seed default
    reached = poisoned & set(order)
    # except at most one rank's share of one step (2): after the first data rollback the last poisoned
    # step met had 2 garbage samples of 4, one anomalous step that the persistence rule let through
    # (seen at ZeRO-1: samples 250 and 4543 at step 34), so they were trained on, never attributed.
    missed = reached - {q["sample_id"] for q in quarantine}
    assert reached and len(missed) <= 2, (missed, events)
    assert all(q["sources"] for q in quarantine)
    assert state.eps == rollbacks[-1]["eps_after"]
    # optimizer windows are one-pass stream ranges, exactly those the events recorded
    windows = Sampler.merge_ranges(tuple(e["skipped_range"]) for e in rollbacks if "skipped_range" in e)
    assert [tuple(r) for r in state.skipped] == windows
    # 3 transient faults + the poisoned stretch (8 samples on one rank): a bounded number of rollbacks
    assert len(rollbacks) <= 3 + 8, events


@pytest.mark.slow
def test_partial_batch_garbage_is_quarantined_by_sample_and_lr_left_alone(tmp_path, data_cache):
    """Issue 14: garbage in a third of each of 4 batches' samples (1 of 3 per rank). The spike is
    attributed to those samples: they (and only poisoned ones) are skipped by id, no window, and LR,
    eps and beta2 stay as they were."""
    run_dir = tmp_path / "run"
    run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=56",
                  "train.micro_batch=3", "checkpoint.interval=0", "checkpoint.snapshot_interval=4",
                  "spike.warmup=8", "faults.poison_steps=[40,41,42,43]", "faults.poison_fraction=0.3"])
    events = read_jsonl(run_dir / "spikes.jsonl")
    assert events and all(e["event"] == "rollback" and e["cause"] == "data" for e in events), events
    for e in events:
        assert (e["eps_after"], e["lr_scale_after"], e["beta2_after"]) == \
            (e["eps_before"], e["lr_scale_before"], e["beta2_before"]), e
        assert "skipped_range" not in e and 0 < e["offending_share"] <= 0.5
    state = read_state(run_dir / "checkpoints" / "step_00000056").history
    poisoned = {i for a, b in state.faults["poisoned"] for i in range(a, b)}
    offending = {i for e in events for i in e["offending_samples"]}
    assert len(poisoned) == 8 and offending <= poisoned and len(offending) >= 4, (offending, poisoned)
    quarantine = read_jsonl(run_dir / "quarantine.jsonl")
    assert {q["why"] for q in quarantine} <= {"outlier", "document"}
    assert {q["sample_id"] for q in quarantine if q["why"] == "outlier"} == offending
    # Documents convicted by a garbage block: with faults.poison_documents off only the chosen blocks
    # are garbage, so a convicted document's other blocks are clean, skipped on the evidence of one bad
    # block. Bound that cost: the document rows are each poisoned block's own document only.
    doc_rows = {q["sample_id"] for q in quarantine if q["why"] == "document"}
    assert {d for e in events for d in e["offending_documents"]} <= set(state.faults["poisoned_docs"])
    assert len(doc_rows - poisoned) <= 4 * len(poisoned), (sorted(doc_rows - poisoned), poisoned)
    assert state.lr_scale == 1.0 and state.eps == 1e-8
    assert [r["step"] for r in surviving(read_jsonl(run_dir / "metrics.jsonl"))] == list(range(1, 57))


@pytest.mark.slow
def test_noise_too_thin_to_spike_is_screened_by_sample_without_a_rollback(tmp_path, data_cache):
    """Issue 14: one sample in eight of two steps (rank 0's first) is uniform token ids. The steps are
    anomalous at most (2 < patience 3), never a spike; the noise screen, run on every rank from the
    all-reduced losses, skips exactly the noise samples; no rollback, LR and eps unchanged."""
    run_dir = tmp_path / "run"
    run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "data.seq_len=64", "train.steps=60",
                  "train.micro_batch=4", "train.precision=fp32", "optim.lr=3e-3", "checkpoint.interval=0",
                  "checkpoint.snapshot_interval=10", "faults.poison_steps=[50,51]", "faults.poison_fraction=0.25",
                  "faults.ranks=[0]"])
    events = read_jsonl(run_dir / "spikes.jsonl")
    assert events and {e["event"] for e in events} == {"screen"}, events
    h = read_state(run_dir / "checkpoints" / "step_00000060").history
    poisoned = {i for a, b in h.faults["poisoned"] for i in range(a, b)}
    noise = {q["sample_id"] for q in read_jsonl(run_dir / "quarantine.jsonl") if q["why"] == "noise"}
    assert len(poisoned) == 2 and noise == poisoned and [e["step"] for e in events] == [50, 51]
    assert h.rollbacks == 0 and h.lr_scale == 1.0 and h.eps == 1e-8 and h.screens == 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_in_process_rollback_equals_a_fresh_engine(tmp_path, data_cache, stage):
    """DeepSpeed warns that a ZeRO-3 in-process load "wants a pristine model". Proof that ours is
    fine, for every stage (ZeRO-2 is the default): the steps after an in-process rollback equal those
    of a fresh process resumed from the same checkpoint with the same skip list and eps."""
    import shutil

    common = [*TINY, f"data.cache_dir={data_cache}", f"train.deepspeed=zero{stage}", "train.steps=16",
              "checkpoint.interval=4", "checkpoint.snapshot_interval=0", "spike.warmup=4", "faults.nan_steps=[10]"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_bigtrain([*common, f"run_dir={a}"])
    (event,) = read_jsonl(a / "spikes.jsonl")
    assert event["event"] == "rollback" and event["restored_step"] == 8
    # A fresh run directory holding A's step-8 checkpoint with A's post-rollback decisions.
    shutil.copytree(a / "checkpoints" / "step_00000008", b / "checkpoints" / "step_00000008")
    after = json.loads((a / "checkpoints" / "step_00000012" / "bigtrain_state.json").read_text())
    state_file = b / "checkpoints" / "step_00000008" / "bigtrain_state.json"
    state = json.loads(state_file.read_text())
    from bigtrain.checkpoint import History

    state.update({f.name: after[f.name] for f in dataclasses.fields(History)})
    state_file.write_text(json.dumps(state))
    from bigtrain.checkpoint import _manifest

    # The manifest records file sizes: keep it true to the edited state file.
    (state_file.parent / "COMPLETE").write_text(_manifest(state_file.parent, 8))
    run_bigtrain([*common, f"run_dir={b}", "--resume", str(b / "checkpoints" / "step_00000008")])
    rows_a = surviving(read_jsonl(a / "metrics.jsonl"))[8:]
    rows_b = read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == list(range(9, 17))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["samples"] for r in rows_a] == [r["samples"] for r in rows_b]


@pytest.mark.slow
def test_resume_after_recovery_keeps_skips_eps_and_monitor(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "checkpoint.interval=4",
              "checkpoint.snapshot_interval=2", "spike.warmup=4", "faults.scale_grad_steps=[10]"]
    run_bigtrain([*common, "train.steps=12"])
    saved = read_state(run_dir / "checkpoints" / "step_00000012")
    # an optimizer spike: its window is a stream range (one pass), not ids
    assert saved.history.skipped and saved.history.eps < 1e-8 and saved.history.rollbacks == 1
    assert saved.progress.monitor["log_loss"]
    # Continue longer and with a larger micro-batch: skips are sample ids, not steps or positions.
    run_bigtrain([*common, "train.steps=16", "train.micro_batch=4", "--resume", "auto"])
    final = read_state(run_dir / "checkpoints" / "step_00000016")
    assert (final.history.skipped, final.history.skipped_samples) == (saved.history.skipped,
                                                                      saved.history.skipped_samples)
    assert final.history.eps == saved.history.eps and final.history.rollbacks == 1
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 12]
    assert [r["step"] for r in rows] == [13, 14, 15, 16]
    assert all(r["eps"] == saved.history.eps for r in rows)
    # 8 samples a step, and more only where a skipped sample id is passed over
    steps = [r["samples"] - p for r, p in zip(rows, [saved.progress.cursor] + [r["samples"] for r in rows])]
    assert all(8 <= d <= 8 + len(saved.history.skipped_samples) for d in steps), steps
    assert len(read_jsonl(run_dir / "spikes.jsonl")) == 1, "the fault did not replay after resume"


@pytest.mark.slow
def test_crash_during_recovery_leaves_a_resumable_run(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=16", "checkpoint.interval=4",
              "checkpoint.snapshot_interval=2", "spike.warmup=4", "faults.nan_steps=[10]"]
    # Every rank dies mid-rollback (after the load, before the new state is recorded), as a job does
    # when its node fails.
    crashed = run_bigtrain([*common, "faults.crash_in_recovery=true"], check=False)
    assert crashed.returncode != 0
    run_bigtrain([*common, "--resume", "auto"])
    rows = surviving(read_jsonl(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 17))
    # The resumed run met the (transient, not yet recorded) fault again and recovered this time; the
    # crashed attempt's event, if rank 0 wrote it, stays in the append-only log.
    events = read_jsonl(run_dir / "spikes.jsonl")
    assert events and all(e["event"] == "rollback" and e["onset_step"] == 10 for e in events)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("fault,snapshots", [("faults.corrupt_weights_step=7", 0), ("faults.nan_steps=[7]", 10)])
def test_an_early_incident_rolls_back_to_the_initial_state(tmp_path, data_cache, fault, snapshots):
    """Issue 11.2/11.3: an incident in the first interval rolls back to step 0 like any other (it
    used to end the run with "7 of 7 steps discarded", or, without snapshots, save the spiked weights
    as a COMPLETE checkpoint that --resume auto then continued from)."""
    from bigtrain.checkpoint import complete_checkpoints

    run_dir = tmp_path / "run"
    proc = run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=10",
                         "checkpoint.interval=0", f"checkpoint.snapshot_interval={snapshots}", "spike.warmup=4", fault],
                        check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (event,) = read_jsonl(run_dir / "spikes.jsonl")
    assert event["event"] == "rollback" and event["onset_step"] == 7 and event["restored_step"] == 0, event
    path = surviving(read_jsonl(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in path] == list(range(1, 11))
    assert all(r["loss"] < 10 for r in path)
    for ckpt in complete_checkpoints(run_dir / "checkpoints"):
        assert read_state(ckpt).history.rollbacks == (ckpt.name != "step_00000000"), ckpt


def test_giving_up_without_a_healthy_state_saves_nothing_and_names_the_last_healthy_checkpoint(tmp_path, caplog):
    """Issue 11.2: with no rollback target the state still holds the spiked weights: never save them."""
    from bigtrain.checkpoint import CheckpointStore, Progress, TrainState, complete_checkpoints
    from bigtrain.recovery import GiveUp, give_up
    from helpers import FakeEngine

    def run(engine, state):  # what give_up uses of a Run
        return types.SimpleNamespace(durable=store, state=state, save=lambda s: s.save(engine, state))

    store = CheckpointStore(tmp_path, keep=5)
    store.save(FakeEngine(b"healthy"), TrainState(Progress(step=4)))
    spiked = TrainState(Progress(step=9))
    with caplog.at_level("ERROR", logger="bigtrain"):
        give_up(run(FakeEngine(b"spiked"), spiked), GiveUp("budget", restored=False, onset=7))
    assert "step_00000004 (step 4)" in caplog.text
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004"]
    # Rolled back: the state is healthy and is saved.
    give_up(run(FakeEngine(b"healthy"), TrainState(Progress(step=4))), GiveUp("budget", restored=True, onset=7))
    assert (tmp_path / "step_00000004" / "mp_rank_00_model_states.pt").read_bytes() == b"healthy"
    # A checkpoint saved after the onset but before the detection holds the spike: --resume auto must
    # not continue from it. It is moved aside (kept for a person to inspect), not deleted.
    store.save(FakeEngine(b"after the onset"), TrainState(Progress(step=8)))
    with caplog.at_level("ERROR", logger="bigtrain"):
        give_up(run(FakeEngine(b"spiked"), TrainState(Progress(step=10))), GiveUp("budget", restored=False, onset=7))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004"] and store.saved == [4]
    assert "step_00000004 (step 4)" in caplog.text
    (aside,) = tmp_path.glob("abandoned-*/step_00000008")
    assert (aside / "mp_rank_00_model_states.pt").read_bytes() == b"after the onset"
    caplog.clear()
    with caplog.at_level("ERROR", logger="bigtrain"):  # an onset before every checkpoint
        give_up(run(FakeEngine(b"spiked"), spiked),
                GiveUp("no intact checkpoint before the onset step 3", restored=False, onset=3))
    assert "No checkpoint was written" in caplog.text and "none: no checkpoint predates" in caplog.text
    assert complete_checkpoints(tmp_path) == [] and store.saved == []


@pytest.mark.gpu
@pytest.mark.slow
def test_fp16_run_on_a_gpu_recovers_an_early_incident(tmp_path, data_cache):
    """The real fp16 path (DeepSpeed refuses fp16 on CPU): dynamic loss scaling, a NaN at step 7 rolled
    back to the initial state, the run finishes with finite losses and the loss scale's skipped steps
    counted."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    run_dir = tmp_path / "run"
    run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=16",
                  "train.precision=fp16", "checkpoint.interval=0", "checkpoint.snapshot_interval=0",
                  "spike.warmup=4", "faults.nan_steps=[7]"], nproc=1)
    events = read_jsonl(run_dir / "spikes.jsonl")
    assert events and events[0]["event"] == "rollback" and events[0]["restored_step"] == 0, events
    path = surviving(read_jsonl(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in path] == list(range(1, 17))
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ds_skipped_steps"] == sum(not r["step_applied"] for r in read_jsonl(run_dir / "metrics.jsonl"))


def test_quarantined_samples_stay_out_in_every_epoch(tmp_path, data_cache):
    """Issue 11 item 4: a skip is a sample id, not a stream range, so the next epoch's permutation
    cannot bring a quarantined sample back. A ~240-block corpus runs 2.5 epochs; every step after the
    last rollback must draw exactly the samples the sampler gives with the final skip set, none of
    them skipped, across the epoch boundaries."""
    import re

    from bigtrain.sampler import Sampler, SkipSet

    run_dir = tmp_path / "run"
    proc = run_bigtrain([*TINY, "data.max_bytes=8000", f"data.cache_dir={data_cache}", f"run_dir={run_dir}",
                         "train.steps=100", "train.micro_batch=3", "checkpoint.interval=0",
                         "checkpoint.snapshot_interval=4", "spike.warmup=8", "faults.poison_steps=[40,41,42,43]",
                         "faults.poison_fraction=0.3"])
    n_train = int(re.search(r"(\d+) train / \d+ eval blocks", proc.stdout + proc.stderr).group(1))
    state = read_state(run_dir / "checkpoints" / "step_00000100").history
    assert state.skipped_samples and state.rollbacks >= 1
    events = read_jsonl(run_dir / "spikes.jsonl")
    rows = surviving(read_jsonl(run_dir / "metrics.jsonl"))
    last_restore = max(e["restored_step"] for e in events)
    tail = [r for r in rows if r["step"] > last_restore]
    assert tail[-1]["samples"] > 2 * n_train, "the run must cross into a third epoch"
    sampler, skips = Sampler(n_train, seed=1234), SkipSet(state.skipped_samples)  # train.seed default
    cursor = next(r["samples"] for r in rows if r["step"] == last_restore)
    for r in tail:
        taken, cursor = sampler.take(cursor, 6, state.skipped, skips)
        assert cursor == r["samples"], r  # the run skipped exactly the quarantined ids
        assert not set(sampler.sample_ids(taken)) & set(state.skipped_samples)


SLOW_WRITER = """
import sys, time
import bigtrain.checkpoint as ckpt
write = ckpt.SnapshotEngine.write
def slow_write(self):
    time.sleep(2.0)  # the files are written long after the loop has run on (and mutated the tensors)
    write(self)
ckpt.SnapshotEngine.write = slow_write
from bigtrain.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_a_rollback_to_an_async_snapshot_restores_exactly_its_step(tmp_path, data_cache):
    """Issue 9.4: a snapshot whose write is still under way when a NaN hits (written 2 s late, after
    the next optimizer step changed every tensor in place) is finished, then restored: every loss of
    the run, before and after the rollback, equals the run with synchronous snapshots."""
    script = tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    common = [*TINY, f"data.cache_dir={data_cache}", "train.steps=14", "train.deepspeed=zero2",
              "checkpoint.interval=0", "checkpoint.snapshot_interval=3", "spike.warmup=6", "faults.nan_steps=[11]"]
    run_bigtrain([*common, f"run_dir={tmp_path / 'async'}", "checkpoint.async_snapshots=true"], script=str(script))
    run_bigtrain([*common, f"run_dir={tmp_path / 'sync'}", "checkpoint.async_snapshots=false"])
    runs = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("async", "sync")}
    for name, rows in runs.items():
        events = read_jsonl(tmp_path / name / "spikes.jsonl")
        assert [(e["event"], e["onset_step"], e["restored_step"]) for e in events] == [("rollback", 11, 9)], events
    steps = [r["step"] for r in runs["sync"]]
    assert steps == [*range(1, 12), *range(10, 15)], steps
    losses = {name: [round(r["loss"], 6) if r["loss"] == r["loss"] else "nan" for r in rows]
              for name, rows in runs.items()}
    assert losses["async"] == losses["sync"]
    # each snapshot reports the write of the one before (0, 3, 6; step 9's, finished by the rollback, at 12)
    assert [r["step"] for r in runs["async"] if "snapshot_write_seconds" in r] == [3, 6, 9, 12], \
        "the background writes were reported (each >= 2 s)"
    assert all(r["snapshot_write_seconds"] >= 2 for r in runs["async"] if "snapshot_write_seconds" in r)
