"""Resume is bit-exact: 2N steps straight == N steps + resume + N steps, per ZeRO stage, 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import BIN, TINY, read_jsonl, run_bigtrain


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


def test_truncate_metrics_survives_a_torn_line_and_drops_what_the_checkpoint_does_not_hold(tmp_path):
    """Issue 11.5: a torn last line made truncate_metrics raise on rank 0 only (exit 2 for the run);
    events and quarantine rows the killed run wrote after its checkpoint were counted again."""
    import json

    from bigtrain.checkpoint import History, Progress, TrainState
    from bigtrain.metrics import truncate_metrics

    rows = [{"step": s, "loss": 1.0} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    # Rollback 1 was detected at step 7 and went back to step 2; the checkpoint at step 5 was saved
    # after it (it holds rollback 1 and its skips), so the event stays although its step is later.
    # Rollback 2 (step 4 of the next pass) is not in the checkpoint's history; a give-up is kept.
    events = [{"event": "rollback", "step": 7, "restored_step": 2, "rollback": 1},
              {"event": "rollback", "step": 4, "restored_step": 3, "rollback": 2},
              {"event": "warning", "step": 8}, {"event": "give_up", "step": 9, "reason": "budget"},
              # Noise screens, by ordinal too: screen 1 (step 6, before rollback 1 went back to step 2)
              # is in the checkpoint's history; screen 2 is not, though its step is earlier.
              {"event": "screen", "step": 6, "screen": 1}, {"event": "screen", "step": 3, "screen": 2}]
    (tmp_path / "spikes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    quarantine = [{"stream_index": 4, "rollback": 1}, {"stream_index": 12, "rollback": 2},
                  {"sample_id": 30, "screen": 1}, {"sample_id": 31, "screen": 2}]
    (tmp_path / "quarantine.jsonl").write_text("".join(json.dumps(q) + "\n" for q in quarantine) + '{"stream')
    truncate_metrics(tmp_path, TrainState(Progress(step=5), History(rollbacks=1, screens=1)))
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert read_jsonl(tmp_path / "spikes.jsonl") == [events[0], events[3], events[4]]
    assert read_jsonl(tmp_path / "quarantine.jsonl") == [quarantine[0], quarantine[2]]


def test_a_universal_conversion_is_reused_only_for_the_checkpoint_it_was_made_from(tmp_path):
    """A conversion left under checkpoints/universal/step_N (by `bigtrain convert`, or a crash before
    its removal) must not be loaded for another step_N of a later timeline: keyed by the manifest."""
    import json

    from bigtrain.checkpoint import MARKER, SOURCE_FILE, source_key, universal_for

    ckpt = tmp_path / "step_00000052"
    ckpt.mkdir()
    (ckpt / MARKER).write_text(json.dumps({"step": 52, "time": 1.0, "files": {}}))
    conv = tmp_path / "universal" / ckpt.name
    conv.mkdir(parents=True)
    (conv / SOURCE_FILE).write_text(source_key(ckpt))
    assert universal_for(ckpt, tmp_path / "universal") is None  # not complete yet
    (conv / MARKER).write_text("{}")
    assert universal_for(ckpt, tmp_path / "universal") == conv
    (ckpt / MARKER).write_text(json.dumps({"step": 52, "time": 2.0, "files": {}}))  # another timeline's step 52
    assert universal_for(ckpt, tmp_path / "universal") is None


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four trainings; each rank-count change rebuilds DeepSpeed's shm op here
def test_resume_on_another_number_of_ranks_goes_through_a_universal_checkpoint(tmp_path, data_cache):
    """Issue 11.7: 2 ranks -> 1 rank -> 2 ranks (the same global batch: grad_accum makes up for the
    ranks). The steps equal those of a straight 2-rank run, so weights and Adam moments were carried
    over, and the data position and the samples a rollback skipped (poisoned at 40-43, caught in the
    first leg) are exact. The legs grow train.steps; optim.decay_steps keeps them on the straight
    run's LR schedule."""
    from bigtrain.checkpoint import read_state

    common = [*TINY, f"data.cache_dir={data_cache}", "train.precision=fp32", "checkpoint.interval=4",
              "checkpoint.snapshot_interval=4", "spike.warmup=8", "faults.poison_steps=[40,41,42,43]",
              "faults.poison_fraction=0.3", "optim.decay_steps=56"]
    straight, hop = tmp_path / "straight", tmp_path / "hop"
    run_bigtrain([*common, f"run_dir={straight}", "train.steps=56"])
    run_bigtrain([*common, f"run_dir={hop}", "train.steps=48"])  # the poison is caught and skipped here
    one = run_bigtrain([*common, f"run_dir={hop}", "train.steps=52", "train.grad_accum=2", "--resume", "auto"], nproc=1)
    assert "converting it to a universal checkpoint" in one.stderr
    assert not (hop / "checkpoints" / "universal" / "step_00000048").exists(), "the inline conversion is removed"
    # Back to 2 ranks the way a large checkpoint goes: inline conversion refused before any work (as
    # at 70B, where the other ranks would wait in a collective for it), `bigtrain convert` once, resume.
    back = [*common, f"run_dir={hop}", "train.steps=56", "checkpoint.convert_inline_max_gb=0", "--resume", "auto"]
    refused = run_bigtrain(back, check=False)
    assert refused.returncode != 0 and "run `bigtrain convert" in refused.stderr, refused.stderr[-3000:]
    ckpt = hop / "checkpoints" / "step_00000052"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "bigtrain", "convert", str(ckpt)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("universal/step_00000052"), out.stderr[-3000:]
    two = run_bigtrain(back)
    assert "loading its universal conversion" in two.stderr and "converting it" not in two.stderr
    assert (hop / "checkpoints" / "universal" / "step_00000052").is_dir(), "`bigtrain convert`'s output is the user's"
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(hop / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # the rollback included
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9), (ra, rb)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, nan_ok=True), (ra, rb)
    sa, sb = read_state(straight / "checkpoints" / "step_00000056"), read_state(hop / "checkpoints" / "step_00000056")
    ha, hb = sa.history, sb.history
    assert hb.skipped_samples == ha.skipped_samples and hb.skipped_samples and hb.rollbacks == ha.rollbacks >= 1
    assert (sb.progress.cursor, sb.world_size) == (sa.progress.cursor, 2)
