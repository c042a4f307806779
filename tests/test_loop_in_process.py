"""The training loop itself, one rank, in this process (quick tier): ``make test-quick`` runs the
trainer end to end, a rollback included, without launching ranks."""

from __future__ import annotations

import json
import logging
import signal

import torch.distributed as dist

from bigtrain.config import load_config
from helpers import TINY, free_port, read_jsonl


def train_in_process(monkeypatch, cfg) -> int:
    """bigtrain.train.train on one rank in this process, its signal handlers and logging undone after."""
    from bigtrain.train import train

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    loggers = {name: logging.getLogger(name) for name in ("bigtrain", "DeepSpeed", "deepspeed")}
    logging_state = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in loggers.items()}
    try:
        return train(cfg)
    finally:
        for sig, handler in handlers.items():  # the loop installs its stop handlers in this process
            signal.signal(sig, handler)
        for name, (kept, level, propagate) in logging_state.items():  # setup_logging's, for later tests' caplog
            loggers[name].handlers[:], loggers[name].propagate = kept, propagate
            loggers[name].setLevel(level)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_loop_rolls_back_a_nan_step_and_finishes(tmp_path, data_cache, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=10",
                             "train.precision=fp32", "checkpoint.interval=0", "checkpoint.snapshot_interval=2",
                             f"checkpoint.snapshot_dir={tmp_path / 'snaps'}", "spike.warmup=4",
                             "faults.nan_steps=[7]"])
    assert train_in_process(monkeypatch, cfg) == 0
    (event,) = read_jsonl(run_dir / "spikes.jsonl")
    assert (event["event"], event["verdict"], event["step"], event["restored_step"]) == ("rollback", "incident", 7, 6)
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10]  # step 7 ran twice: the NaN, then its redo
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["rollbacks"], summary["wasted_steps"]) == (10, 1, 1)
    assert not (tmp_path / "snaps").exists(), "the snapshot ring is removed at the end"

