"""Injected faults are detected and recovered under ZeRO 1/2/3 with 2 ranks, also when only one rank
sees them; the skipped data is exactly what spikes.jsonl records; resume keeps skips, eps and monitor."""

from __future__ import annotations

import json

import pytest

from bigtrain.checkpoint import read_state
from bigtrain.sampler import Sampler
from conftest import TINY, read_jsonl, run_bigtrain

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
    fault_run(run_dir, data_cache, stage, ranks)
    events = read_jsonl(run_dir / "spikes.jsonl")
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [e["event"] for e in events] == ["rollback"] * len(events), events
    # Every injected fault is caught at its own step (poison: within the poisoned steps).
    onsets = [e["onset_step"] for e in rollbacks]
    assert onsets[:3] == [14, 20, 26], events
    assert len(onsets) == 4 and 32 <= onsets[3] <= 35, events
    for e in rollbacks:
        assert e["restored_step"] < e["onset_step"]
        assert e["eps_after"] < e["eps_before"]

    rows = read_jsonl(run_dir / "metrics.jsonl")
    path = surviving(rows)
    assert [r["step"] for r in path] == list(range(1, STEPS + 1)), "training continued to the end"
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in path), "no spike left on the final path"

    # The data position follows exactly from the recorded skip ranges.
    summary = json.loads((run_dir / "summary.json").read_text())
    recorded = Sampler.merge_ranges(tuple(e["skipped_range"]) for e in rollbacks)
    assert [tuple(r) for r in summary["skipped_ranges"]] == recorded
    state = read_state(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    sampler = Sampler(10**6, 0)  # only positions matter here, not ids
    cursor, global_batch = 0, 4
    for r in path:
        _, cursor = sampler.take(cursor, global_batch, recorded)
        assert r["samples"] == cursor, r
    assert [tuple(r) for r in state.skipped] == recorded
    # Poisoned samples are all in the quarantine file with their source documents.
    quarantined = {q["stream_index"] for q in read_jsonl(run_dir / "quarantine.jsonl")}
    poisoned = {i for a, b in state.poisoned for i in range(a, b)}
    assert poisoned and poisoned <= quarantined
    assert all(q["sources"] for q in read_jsonl(run_dir / "quarantine.jsonl"))
    assert state.eps == rollbacks[-1]["eps_after"]
