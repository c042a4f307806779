"""The optimizer's hyper-parameters over a run (bigtrain.engine): the rollback LR multiplier."""

import pytest

from bigtrain.checkpoint import History, Progress, TrainState
from bigtrain.config import load_config
from bigtrain.engine import lr_multiplier


def test_rollback_lr_cut_cools_down_back_to_the_schedule():
    cfg = load_config(None, ["spike.lr_cooldown_steps=100"])
    state = TrainState(Progress(step=50), History(lr_scale=0.5, lr_scale_step=50))
    assert lr_multiplier(cfg, state) == 0.5
    state.progress.step = 100
    assert lr_multiplier(cfg, state) == pytest.approx(0.75)
    state.progress.step = 400
    assert lr_multiplier(cfg, state) == 1.0
    permanent = load_config(None, ["spike.lr_cooldown_steps=0"])
    assert lr_multiplier(permanent, state) == 0.5
