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


@pytest.mark.slow
def test_resume_past_a_torn_checkpoint_replaces_it_and_keeps_logs_exact(tmp_path, data_cache):
    """Issue 11.1 and 11.5, the scenario of the issue: the newest checkpoint is truncated, --resume auto
    falls back to the older one and trains forward; the save at the torn checkpoint's step must write
    the new state (it used to refresh the manifest over the truncated file, which then verified). A
    torn last line in metrics.jsonl must not stop the resume, and events the killed run logged after
    the checkpoint must not be counted twice."""
    import json

    from bigtrain.checkpoint import verify

    run_dir = tmp_path / "run"
    common = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=8", "checkpoint.interval=4",
              "checkpoint.snapshot_interval=0"]
    run_bigtrain(common)
    newest = run_dir / "checkpoints" / "step_00000008"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 4.')  # a kill mid-write
    with open(run_dir / "spikes.jsonl", "a") as f:
        f.write(json.dumps({"event": "rollback", "step": 6, "onset_step": 6, "restored_step": 4}) + "\n")
    with open(run_dir / "quarantine.jsonl", "a") as f:
        f.write(json.dumps({"stream_index": 17, "rollback": 1}) + "\n")

    proc = run_bigtrain([*common, "--resume", "auto"])
    assert "skipping checkpoint" in proc.stderr and "abandoned timeline" in proc.stderr
    assert verify(newest) is None and victim.stat().st_size == size, "the torn file was laundered"
    (aside,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert (aside / "step_00000008" / victim.relative_to(newest)).stat().st_size == size // 2  # kept, not deleted
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 9))
    assert read_jsonl(run_dir / "spikes.jsonl") == [] and read_jsonl(run_dir / "quarantine.jsonl") == []


@pytest.mark.slow
def test_resume_applies_every_changed_hyperparameter_and_logs_it(tmp_path, data_cache):
    """Issue 11.6: DeepSpeed's load restores the saved lr, eps, betas and weight decay; every one the
    config changes must be applied, read back from the optimizer, and logged as a change."""
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "checkpoint.interval=4",
              "checkpoint.snapshot_interval=0"]
    run_bigtrain([*common, "train.steps=4"])
    changed = ["train.steps=8", "optim.eps=1e-9", "optim.beta1=0.8", "optim.beta2=0.99", "optim.weight_decay=0.05"]
    proc = run_bigtrain([*common, *changed, "--resume", "auto"])
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 4]
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    for r in rows:
        assert (r["eps"], r["beta1"], r["beta2"], r["weight_decay"]) == (1e-9, 0.8, 0.99, 0.05), r
    for key in ("train.steps", "optim.eps", "optim.beta1", "optim.beta2", "optim.weight_decay"):
        assert f"{key} changed" in proc.stderr, key
    assert "stretches the LR schedule" in proc.stderr
    other = run_bigtrain([*common, "train.steps=8", "train.deepspeed=zero3", "--resume", "auto"], nproc=1, check=False)
    assert other.returncode == 2 and "saved with ZeRO-2, now ZeRO-3" in other.stderr
