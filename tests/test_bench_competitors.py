"""The spike benchmark's competitor rules (bench/competitors.py) and the seam they plug into: they are
registered by name through bigtrain.spike.register_monitor, never imported by bigtrain."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain import spike
from bigtrain.config import load_config
from bigtrain.spike import SpikeConfig, build_monitor
from helpers import BIN, read_jsonl, run_bigtrain

ROOT = Path(__file__).resolve().parent.parent
ENTRY = str(ROOT / "bench" / "bench_entry.py")
sys.path.insert(0, str(ROOT / "bench"))

import competitors  # noqa: E402
from competitors import KillLossSpikeMonitor, MegatronRerunMonitor, OlmoSkipStepMonitor, PalmManualMonitor  # noqa: E402


@pytest.fixture
def registered(monkeypatch):
    """The competitors registered, and the registry as it was after the test."""
    monkeypatch.setattr(spike, "MONITORS", dict(spike.MONITORS))
    competitors.register()
    competitors.register()  # every rank, every import: registering again is a no-op


def test_registered_names_build_the_competitors(registered):
    assert isinstance(build_monitor(load_config(None, ["spike.monitor=olmo_skip_step"]).spike, 1000),
                      OlmoSkipStepMonitor)
    kill = build_monitor(SpikeConfig(monitor="llmfoundry_kill"), 10_000)
    assert isinstance(kill, KillLossSpikeMonitor) and kill.window_size == 500
    assert isinstance(build_monitor(SpikeConfig(monitor="megatron_rerun"), 10), MegatronRerunMonitor)
    assert isinstance(build_monitor(SpikeConfig(monitor="palm_manual"), 10), PalmManualMonitor)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_only_the_benchmark_entry_knows_the_competitors_and_modadd(tmp_path):
    bench = ["train", "--dry-run", "spike.monitor=llmfoundry_kill", "model.preset=modadd", "data.source=modadd",
             "data.seq_len=4"]
    proc = _run([ENTRY, *bench])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "monitor: llmfoundry_kill" in proc.stdout and "preset: modadd" in proc.stdout
    proc = _run(["-m", "bigtrain", "train", "spike.monitor=olmo_skip_step", f"run_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert "spike.monitor must be a registered monitor (bigtrain, none), got 'olmo_skip_step'" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run started


@pytest.mark.slow
def test_a_registered_monitor_acts_in_a_two_rank_run(tmp_path):
    """OLMo-core's rule through bench/bench_entry.py on the modadd task: the 1000x gradient at step 70 is
    one skipped update (the trainer's generic SKIP_UPDATE path: restore the step before, go on)."""
    run_dir = tmp_path / "run"
    run_bigtrain([f"run_dir={run_dir}", "model.preset=modadd", "data.source=modadd", "data.seq_len=4",
                  "train.micro_batch=32", "train.steps=75", "optim.warmup_steps=5", "train.eval_interval=0",
                  "checkpoint.interval=0", "checkpoint.snapshot_interval=1", "spike.monitor=olmo_skip_step",
                  "faults.scale_grad_steps=[70]"], script=ENTRY)
    events = [e for e in read_jsonl(run_dir / "spikes.jsonl") if e.get("event") == "skip_update"]
    assert [e["step"] for e in events] == [70], read_jsonl(run_dir / "spikes.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 75 and math.isfinite(summary["final_loss"])


# --- OLMo-core SkipStepOptimizer -----------------------------------------------------------------


def test_olmo_waits_for_64_values_then_flags_beyond_6_sigma():
    mon = OlmoSkipStepMonitor()
    base = [1.0, 3.0] * 40  # mean 2, unbiased std ~1.0
    for t in range(63):
        assert mon.observe(t, base[t], 1.0 + 0.1 * (t % 2)).kind == "ok"
    # The 64th value is the first checked: 63 previous values.
    prev = base[:63]
    mu = sum(prev) / 63
    sd = math.sqrt(sum((x - mu) ** 2 for x in prev) / 62)
    assert mon.observe(63, mu + 6 * sd - 1e-9, 1.0).kind == "ok"
    v = mon.observe(64, 100.0, 1.0)
    assert v.kind == "skip_update" and v.onset_step == 64


def test_olmo_flagged_values_enter_the_window_and_window_is_128():
    mon = OlmoSkipStepMonitor()
    for t in range(200):
        mon.observe(t, 2.0 + 0.01 * (t % 3), 1.0 + 0.01 * (t % 2))
    assert mon.observe(200, 50.0, 1.0).kind == "skip_update"
    state = mon.state_dict()
    assert state["losses"][-1] == 50.0 and len(state["losses"]) == 129
    # The spike now inflates sigma: a 3x loss right after is no longer flagged (upstream caveat).
    assert mon.observe(201, 6.0, 1.0).kind == "ok"


def test_olmo_grad_rule_and_nonfinite():
    mon = OlmoSkipStepMonitor()
    for t in range(100):
        mon.observe(t, 2.0 + 0.01 * (t % 3), 1.0 + 0.01 * (t % 2))
    assert mon.observe(100, 2.0, 5.0).kind == "skip_update"
    assert mon.observe(101, float("inf"), 1.0).kind == "stop"  # OLMo-core's trainer raises


def test_kill_loss_spike_ignores_a_nan_and_is_blind_while_it_is_in_the_window():
    """Upstream has no non-finite rule: the NaN enters the window, whose mean is then NaN."""
    mon = KillLossSpikeMonitor(total_steps=300)
    for t in range(1, 101):
        mon.observe(t, 2.0, 1.0)
    assert mon.observe(101, float("nan"), 1.0).kind == "ok"
    assert [mon.observe(t, 9.0, 1.0).kind for t in range(102, 110)] == ["ok"] * 8


# --- llm-foundry KillLossSpike -------------------------------------------------------------------


def test_kill_window_size():
    assert KillLossSpikeMonitor(1000).window_size == 100
    assert KillLossSpikeMonitor(10_000).window_size == 500


def test_kill_stops_on_fifth_consecutive_2x_step_not_fourth():
    mon = KillLossSpikeMonitor(total_steps=1000)
    for t in range(100):
        assert mon.observe(t, 1.0, 1.0).kind == "ok"  # filling the window: nothing checked
    kinds = [mon.observe(100 + i, 10.0, 1.0).kind for i in range(5)]
    assert kinds == ["ok", "ok", "ok", "ok", "stop"]


def test_kill_counter_resets_and_mean_includes_spikes():
    mon = KillLossSpikeMonitor(total_steps=1000)
    for t in range(100):
        mon.observe(t, 1.0, 1.0)
    for i in range(4):
        mon.observe(100 + i, 2.0, 1.0)  # exactly 2x counts (>=)
    assert mon.observe(104, 1.0, 1.0).kind == "ok"  # resets the counter
    # Window mean is now (95 + 4*2 + 1) / 100 = 1.04, so 2.0 is no longer an outlier.
    assert [mon.observe(105 + i, 2.0, 1.0).kind for i in range(5)] == ["ok"] * 5


def test_kill_high_loss_rule():
    """Upstream sets the cap at ``timestamp.batch == window_size``, a batch at which the window is one
    value short of full (Composer counts the batch before BATCH_END), so the cap stays at its default
    10: 3.5 is never high; 11.5 (under 2x a mean of 6, so no outlier) is."""
    mon = KillLossSpikeMonitor(total_steps=1000)  # window 100
    for t in range(1, 101):
        mon.observe(t, 3.0 if t == 1 else 2.0, 1.0)
    assert all(mon.observe(t, 3.5, 1.0).kind == "ok" for t in range(101, 301))
    mon = KillLossSpikeMonitor(total_steps=1000)
    for t in range(1, 101):
        mon.observe(t, 6.0, 1.0)
    kinds = [mon.observe(t, 11.5, 1.0).kind for t in range(101, 201)]
    # The rule is first checked at step 200 (current_step >= 2 x window), when the window holds 99
    # values of 11.5 > cap 10 (>= 50).
    assert kinds == ["ok"] * 99 + ["stop"]


def test_kill_high_loss_needs_half_the_window():
    mon = KillLossSpikeMonitor(total_steps=1000)
    for t in range(100):
        mon.observe(t, 3.0 if t == 0 else 2.0, 1.0)
    kinds = [mon.observe(100 + i, 3.5 if i % 3 == 0 else 2.0, 1.0).kind for i in range(200)]
    assert "stop" not in kinds  # about a third of the window is above the cap


def test_competitors_keep_no_state_across_a_restart():
    """Upstream keeps both rules' windows in memory only: a run restarted from a checkpoint starts
    with empty ones (OLMo-core's lists are plain attributes; KillLossSpike defines no state_dict)."""
    for mon in (OlmoSkipStepMonitor(), KillLossSpikeMonitor(100)):
        for t in range(1, 151):
            mon.observe(t, 2.0 + 0.01 * (t % 5), 1.0)
        twin = type(mon)() if isinstance(mon, OlmoSkipStepMonitor) else KillLossSpikeMonitor(100)
        twin.load_state_dict(json.loads(json.dumps(mon.state_dict())))
        losses = [2.0, 9.0, 9.0, 9.0, 9.0, 9.0, 2.0]
        assert any(mon.observe(t, x, 1.0).kind != "ok" for t, x in enumerate(losses, start=151))
        assert all(twin.observe(t, x, 1.0).kind == "ok" for t, x in enumerate(losses, start=151))


def test_megatron_flags_10x_the_frozen_max_of_the_first_100_and_applies_the_update():
    """is_unexpectedly_large: the first iteration is not checked, the next 100 values set the max, which
    never moves again; a value >= 10x it is flagged (logged, the update applied), not stopped."""
    mon = MegatronRerunMonitor()
    assert mon.observe(1, 1000.0, 1.0).kind == "ok"  # first iteration: not validated, not in the max
    for t in range(2, 102):
        assert mon.observe(t, 5.0 if t == 2 else 2.0, 1.0).kind == "ok"
    assert mon.observe(102, 49.9, 1.0).kind == "ok"  # below 10 x 5
    v = mon.observe(103, 50.0, 1.0)
    assert v.kind == "flagged" and v.onset_step == 103 and v.severity == pytest.approx(10.0)
    assert mon.observe(104, 49.0, 1.0).kind == "ok"  # the flagged value did not raise the max
    assert mon.observe(105, math.nan, 1.0).kind == "stop"  # the NaN check ends the job
    twin = MegatronRerunMonitor()
    twin.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert twin.observe(106, 60.0, 1.0).kind == "ok"  # a relaunched job skips its first iteration
    assert twin.observe(107, 60.0, 1.0).kind == "flagged"  # then the saved max applies


def test_palm_person_stops_above_1_5x_the_median_and_forgets_on_restart():
    mon = PalmManualMonitor()
    for t in range(1, 21):
        assert mon.observe(t, 30.0 if t == 5 else 2.0, 1.0).kind == "ok"  # no decision before 20 losses
    assert mon.observe(21, 3.0, 1.0).kind == "ok"  # exactly 1.5 x the median: not above
    v = mon.observe(22, 3.01, 1.0)
    assert v.kind == "stop" and v.onset_step == 22
    assert mon.observe(23, math.inf, 1.0).kind == "stop"
    twin = PalmManualMonitor()
    twin.load_state_dict(mon.state_dict())
    assert twin.observe(24, 100.0, 1.0).kind == "ok"  # a restarted run: the person starts watching anew
