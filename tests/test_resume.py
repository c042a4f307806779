"""Resume is bit-exact: 2N steps straight == N steps + resume + N steps, per ZeRO stage, 2 ranks."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, read_jsonl, run_bigtrain


def fp32_weights(ckpt):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_is_bit_exact(tmp_path, data_cache, stage):
    n = 4
    common = [*TINY, f"data.cache_dir={data_cache}", f"train.deepspeed=zero{stage}", f"train.steps={2 * n}",
              "checkpoint.snapshot_interval=0", "train.grad_accum=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_bigtrain([*common, f"run_dir={straight}", f"checkpoint.interval={n}"])
    # Resume from the straight run's step-N checkpoint into a second run directory.
    run_bigtrain([*common, f"run_dir={resumed}", "--resume", str(straight / "checkpoints" / "step_00000004")])

    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in a] == list(range(1, 2 * n + 1))
    assert [r["step"] for r in b] == list(range(n + 1, 2 * n + 1)), "a resumed run repeats or adds no step"
    assert [r["loss"] for r in a[n:]] == [r["loss"] for r in b]
    assert [r["samples"] for r in a[n:]] == [r["samples"] for r in b]
    wa = fp32_weights(straight / "checkpoints" / "step_00000008")
    wb = fp32_weights(resumed / "checkpoints" / "step_00000008")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
