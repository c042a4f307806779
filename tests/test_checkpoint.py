"""Checkpoint selection: only complete checkpoints count; pruning never loses the newest complete one."""

from __future__ import annotations

import json

import pytest

from bigtrain.checkpoint import (MARKER, STATE_FILE, CheckpointStore, TrainState, complete_checkpoints, resolve_resume,
                                 rng_state, set_rng_state, tag_for)


def fake_ckpt(root, step, complete=True):
    path = root / tag_for(step)
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps(TrainState(step=step).to_json()))
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
    assert [p.name for p in sorted(tmp_path.iterdir())] == [tag_for(20), tag_for(30)]
    assert store.latest_before(30) == 20 and store.latest_before(20) is None
    store.drop_after(20)
    assert store.saved == [20] and not (tmp_path / tag_for(30)).exists()


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
    state = TrainState(step=3, skipped=[[1, 5]], eps=1e-9)
    assert TrainState.from_json(json.loads(json.dumps(state.to_json()))) == state
