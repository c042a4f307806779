"""ZeRO-3 builds and loads the model partitioned, in the training dtype (issue 9 item 2), and a
``model.path`` run under ZeRO-3 still resumes bit-exactly, rolls back and exports; summary.json and
the start-up log carry the memory report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import TINY, free_port, read_jsonl, run_bigtrain
from helpers import save_tiny_model

BUILD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from bigtrain.config import load_config
    from bigtrain.data import build_tokenizer
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.engine import resolve_ds_config
    from bigtrain.model import build_model
    init_distributed()
    cfg = load_config(None, [f"model.path={sys.argv[1]}", "train.deepspeed=zero3", "train.precision=bf16",
                             "data.seq_len=32"])
    model = build_model(cfg.model, build_tokenizer(cfg.model.path), 32, 0, resolve_ds_config(cfg, 1))
    full = [(n, p.numel(), str(p.dtype)) for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    shares = {str(p.ds_tensor.dtype) for p in model.parameters() if hasattr(p, "ds_id")}
    print(repr((full, sorted(shares))))
    shutdown(barrier=True)  # gloo's threads left to finalization can abort the process at exit
""")


@pytest.mark.slow
def test_zero3_builds_the_model_partitioned_in_the_training_dtype(tmp_path):
    path = save_tiny_model(tmp_path / "m", 0.0, dtype=torch.bfloat16)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    out = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(path)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    full, shares = eval(out.stdout.strip().splitlines()[-1])
    assert full == [], f"parameters materialised whole on the rank (no zero.Init): {full[:3]}"
    assert shares == ["torch.bfloat16"], shares


@pytest.mark.slow
def test_zero3_model_path_resumes_bit_exact_rolls_back_and_exports(tmp_path, data_cache):
    from bigtrain.cli import main

    model = save_tiny_model(tmp_path / "m", 0.1, dtype=torch.bfloat16)
    common = [*TINY, f"data.cache_dir={data_cache}", "train.deepspeed=zero3", f"model.path={model}",
              "train.steps=7", "checkpoint.snapshot_interval=1", "spike.warmup=4", "faults.nan_steps=[5]"]
    straight = tmp_path / "straight"
    proc = run_bigtrain([*common, f"run_dir={straight}", "checkpoint.interval=3"])
    assert "memory (host RSS, max over ranks): before_model_load" in proc.stderr
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["rollbacks"] == 1
    memory = summary["memory_mb"]
    assert set(memory) >= {"before_model_load", "after_model_load", "model_load_added", "after_engine_init",
                           "after_first_step", "peak"}
    run_bigtrain([*common, f"run_dir={tmp_path / 'resumed'}", "--resume",
                  str(straight / "checkpoints" / "step_00000003")])
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["loss"] for r in a][-2:] == [r["loss"] for r in b][-2:]
    assert main(["export", str(straight / "checkpoints" / "step_00000007"), str(tmp_path / "hf")]) == 0
    assert list((tmp_path / "hf").glob("*.safetensors"))
