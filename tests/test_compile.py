"""model.compile: torch.compile through DeepSpeed's engine.compile(). The compiled model trains the same
losses as the eager one (to inductor's float tolerance) and its checkpoints load into an eager run."""

from __future__ import annotations

import pytest

from conftest import TINY, read_jsonl, run_bigtrain

pytestmark = pytest.mark.slow


def test_compiled_run_matches_eager_and_its_checkpoint_resumes_eagerly(tmp_path, data_cache):
    common = [*TINY, f"data.cache_dir={data_cache}", "train.steps=6", "checkpoint.interval=3",
              "checkpoint.snapshot_interval=0"]
    run_bigtrain([*common, f"run_dir={tmp_path / 'c'}", "model.compile=true"], nproc=1, timeout=400)
    run_bigtrain([*common, f"run_dir={tmp_path / 'e'}"], nproc=1)
    run_bigtrain([*common, f"run_dir={tmp_path / 'r'}", "--resume",
                  str(tmp_path / "c" / "checkpoints" / "step_00000003")], nproc=1)
    compiled = [r["loss"] for r in read_jsonl(tmp_path / "c" / "metrics.jsonl")]
    eager = [r["loss"] for r in read_jsonl(tmp_path / "e" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")]
    assert len(compiled) == len(eager) == 6 and len(resumed) == 3
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert compiled != eager  # the compiled kernels really ran (inductor's fusions round differently)
    assert resumed == pytest.approx(compiled[3:], rel=1e-3)
