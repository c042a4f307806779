"""Config parsing, validation messages, DeepSpeed JSON resolution, LR schedule."""

from __future__ import annotations

import json
import math

import pytest

from bigtrain.cli import main
from bigtrain.config import ConfigError, load_config, upgrade_saved
from bigtrain.engine import DS_CONFIG_DIR, lr_at, resolve_ds_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 50\noptim:\n  lr: 3e-4\n")
    cfg = load_config(f, ["train.micro_batch=4", "optim.min_lr=1e-5", "faults.nan_steps=[3, 4]"])
    assert (cfg.train.steps, cfg.train.micro_batch, cfg.optim.lr, cfg.optim.min_lr) == (50, 4, 3e-4, 1e-5)
    assert cfg.faults.nan_steps == [3, 4]
    assert cfg.train.precision == "bf16" and cfg.train.deepspeed == "zero2"


@pytest.mark.parametrize("override,needle", [
    ("trian.steps=3", "unknown config key 'trian'; did you mean train?"),
    ("train.stpes=3", "did you mean train.steps?"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr=abc", "optim.lr must be float"),
    ("train.steps=2.5", "train.steps must be int"),
    ("train.precision=fp8", "train.precision must be bf16, fp16 or fp32"),
    ("optim.warmup_steps=500", "optim.warmup_steps=500 exceeds train.steps=200"),
    ("data.seq_len=2", "data.seq_len must be >= 8"),
    ("spike.window=3", "spike.window"),
    ("model.preset=gpt9", "model.preset must be one of"),
    ("train.steps", "must look like key.path=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


@pytest.mark.parametrize("value,parsed,used", [("true", True, True), ("false", False, False), ("auto", "auto", True)])
def test_torch_adam_takes_a_boolean_or_auto(tmp_path, value, parsed, used):
    f = tmp_path / "c.yaml"
    f.write_text(f"optim:\n  torch_adam: {value}\n")
    for cfg in (load_config(None, [f"optim.torch_adam={value}"]), load_config(f)):
        assert cfg.optim.torch_adam == parsed and type(cfg.optim.torch_adam) is type(parsed)
        assert resolve_ds_config(cfg, 1)["optimizer"]["params"]["torch_adam"] is used


@pytest.mark.parametrize("value", ["maybe", "1", "'true'", "[true]"])
def test_torch_adam_refuses_anything_else(value):
    with pytest.raises(ConfigError, match=r"optim.torch_adam must be bool or 'auto', got"):
        load_config(None, [f"optim.torch_adam={value}"])


def test_a_checkpoint_config_of_an_older_bigtrain_compares_equal():
    # Earlier versions saved optim.torch_adam as a string: a resume must not report it as changed.
    for old, new in (("true", True), ("false", False), ("auto", "auto")):
        cfg = load_config(None, [f"optim.torch_adam={new if isinstance(new, str) else str(new).lower()}"])
        saved = cfg.to_dict()
        saved["optim"]["torch_adam"] = old
        assert upgrade_saved(saved) == cfg.to_dict()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_every_shipped_ds_config_resolves(name):
    cfg = load_config(None, [f"train.deepspeed={name}", "train.micro_batch=3", "train.grad_accum=2",
                             "optim.grad_clip=0.5", "optim.eps=1e-10", "train.precision=fp32"])
    ds = resolve_ds_config(cfg, world_size=4)
    text = json.dumps(ds)
    assert '"auto"' not in text, f"{name}: an auto value was left unfilled"
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["eps"] == 1e-10
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)


def test_contradicting_ds_config_is_an_error(tmp_path):
    bad = json.loads((DS_CONFIG_DIR / "zero2.json").read_text())
    bad["gradient_clipping"] = 5.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    cfg = load_config(None, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match="gradient_clipping=5.0 contradicts optim.grad_clip=1.0"):
        resolve_ds_config(cfg, 1)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        resolve_ds_config(cfg, 1)
    bad["scheduler"] = {"type": "WarmupLR"}
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="bigtrain owns the LR schedule"):
        resolve_ds_config(cfg, 1)
    with pytest.raises(ConfigError, match="neither a shipped config"):
        resolve_ds_config(load_config(None, ["train.deepspeed=zero9"]), 1)


def test_fp16_on_cpu_is_refused_with_the_fix():
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_ds_config(load_config(None, ["train.precision=fp16"]), 1)


def test_fp16_overflow_calibration_is_survived_by_one_rollback(monkeypatch):
    """The fp16 path's logic without a GPU, with DeepSpeed's own config parser and loss scaler: the
    resolved config gives dynamic scaling from 2^16; calibrating down to a scale that fits takes 6
    consecutive overflow-skipped steps, which the monitor calls an incident at the 5th (issue 11.3:
    the run used to die there with "5 of 5 steps discarded"). The rollback to step 0 is within budget
    and keeps the calibrated scale, so the replay does not meet the same incident again."""
    import pickle

    import torch
    from deepspeed.runtime.fp16 import loss_scaler as ds_scaler
    from deepspeed.runtime.precision_config import get_float16_config

    from bigtrain.engine import keep_loss_scale, loss_scale
    from bigtrain.spike import Escalation, SpikeConfig, build_monitor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ds = resolve_ds_config(load_config(None, ["train.precision=fp16"]), 2)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    fp16 = get_float16_config(ds)  # DeepSpeed's parser, as deepspeed.initialize runs it
    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda: 0)

    class Engine:  # what keep_loss_scale/loss_scale read: engine.optimizer.loss_scaler
        class optimizer:
            loss_scaler = ds_scaler.CreateLossScaler(torch.half, fp16.loss_scale, True, fp16.dynamic_loss_scale_args())

    fits = 2.0 ** 11  # gradients overflow at any larger scale
    spike_cfg = SpikeConfig()

    def run(steps):
        monitor, skipped = build_monitor(spike_cfg, 100), 0
        for step in range(1, steps + 1):
            overflow = Engine.optimizer.loss_scaler.cur_scale > fits
            Engine.optimizer.loss_scaler.update_scale(overflow)
            skipped += overflow
            verdict = monitor.observe(step, 5.0, 1.0, False, overflow)
            if verdict.recover:
                return step, verdict, skipped
        return None, None, skipped

    saved = pickle.dumps(Engine.optimizer.loss_scaler)  # the step-0 state in the checkpoint
    step, verdict, _ = run(20)
    assert step == spike_cfg.max_ds_skipped_run and verdict.onset_step == 1
    plan = Escalation(spike_cfg).decide(step, verdict.onset_step, 0, 0, 1e-8, 1.0, 0.95)
    assert not plan.stop, plan.reason
    scale = loss_scale(Engine)
    Engine.optimizer.loss_scaler = pickle.loads(saved)  # what DeepSpeed's load does to the scaler
    keep_loss_scale(Engine, scale)
    assert Engine.optimizer.loss_scaler.cur_scale == scale < 2.0 ** 16
    step, verdict, skipped = run(20)
    assert step is None and skipped < spike_cfg.max_ds_skipped_run, "the replay met the incident again"


def test_lr_schedule_is_warmup_then_cosine():
    cfg = load_config(None, ["train.steps=100", "optim.warmup_steps=10", "optim.lr=1e-3", "optim.min_lr=1e-4"])
    lrs = [lr_at(s, cfg.optim, 100) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup increases"
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine decreases"
    assert lr_at(100, cfg.optim, 100) == pytest.approx(1e-4)
    assert lr_at(55, cfg.optim, 100) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))


