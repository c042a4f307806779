"""The benchmark harness: its statistics (fast) and one tiny 2-rank run of each contender (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BIN, TINY, free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import perf  # noqa: E402


def test_step_seconds_drops_warmup_and_last_step():
    row = {"ends": [0.0, 1.0, 2.0, 4.0, 7.0, 100.0]}  # the last interval holds bigtrain's final eval
    assert perf.step_seconds(row, 1) == [1.0, 2.0, 3.0]


def test_quantile_interpolates():
    assert perf.quantile([1, 2, 3, 4], 0.5) == 2.5
    assert perf.quantile([5], 0.25) == 5


def test_diluted_paired_ratios_and_intervals_are_per_seed():
    import spike_bench

    m, lo, hi = spike_bench.interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 / 3 ** 0.5)  # t(2) x sd 1 / sqrt(3)
    assert spike_bench.interval([1.0]) is None
    run = lambda sc, pol, seed, loss, **q: {"scenario": sc, "policy": pol, "seed": seed,  # noqa: E731
                                            "final_eval_loss": loss, "outcome": "finished", "quarantine": q}
    results = [run("diluted_clean", "none", 1, 2.0), run("diluted_clean", "none", 2, 4.0),
               run("diluted_30", "none", 1, 2.2), run("diluted_30", "none", 2, 4.4),
               run("diluted_30", "bigtrain", 1, 2.2 * 0.9, doc_recall=1.0), run("diluted_30", "bigtrain", 2, 4.4 * 1.1,
                                                                              doc_recall=0.5)]
    lines = spike_bench.diluted_paired(results, {"environment": {"bigtrain": "abc"}, "seeds": [1, 2]})
    row = [x for x in lines if x.startswith("| diluted_30")][0].split(" | ")
    assert row[3].startswith("1 [") and row[4] == "1 of 2"  # 0.9 and 1.1 of the same seed's off run
    assert row[5].startswith("1.1 [") and row[6].startswith("0.75 [")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bare_deepspeed.py", "perf_worker.py", "hf_trainer.py"])
def test_contender_writes_a_result_row(tmp_path, data_cache, script):
    result = tmp_path / "r.jsonl"
    args = [*TINY, "train.steps=5", "optim.warmup_steps=0", f"data.cache_dir={data_cache}"]
    if script == "perf_worker.py":
        args += [f"run_dir={tmp_path / 'run'}", f"checkpoint.snapshot_dir={tmp_path / 'snap'}"]
    if script == "hf_trainer.py":
        args += [f"--out-dir={tmp_path / 'hf'}"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "bench" / script), "--result", str(result), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(result.read_text().splitlines()[-1])
    assert len(row["ends"]) == 5 and row["world"] == 2
    assert row["tokens_per_step"] == 2 * 2 * 32  # micro 2 x 2 ranks x seq 32
    assert row["peak_rss_mb_max_rank"] > 0
    if script == "hf_trainer.py":
        assert row["is_deepspeed_enabled"]


def test_a_stopped_run_restarts_from_the_checkpoint_before_the_onset_and_counts_every_executed_step(tmp_path):
    """Kill-style competitors get the restart a person would do (issue 12): from the newest checkpoint
    before the stop's onset, skipping the data up to the stop; the steps the restart discards still
    count as executed (wasted)."""
    import spike_bench

    for step in (50, 100, 150):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "bigtrain_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000160").mkdir()  # saved at the stop: after the onset anyway
    assert spike_bench.restart_point(tmp_path) is None  # no stop event: nothing to restart
    (tmp_path / "spikes.jsonl").write_text(json.dumps({"event": "stop", "step": 160, "onset_step": 156}) + "\n")
    assert spike_bench.restart_point(tmp_path) == (150, 160)
    (tmp_path / "spikes.jsonl").write_text(json.dumps({"event": "stop", "step": 160, "onset_step": 150}) + "\n")
    assert spike_bench.restart_point(tmp_path) == (100, 160)  # strictly before the onset
    rows = lambda a, b, tag="": [{"step": s, "loss": s, "tag": tag} for s in range(a, b + 1)]  # noqa: E731
    first = rows(1, 160)  # stopped at 160
    second = rows(1, 100) + rows(101, 300, "again")  # resumed from 100: rows 101-160 truncated, then redone
    executed = spike_bench.merged_legs([first, second])
    assert len(executed) == 160 + 200 and executed[160:] == rows(101, 300, "again")


def test_a_restart_carries_the_world_over_and_merges_each_legs_events_once(tmp_path):
    """What happened stays happened: a fired NaN does not come back, the poison the stopped leg met
    stays at its sample ids; events of every leg are counted once (a resume keeps a stop anywhere)."""
    import spike_bench

    sc = spike_bench.Scenario("x", "x", [], 300, 300, faults=["faults.nan_steps=[150,250]",
                                                             "faults.poison_steps=[150,151]",
                                                             "faults.corrupt_weights_step=120"])
    stop = tmp_path / "checkpoints" / "step_00000154"
    stop.mkdir(parents=True)
    (stop / "bigtrain_state.json").write_text(json.dumps({"faults": {"poisoned": [[7, 9], [40, 41]],
                                                                     "fired": ["poison@150", "poison@151"]}}))
    assert spike_bench.carried_faults(sc, tmp_path, 154) == [
        "faults.nan_steps=[250]", "faults.scale_grad_steps=[]", "faults.poison_steps=[]",
        "faults.poison_ids=[[7,9],[40,41]]", "faults.corrupt_weights_step=0"]
    a, b, c = {"time": 1.0, "event": "rollback"}, {"time": 2.0, "event": "stop"}, {"time": 3.0, "event": "skip_steps"}
    assert spike_bench.merged_events([[a, b], [b, c]]) == [a, b, c]  # the resume dropped a, kept b


def test_a_poison_stretch_not_reached_before_the_stop_is_still_armed_but_a_fired_one_is_not(tmp_path):
    """A stretch is armed whole at its first step (its samples then live in poison_ids); a later step
    of it must not be armed again on the restart, which would poison other samples too."""
    import spike_bench

    sc = spike_bench.Scenario("x", "x", [], 300, 300, faults=["faults.poison_steps=[150,151,152,200]"])
    stop = tmp_path / "checkpoints" / "step_00000151"
    stop.mkdir(parents=True)
    (stop / "bigtrain_state.json").write_text(json.dumps({"faults": {
        "poisoned": [[7, 9]], "fired": ["poison@150", "poison@151", "poison@152"]}}))
    assert "faults.poison_steps=[200]" in spike_bench.carried_faults(sc, tmp_path, 151)


def test_each_policy_restarts_by_its_own_rule(tmp_path):
    """llm-foundry / OLMo: skip from the checkpoint to the stop; PaLM: 100 steps back, 200 batches
    skipped; Megatron: only the iterations its check flagged (the NaN that ended the job was transient)."""
    import spike_bench

    for step in (50, 100, 150):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "bigtrain_state.json").write_text("{}")
    (tmp_path / "spikes.jsonl").write_text(json.dumps({"event": "stop", "step": 160, "onset_step": 156}) + "\n")
    assert spike_bench.restart_point(tmp_path, "llmfoundry-kill") == (150, 160)
    assert spike_bench.restart_point(tmp_path, "palm-manual") == (50, 160)  # newest <= 156 - 100
    assert spike_bench.restart_skips("llmfoundry-kill", tmp_path, 150, 160, []) == [[151, 160]]
    assert spike_bench.restart_skips("llmfoundry-kill", tmp_path, 150, 160, [[20, 30], [155, 158]]) == [
        [20, 30], [151, 164]]  # the stopped leg's own skip after the checkpoint is carried, longer
    assert spike_bench.restart_skips("llmfoundry-kill", tmp_path, 150, 160, [[155, 158], [180, 185]]) == [
        [151, 164], [180, 185]]  # a range the stopped leg never reached stays as it was
    assert spike_bench.restart_skips("palm-manual", tmp_path, 50, 160, []) == [[51, 250]]
    assert spike_bench.restart_skips("palm-manual", tmp_path, 50, 400, []) == [[51, 400]]  # at least to the stop
    rows = [{"step": s, "loss": 1.0, "verdict": "flagged" if s in (40, 120, 130) else "ok"} for s in range(1, 161)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert spike_bench.restart_skips("megatron-rerun", tmp_path, 100, 160, []) == [[120, 120], [130, 130]]
    (tmp_path / "spikes.jsonl").write_text(json.dumps({"event": "stop", "step": 40, "onset_step": 40}) + "\n")
    assert spike_bench.restart_point(tmp_path, "palm-manual") is None  # no checkpoint before the onset


def test_natural_spikes_are_labelled_by_the_median_rule_and_scored_per_detection():
    """A spike: loss > 1.5x the median of the previous 50 steps, back under it within 50 steps; a loss
    that stays up is not one. A detection matches a spike at most 10 rows before it."""
    import spike_bench

    losses = [1.0] * 100 + [2.0, 3.0, 1.0] + [1.0] * 100 + [5.0] * 60
    rows = [{"step": i + 1, "loss": x, "verdict": "ok"} for i, x in enumerate(losses)]
    assert spike_bench.labelled_spikes(rows) == [100]  # the divergence at 203 never recovers
    rows[104]["verdict"] = "flagged"  # detected 4 rows after the onset
    rows[150]["verdict"] = "flagged"  # nothing there: a false detection
    s = spike_bench.natural_scores(rows, [])
    assert (s["labelled"], s["detections"], s["true_detections"], s["found"]) == (1, 2, 1, 1)
    assert s["precision"] == 0.5 and s["recall"] == 1.0


def test_paired_claims_count_unfinished_runs_apart_and_claim_only_outside_the_interval():
    import spike_bench

    sc = spike_bench.Scenario("poison", "t", [], 10, 10, seeds=(1, 2, 3))
    mk = lambda p, seed, loss, fin=True: {"scenario": "poison", "policy": p, "seed": seed,  # noqa: E731
                                          "final_eval_loss": loss, "finished": fin}
    res = [mk("bigtrain", s, 2.0 + 0.01 * s) for s in (1, 2, 3)]
    res += [mk("none", s, 2.5 + 0.01 * s) for s in (1, 2, 3)]
    res += [mk("llmfoundry-kill", 1, 1.0, fin=False), mk("llmfoundry-kill", 2, 2.0), mk("llmfoundry-kill", 3, 2.03)]
    lines = spike_bench.paired_claims(res, {"poison": sc}, mine=("bigtrain",))
    row = {line.split(" | ")[2]: line for line in lines[2:]}
    assert "| **better** |" in row["none"] and "3/3" in row["none"]
    # Seed 1: only bigtrain finished (the other's lower loss where it stopped does not count); seeds 2-3
    # are a wash, and finishing once more is counted, not claimed.
    assert "2/3" in row["llmfoundry-kill"] and "| 1 | 0 | no difference shown |" in row["llmfoundry-kill"]
    res[-2]["final_eval_loss"], res[-1]["final_eval_loss"] = 1.5, 1.52  # the other clearly lower where both finished
    lines = spike_bench.paired_claims(res, {"poison": sc}, mine=("bigtrain",))
    assert "| 1 | 0 | no difference shown |" in [line for line in lines if "llmfoundry-kill" in line][0]  # mixed evidence
    res[6]["finished"], res[6]["final_eval_loss"] = True, 1.51  # all finished, the other lower on each seed
    lines = spike_bench.paired_claims(res, {"poison": sc}, mine=("bigtrain",))
    assert "| 3/3 |" in [line for line in lines if "llmfoundry-kill" in line][0]
    assert "| 0 | 0 | worse |" in [line for line in lines if "llmfoundry-kill" in line][0]


def test_modadd_is_compared_by_accuracy_points_not_by_a_loss_ratio_near_zero():
    """On modadd one seed ends near loss 0 and another on the plateau: a loss ratio against the run
    near 0 drowns every other seed, so runs are compared by accuracy at equal executed steps; higher
    accuracy is better and is shown as a positive difference."""
    import spike_bench

    sc = spike_bench.Scenario("modadd", "t", [], 1000, 700, seeds=(1, 2, 3), kind="natural")
    mk = lambda p, seed, loss, acc: {"scenario": "modadd", "policy": p, "seed": seed, "finished": True,  # noqa: E731
                                     "eval_loss_equal_executed": loss, "eval_accuracy_equal_executed": acc}
    # bigtrain is 2-4 points more accurate on every seed; on seed 1 its loss is 30x the other's (both ~0).
    res = [mk("bigtrain", 1, 0.003, 0.995), mk("bigtrain", 2, 1.0, 0.70), mk("bigtrain", 3, 0.5, 0.83)]
    res += [mk("none", 1, 0.0001, 0.975), mk("none", 2, 1.2, 0.66), mk("none", 3, 0.6, 0.80)]
    line = [x for x in spike_bench.paired_claims(res, {"modadd": sc}, mine=("bigtrain",)) if "| none |" in x][0]
    assert "| **better** |" in line and "+3.0 pt" in line
    assert spike_bench.paired_diff(res[0], res[3], sc) < 0  # < 0: the first run is the better one
    res[3]["eval_accuracy_equal_executed"] = None  # a run without an accuracy is left out, not counted as 0
    line = [x for x in spike_bench.paired_claims(res, {"modadd": sc}, mine=("bigtrain",)) if "| none |" in x][0]
    assert "| 2 (3 finished)/3 |" in line and "+3.5 pt" in line  # the seeds the interval is over
    res[3]["eval_accuracy_equal_executed"] = 0.975
    for r in res:
        r.update(final_eval_loss=r["eval_loss_equal_executed"], final_eval_accuracy=r["eval_accuracy_equal_executed"],
                 spikes_executed=[], spikes_kept=[], natural={})
    rows = {x.split(" | ")[1]: x for x in spike_bench.outcome_table(res, {"modadd": sc})[2:]}
    assert "| +3.0 pt [" in rows["bigtrain"] and "%" not in rows["bigtrain"]  # more accurate than none: positive
    assert "| (reference) |" in rows["none"]


def test_faults_that_fired_in_any_earlier_leg_stay_fired(tmp_path):
    """A second restart's checkpoint descends from one taken before the first leg's faults fired: what
    the first leg met must not be armed again (review of issue 12)."""
    import spike_bench

    sc = spike_bench.Scenario("x", "x", [], 300, 300, faults=["faults.poison_steps=[60,61,62]",
                                                             "faults.nan_steps=[58]"])
    for step, state in ((70, {"poisoned": [[7, 9]], "fired": ["nan@58", "poison@60", "poison@61", "poison@62"]}),
                        (55, {"poisoned": [], "fired": []})):
        d = tmp_path / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "bigtrain_state.json").write_text(json.dumps({"faults": state}))
    seen: dict = {}
    spike_bench.carried_faults(sc, tmp_path, 70, seen)
    again = spike_bench.carried_faults(sc, tmp_path, 55, seen)  # the second leg stopped earlier
    assert "faults.poison_steps=[]" in again and "faults.nan_steps=[]" in again
    assert "faults.poison_ids=[[7,9]]" in again


def test_results_name_the_commit_of_the_code_not_a_later_results_commit(tmp_path, monkeypatch):
    """Benchmark invocations spread over sessions commit their results in between: each must still
    name the commit that last changed the code it ran, not HEAD; an uncommitted or new code file is
    reported and changes the code hash, a results file does neither."""
    import harness

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "bigtrain").mkdir()
    (tmp_path / "bigtrain" / "train.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "code")
    code_commit = git("rev-parse", "HEAD")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.jsonl").write_text("{}\n")
    git("add", "-A")
    git("commit", "-qm", "results")
    monkeypatch.setattr(harness, "REPO", tmp_path)
    commit, dirty = harness.code_version()
    assert code_commit.startswith(commit) and len(commit) == 12 and not dirty
    sha = harness.code_sha256()
    (tmp_path / "docs" / "results.jsonl").write_text("{}\n{}\n")
    assert harness.code_sha256() == sha and not harness.code_version()[1]
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    (tmp_path / "bigtrain" / "__pycache__").mkdir()
    (tmp_path / "bigtrain" / "__pycache__" / "train.pyc").write_bytes(b"\0")  # written by every run: ignored
    assert harness.code_sha256() == sha and harness.code_version() == (commit, False)
    (tmp_path / "bigtrain" / "new.py").write_text("y = 2\n")  # untracked code counts
    assert harness.code_version() == (commit, True) and harness.code_sha256() != sha
    (tmp_path / "bigtrain" / "new.py").unlink()
    git("mv", "bigtrain/train.py", "bigtrain/tr\u00e4in.py")  # same bytes, another name (git quotes it)
    renamed = harness.code_sha256()
    assert renamed != sha and harness.code_version() == (commit, True)
    (tmp_path / "bigtrain" / "tr\u00e4in.py").write_text("x = 3\n")
    assert harness.code_sha256() != renamed  # the quoted name's file is in the hash
    git("commit", "-qam", "rename")
    # a side branch changes the code and is merged with a merge commit: the merge names the code
    git("checkout", "-qb", "side")
    (tmp_path / "bigtrain" / "side.py").write_text("z = 1\n")
    git("add", "-A")
    git("commit", "-qm", "side code")
    git("checkout", "-q", "-")
    git("merge", "-q", "--no-ff", "-m", "merge", "side")
    merge = git("rev-parse", "HEAD")
    (tmp_path / "docs" / "results.jsonl").write_text("{}\n{}\n{}\n")
    git("commit", "-qam", "results")
    assert merge.startswith(harness.code_version()[0])
    # a shallow clone: the cut commit counts as changing every file, so the name is marked
    clone = tmp_path.parent / f"{tmp_path.name}-shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{tmp_path}", str(clone)], check=True)
    monkeypatch.setattr(harness, "REPO", clone)
    assert harness.code_version()[0].endswith(" (shallow clone)")


def test_the_report_claims_one_commit_only_when_every_invocation_ran_it():
    import spike_bench

    env = {"bigtrain": "abc", "code_sha256": "h1"}
    meta = {"environment": env, "merged": [{"environment": dict(env)}, {"environment": dict(env)}]}
    assert spike_bench.code_line(meta).startswith("Code: bigtrain **abc** (code hash h1) for every run, all 3")
    meta["merged"][1]["environment"]["code_sha256"] = "h2"
    assert "mix code versions" in spike_bench.code_line(meta) and "h2" in spike_bench.code_line(meta)
    meta["merged"][1] = spike_bench.merged_entry({"command": "c", "date": "d", "total_minutes": 1.0,
                                                  "environment": dict(env), "warning": "changed", "seeds": {}})
    assert meta["merged"][1]["warning"] == "changed" and "seeds" not in meta["merged"][1]
    assert "mix code versions" in spike_bench.code_line(meta)
    # the same files under another commit name (a shallow clone): one code state, said so
    meta["merged"][1] = {"environment": {"bigtrain": "abc (shallow clone)", "code_sha256": "h1"}}
    line = spike_bench.code_line(meta)
    assert "one code hash, **h1**, for every run" in line and "abc (shallow clone)" in line
    meta["merged"][1] = {"environment": {"bigtrain": "unknown", "code_sha256": "h1"}}
    assert "not recorded" in spike_bench.code_line(meta)


def test_the_report_names_an_invocation_that_ran_on_another_machine():
    import spike_bench

    env = {"bigtrain": "abc", "code_sha256": "h1", "cpu": "AMD EPYC", "cores": "2", "torch": "2.13.0"}
    meta = {"environment": env, "merged": [{"command": "same", "environment": dict(env)}]}
    assert spike_bench.machine_warning(meta) == ""
    meta["merged"].append({"command": "later", "environment": {**env, "cores": "16"}})
    warning = spike_bench.machine_warning(meta)
    assert "`later`: cores 16" in warning and "same" not in warning
