"""GPU path (issue 9 item 5): one-rank CUDA runs. Skipped without CUDA; run with
``python -m pytest -q -m gpu tests/test_gpu.py`` (docs/gpu.md)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, read_jsonl, run_bigtrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(tmp_path, data_cache, name, *extra, check=True):
    return run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={tmp_path / name}", *extra], nproc=1,
                        check=check)


def test_bf16_run_uses_torch_fused_adamw(tmp_path, data_cache):
    _run(tmp_path, data_cache, "bf16", "train.steps=6", "train.precision=bf16")
    ds = json.loads((tmp_path / "bf16" / "ds_config.json").read_text())
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["memory_mb"]["gpu_peak"] > 0


def test_fp16_overflow_step_is_skipped_and_counted(tmp_path, data_cache):
    # The first steps at loss scale 2**16 on a tiny model may overflow; a x1e6 gradient step surely does.
    _run(tmp_path, data_cache, "fp16", "train.steps=8", "train.precision=fp16", "spike.enabled=false",
         "faults.scale_grad_steps=[6]", "faults.grad_scale=1e30")
    rows = read_jsonl(tmp_path / "fp16" / "metrics.jsonl")
    summary = json.loads((tmp_path / "fp16" / "summary.json").read_text())
    assert summary["ds_skipped_steps"] >= 1
    assert any(not r["step_applied"] for r in rows)


def test_zero3_partitioned_load_nan_rollback_export_resume(tmp_path, data_cache):
    from bigtrain.cli import main
    from helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "m", 0.1, dtype=torch.bfloat16)
    common = ["train.deepspeed=zero3", f"model.path={model}", "train.steps=7", "checkpoint.snapshot_interval=1",
              "spike.warmup=4", "faults.nan_steps=[5]"]
    _run(tmp_path, data_cache, "a", *common, "checkpoint.interval=3")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["rollbacks"] == 1
    _run(tmp_path, data_cache, "b", *common, "--resume", str(tmp_path / "a" / "checkpoints" / "step_00000003"))
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss"] for r in a][-2:] == [r["loss"] for r in b][-2:]
    assert main(["export", str(tmp_path / "a" / "checkpoints" / "step_00000007"), str(tmp_path / "hf")]) == 0