def test_decay_steps_keeps_one_schedule_when_a_run_is_trained_in_legs():
    """A run trained to step 50, then resumed with train.steps=100: with optim.decay_steps=100 every
    step's LR is the straight 100-step run's; without it the first leg decays to min_lr by step 50."""
    base = ["optim.warmup_steps=10", "optim.lr=1e-3", "optim.min_lr=1e-4"]
    straight = load_config(None, ["train.steps=100", *base])
    leg = load_config(None, ["train.steps=50", "optim.decay_steps=100", *base])
    assert [lr_at(s, leg.optim, 50) for s in range(50)] == [lr_at(s, straight.optim, 100) for s in range(50)]
    stretched = load_config(None, ["train.steps=50", *base])
    assert lr_at(50, stretched.optim, 50) == pytest.approx(1e-4)
    assert lr_at(50, leg.optim, 50) > 5e-4
    assert lr_at(150, leg.optim, 150) == pytest.approx(1e-4), "flat at min_lr after decay_steps"
    with pytest.raises(ConfigError, match="decay_steps"):
        load_config(None, ["train.steps=100", "optim.warmup_steps=10", "optim.decay_steps=5"])


def test_dry_run_prints_config_and_resolved_deepspeed_json(capsys):
    assert main(["train", "--dry-run", "train.micro_batch=3", "train.deepspeed=zero3"]) == 0
    out = capsys.readouterr().out
    ds = json.loads(out[out.index("# DeepSpeed config"):].split("\n", 1)[1])
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["zero_optimization"]["stage"] == 3
    assert "micro_batch: 3" in out


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["train", "--dry-run", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigtrain: error: optim.lr must be > 0") and "\n" not in err


def test_flash_attention_with_packed_examples_needs_micro_batch_one():
    """transformers separates packed examples for flash-attention only in a one-row micro-batch; with
    more rows they would attend to each other, so the config is refused with the fix."""
    fa = ["model.attn_implementation=flash_attention_2", "data.format=chat", "data.source=files", "data.files=[chat.jsonl]"]
    with pytest.raises(ConfigError, match="set train.micro_batch=1"):
        load_config(None, [*fa, "train.micro_batch=4"])
    assert load_config(None, [*fa, "train.micro_batch=1"]).model.attn_implementation == "flash_attention_2"
    load_config(None, [*fa, "train.micro_batch=4", "data.packing=false"])  # padded: nothing to separate
    load_config(None, ["model.attn_implementation=flash_attention_2", "train.micro_batch=4"])  # text
    with pytest.raises(ConfigError, match="flash_attention_2"):
        load_config(None, ["model.attn_implementation=flash_attn"])


def test_flash_attention_is_refused_before_any_work_on_a_machine_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["train", f"run_dir={tmp_path / 'run'}", "model.attn_implementation=flash_attention_2"])
    assert rc == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_run_fingerprint_is_stable_across_versions():
    """A resume is refused when the fingerprint differs: removing or renaming a data/model setting
    must not change it, or every checkpoint saved before becomes unresumable. These values are the
    ones bigtrain computed before the modadd task left the product (data.modadd_train_fraction)."""
    assert load_config(None, []).fingerprint() == "00ab6ca205d7bafd"
    assert load_config(None, ["data.source=files", 'data.files=["/x/a.txt"]']).fingerprint() == "d097864fc649791b"


def test_a_config_yaml_written_by_an_older_bigtrain_still_loads(tmp_path):
    """RUN_DIR/config.yaml is what the resume error tells users to relaunch with: the keys an older
    bigtrain wrote (data.modadd_train_fraction, spike.policy, optim.torch_adam as a string) load."""
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  seq_len: 64\n  modadd_train_fraction: 0.5\n"
                   "spike:\n  policy: none\n  window: 32\noptim:\n  torch_adam: 'true'\n")
    cfg = load_config(old)
    assert (cfg.data.seq_len, cfg.spike.monitor, cfg.spike.window, cfg.optim.torch_adam) == (64, "none", 32, True)
    assert cfg.fingerprint() == load_config(None, ["data.seq_len=64"]).fingerprint()
