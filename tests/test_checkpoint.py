"""Checkpoint selection: only complete checkpoints count; pruning never loses the newest complete one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtrain.checkpoint import (MARKER, STATE_FILE, CheckpointStore, History, Progress, TrainState, complete_checkpoints, finish_swaps,
                                 is_complete, resolve_resume, rng_state, set_rng_state, tag_for, wait_for_discards)
from helpers import FakeEngine


def fake_ckpt(root, step, complete=True):
    path = root / tag_for(step)
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps(TrainState(Progress(step=step)).to_json()))
    if complete:
        (path / MARKER).write_text("{}")
    return path


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    fake_ckpt(tmp_path, 10)
    fake_ckpt(tmp_path, 20)
    fake_ckpt(tmp_path, 30, complete=False)  # a kill during the save of step 30
    (tmp_path / "latest").write_text("step_00000030")  # DeepSpeed's own pointer is not trusted
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(10), tag_for(20)]
    assert resolve_resume("auto", tmp_path).name == tag_for(20)
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(tmp_path / tag_for(30)), tmp_path)
    with pytest.raises(ValueError, match="not a bigtrain checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None


def test_prune_keeps_newest_complete_and_drops_stale_partials(tmp_path):
    for step in (10, 20, 30):
        fake_ckpt(tmp_path, step)
    fake_ckpt(tmp_path, 15, complete=False)
    store = CheckpointStore(tmp_path, keep=2)
    assert store.saved == [10, 20, 30]
    store._prune()
    wait_for_discards()
    assert [p.name for p in sorted(tmp_path.iterdir())] == [tag_for(20), tag_for(30)]
    assert store.latest_before(30) == 20 and store.latest_before(20) is None
    store.drop_after(20)
    assert store.saved == [20] and not (tmp_path / tag_for(30)).exists()


def test_pruned_checkpoints_are_deleted_without_making_the_ranks_wait(tmp_path, monkeypatch):
    """A 70B checkpoint is ~1 TB of files: rank 0 deleted the pruned one inside the save, while every
    other rank waited in the closing barrier. Now one rename, and the deletion runs in the background."""
    import shutil as _shutil
    import time

    real = _shutil.rmtree

    def slow_rmtree(path, *a, **k):  # a shared filesystem unlinking a large checkpoint
        time.sleep(1.5)
        return real(path, *a, **k)

    store = CheckpointStore(tmp_path, keep=1)
    store.save(FakeEngine(b"one"), TrainState(Progress(step=1)))
    monkeypatch.setattr(_shutil, "rmtree", slow_rmtree)
    t0 = time.perf_counter()
    store.save(FakeEngine(b"two"), TrainState(Progress(step=2)))
    assert time.perf_counter() - t0 < 1.0
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(2)] and store.saved == [2]
    wait_for_discards()
    assert [p.name for p in tmp_path.iterdir()] == [tag_for(2)]
    # A kill mid-deletion leaves trash: the next start removes it.
    (tmp_path / "trash-step_00000001-abcd").mkdir()
    finish_swaps(tmp_path)
    wait_for_discards()
    assert [p.name for p in tmp_path.iterdir()] == [tag_for(2)]


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np
    import torch

    state = json.loads(json.dumps(rng_state()))
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_train_state_is_plain_json():
    state = TrainState(Progress(step=3), History(skipped=[[1, 5]], eps=1e-9))
    assert TrainState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_a_save_over_a_torn_checkpoint_writes_the_new_state(tmp_path):
    """Issue 11.1: saving a step whose complete directory exists (torn here) must write the state it
    is given, never recompute the manifest over the old files."""
    from bigtrain.checkpoint import verify

    store = CheckpointStore(tmp_path, keep=3)
    path = store.save(FakeEngine(b"old" * 100), TrainState(Progress(step=10), History(eps=1e-8)))
    assert verify(path) is None
    weights = path / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:50])  # truncated after the save
    assert verify(path) is not None
    path = store.save(FakeEngine(b"new" * 200), TrainState(Progress(step=10), History(eps=1e-9)))
    assert verify(path) is None
    assert weights.read_bytes() == b"new" * 200
    assert json.loads((path / STATE_FILE).read_text())["eps"] == 1e-9
    wait_for_discards()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(10)], "no leftover of the swap"


def test_an_interrupted_swap_is_finished_and_never_loses_the_checkpoint(tmp_path):
    """A crash between the two renames of a replacement leaves replaced-step_N and incoming-step_N;
    the next start puts a complete one back under step_N."""
    import shutil

    from bigtrain.checkpoint import INCOMING, REPLACED

    store = CheckpointStore(tmp_path, keep=3)
    path = store.save(FakeEngine(b"a" * 10), TrainState(Progress(step=10)))
    shutil.copytree(path, tmp_path / "old")
    store.save(FakeEngine(b"b" * 10), TrainState(Progress(step=10)))
    path.rename(tmp_path / (INCOMING + path.name))  # the new copy, complete, not yet renamed ...
    (tmp_path / "old").rename(tmp_path / (REPLACED + path.name))  # ... the old one already aside
    finish_swaps(tmp_path)
    wait_for_discards()
    assert (path / "mp_rank_00_model_states.pt").read_bytes() == b"b" * 10
    assert [p.name for p in tmp_path.iterdir()] == [tag_for(10)]
    # Died before the new copy was complete: the old one comes back.
    path.rename(tmp_path / (REPLACED + path.name))
    (tmp_path / (INCOMING + tag_for(10))).mkdir()
    finish_swaps(tmp_path)
    wait_for_discards()
    assert (path / "mp_rank_00_model_states.pt").read_bytes() == b"b" * 10 and is_complete(path)
    assert [p.name for p in tmp_path.iterdir()] == [tag_for(10)]


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, caplog):
    from bigtrain.checkpoint import set_aside_newer

    for step in (10, 20, 30):
        fake_ckpt(tmp_path, step)
    fake_ckpt(tmp_path, 40, complete=False)
    with caplog.at_level("WARNING", logger="bigtrain"):
        dest = set_aside_newer(tmp_path, 20)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(10), tag_for(20)]
    assert sorted(p.name for p in dest.iterdir()) == [tag_for(30), tag_for(40)]  # kept, not deleted
    assert "abandoned timeline" in caplog.text and str(dest) in caplog.text
    assert resolve_resume("auto", tmp_path).name == tag_for(20)
    assert set_aside_newer(tmp_path, 20) is None


class TensorEngine:
    """Hands DeepSpeed-like state dicts (tensors) to ``self.checkpoint_engine``, as deepspeed 0.19's
    save_checkpoint does: one model file and one optimizer partition per rank."""

    def __init__(self):
        import torch

        self.weight = torch.arange(1000, dtype=torch.float32)
        self.checkpoint_engine = None  # the store swaps its snapshot engine in for the save

    def save_checkpoint(self, root, tag, client_state, save_latest):
        ce = self.checkpoint_engine
        ce.makedirs(str(Path(root) / tag), exist_ok=True)
        ce.save({"module": {"w": self.weight, "tied": self.weight}, **client_state},
                str(Path(root) / tag / "mp_rank_00_model_states.pt"))
        ce.save({"optimizer_state_dict": {"exp_avg": self.weight * 2, "param_groups": [{"lr": 0.1}]}},
                str(Path(root) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        ce.commit(None)


def test_an_async_snapshot_is_no_rollback_target_before_its_write_completes(tmp_path, monkeypatch):
    """Issue 9.4: save() returns once the state is copied; until the background write ends and
    finish() has agreed on it, the snapshot has no marker, no step_* name and is not in ``saved``.
    The files hold the state of the save, not what the next step does to the tensors in place."""
    import threading

    import torch

    import bigtrain.checkpoint as ckpt

    release, real_save = threading.Event(), torch.save

    def slow_save(obj, path, **kw):
        assert release.wait(60), "the test never released the writer"
        real_save(obj, path, **kw)

    monkeypatch.setattr(ckpt.torch, "save", slow_save)
    store = CheckpointStore(tmp_path, keep=2, asynchronous=True)
    engine = TensorEngine()
    path = store.save(engine, TrainState(Progress(step=4)))
    try:
        _check_pending(store, engine, path, tmp_path)
    finally:
        release.set()  # never leave the writer (a non-daemon thread) waiting when a check fails
    store.finish()
    _check_written(store, path)


def _check_pending(store, engine, path, tmp_path):
    assert engine.checkpoint_engine is None, "the original engine is back after the save"
    assert store.saved == [] and store.latest_before(10) is None, "pending: not a rollback target"
    assert not path.exists() and not is_complete(tmp_path / f"incoming-{tag_for(4)}")
    assert complete_checkpoints(tmp_path) == []
    engine.weight.mul_(-1)  # the optimizer's next step, in place, while the write is pending


def _check_written(store, path):
    import torch

    assert store.saved == [4] and store.latest_before(10) == 4 and is_complete(path)
    model = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)
    assert torch.equal(model["module"]["w"], torch.arange(1000, dtype=torch.float32))
    assert model["module"]["tied"] is model["module"]["w"], "aliasing (tied weights) is kept"
    assert model["bigtrain_step"] == 4
    optim = torch.load(path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert torch.equal(optim["optimizer_state_dict"]["exp_avg"], 2 * torch.arange(1000, dtype=torch.float32))
    assert json.loads((path / STATE_FILE).read_text())["step"] == 4
    assert "mp_rank_00_model_states.pt" in json.loads((path / MARKER).read_text())["files"]


def test_a_failed_async_write_is_a_checkpoint_error_and_never_a_target(tmp_path, monkeypatch):
    import torch

    import bigtrain.checkpoint as ckpt
    from bigtrain.checkpoint import CheckpointError

    store = CheckpointStore(tmp_path, keep=2, asynchronous=True)
    engine = TensorEngine()
    store.save(engine, TrainState(Progress(step=2)))
    store.finish()
    real_save = torch.save

    def full_disk(obj, path, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    store.save(engine, TrainState(Progress(step=4)))  # the copy succeeds; the write fails in the background
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.finish()
    assert store.saved == [2] and store.pending is None
    assert [p.name for p in tmp_path.iterdir()] == [tag_for(2)], "the failed snapshot is removed"
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    store.save(engine, TrainState(Progress(step=6)))  # finishes nothing pending; the next one works again
    store.finish()
    assert store.saved == [2, 6]


def test_a_state_written_before_the_progress_history_split_loads():
    old = {"step": 12, "cursor": 96, "tokens": 3072, "skipped": [[32, 104]], "skipped_samples": [5, 6],
           "skipped_docs": [1], "eps": 1e-9, "lr_scale": 0.5, "lr_scale_step": 8, "beta2": 0.95,
           "monitor": {"log_loss": [1.0]}, "escalation": {"rollbacks": 1}, "ds_skipped_steps": 0, "rollbacks": 1,
           "wasted_steps": 2, "executed_steps": 14, "poisoned": [[5, 7]], "poisoned_docs": [1],
           "faults_fired": ["poison@10"], "fingerprint": "f", "world_size": 2, "zero_stage": 2, "config": {}}
    state = TrainState.from_json(old)
    assert (state.progress.step, state.progress.cursor, state.progress.monitor) == (12, 96, {"log_loss": [1.0]})
    assert (state.history.skipped, state.history.skipped_samples, state.history.rollbacks) == ([[32, 104]], [5, 6], 1)
    assert state.history.faults == {"poisoned": [[5, 7]], "poisoned_docs": [1], "fired": ["poison@10"]}
    assert (state.world_size, state.zero_stage) == (2, 2)
    # Saved again, it keeps every field, flat (the faults under one key).
    again = state.to_json()
    added = {"manual_skips": [], "screens": 0, "screened_blocks": 0}  # fields newer than the state: defaults
    assert {k: v for k, v in again.items() if k != "faults"} == {
        **{k: v for k, v in old.items() if k not in ("poisoned", "poisoned_docs", "faults_fired")}, **added}
