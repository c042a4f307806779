"""End-to-end runs of the real entry point: outputs, run-dir safety, loss normalisation, export."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, read_jsonl, run_bigtrain


@pytest.mark.slow
def test_single_process_run_writes_everything_and_resume_auto_adds_no_step(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=12", "train.eval_interval=6",
            "checkpoint.interval=5", "checkpoint.keep=2"]
    run_bigtrain(args, nproc=1)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "samples"):
        assert all(key in r for r in rows), key
    assert rows[-1]["samples"] == 12 * 2 and rows[-1]["loss"] < rows[0]["loss"]
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12]
    assert read_jsonl(run_dir / "spikes.jsonl") == [], "a clean run has zero spike events"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file() and json.loads((run_dir / "ds_config.json").read_text())
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000012"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["rollbacks"] == 0

    again = run_bigtrain(args, nproc=1, check=False)
    assert again.returncode == 2 and "already holds a run: continue it with --resume auto" in again.stderr
    run_bigtrain([*args, "--resume", "auto"], nproc=1)
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 12, "resuming a finished run trains nothing"
    other = run_bigtrain([*args, "train.seed=7", "--resume", "auto"], nproc=1, check=False)
    assert other.returncode == 2 and "belongs to another model/data/seed" in other.stderr


@pytest.mark.slow
def test_loss_is_normalised_over_the_global_batch(tmp_path):
    """1 rank x 4 micro-batches, 2 ranks x 2 and 2 ranks x 1 micro-batch of twice the size see the
    same global batch: the loss and the global grad norm must agree. The data is prompt/completion
    rows with completions of 1 to 23 tokens, unpacked, so every sample carries a different number of
    label tokens: a per-rank or per-micro-batch mean would differ from the token-weighted loss."""
    import json

    rows = tmp_path / "pc.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": "ab" * (1 + (i * 7) % 11)}) + "\n"
                            for i in range(120)))
    common = ["data.source=files", f"data.files=[{rows}]", "data.format=prompt_completion", "data.packing=false",
              "data.seq_len=32", "train.eval_interval=0", "train.eval_batches=1", "optim.warmup_steps=2",
              f"data.cache_dir={tmp_path / 'cache'}", "train.steps=4", "train.precision=fp32",
              "checkpoint.snapshot_interval=0", "checkpoint.interval=0"]
    run_bigtrain([*common, f"run_dir={tmp_path / 'one'}", "train.micro_batch=2", "train.grad_accum=4"], nproc=1)
    run_bigtrain([*common, f"run_dir={tmp_path / 'two'}", "train.micro_batch=2", "train.grad_accum=2"], nproc=2)
    run_bigtrain([*common, f"run_dir={tmp_path / 'big'}", "train.micro_batch=4", "train.grad_accum=1"], nproc=2)
    runs = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("one", "two", "big")]
    assert [r["samples"] for r in runs[0]] == [r["samples"] for r in runs[1]] == [8, 16, 24, 32]
    for rows_b in runs[1:]:
        for ra, rb in zip(runs[0], rows_b, strict=True):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
            assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_export_gives_a_loadable_model_with_the_trained_eval_loss(tmp_path, data_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigtrain.cli import main
    from bigtrain.config import load_config
    from bigtrain.data import build_dataset

    run_dir, out = tmp_path / "run", tmp_path / "hf"
    args = [*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=6", "train.precision=fp32",
            "train.deepspeed=zero3", "train.eval_batches=3"]
    run_bigtrain(args)
    assert main(["export", str(run_dir / "checkpoints" / "step_00000006"), str(out)]) == 0
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.use_cache is True, "issue 11.12: the export kept training's use_cache=False"
    tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = load_config(None, [a for a in args if not a.startswith("run_dir")])
    data = build_dataset(cfg.data, tokenizer, cfg.train.seed)
    # The trainer's final evaluation: 3 batches x 2 ranks x micro 2, rank-major over the eval blocks.
    m = data.eval.shape[0]
    total = n = right = 0.0
    with torch.no_grad():
        for b in range(3):
            for rank in range(2):
                start = (b * 2 + rank) * 2
                x = data.batch([(start + j) % m for j in range(2)], "eval")["input_ids"]
                tokens = x.shape[0] * (x.shape[1] - 1)
                out = model(input_ids=x, labels=x)
                total += out.loss.item() * tokens
                right += int((out.logits[:, :-1].argmax(-1) == x[:, 1:]).sum())
                n += tokens
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert total / n == pytest.approx(final["eval_loss"], rel=1e-5)
    # Next-token accuracy on the same blocks. The 2-rank ZeRO-3 forward and this one differ in reduction
    # order (the losses agree to 1e-5, not bit for bit), so a near-tie may flip one argmax: allow one token.
    assert abs(right / n - final["eval_accuracy"]) <= 1.5 / n
    assert 0.0 < final["eval_accuracy"] < 1.0


STOPPING_ENTRY = """
import sys
from bigtrain.cli import main
from bigtrain.spike import OK, STOP, NullMonitor, Verdict, register_monitor

class StopAtThree(NullMonitor):
    def observe(self, step, loss, grad_norm, nonfinite=False, ds_skipped=False):
        return Verdict(STOP if step == 3 else OK, "stop rule", severity=2.0)

register_monitor("stop_at_three", lambda spike_cfg, total_steps: StopAtThree())
sys.exit(main())
"""


@pytest.mark.slow
def test_a_monitor_that_stops_the_run_saves_it_as_it_is_and_exits_3(tmp_path, data_cache):
    """finish(EXIT_GAVE_UP) through a monitor's STOP verdict (llm-foundry's kind of rule, plugged in
    through the monitor registry): the step is logged with its event, the durable checkpoint holds
    that step, no summary is written, exit 3."""
    from bigtrain.checkpoint import complete_checkpoints, read_state

    entry = tmp_path / "entry.py"
    entry.write_text(STOPPING_ENTRY)
    run_dir = tmp_path / "run"
    proc = run_bigtrain([*TINY, f"data.cache_dir={data_cache}", f"run_dir={run_dir}", "train.steps=8",
                         "spike.monitor=stop_at_three", "checkpoint.interval=0"], nproc=1, check=False,
                        script=str(entry))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    (event,) = read_jsonl(run_dir / "spikes.jsonl")
    assert (event["event"], event["step"], event["reason"]) == ("stop", 3, "stop rule")
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert read_state(last).progress.step == 3 and not (run_dir / "summary.json").exists()
