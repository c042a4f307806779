"""Train mode: a fine-tuned model (``from_pretrained`` returns eval mode) trains with dropout on, and
resume stays bit-exact with dropout drawing from every rank's RNG (issue 9 item 3, issue 11's test)."""

from __future__ import annotations


import pytest

from helpers import TINY, read_jsonl, run_bigtrain, save_tiny_model


@pytest.mark.slow
def test_dropout_is_on_in_training_and_resume_is_bit_exact_with_it(tmp_path, data_cache):
    common = [*TINY, f"data.cache_dir={data_cache}", "train.deepspeed=zero2", "checkpoint.snapshot_interval=0",
              "train.precision=fp32"]
    dropout = save_tiny_model(tmp_path / "m_drop", 0.1)
    plain = save_tiny_model(tmp_path / "m_plain", 0.0)
    # Same weights, same data: only dropout differs. In eval mode (the bug) the losses are identical.
    run_bigtrain([*common, f"model.path={plain}", "train.steps=2", f"run_dir={tmp_path / 'plain'}"])
    run_bigtrain([*common, f"model.path={dropout}", "train.steps=4", "checkpoint.interval=2",
                  f"run_dir={tmp_path / 'straight'}"])
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    p = read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    assert a[0]["loss"] != p[0]["loss"], "dropout 0.1 trained like dropout 0.0: the model is in eval mode"
    # Resume from step 2: dropout masks come from each rank's restored torch RNG, so losses must match.
    run_bigtrain([*common, f"model.path={dropout}", "train.steps=4", f"run_dir={tmp_path / 'resumed'}",
                  "--resume", str(tmp_path / "straight" / "checkpoints" / "step_00000002")])
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [3, 4]
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b]
