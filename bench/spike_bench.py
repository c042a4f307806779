"""Loss-spike benchmark: every (scenario, policy, seed) as a real 2-rank ``torchrun bench/bench_entry.py train``.

Usage (from the repository root, with the venv's python):

    .venv/bin/python bench/spike_bench.py [--quick] [--seeds N] [--out DIR] [--work DIR]
    .venv/bin/python bench/spike_bench.py --report-only --out docs   # re-render from DIR/spike_benchmark.jsonl

Runs are sequential (the benchmark is sized for a 2-core CPU box) and each is a subprocess of
bench/bench_entry.py: bigtrain's normal command line with the benchmark's competitor monitors and modadd
task registered (bigtrain does not ship them), so what is measured is what a user gets. Each run's metrics.jsonl, spikes.jsonl,
summary.json and exit status are parsed into one JSON line (OUT/spike_benchmark.jsonl); the table,
the command line, the date and the environment go to OUT/spike_benchmark.md, and one PNG per scenario
(OUT/spike_<scenario>.png) overlays every policy's loss on the surviving path of the first seed.
Text below the line ``<!-- notes -->`` in an existing OUT/spike_benchmark.md is kept on re-runs.

Scenarios, policies and measured quantities are defined once, below; docs/spike_benchmark.md explains
them for readers. Nothing here tunes a threshold per scenario: every policy runs with its defaults.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bigtrain.report import discarded_mask, read_jsonl, surviving_rows  # noqa: E402  (no torch import)
from harness import environment, free_port, group_rss, job_env, start  # noqa: E402
from harness import watch as watch_job  # noqa: E402

NOTES_MARKER = "<!-- notes -->"
ENTRY = REPO / "bench" / "bench_entry.py"  # registers the competitors and modadd, then runs bigtrain's CLI

# ------------------------------------------------------------------------------------------------
# Scenarios


# The tiny-llama default on the stdlib text, fp32 (exact on CPU), no clipping unless a policy adds it.
STDLIB = ["data.seq_len=64", "train.micro_batch=8", "train.precision=fp32", "train.deepspeed=zero2",
          "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=20", "optim.grad_clip=0",
          "train.eval_interval=50", "train.eval_batches=16", "checkpoint.interval=0"]
# The low-loss Adam spike recipe (docs/design.md sec. 3) through bigtrain's own pipeline:
# global batch 512 (256 x 2 ranks), constant LR after a 10-step warmup, no weight decay, no clipping.
# bf16, not fp32: with the Llama preset's N(0, 0.02) init the fp32 loss glides to ~1e-7 without a
# spike, while in bf16 it bottoms out near 1e-3 and spikes 10-100x every ~50 steps, as the research
# model does in fp32 (docs/spike_benchmark.md, "The modadd recipe").
MODADD = ["model.preset=modadd", "data.source=modadd", "data.seq_len=4", "train.micro_batch=256",
          "train.precision=bf16", "train.deepspeed=zero1", "optim.lr=3e-3", "optim.min_lr=3e-3",
          "optim.beta2=0.98", "optim.eps=1e-8", "optim.weight_decay=0", "optim.grad_clip=0",
          "optim.warmup_steps=10", "train.eval_interval=100", "train.eval_batches=10",
          "checkpoint.interval=0"]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    base: list[str]
    steps: int
    quick_steps: int
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    """train.seed values, in order: a run uses the first ``n_seeds`` of them."""
    n_seeds: int = 1
    """Seeds in the default sizing (--quick: 1; --seeds N: N)."""
    faults: list[str] = field(default_factory=list)
    """Overrides that inject the fault."""
    injected: list[tuple[int, int]] = field(default_factory=list)
    """[first, last] step of each injected fault (for detected / missed / false alarms)."""
    data_fault: bool = False
    """True when the fault is bad data (it stays in the data; rollbacks can meet it again)."""
    kind: str = "injected"
    """"natural": real spikes, "injected": faults, "clean": nothing injected (every event is a false
    alarm)."""
    reference: str | None = None
    """Scenario whose run with the same policy and seed is the clean reference for the final loss;
    None: this scenario's policy "none" with the same seed."""
    variant: bool = False
    """A held-out fault variant (issue 12): run with ``--variants``, not by default."""


# Seeds used while the rules were developed (dev; every number of the first iterations came from them):
# text 1-4, modadd 2 and 6 (the first escapers in a scan of seeds 1-6, policy none, of the initial
# ln(97) plateau), diluted 11 (thresholds) and 12-26 (issue 14's reports). The held-out evaluation
# uses seeds none of that touched, for every scenario: the text seeds chosen before any run of them;
# the modadd seeds selected on one result only, policy none's loss after 700 steps (the rule below),
# before any other policy ran on them.
DEV_SEEDS = (1, 2, 3, 4)
MODADD_DEV_SEEDS = (2, 6, 3, 4)
# The first held-out text seeds, 31-35 (the evaluation at f9fff5e, kept in spike_benchmark_history.jsonl),
# became development data when their V2/V3 results led to spike.data_repeat_window; every evaluation from
# then on uses 36-40, chosen before any run of them (no text run had used them).
FIRST_HELDOUT_SEEDS = (31, 32, 33, 34, 35)
HELDOUT_SEEDS = (36, 37, 38, 39, 40)
# modadd's held-out seeds: on most seeds bigtrain's epoch-permutation sampler keeps the plain run on the
# ln(97) plateau for the whole run, where nothing spikes. The rule, fixed before the scan and applied to
# policy none only (no other policy ran on them): the first seeds >= 31 whose plain run's held-out loss
# is < 2.0 after 700 steps. Scan of 31-42 (2026-12-05, `--quick --only modadd --policies none`): 31 3.11,
# 32 4.71, 33 1.49, 34 4.25, 35 4.65, 36 4.67, 37 0.034, 38 0.017, 39 4.62, 40 4.70, 41 1.52, 42 4.34.
# The fifth by the same rule, scanned from 43 on (2026-12-06, same command): 43 4.64, 44 0.037.
# These seeds ran in the f9fff5e evaluation too. They are kept: no rule was changed on modadd's results
# (spike.data_repeat_window came from the text variants V2/V3), and a new scan would take ~25 min.
MODADD_HELDOUT_SEEDS = (33, 37, 38, 41, 44)


def scenarios(quick: bool, dev: bool = False) -> list[Scenario]:
    """The benchmark's scenarios. Text runs are 200 steps (--quick: 150) with the faults at mid-run
    (after the fast initial fall, leaving half the run to recover); the variants move them (early:
    10%, late: 90%) or change their size and shape. ``dev``: the seeds the rules were developed on."""
    n_text = 150 if quick else 200
    at = n_text // 2
    text_seeds = DEV_SEEDS if dev else HELDOUT_SEEDS
    modadd_seeds = MODADD_DEV_SEEDS if dev else MODADD_HELDOUT_SEEDS
    n = 2 if dev else 5

    def poison(first: int, length: int) -> list[str]:
        return [f"faults.poison_steps=[{','.join(map(str, range(first, first + length)))}]"]

    def text(key: str, title: str, faults: list[str], injected: list[tuple[int, int]], data: bool = False,
             base: list[str] = STDLIB, variant: bool = False) -> Scenario:
        return Scenario(key, title, base, n_text, n_text, seeds=text_seeds, n_seeds=n, faults=faults,
                        injected=injected, data_fault=data, reference="clean_text" if base is STDLIB else "clean_epochs",
                        variant=variant)

    early, late = n_text // 10, n_text * 9 // 10 - 6
    # A stdlib subset small enough that a run sees it ~3 times (1,350 train blocks of 64 tokens against
    # 200 x 16 samples): the poisoned blocks come round again in every epoch.
    epochs = [*STDLIB, "data.max_bytes=90000"]
    return [
        Scenario("modadd", "1. Low-loss Adam spikes (modadd, real, optimizer-driven)", MODADD,
                 steps=1000, quick_steps=700, seeds=modadd_seeds, n_seeds=min(n, len(modadd_seeds)), kind="natural"),
        text("poison", "2. Bad data: 6 consecutive batches of garbage tokens on both ranks",
             poison(at, 6), [(at, at + 5)], data=True),
        text("sdc", "3. Silent data corruption for one step: output projection x1000 on rank 1 (the fp32 master restores it after the step)",
             [f"faults.corrupt_weights_step={at}", "faults.ranks=[1]"], [(at, at)]),
        text("nan", "4. Non-finite loss at one step (both ranks)", [f"faults.nan_steps=[{at}]"], [(at, at)]),
        Scenario("clean_text", "5a. Clean control: stdlib text, nothing injected", STDLIB, n_text, n_text,
                 seeds=text_seeds, n_seeds=n, kind="clean"),
        # Variants that played no part in developing any rule (issue 12), defined before any run of them.
        text("poison_1", "V1. Bad data: 1 batch", poison(at, 1), [(at, at)], data=True, variant=True),
        text("poison_30", "V2. Bad data: 30 consecutive batches", poison(at, 30), [(at, at + 29)], data=True,
             variant=True),
        text("poison_100", "V3. Bad data: 100 consecutive batches (half the run)", poison(at - 40, 100),
             [(at - 40, at + 59)], data=True, variant=True),
        text("poison_part", "V4. Bad data on part of the batch: ~30% of 6 batches' samples",
             [*poison(at, 6), "faults.poison_fraction=0.3"], [(at, at + 5)], data=True, variant=True),
        text("poison_rank", "V5. Bad data on one rank: rank 1's samples in 6 batches",
             [*poison(at, 6), "faults.ranks=[1]"], [(at, at + 5)], data=True, variant=True),
        text("poison_early", "V6. Bad data early (10% of the run): 6 batches", poison(early, 6),
             [(early, early + 5)], data=True, variant=True),
        text("poison_late", "V7. Bad data late (90% of the run): 6 batches", poison(late, 6),
             [(late, late + 5)], data=True, variant=True),
        # V8: the corruption is written into ZeRO's fp32 master too (faults.corrupt_persistent), so it stays
        # in the model until a rollback restores a state from before it; x2 is one exponent bit per element.
        text("corrupt_persist", "V8. Small persistent weight corruption: output projection x2 in the fp32 master "
             "(every rank's share), from mid-run on", [f"faults.corrupt_weights_step={at}", "faults.corrupt_scale=2",
                                                       "faults.corrupt_persistent=true"], [(at, at)], variant=True),
        text("poison_epochs", "V9. Multi-epoch: 6 bad batches in epoch 1 come round in epochs 2 and 3",
             poison(n_text // 8, 6), [(n_text // 8, n_text // 8 + 5)], data=True, base=epochs, variant=True),
        Scenario("clean_epochs", "V9 clean: the multi-epoch data, nothing injected", epochs, n_text, n_text,
                 seeds=text_seeds, n_seeds=n, kind="clean", variant=True),
    ]


# ------------------------------------------------------------------------------------------------
# Policies: config overrides on top of the scenario. Snapshots only where the policy uses them, so
# the plain baselines pay nothing for bigtrain's machinery and the overhead column is honest.

# The competitors run as their recipes do: gradient clipping at 1.0 (llm-foundry:
# scripts/train/yamls/pretrain/mpt-7b.yaml, algorithms.gradient_clipping; OLMo-core's recipes set
# max_grad_norm 1.0) and periodic checkpoints (every 50 steps here), from which a person restarts a
# run their rule stopped (``run_one``: RESTART_POLICIES).
PERIODIC = ["checkpoint.interval=50", "checkpoint.keep=100"]
POLICIES: dict[str, list[str]] = {
    "none": ["spike.monitor=none", "checkpoint.snapshot_interval=0"],
    "clip-only": ["spike.monitor=none", "optim.grad_clip=1.0", "checkpoint.snapshot_interval=0"],
    # modadd's equal-compute baseline: plain training with the hyper-parameters bigtrain's recovery ends
    # with on modadd (dev seeds 2 and 6: beta2 0.95, eps 1e-15, LR scaled to 0.02-0.23x, geometric mean
    # ~0.07), the LR decayed to 0.07x by the schedule (cosine to min_lr) instead of by events.
    "none-matched": ["spike.monitor=none", "checkpoint.snapshot_interval=0", "optim.beta2=0.95", "optim.eps=1e-15",
                     "optim.min_lr=2.1e-4"],
    "olmo-skip-step": ["spike.monitor=olmo_skip_step", "checkpoint.snapshot_interval=1", "optim.grad_clip=1.0",
                       *PERIODIC],
    "llmfoundry-kill": ["spike.monitor=llmfoundry_kill", "checkpoint.snapshot_interval=0", "optim.grad_clip=1.0",
                        *PERIODIC],
    # Megatron-LM clips at 1.0 by default (megatron/training/arguments.py, --clip-grad 1.0).
    "megatron-rerun": ["spike.monitor=megatron_rerun", "checkpoint.snapshot_interval=0", "optim.grad_clip=1.0",
                       *PERIODIC],
    # PaLM clipped at 1.0 (Chowdhery et al. 2022, sec. 5).
    "palm-manual": ["spike.monitor=palm_manual", "checkpoint.snapshot_interval=0", "optim.grad_clip=1.0", *PERIODIC],
    "bigtrain": ["spike.monitor=bigtrain"],
    "bigtrain-clip": ["spike.monitor=bigtrain", "optim.grad_clip=1.0"],
    "bigtrain-no-eps": ["spike.monitor=bigtrain", "spike.lower_eps=false"],
    "bigtrain-lr0.5": ["spike.monitor=bigtrain", "spike.lr_factor=0.5"],
    # bigtrain with attribution disabled (no sample is ever an outlier): the pre-issue-14 window rule.
    "bigtrain-window": ["spike.monitor=bigtrain", "spike.sample_z=1e9"],
    # bigtrain as shipped at f9fff5e: data rollbacks skip by sample id only, never the stream ahead.
    # It decides spike.data_repeat_window's default by a rule fixed before any run on seeds 36-40
    # (2026-12-06): the window stays on only if bigtrain-clip is better than this policy (paired 95%
    # interval excluding 0), or finishes where it stops, on the 30- or the 100-batch block (V2, V3), and
    # is worse (interval excluding 0) on no data scenario (poison, V1-V7, V9). Otherwise its default
    # becomes off.
    "bigtrain-clip-idonly": ["spike.monitor=bigtrain", "optim.grad_clip=1.0", "spike.data_repeat_window=false"],
}
BIGTRAIN = "bigtrain"
# The held-out run's policies: every competitor as its users run it, plain training, bigtrain with and
# without clipping (clip-only is left out: Megatron's policy is clipping plus checks that rarely fire;
# the ablations bigtrain-no-eps / -lr0.5 / -window were development tools). none-matched runs on modadd only.
DEFAULT_POLICIES = ["none", "none-matched", "olmo-skip-step", "llmfoundry-kill", "megatron-rerun", "palm-manual",
                    "bigtrain", "bigtrain-clip"]
MODADD_ONLY = {"none-matched"}
# Policies whose rule ends the run (llm-foundry's KillLossSpike raises LossSpikeError; OLMo-core's
# trainer raises on a non-finite loss; Megatron's NaN check exits the job; PaLM's person stops it): the
# run is restarted, at most MAX_RESTARTS times, by ``restart_plan``'s rule for the policy.
RESTART_POLICIES = {"llmfoundry-kill", "olmo-skip-step", "megatron-rerun", "palm-manual"}
MAX_RESTARTS = 3
# PaLM: "re-started training from a checkpoint roughly 100 steps before the spike started, and skipped
# roughly 200-500 data batches" (the low end: these runs are 200 steps).
PALM_BACK, PALM_SKIP = 100, 200
# OLMo-core skips an update by multiplying it by zero (src/olmo_core/optim/skip_step_optimizer.py);
# DeepSpeed offers no cheap way to drop one update, so here the policy restores a per-step snapshot:
# its loop time measures the emulation, not OLMo's rule, and stays out of the overhead column.
EMULATED_OVERHEAD = {"olmo-skip-step"}
# --quick runs the plain baseline, the two competitors that act, and bigtrain's default.
QUICK_POLICIES = ["none", "olmo-skip-step", "llmfoundry-kill", "bigtrain"]
# Verdict kinds of a step row that are a policy's detection (FLAGGED: Megatron's logged-only flag).
FLAGGED = "flagged"

# An event "detects" an injected fault when its onset (or, without one, its step) lies in
# [first - EARLY, last + LATE]: llm-foundry needs 5 steps at >= 2x before it stops, and its stop
# event has no onset.
EARLY, LATE = 2, 10


# ------------------------------------------------------------------------------------------------
# Running


def run_env() -> dict[str, str]:
    env = job_env()
    # DeepSpeed JIT-builds its shared-memory comm op into the torch extensions dir. Processes that
    # build it with different flags rebuild it in turn in the shared default dir (~30 s each, under a
    # file lock); a private dir is built once and then reused.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/bigtrain/torch_extensions").expanduser()))
    return env


def warm_up(env: dict[str, str]) -> None:
    """Build the comm op and the stdlib data cache once, outside every timed run."""
    subprocess.run([sys.executable, "-c",
                    "from deepspeed.accelerator import get_accelerator as g; "
                    "b = g().create_op_builder('ShareMemCommBuilder'); b and b.load()"],
                   env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-c",
                    "from bigtrain.data import DataConfig, build_dataset, build_tokenizer; "
                    "build_dataset(DataConfig(seq_len=64), build_tokenizer(None), 0)"],
                   env=env, check=True, capture_output=True, cwd=REPO)


def fault_overrides(sc: Scenario) -> list[str]:
    return list(sc.faults)


def command(sc: Scenario, policy: str, seed: int, steps: int, run_dir: Path) -> list[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(ENTRY.relative_to(REPO)), "train",
            f"run_dir={run_dir}", *sc.base, f"train.steps={steps}", f"train.seed={seed}",
            *fault_overrides(sc), *POLICIES[policy]]


def restart_point(run_dir: Path, policy: str = "llmfoundry-kill") -> tuple[int, int] | None:
    """Where a run its policy stopped is restarted: (checkpoint step, stop step). The newest periodic
    checkpoint before the stop event's onset (the stop step when it has none); for PaLM's person, the
    newest at least ``PALM_BACK`` steps before the onset, else the newest before it. None: no stop
    event, or no checkpoint before it."""
    stops = [e for e in read_jsonl(run_dir / "spikes.jsonl") if e.get("event") == "stop"]
    if not stops:
        return None
    stop = stops[-1]
    onset = stop.get("onset_step") or stop["step"]
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")
                   if (p / "bigtrain_state.json").exists())
    before = [s for s in saved if s < onset]
    if policy == "palm-manual" and [s for s in before if s <= onset - PALM_BACK]:
        before = [s for s in before if s <= onset - PALM_BACK]
    return (before[-1], stop["step"]) if before else None


def restart_skips(policy: str, run_dir: Path, ckpt: int, stop: int, skips: list[list[int]]) -> list[list[int]]:
    """Every skip range of the run so far and the new ones for a restart from ``ckpt`` after a stop at
    ``stop`` (``run_one`` passes on those after the checkpoint; the earlier ones are in its history).

    - llm-foundry / OLMo (a person, PaLM-style): the data from the checkpoint to the stop, plus what the
      stopped leg itself skipped after the checkpoint.
    - PaLM: as above, at least ``PALM_SKIP`` batches.
    - Megatron: the relaunch skips only the iterations its spiky-loss check flagged (they reproduce:
      every fault here is deterministic data or persistent weights), after the checkpoint; the NaN that
      ended the job was transient (it did not reproduce), so nothing is skipped for it."""
    earlier = [r for r in skips if r[0] <= ckpt]
    later = [r for r in skips if ckpt < r[0] <= stop]  # applied by the stopped leg after the checkpoint
    unreached = [r for r in skips if r[0] > stop]  # still ahead: kept as they are
    if policy == "megatron-rerun":
        flagged = {r["step"] for leg in read_legs(run_dir, "metrics.jsonl") for r in leg if r.get("verdict") == FLAGGED}
        covered = {s for a, b in later for s in range(a, b + 1)}
        covered |= {s for a, b in unreached for s in range(a, b + 1)}
        return earlier + sorted(later + unreached + [[s, s] for s in sorted(flagged) if s > ckpt and s not in covered])
    length = (stop - ckpt) + sum(b - a + 1 for a, b in later)
    if policy == "palm-manual":
        length = max(length, PALM_SKIP)
    new = [ckpt + 1, ckpt + length]
    return earlier + [new] + [r for r in unreached if r[0] > new[1]]


def carried_faults(sc: Scenario, run_dir: Path, stop: int, seen: dict | None = None) -> list[str]:
    """Fault overrides for a restart after a stop at ``stop``: what happened to the world stays
    happened. Transient faults that fired in any leg so far (NaN, weight corruption, gradient scaling)
    do not come back; the poison any leg armed stays in the data (``faults.poison_ids``) instead of
    being armed again at its step on other samples. ``seen`` carries what earlier legs did (each
    restart's checkpoint descends from one taken before their faults fired, so its own state forgets
    them); it is updated in place."""
    seen = {} if seen is None else seen
    over = dict(f.split("=", 1) for f in sc.faults)
    steps = lambda key: [int(x) for x in json.loads(over.get(key, "[]"))]  # noqa: E731
    state = json.loads((run_dir / "checkpoints" / f"step_{stop:08d}" / "bigtrain_state.json").read_text())
    faults = state.get("faults") or {}
    # A poison stretch is armed whole at its first step (its later steps are marked fired then): its
    # samples are in poison_ids, and arming its later steps again would poison other samples too.
    fired = seen["fired"] = seen.get("fired", set()) | set(faults.get("fired", []))
    reached = seen["reached"] = max(seen.get("reached", 0), stop)
    poisoned = seen["poisoned"] = sorted({tuple(r) for r in [*seen.get("poisoned", []), *faults.get("poisoned", [])]})
    left = lambda key, kind: [x for x in steps(key) if x > reached and f"{kind}@{x}" not in fired]  # noqa: E731
    out = [f"faults.nan_steps={json.dumps(left('faults.nan_steps', 'nan'))}",
           f"faults.scale_grad_steps={json.dumps(left('faults.scale_grad_steps', 'scale_grad'))}",
           f"faults.poison_steps={json.dumps(left('faults.poison_steps', 'poison'))}",
           f"faults.poison_ids={json.dumps([list(r) for r in poisoned], separators=(',', ':'))}"]
    corrupt = int(over.get("faults.corrupt_weights_step", 0))
    if 0 < corrupt and (corrupt <= reached or f"corrupt@{corrupt}" in fired):
        out.append("faults.corrupt_weights_step=0")
    return [o.replace(" ", "") for o in out]


def merged_legs(legs: list[list[dict]]) -> list[dict]:
    """Rows of every leg, each once: a leg's file starts with the rows it inherited from the one
    before (a resume keeps them up to its checkpoint and drops the rest, which were executed)."""
    out = list(legs[0])
    for before, after in zip(legs, legs[1:]):
        kept = 0
        while kept < min(len(before), len(after)) and before[kept] == after[kept]:
            kept += 1
        out += after[kept:]
    return out


def merged_events(legs: list[list[dict]]) -> list[dict]:
    """spikes.jsonl events of every leg, each once (by its time stamp): a resume keeps a stop and the
    rollbacks its checkpoint holds, wherever they lie, so legs do not share a simple prefix."""
    seen, out = set(), []
    for leg in legs:
        for e in leg:
            if e.get("time") not in seen:
                seen.add(e.get("time"))
                out.append(e)
    return out


def read_legs(run_dir: Path, name: str) -> list[list[dict]]:
    """Each leg's copy of ``name`` (``name.leg1``, ...; saved by ``run_one``), else the file itself."""
    legs = sorted(run_dir.glob(f"{name}.leg*"), key=lambda p: int(p.name.rsplit("leg", 1)[1]))
    return [read_jsonl(p) for p in legs] or [read_jsonl(run_dir / name)]


def run_one(sc: Scenario, policy: str, seed: int, steps: int, work: Path, env: dict[str, str],
            timeout: int) -> dict[str, Any]:
    run_dir = work / f"{sc.key}-{policy}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = command(sc, policy, seed, steps, run_dir)
    first, t0, legs, skips, stops, seen = cmd, time.monotonic(), 0, [], 0, {}
    while True:
        with open(run_dir / "log.txt", "a") as log:
            # Own session, so the watchdog can end torchrun and its workers together by group id.
            proc = start(cmd, env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            killed = watch(proc, run_dir / "metrics.jsonl", time.monotonic(), timeout)
        legs += 1
        for name in ("metrics.jsonl", "spikes.jsonl"):  # a restart truncates both to its checkpoint
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, run_dir / f"{name}.leg{legs}")
        events = read_jsonl(run_dir / "spikes.jsonl")
        new_stop = sum(e.get("event") == "stop" for e in events) > stops  # this leg's rule stopped it
        stops = sum(e.get("event") == "stop" for e in events)
        point = restart_point(run_dir, policy) if policy in RESTART_POLICIES and not killed and new_stop else None
        if point is None or legs > MAX_RESTARTS or (run_dir / "summary.json").exists():
            break
        ckpt, stop = point
        skips = restart_skips(policy, run_dir, ckpt, stop, skips)
        later = [r for r in skips if r[0] > ckpt and r[0] <= steps]
        at = first.index("train") + 1  # options before the overrides (argparse takes them there)
        cmd = [*first[:at], "--resume", str(run_dir / "checkpoints" / f"step_{ckpt:08d}"), *first[at:],
               *carried_faults(sc, run_dir, stop, seen), f"train.skip_steps={json.dumps(later, separators=(',', ':'))}"]
    wall = time.monotonic() - t0
    result = parse_run(run_dir, sc, policy, seed, steps, proc.returncode, wall)
    if killed:
        result["outcome"] = killed
    result["command"] = shlex.join(["torchrun", *first[1:]]) + (
        f" (+{legs - 1} restart(s) with --resume, train.skip_steps and the faults carried over)" if legs > 1 else "")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # final checkpoints are not needed
    # A run that is killed leaves its RAM snapshots behind; same path as train.snapshot_root().
    shm = Path("/dev/shm") / f"bigtrain-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]}"
    shutil.rmtree(shm, ignore_errors=True)
    return result


# A step executed this often means recovery is looping (it never finishes by itself): the run is
# stopped and reported as such. Legitimate policies redo a step a handful of times (OLMo's skip-step
# redoes one step per bad batch; bigtrain's budget allows 10 rollbacks).
LOOP_LIMIT = 50
# A run whose processes together hold more than this is stopped before the kernel's OOM killer picks
# a victim on a shared machine (normal runs here hold ~0.6 GiB per rank).
MEMORY_LIMIT = int(os.environ.get("SPIKE_BENCH_MEMORY_GB", "4")) << 30


def watch(proc: subprocess.Popen, metrics: Path, t0: float, timeout: int) -> str | None:
    """Wait for the run; stop it on a recovery loop, too much memory or a timeout. Returns why it was
    stopped, or None."""
    counts: dict[int, int] = {}
    offset, inode = 0, None

    def reason() -> str | None:
        nonlocal offset, inode
        why = None
        if metrics.exists():
            with open(metrics, "rb") as f:
                # A resume rewrites the file (truncated to its checkpoint, then os.replace): start over.
                if os.fstat(f.fileno()).st_ino != inode:
                    inode, offset = os.fstat(f.fileno()).st_ino, 0
                    counts.clear()
                f.seek(offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
            offset += len(complete)
            for line in complete.decode().splitlines():
                step = json.loads(line)["step"]
                counts[step] = counts.get(step, 0) + 1
                if counts[step] >= LOOP_LIMIT and why is None:
                    why = f"killed by the benchmark: step {step} executed {LOOP_LIMIT} times (recovery loop)"
        rss = group_rss(proc.pid)
        if why is None and rss > MEMORY_LIMIT:
            why = f"killed by the benchmark: memory {rss / 2**30:.1f} GiB > {MEMORY_LIMIT / 2**30:.0f} GiB"
        return why

    return watch_job(proc, t0, timeout, reason)


# ------------------------------------------------------------------------------------------------
# Measuring


def research_spikes(rows: list[dict], factor: float = 10.0, floor: float = 1e-3, after: int = 200,
                    gap: int = 50, lookback: int = 100) -> list[int]:
    """Steps of spikes by the rule of docs/design.md sec. 3: loss > max(floor, factor x min of
    the previous ``lookback`` executed steps), >= ``gap`` executed steps apart, after step ``after``.
    ``rows`` in execution order, including steps a rollback later undid."""
    losses = [r["loss"] for r in rows]
    out: list[int] = []
    last = -math.inf
    for i in range(1, len(rows)):
        if rows[i]["step"] <= after:
            continue
        prev = [x for x in losses[max(0, i - lookback):i] if math.isfinite(x)]
        if prev and losses[i] > max(floor, factor * min(prev)) and i - last >= gap:
            out.append(rows[i]["step"])
            last = i
    return out


def injected_rows(rows: list[dict], sc: Scenario) -> list[set[int]]:
    """Per injected fault, the executed rows (indices into metrics.jsonl) it touched.

    A transient fault (NaN, weight corruption) fires once, at the first execution of its step. Bad
    data is data: every execution that drew a poisoned sample counts, also after a rollback has
    renumbered the steps, so an event on re-met poison is a detection, not a false alarm. Poisoned
    stream positions: the batches of the poisoned steps' first execution (positions are the
    ``samples`` cursor; one global batch per step)."""
    if not rows:
        return [set() for _ in sc.injected]
    batch = rows[0]["samples"]  # step 1 draws exactly one global batch from position 0
    out = []
    for first, last in sc.injected:
        i0 = next((i for i, r in enumerate(rows) if r["step"] == first), None)
        if i0 is None:
            out.append(set())
        elif sc.data_fault:
            lo = rows[i0]["samples"] - batch
            hi = lo + (last - first + 1) * batch
            out.append({i for i, r in enumerate(rows) if r["samples"] - batch < hi and r["samples"] > lo})
        else:
            out.append({i0})
    return out


def detections(rows: list[dict], events: list[dict]) -> list[tuple[int, int]]:
    """(row, onset row) of every detection on the executed timeline. Rows with a spike / incident /
    skip_update / stop verdict each have exactly one spikes.jsonl event, in order (its onset step is
    looked up backwards from the row); a row Megatron's check flagged is its own detection (logged
    only, no event)."""
    event_rows = [i for i, r in enumerate(rows) if r.get("verdict") in ("spike", "incident", "skip_update", "stop")]
    # Events that answer such a row: not a noise screen, a skip_steps or a screen_off (no verdict of theirs).
    events = [e for e in events if e.get("event") in ("rollback", "skip_update", "give_up", "stop")]
    out = []
    for i_e, e in zip(event_rows, events):
        onset = e.get("onset_step")
        i_o = next((j for j in range(i_e, -1, -1) if rows[j]["step"] == onset), i_e) if onset is not None else i_e
        out.append((i_e, i_o))
    out += [(i, i) for i, r in enumerate(rows) if r.get("verdict") == FLAGGED]
    return sorted(out)


def classify_events(rows: list[dict], events: list[dict], faults: list[set[int]]) -> tuple[int, int, int]:
    """(detected, missed, false alarms) on the executed timeline.

    A detection (``detections``) detects a fault if a row the fault touched lies between the
    detection's onset (minus ``EARLY`` rows) and the detection, or at most ``LATE`` rows before it
    (llm-foundry's stop has no onset). Several detections of one fault count once; a detection that
    detects nothing is a false alarm."""
    hit = [False] * len(faults)
    false_alarms = 0
    for i_e, i_o in detections(rows, events):
        found = False
        for f, touched in enumerate(faults):
            if any(j <= i_e and (i_e - j <= LATE or j >= i_o - EARLY) for j in touched):
                hit[f] = found = True
        false_alarms += not found
    return sum(hit), len(faults) - sum(hit), false_alarms


# Natural spikes, labelled by the definition: loss > LABEL_FACTOR x the median of the previous
# LABEL_WINDOW executed steps, back under that bar within LABEL_RECOVER steps (a loss that stays up is
# a divergence, not a spike); consecutive labelled steps are one spike.
LABEL_FACTOR, LABEL_WINDOW, LABEL_RECOVER, LABEL_MIN = 1.5, 50, 50, 20


def labelled_spikes(rows: list[dict]) -> list[int]:
    """Onset rows of the natural spikes on the executed timeline (after LABEL_MIN rows)."""
    losses = [r["loss"] for r in rows]
    onsets, i = [], LABEL_MIN
    while i < len(rows):
        prev = [x for x in losses[max(0, i - LABEL_WINDOW):i] if math.isfinite(x)]
        bar = LABEL_FACTOR * statistics.median(prev) if prev else math.inf
        if math.isfinite(losses[i]) and not losses[i] > bar:  # a NaN counts as a spike
            i += 1
            continue
        end = next((j for j in range(i + 1, min(len(rows), i + 1 + LABEL_RECOVER)) if losses[j] <= bar), None)
        if end is not None:
            onsets.append(i)
        i = end if end is not None else i + LABEL_RECOVER
    return onsets


def natural_scores(rows: list[dict], events: list[dict]) -> dict[str, Any]:
    """Detection precision / recall against ``labelled_spikes``: a detection matches a labelled spike
    whose onset lies in [its onset - EARLY, the detection row] or at most LATE rows before it."""
    labels = labelled_spikes(rows)
    dets = detections(rows, events)
    match = lambda d, o: o <= d[0] and (d[0] - o <= LATE or o >= d[1] - EARLY)  # noqa: E731
    true_dets = sum(any(match(d, o) for o in labels) for d in dets)
    found = sum(any(match(d, o) for d in dets) for o in labels)
    return {"labelled": len(labels), "detections": len(dets), "true_detections": true_dets, "found": found,
            "precision": true_dets / len(dets) if dets else None, "recall": found / len(labels) if labels else None}


def eval_at_executed(rows: list[dict], limit: int) -> tuple[float | None, float | None]:
    """(eval loss, eval accuracy) of the last evaluation within the first ``limit`` executed steps
    (equal compute: a run that redid steps is compared where the others stopped)."""
    evals = [r for r in rows[:limit] if "eval_loss" in r]
    return (evals[-1]["eval_loss"], evals[-1].get("eval_accuracy")) if evals else (None, None)


def parse_run(run_dir: Path, sc: Scenario, policy: str, seed: int, steps: int, rc: int,
              wall: float) -> dict[str, Any]:
    legs = read_legs(run_dir, "metrics.jsonl")
    rows = merged_legs(legs)  # every executed step, across restarts
    events = merged_events(read_legs(run_dir, "spikes.jsonl"))
    # torchrun exits 1 whatever its workers' status; bigtrain's own (3: gave up / stopped) is in its report.
    log = (run_dir / "log.txt").read_text(errors="replace") if (run_dir / "log.txt").exists() else ""
    worker_codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", log)]
    worker_exit = max(worker_codes, key=abs) if worker_codes else rc
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    path = surviving_rows(read_jsonl(run_dir / "metrics.jsonl"))
    evals = [r["eval_loss"] for r in path if "eval_loss" in r]
    final_eval = summary["eval_loss"] if summary and summary.get("eval_loss") is not None else (
        evals[-1] if evals else None)
    steps_done = path[-1]["step"] if path else 0
    wasted = len(rows) - len(path)
    tokens_per_step = (rows[0]["tokens"] // rows[0]["step"]) if rows else 0
    faults = injected_rows(rows, sc) if sc.kind == "injected" else []
    detected, missed, false_alarms = classify_events(rows, events, faults)
    gone = discarded_mask(rows)
    faulty_kept = sum(not gone[i] for touched in faults for i in touched)
    natural = natural_scores(rows, events) if sc.kind == "natural" else None
    if sc.kind == "natural":
        detected = missed = false_alarms = None  # real spikes: scored against the labelled list instead
    reruns = sum(r.get("verdict") == FLAGGED for r in rows)  # Megatron re-runs each flagged step once
    equal_loss, equal_acc = eval_at_executed(rows, steps)
    accs = [r["eval_accuracy"] for r in path if "eval_accuracy" in r]
    finished = rc == 0 and steps_done == steps and summary is not None and final_eval is not None and math.isfinite(final_eval)
    kinds = [e.get("event") for e in events]
    restarts = len(legs) - 1
    outcome = (f"finished after {restarts} restart(s)" if finished and restarts else
               "finished" if finished else "stopped by the policy" if "stop" in kinds
               else "gave up (budget / no snapshot)" if "give_up" in kinds else f"crashed (exit {worker_exit})")
    return {
        "scenario": sc.key, "policy": policy, "seed": seed, "steps": steps, "exit_code": rc,
        "worker_exit_code": worker_exit, "finished": finished, "outcome": outcome, "restarts": restarts,
        "steps_done": steps_done, "final_eval_loss": final_eval, "final_train_loss": path[-1]["loss"] if path else None,
        "train_loss_last50": _mean([r["loss"] for r in path[-50:]]),
        "spikes_executed": research_spikes(rows), "spikes_kept": research_spikes(path),
        "events": [{k: e.get(k) for k in ("event", "step", "onset_step", "verdict", "reason", "action",
                                          "restored_step", "wasted_steps", "eps_after", "lr_scale_after",
                                          "beta2_after")} for e in events],
        "final_eval_accuracy": accs[-1] if accs else None,
        "eval_loss_equal_executed": equal_loss, "eval_accuracy_equal_executed": equal_acc, "natural": natural,
        "detected": detected, "missed": missed, "false_alarms": false_alarms, "reruns": reruns,
        "faulty_steps_run": sum(len(t) for t in faults), "faulty_steps_kept": faulty_kept if faults else None,
        "rollbacks": sum(e.get("event") in ("rollback", "skip_update") for e in events) + reruns,
        "wasted_steps": wasted + reruns, "wasted_steps_summary": summary.get("wasted_steps") if summary else None,
        "wasted_tokens": (wasted + reruns) * tokens_per_step, "executed_steps": len(rows),
        "ds_skipped_steps": sum(not r.get("step_applied", True) for r in rows),
        "wall_seconds": round(wall, 1), "train_seconds": summary.get("seconds") if summary else None,
        "causes": [e.get("cause") for e in events if e.get("cause")],
        "quarantine": quarantine_scores(run_dir) if sc.data_fault else None,
        "curve": [[r["step"], float(f"{r['loss']:.4g}")] for r in path],
        "eval_curve": [[r["step"], float(f"{r['eval_loss']:.4g}")] for r in path if "eval_loss" in r],
    }


# ------------------------------------------------------------------------------------------------
# Reporting


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return "nan"
    return f"{100 * x:+.1f}%" if abs(x) >= 0.001 else f"{100 * x:+.2f}%"


def relative(results: list[dict], r: dict, scs: dict[str, Scenario]) -> float | None:
    """The run against its clean reference (same seed): paired_diff (modadd: accuracy points against
    policy none at equal executed steps; text: final held-out loss ratio - 1)."""
    sc = scs[r["scenario"]]
    ref_key, ref_policy = (sc.reference, r["policy"]) if sc.reference else (sc.key, "none")
    ref = [x for x in results if x["scenario"] == ref_key and x["policy"] == ref_policy and x["seed"] == r["seed"]]
    return paired_diff(r, ref[0], sc) if ref else None


def overhead(results: list[dict], r: dict) -> float | None:
    """Training-loop seconds relative to policy none on the same scenario and seed (finished runs);
    None for a policy whose loop time measures an emulation (EMULATED_OVERHEAD)."""
    if r["policy"] in EMULATED_OVERHEAD:
        return None
    if r.get("restarts"):  # summary.json times the last leg only; its cost is in "wall s"
        return None
    base = [x for x in results if x["scenario"] == r["scenario"] and x["policy"] == "none" and x["seed"] == r["seed"]]
    if not base or not base[0]["train_seconds"] or not r["train_seconds"]:
        return None
    return r["train_seconds"] / base[0]["train_seconds"] - 1


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    if any(not math.isfinite(x) for x in xs):
        return math.nan
    return statistics.fmean(xs)


# Two-sided 95% Student t quantiles by degrees of freedom (a table: the benchmark needs no scipy).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t95(df: int) -> float:
    """The quantile for ``df``, or for the next smaller tabulated df (a slightly wider interval)."""
    return _T95[max(k for k in _T95 if k <= df)]


def interval(xs: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95% t-interval (lo, hi) of ``xs`` (seeds as independent replicates); None below 2."""
    if len(xs) < 2 or not all(math.isfinite(x) for x in xs):
        return None
    m, half = statistics.fmean(xs), _t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def _fmt_interval(xs: list[float], digits: int = 4) -> str:
    iv = interval(xs)
    if iv is None:
        return _fmt(xs[0], digits) if xs else "—"
    return f"{iv[0]:.{digits}g} [{iv[1]:.{digits}g}, {iv[2]:.{digits}g}]"


def _groups(results: list[dict], scs: dict[str, Scenario]):
    for sc in scs.values():
        for policy in POLICIES:
            rs = [r for r in results if r["scenario"] == sc.key and r["policy"] == policy]
            if rs:
                yield sc, policy, rs


def _pct_interval(xs: list[float], unit: str = "%", tail: str = "") -> str:
    """Mean [95% t-interval] of differences in hundredths (percent, or accuracy points with
    ``unit`` " pt"); n=1: the value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    if any(not math.isfinite(x) for x in xs):
        return "nan"
    iv = interval(xs)
    if iv is None:
        return (_pct(xs[0]) if unit == "%" else f"{100 * xs[0]:+.1f}{unit}") + tail
    return f"{100 * iv[0]:+.1f}{unit} [{100 * iv[1]:+.1f}, {100 * iv[2]:+.1f}]{tail}"


def paired_diff(a: dict, b: dict, sc: Scenario) -> float | None:
    """How run ``a`` compares with run ``b`` (same seed; ``b`` may be a clean reference), signed so that < 0 means ``a``
    is better. Text: ``a``'s loss / ``b``'s - 1. modadd: ``b``'s accuracy at equal executed steps minus
    ``a``'s, in accuracy points (0-1 scale): its losses span 4e-4 to 4 across seeds, so a loss ratio
    against a run near 0 is dominated by that run (one seed's +1500% drowned the rest)."""
    if sc.kind == "natural":
        x, y = a.get("eval_accuracy_equal_executed"), b.get("eval_accuracy_equal_executed")
        if x is None or y is None:
            return None
        return y - x if math.isfinite(x) and math.isfinite(y) else math.nan
    x, y = compared_loss(a, sc), compared_loss(b, sc)
    if x is None or y is None:
        return None
    if not (math.isfinite(x) and math.isfinite(y)):
        return math.nan
    return x / y - 1 if y else None


def _diff_interval(xs: list[float], sc: Scenario) -> str:
    """Mean [95% CI] of paired_diff values: percent of loss, or (modadd) accuracy points, shown with
    the sign of "mine minus theirs" (higher accuracy is better, so its sign is flipped back)."""
    if sc.kind != "natural":
        return _pct_interval(xs)
    return _pct_interval([-x for x in xs if x is not None], unit=" pt", tail=" acc.")


def compared_loss(r: dict, sc: Scenario) -> float | None:
    """The loss a run is judged by: on modadd (real spikes, where recovery redoes steps) the last eval
    within the steps every policy executed (equal compute); elsewhere the final eval."""
    return r.get("eval_loss_equal_executed") if sc.kind == "natural" else r["final_eval_loss"]


def outcome_table(results: list[dict], scs: dict[str, Scenario]) -> list[str]:
    lines = ["| scenario | policy | finished | final eval loss | vs clean, paired | eval accuracy "
             "| at equal executed steps: eval loss / accuracy | spikes (10x rule), run / kept "
             "| natural spikes: labelled / precision / recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sc, policy, rs in _groups(results, scs):
        nat = [r.get("natural") or {} for r in rs]
        prec = [x["precision"] for x in nat if x.get("precision") is not None]
        rec = [x["recall"] for x in nat if x.get("recall") is not None]
        lines.append(
            f"| {sc.key} | {policy} | {sum(r['finished'] for r in rs)}/{len(rs)} "
            f"| {_fmt_interval([r['final_eval_loss'] for r in rs if r['final_eval_loss'] is not None])} "
            f"| {_diff_interval([relative(results, r, scs) for r in rs], sc) if sc.kind not in ('clean', 'natural') or policy != 'none' else '(reference)'} "
            f"| {_fmt_interval([r['final_eval_accuracy'] for r in rs if r.get('final_eval_accuracy') is not None], 3)} "
            f"| {_fmt(_mean([r.get('eval_loss_equal_executed') for r in rs]))} / "
            f"{_fmt(_mean([r.get('eval_accuracy_equal_executed') for r in rs]), 3)} "
            f"| {sum(len(r['spikes_executed']) for r in rs)} / {sum(len(r['spikes_kept']) for r in rs)} "
            f"| {sum(x.get('labelled', 0) for x in nat) if sc.kind == 'natural' else 'n/a'} / "
            f"{_fmt(_mean(prec), 2) if sc.kind == 'natural' else 'n/a'} / {_fmt(_mean(rec), 2) if sc.kind == 'natural' else 'n/a'} |")
    return lines


def paired_claims(results: list[dict], scs: dict[str, Scenario], mine: tuple[str, ...] = (BIGTRAIN, "bigtrain-clip")
                  ) -> list[str]:
    """bigtrain (and bigtrain-clip) against every other policy, scenario by scenario, paired by seed.

    A seed where one run finished and the other did not is counted in the "only ... finished" columns,
    not in the loss difference, and is no claim by itself (a harness cap on restarts decides some of
    them); the difference (paired_diff: loss ratio, or modadd's accuracy points) is over the seeds where both
    finished, with a 95% t-interval. A claim ("better" / "worse") is made only when the interval
    excludes 0 and no unfinished run argues the other way."""
    lines = ["| scenario | policy | vs | seeds both finished | difference, mean [95% CI] | only mine finished "
             "| only theirs finished | verdict |", "|---|---|---|---|---|---|---|---|"]
    for sc in scs.values():
        for me in mine:
            for other in POLICIES:
                if other in mine or other == me:
                    continue
                pairs = []
                for seed in sc.seeds:
                    a = [r for r in results if (r["scenario"], r["policy"], r["seed"]) == (sc.key, me, seed)]
                    b = [r for r in results if (r["scenario"], r["policy"], r["seed"]) == (sc.key, other, seed)]
                    if a and b:
                        pairs.append((a[0], b[0]))
                if not pairs:
                    continue
                both = [(a, b) for a, b in pairs if a["finished"] and b["finished"]]
                diffs = [d for d in (paired_diff(a, b, sc) for a, b in both) if d is not None]
                only_me = sum(a["finished"] and not b["finished"] for a, b in pairs)
                only_them = sum(b["finished"] and not a["finished"] for a, b in pairs)
                iv = interval(diffs)
                if iv is not None and iv[2] < 0 and only_them <= only_me:
                    verdict = "**better**"
                elif iv is not None and iv[1] > 0 and only_me <= only_them:
                    verdict = "worse"
                else:  # finishing where the other did not is in the counts, not a claim
                    verdict = "no difference shown"
                counted = f"{len(diffs)}" + (f" ({len(both)} finished)" if len(diffs) != len(both) else "")
                lines.append(f"| {sc.key} | {me} | {other} | {counted}/{len(pairs)} | {_diff_interval(diffs, sc)} "
                             f"| {only_me} | {only_them} | {verdict} |")
    return lines


def cost_table(results: list[dict], scs: dict[str, Scenario]) -> list[str]:
    lines = ["| scenario | policy | detected | missed | false alarms | faulty steps kept / run "
             "| rollbacks + skips + reruns | restarts by hand | DeepSpeed-skipped steps | wasted steps (tokens) | wall s "
             "| loop overhead |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sc, policy, rs in _groups(results, scs):
        if sc.kind == "natural":
            det = miss = fa = kept = "n/a"
        elif sc.kind == "clean":
            det = miss = kept = "—"
            fa = str(sum(r["false_alarms"] for r in rs))
        else:
            det = f"{sum(r['detected'] for r in rs)}/{len(rs) * len(sc.injected)}"
            miss = str(sum(r["missed"] for r in rs))
            fa = str(sum(r["false_alarms"] for r in rs))
            kept = f"{sum(r['faulty_steps_kept'] for r in rs)} / {sum(r['faulty_steps_run'] for r in rs)}"
        ovh = _mean([overhead(results, r) for r in rs])
        lines.append(
            f"| {sc.key} | {policy} | {det} | {miss} | {fa} | {kept} | {sum(r['rollbacks'] for r in rs)} "
            f"| {sum(r.get('restarts', 0) for r in rs)} | {sum(r['ds_skipped_steps'] for r in rs)} "
            f"| {sum(r['wasted_steps'] for r in rs)} ({sum(r['wasted_tokens'] for r in rs):,}) "
            f"| {_fmt(_mean([r['wall_seconds'] for r in rs]), 3)} "
            f"| {'—' if policy == 'none' else 'emulated' if policy in EMULATED_OVERHEAD else _pct(ovh)} |")
    return lines


DEFINITIONS = """\
- **policies**: each competitor as its users run it, with gradient clipping at 1.0 as its recipes
  use (llm-foundry: scripts/train/yamls/pretrain/mpt-7b.yaml, `algorithms.gradient_clipping`;
  OLMo-core's recipes: `max_grad_norm` 1.0; Megatron-LM: `--clip-grad` 1.0 by default; PaLM: clipping
  at 1.0) and a checkpoint every 50 steps. When a policy's rule ends the run, it is restarted, at most
  3 times, from a checkpoint, with its own rule for the data:
  - `llmfoundry-kill` (KillLossSpike's LossSpikeError) and `olmo-skip-step` (OLMo-core's trainer
    raises on a non-finite loss): a simulated person restarts from the newest checkpoint before the
    stop's onset and skips the data from there to the stop.
  - `palm-manual`: the person of PaLM's report (sec. 5.1) stops at a spike (loss > 1.5x the median
    of the last 100 steps; the paper gives no rule), restarts from a checkpoint ~100 steps before it
    and skips 200 batches (the report: 200-500).
  - `megatron-rerun`: Megatron-LM's checks (megatron/core/rerun_state_machine.py): a NaN ends the
    job (exit 16/17) and the scheduler relaunches it from the newest checkpoint; a loss >= 10x the
    max of the first 100 (`--check-for-spiky-loss`, on here) is flagged, re-run once and applied, and
    skipped only on a relaunch.

  What happened stays happened: a transient fault that fired (NaN, weight corruption) does not come
  back, and poison met before the stop stays in the data at its sample ids (`faults.poison_ids`).
  Each restart is counted, its steps as wasted, its start-up in the wall time. KillLossSpike ignores a
  NaN as upstream does (the NaN enters its window and blinds it while it stays there). No competitor
  keeps its window across a restart (upstream keeps it in memory only; Megatron's max is kept).
  `bigtrain-clip` is bigtrain as shipped (`optim.grad_clip` defaults to 1.0); `bigtrain` is
  bigtrain with clipping off, as in the scenarios' base (no clipping). `none-matched` (modadd only) is plain training
  with the beta2 (0.95), eps (1e-15) and LR decay (to 0.07x) bigtrain's recovery ended with on the dev
  seeds: the equal-hyper-parameter baseline.
- **finished**: exit status 0 and every step done (runs per policy / runs); "finished after N
  restart(s)" when a person had to restart it.
- **eval accuracy**: next-token accuracy on the same held-out blocks (modadd: the answer token).
  **at equal executed steps**: the last evaluation within the first `train.steps` executed steps
  (steps a rollback or restart redid count), mean over seeds: on modadd, where recovery redoes steps,
  the loss every comparison uses.
- **natural spikes** (modadd): labelled on each run's executed timeline as loss > 1.5x the median
  of the previous 50 steps, back under it within 50 steps (consecutive steps are one spike); a
  detection (any rollback, skip, stop or Megatron flag) is true if a labelled onset lies in [its
  onset - 2, it] or at most 10 steps before it; precision over detections, recall over labelled
  spikes, means over seeds.
- **final eval loss**: mean [95% t-interval over seeds] of the last held-out loss the run logged (`train.eval_batches` x micro-batch x 2
  ranks eval blocks, the same blocks every time); for a run that did not finish, the last eval
  before it stopped. **vs clean, paired**: that loss relative to the clean reference with the same seed,
  mean [95% t-interval over seeds] (modadd: eval accuracy minus the reference's, in points):
  for scenarios 2-4 the `clean_text` run *of the same policy* (so the number is what the fault cost
  under that policy; with no event on the clean run it equals plain training), for `modadd` and the
  clean controls the policy `none` run (modadd: at equal executed steps).
- **spikes (10x rule)**: the rule of docs/design.md sec. 3, loss > max(1e-3, 10 x the
  minimum of the previous 100 executed steps), >= 50 executed steps apart, after step 200;
  *run*: over every executed step, including those a rollback later undid; *kept*: over the
  surviving path only.
- **detected / missed / false alarms**: an event (spikes.jsonl: rollback, skip_update, give_up,
  stop) detects an injected fault when a step the fault touched lies between the event's onset
  (minus 2 steps) and the event, or at most 10 steps before it. Steps are counted on the executed
  timeline, and poisoned data counts wherever it is drawn, also after a rollback renumbered the
  steps. Events that detect nothing are false alarms; on the clean controls every event is one. The
  policies `none` and `clip-only` have no detector and miss by construction.
- **faulty steps kept / run**: executed steps that drew poisoned data, or at which the NaN / weight
  corruption fired, that remain on the surviving path / that were executed at all.
- **rollbacks + skips + reruns**: rollback and skip_update events, and steps Megatron's check
  flagged (each re-run once in place upstream; the re-run is not executed here, and counts as one
  wasted step). **DeepSpeed-skipped steps**: steps whose
  update DeepSpeed itself dropped (non-finite gradients). **wasted steps**: executed steps a
  rollback discarded (metrics.jsonl rows minus surviving steps); tokens = steps x global batch x
  seq_len.
- **wall s**: the whole subprocess (every leg of a restarted run), start-up (~8-12 s of imports)
  included; **loop overhead**: the training loop's seconds (summary.json) relative to policy `none`,
  same scenario and seed, finished runs that were not restarted (a restarted run's cost, every
  leg's start-up included, is in wall s).
  `emulated` for OLMo-core's skip-step: upstream multiplies the update by zero
  (src/olmo_core/optim/skip_step_optimizer.py), which DeepSpeed cannot do cheaply, so the benchmark
  restores a per-step snapshot instead; that cost is the emulation's, not OLMo's. The machine was
  shared: treat differences under ~10% as noise.
"""


def per_run(results: list[dict]) -> list[str]:
    """One line per run: outcome and every monitor event (step, onset, action)."""
    lines = ["| scenario | policy | seed | outcome | steps done | final eval | events: step (onset) event/action |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ev = "; ".join(f"{e['step']} ({e['onset_step'] if e.get('onset_step') is not None else '?'}) "
                       f"{e['action'] if e['event'] == 'rollback' else e['event']}" for e in r["events"][:12])
        if len(r["events"]) > 12:
            ev += f"; ... {len(r['events']) - 12} more"
        lines.append(f"| {r['scenario']} | {r['policy']} | {r['seed']} | {r['outcome']} | {r['steps_done']}/{r['steps']} "
                     f"| {_fmt(r['final_eval_loss'])} | {ev or '—'} |")
    return lines


SHIPPED = "bigtrain-clip"  # bigtrain as installed: optim.grad_clip defaults to 1.0 (bigtrain/config.py)


def checks(results: list[dict], scs: dict[str, Scenario]) -> list[str]:
    """The benchmark's questions about bigtrain, answered from the numbers (regenerated on every run;
    the discussion under the notes marker is written by hand): for bigtrain as shipped (clipping at
    1.0, SHIPPED) and for bigtrain with clipping off (BIGTRAIN, the scenarios' base)."""
    out = []
    for policy, name in ((SHIPPED, "bigtrain as shipped (`bigtrain-clip`: gradient clipping 1.0, the default)"),
                         (BIGTRAIN, "bigtrain with clipping off (`bigtrain`)")):
        bt = [r for r in results if r["policy"] == policy]
        if not bt:
            continue
        out.append(f"{name}:")
        unfinished = [f"{r['scenario']} seed {r['seed']} ({r['outcome']})" for r in bt if not r["finished"]]
        out.append(f"- **Finished every run:** {'yes' if not unfinished else 'no: ' + ', '.join(unfinished)} "
                   f"({sum(r['finished'] for r in bt)}/{len(bt)}).")
        inj = [r for r in bt if scs[r["scenario"]].kind == "injected"]
        missed = [f"{r['scenario']} seed {r['seed']}" for r in inj if r["missed"]]
        kept = [f"{r['scenario']} seed {r['seed']} ({r['faulty_steps_kept']})" for r in inj if r["faulty_steps_kept"]]
        out.append(f"- **Caught every injected fault:** "
                   f"{'yes' if not missed else 'no: missed in ' + ', '.join(missed)} "
                   f"({sum(r['detected'] for r in inj)}/{sum(len(scs[r['scenario']].injected) for r in inj)}); "
                   f"faulty steps left in the final model: {', '.join(kept) if kept else 'none'}.")
        fa = {k: sum(r["false_alarms"] or 0 for r in bt if r["scenario"] == k) for k, s in scs.items()
              if s.kind != "natural" and any(r["scenario"] == k for r in bt)}
        fa_clean = sum(v for k, v in fa.items() if scs[k].kind == "clean")
        out.append(f"- **Zero false alarms on the clean runs:** {'yes' if fa_clean == 0 else f'no: {fa_clean}'} "
                   "(false alarms per scenario: " + ", ".join(f"{k} {v}" for k, v in fa.items()) + ").")
        for key in [k for k, sc in scs.items() if sc.kind == "injected" and any(r["scenario"] == k for r in bt)]:
            rels = [relative(results, r, scs) for r in bt if r["scenario"] == key]
            out.append(f"- **{key}: held-out loss vs the clean run (same policy, paired by seed):** {_pct_interval(rels)}.")
        out.append("")
    for k in (k for k, s in scs.items() if s.kind == "natural"):
        for seed in sorted({r["seed"] for r in results if r["scenario"] == k}):
            rs = {r["policy"]: r for r in results if r["scenario"] == k and r["seed"] == seed}
            # Finished runs ranked by accuracy at equal executed steps (then loss); the unfinished apart,
            # at the last eval they reached (fewer steps).
            def key(p: str) -> tuple:
                acc, loss = rs[p].get("eval_accuracy_equal_executed"), compared_loss(rs[p], scs[k])
                bad = acc is None or not math.isfinite(acc)
                return (bad, 0 if bad else -acc, math.inf if loss is None or not math.isfinite(loss) else loss)

            def show(p: str) -> str:
                return f"{p} {_fmt(rs[p].get('eval_accuracy_equal_executed'), 3)} / {_fmt(compared_loss(rs[p], scs[k]), 3)}"

            done = sorted((p for p in rs if rs[p]["finished"]), key=key)
            stopped = [f"{show(p)} at step {rs[p]['steps_done']}" for p in sorted(rs, key=key) if not rs[p]["finished"]]
            out.append(f"- **{k}, seed {seed}, ranking at equal executed steps ({scs[k].steps}), accuracy / loss:** "
                       + " > ".join(show(p) for p in done) + (f"; not finished: {', '.join(stopped)}" if stopped else "")
                       + ".")
    return out


def plot(results: list[dict], scs: dict[str, Scenario], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for sc in scs.values():
        seeds = [s for s in sc.seeds if any(r["scenario"] == sc.key and r["seed"] == s for r in results)]
        if not seeds:
            continue
        rs = [r for r in results if r["scenario"] == sc.key and r["seed"] == seeds[0]]
        zoom = sc.injected[0] if sc.injected else None
        fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 9, 4.5), squeeze=False)
        # Text losses are noisy per batch: the full view shows a 10-step running mean, the zoom raw.
        smooth = 10 if sc.base is STDLIB else 1
        for ax_i, ax in enumerate(axes[0]):
            for r in rs:
                if not r["curve"]:
                    continue
                steps, losses = zip(*r["curve"])
                if ax_i == 0 and smooth > 1:
                    losses = [statistics.fmean(losses[max(0, i - smooth + 1):i + 1]) for i in range(len(losses))]
                style = "-" if r["policy"].startswith("bigtrain") else "--"
                label = r["policy"] + ("" if r["finished"] else " (stopped)")
                ax.plot(steps, losses, style, lw=0.9, alpha=0.85, label=label)
            for a, b in sc.injected:
                ax.axvspan(a - 0.5, b + 0.5, color="red", alpha=0.15, lw=0)
            if any(x > 0 for r in rs for _, x in r["curve"]):
                ax.set_yscale("log")
            ax.set_xlabel("step (surviving path)")
            if ax_i == 0:
                ax.set_ylabel("train loss" + (f" ({smooth}-step running mean)" if smooth > 1 else ""))
                ax.set_title(f"{sc.title}\nseed {seeds[0]}", fontsize=9)
            else:
                ax.set_xlim(zoom[0] - 25, zoom[1] + 40)
                ax.set_title("around the injected fault", fontsize=9)
        axes[0][0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"spike_{sc.key}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def code_state(env: dict) -> tuple[str, str]:
    """An invocation's recorded (commit, code hash); "unknown" and "?" where it recorded none."""
    return env.get("bigtrain", "unknown"), env.get("code_sha256", "?")


def code_line(meta: dict) -> str:
    """The report's claim about the code: one commit and code hash only when every invocation (the
    first and each merged one) recorded the same pair and none saw the code change while it ran. The
    same hash under different commit names (a shallow clone or a rebase names one code state anew) is
    one code state, said so; an invocation that recorded no commit or hash supports no claim; anything
    else is a warning naming every pair."""
    invocations = [meta, *meta.get("merged", [])]
    states = list(dict.fromkeys(code_state(m["environment"]) for m in invocations))
    changed = [m for m in invocations if m.get("warning")]
    named = "; ".join(f"{c} (code hash {h})" for c, h in states)
    if any(c.startswith("unknown") or h == "?" for c, h in states):
        return f"**Code version not recorded for every invocation**: {named}. "
    if changed:
        return f"**Warning: the runs mix code versions**: {named}; {len(changed)} invocation(s) saw the code change while running. "
    if len(states) == 1:
        commit, sha = states[0]
        return f"Code: bigtrain **{commit}** (code hash {sha}) for every run, all {len(invocations)} invocations. "
    if len({h for _, h in states}) == 1:
        return (f"Code: one code hash, **{states[0][1]}**, for every run, all {len(invocations)} invocations, recorded "
                f"under the commits {', '.join(dict.fromkeys(c for c, _ in states))} (the same files: a shallow clone "
                "or a rebase names them anew). ")
    return f"**Warning: the runs mix code versions**: {named}. "


MACHINE = ("python", "torch", "deepspeed", "transformers", "cpu", "cores", "os")


def machine_warning(meta: dict) -> str:
    """The report prints the first invocation's machine and libraries; a merged invocation that ran
    elsewhere (another CPU, core count or library version) is named, since its wall-clock columns
    and results are not the first machine's. Empty when every invocation matches."""
    first = meta["environment"]
    odd = [(m, [k for k in MACHINE if m["environment"].get(k) != first.get(k)]) for m in meta.get("merged", [])]
    odd = [(m, keys) for m, keys in odd if keys]
    if not odd:
        return ""
    return ("**Warning: the invocations ran on different machines or libraries**: " + "; ".join(
        f"`{m['command']}`: " + ", ".join(f"{k} {m['environment'].get(k)}" for k in keys) for m, keys in odd) + ".")


def merged_entry(meta: dict) -> dict:
    """What a merged report keeps of one invocation, its code-change warning included."""
    return {k: meta[k] for k in ("command", "date", "total_minutes", "environment", "warning") if k in meta}


def write_report(results: list[dict], meta: dict, scs: dict[str, Scenario], out: Path) -> Path:
    pngs = plot(results, scs, out)
    md = out / "spike_benchmark.md"
    notes = ""
    if md.exists() and NOTES_MARKER in md.read_text():
        notes = md.read_text().split(NOTES_MARKER, 1)[1]
    env = meta["environment"]
    machine = machine_warning(meta)
    lines = [
        "# Spike benchmark",
        "",
        code_line(meta),
        f"{len(results)} runs; {meta['total_minutes'] + sum(m['total_minutes'] for m in meta.get('merged', [])):.1f} min "
        f"over {1 + len(meta.get('merged', []))} invocations (replaced runs included); first invocation `{meta['command']}` on {meta['date']} ({meta['total_minutes']:.1f} min; "
        f"{'quick' if meta['quick'] else 'default'} sizing; seeds per scenario in "
        "the table under \"What was run\").",
        "",
        f"Environment: Python {env['python']}, torch {env['torch']}, DeepSpeed {env['deepspeed']}, "
        f"transformers {env['transformers']}; bigtrain {env.get('bigtrain', 'unknown')}; {env['cpu']}, "
        f"{env['cores']} cores; {env['os']}. "
        "Every run is `torchrun --nproc_per_node 2 -m bigtrain train ...` (gloo, CPU), one at a time.",
        *([f"\n**Warning:** {meta['warning']}."] if meta.get("warning") else []),
        *([f"\n{machine}"] if machine else []),
        *([f"\nThe runs' files were re-parsed on {meta['reparsed']['date']} by bigtrain "
           "{} (code hash {}).".format(*code_state(meta["reparsed"]["environment"]))] if meta.get("reparsed") else []),
        *[f"\nRuns added (or replaced) later by `{m['command']}` on {m['date']} (bigtrain "
          "{}, code hash {}, ".format(*code_state(m["environment"])) + f"{m['total_minutes']:.1f} min)." + (f" **Warning:** {m['warning']}." if m.get("warning") else "")
          for m in meta.get("merged", [])],
        "",
        "## Results",
        "",
        "Per (scenario, policy): losses and accuracies are means with a 95% t-interval over seeds (paired by "
        "seed where compared), counts are summed over seeds, times are means. Every run is in the table "
        "under \"Every run\". Definitions are under the tables.",
        "",
        *outcome_table(results, scs),
        "",
        *cost_table(results, scs),
        "",
        DEFINITIONS,
        "### Answers (computed from the table)",
        "",
        *checks(results, scs),
        "",
        "### Claims: bigtrain against each policy, paired by seed",
        "",
        "Difference: on the text scenarios bigtrain's final held-out loss / the other policy's - 1; on "
        "modadd bigtrain's eval accuracy at equal executed steps minus the other's, in accuracy points "
        "(its losses span 4e-4 to 4 across seeds, so a loss ratio is dominated by the run nearest 0); "
        "over the seeds where both finished, mean [95% t-interval]. `bigtrain-clip` is bigtrain as shipped "
        "(gradient clipping 1.0 is the default); `bigtrain` turns clipping off. "
        "A seed where only one of the two finished is counted beside it and is no claim by itself. **better** / "
        "worse only where the interval excludes 0 and the unfinished counts do not argue the other way; "
        "everything else is \"no difference shown\".",
        "",
        *paired_claims(results, scs),
        "",
        "<details><summary>Every run: outcome and monitor events</summary>",
        "",
        *per_run(results),
        "",
        "</details>",
        "",
        "### Loss curves (first seed, surviving path; red band: injected fault)",
        "",
        *[f"![{p}]({p})" for p in pngs],
        "",
        "## What was run",
        "",
        "| scenario | steps | seeds (`train.seed`) | overrides (plus the policy's) |",
        "|---|---|---|---|",
        *[f"| {sc.key} | {meta['steps'][sc.key]} | {', '.join(map(str, meta['seeds'][sc.key]))} "
          f"| `{' '.join(sc.base + fault_overrides(sc))}` |"
          for sc in scs.values() if sc.key in meta["steps"]],
        "",
        "| policy | overrides |",
        "|---|---|",
        *[f"| {p} | `{' '.join(o)}` |" for p, o in POLICIES.items()],
        "",
        f"The exact command of every run is in `{meta['jsonl_name']}` (field `command`, run directory "
        "under the benchmark's work dir).",
        "",
        NOTES_MARKER + notes.rstrip("\n") if notes else NOTES_MARKER,
        "",
    ]
    md.write_text("\n".join(lines))
    return md


# ------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, meta: dict, results: list[dict]) -> None:
    with open(path, "w") as f:
        for row in [meta, *results]:
            f.write(json.dumps(row) + "\n")


HISTORY = "spike_benchmark_history.jsonl"


def append_history(out: Path, meta: dict, results: list[dict]) -> None:
    """Every invocation's runs, one JSON line each, appended and never rewritten (spike_benchmark.jsonl
    holds the set the report shows). The first call also files the set it is about to replace."""
    path = out / HISTORY
    jsonl = out / "spike_benchmark.jsonl"
    drop = ("curve", "eval_curve")
    with open(path, "a") as f:
        if not path.stat().st_size and jsonl.exists():
            old_meta, *old = read_jsonl(jsonl)
            f.write(json.dumps({"meta": old_meta, "results": [{k: v for k, v in r.items() if k not in drop}
                                                               for r in old]}) + "\n")
        f.write(json.dumps({"meta": meta, "results": [{k: v for k, v in r.items() if k not in drop}
                                                      for r in results]}) + "\n")


def reparse(old: dict, work: Path, sc: Scenario) -> dict:
    run_dir = work / f"{old['scenario']}-{old['policy']}-s{old['seed']}"
    new = parse_run(run_dir, sc, old["policy"], old["seed"], old["steps"], old["exit_code"], old["wall_seconds"])
    new["command"] = old["command"]
    if old["outcome"].startswith("killed"):
        new["outcome"] = old["outcome"]
    return new


# ------------------------------------------------------------------------------------------------
# Diluted bad data (issue 14): quarantine precision / recall against the injected bad documents.
#
#     .venv/bin/python bench/spike_bench.py --diluted [--seed-ids 11 12] [--out docs]
#
# The corpus is the same stdlib text cut into documents at top-level ``def``/``class`` lines (a file
# is one document of ~300 blocks, too coarse for "a fraction of the documents is garbage"); each
# poisoned step turns the source documents of a share of its samples into garbage, every block of
# them, wherever they lie in the stream. Seeds 11 and 12 played no part in choosing any threshold.

DILUTED_POLICIES = ["none", "bigtrain-window", "bigtrain"]
DILUTED_SEEDS = (11, 12)
DILUTED_MARK = "<!-- diluted -->"


def diluted_scenarios(corpus: Path) -> list[Scenario]:
    base = [*STDLIB, "data.source=files", f"data.files=[{corpus}]"]
    steps, at = 300, 150
    stretch = f"faults.poison_steps=[{','.join(str(s) for s in range(at, at + 10))}]"
    bad = [stretch, "faults.poison_documents=true"]
    mk = lambda key, title, extra: Scenario(  # noqa: E731
        key, title, base, steps, steps, seeds=DILUTED_SEEDS, faults=[*bad, *extra],
        injected=[(at, at + 9)], data_fault=True, reference="diluted_clean", n_seeds=2)
    return [
        mk("diluted_whole", "D1. 10 batches whose every sample's documents are garbage", []),
        mk("diluted_30", "D2. ~30% of 10 batches' samples (2 of 8 per rank): their documents garbage",
           ["faults.poison_fraction=0.3"]),
        mk("diluted_5", "D3. ~5% of 10 batches' samples (1 of 16, rank 0): their documents garbage",
           ["faults.poison_fraction=0.05", "faults.ranks=[0]"]),
        mk("diluted_rank", "D4. one rank only: all of rank 1's samples in 10 batches, their documents garbage",
           ["faults.ranks=[1]"]),
        # Garbage of other kinds than uniform tokens, added after the noise screen (which catches
        # uniform tokens by construction) to show what it does not catch; no rule was tuned on them.
        mk("diluted_30_shuffled", "D5. as D2, the garbage the blocks' own tokens shuffled",
           ["faults.poison_fraction=0.3", "faults.poison_kind=shuffled"]),
        mk("diluted_5_shuffled", "D6. as D3, the garbage the blocks' own tokens shuffled",
           ["faults.poison_fraction=0.05", "faults.ranks=[0]", "faults.poison_kind=shuffled"]),
        mk("diluted_30_repeated", "D7. as D2, the garbage one random 8-token phrase repeated",
           ["faults.poison_fraction=0.3", "faults.poison_kind=repeated"]),
        Scenario("diluted_clean", "D0. Clean control on the same corpus", base, steps, steps,
                 seeds=DILUTED_SEEDS, kind="clean", n_seeds=2),
    ]


def make_corpus(path: Path, max_bytes: int = 4_000_000, min_doc: int = 400) -> Path:
    """Write the stdlib subset of ``data.max_bytes`` as JSON lines, one document per top-level
    def/class (pieces shorter than ``min_doc`` bytes join the next). Deterministic."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if not {"test", "tests", "site-packages", "idlelib"}
                    & set(p.relative_to(root).parts)), key=lambda p: p.relative_to(root).as_posix())
    docs, total = [], 0
    for f in files:
        text = f.read_text(errors="replace")
        if total + len(text) > max_bytes:
            continue
        total += len(text)
        piece: list[str] = []
        for line in text.splitlines(keepends=True):
            if (line.startswith("def ") or line.startswith("class ")) and sum(map(len, piece)) >= min_doc:
                docs.append("".join(piece))
                piece = []
            piece.append(line)
        if piece:
            docs.append("".join(piece))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def quarantine_scores(run_dir: Path) -> dict[str, Any]:
    """Precision / recall of the run's skips against the injected bad documents, from the final
    checkpoint's TrainState (poisoned_docs / poisoned: ground truth; skipped_docs / skipped_samples)."""
    states = sorted((run_dir / "checkpoints").glob("step_*/bigtrain_state.json"))
    if not states:
        return {}
    st = json.loads(states[-1].read_text())
    truth = st.get("faults") or st  # fault injection's own state (older checkpoints: flat fields)
    bad_docs = set(truth.get("poisoned_docs", []))
    bad_blocks = {i for a, b in truth.get("poisoned", []) for i in range(a, b)}
    docs, samples = set(st.get("skipped_docs", [])), set(st.get("skipped_samples", []))
    out: dict[str, Any] = {"bad_docs": len(bad_docs), "bad_blocks": len(bad_blocks), "skipped_docs": len(docs),
                           "skipped_samples": len(samples)}
    if bad_docs:
        out["doc_recall"] = len(docs & bad_docs) / len(bad_docs)
        out["doc_precision"] = len(docs & bad_docs) / len(docs) if docs else None
        out["block_recall"] = len(samples & bad_blocks) / len(bad_blocks)
        out["sample_precision"] = len(samples & bad_blocks) / len(samples) if samples else None
    return out


def diluted_report(results: list[dict], meta: dict) -> list[str]:
    """Markdown for the diluted-data section: one row per (scenario, policy), means over seeds."""
    clean = {r["seed"]: r["final_eval_loss"] for r in results if r["scenario"] == "diluted_clean"
             and r["policy"] == "none" and r["final_eval_loss"] is not None}
    off = {(r["scenario"], r["seed"]): r["final_eval_loss"] for r in results if r["policy"] == "none"}
    lines = [f"### Diluted bad data ({meta['date']})", "", f"Commands: `{meta['command']}`", "",
             f"Seeds {list(meta['seeds'])}; the last invocation took {(meta.get('merged') or [meta])[-1]['total_minutes']:.1f} min. Held-out loss: final eval loss; vs clean / vs off: "
             "ratio to the clean run (policy none) and to the monitor-off run of the same scenario and seed. "
             "Precision/recall over the injected bad documents (doc) and blocks (sample precision: share of "
             "skipped samples that were garbage).", "",
             "| scenario | policy | outcome | eval loss | vs clean | vs off | rollbacks | causes | LR cut | "
             "doc recall | doc precision | block recall | sample precision | skipped samples |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["scenario"], r["policy"]) for r in results},
                  key=lambda k: (k[0], DILUTED_POLICIES.index(k[1]) if k[1] in DILUTED_POLICIES else 9))
    for sc, pol in keys:
        rs = [r for r in results if (r["scenario"], r["policy"]) == (sc, pol)]
        q = [r.get("quarantine") or {} for r in rs]
        ev = [r["final_eval_loss"] for r in rs]
        vs_clean = [r["final_eval_loss"] / clean[r["seed"]] for r in rs
                    if r["final_eval_loss"] is not None and r["seed"] in clean]
        vs_off = [r["final_eval_loss"] / off[(sc, r["seed"])] for r in rs
                  if r["final_eval_loss"] is not None and off.get((sc, r["seed"]))]
        causes = Counter(c for r in rs for c in r.get("causes", []))
        lr_cut = min((e.get("lr_scale_after") or 1.0 for r in rs for e in r["events"]), default=1.0)
        m = lambda k: _mean([x.get(k) for x in q if x.get(k) is not None]) if any(  # noqa: E731
            x.get(k) is not None for x in q) else None
        lines.append(" | ".join(["", sc, pol, ", ".join(sorted({r["outcome"] for r in rs})), _fmt(_mean(ev)),
                                 _fmt(_mean(vs_clean)), _fmt(_mean(vs_off)),
                                 _fmt(_mean([r["rollbacks"] for r in rs])),
                                 " ".join(f"{k}:{n}" for k, n in sorted(causes.items())) or "-",
                                 _fmt(lr_cut, 3), _fmt(m("doc_recall"), 3), _fmt(m("doc_precision"), 3),
                                 _fmt(m("block_recall"), 3), _fmt(m("sample_precision"), 3),
                                 _fmt(m("skipped_samples"))]).strip())
    return lines


def diluted_paired(results: list[dict], meta: dict, policy: str = BIGTRAIN) -> list[str]:
    """Markdown: one invocation's runs of ``policy`` (one commit), per scenario, as paired ratios to the
    monitor-off and clean runs of the same seed, and quarantine scores, with 95% t-intervals over seeds."""
    clean = {r["seed"]: r["final_eval_loss"] for r in results if r["scenario"] == "diluted_clean"
             and r["policy"] == "none" and r["final_eval_loss"] is not None}
    off = {(r["scenario"], r["seed"]): r["final_eval_loss"] for r in results if r["policy"] == "none"}
    rows = []
    for sc in sorted({r["scenario"] for r in results if r["policy"] == policy}):
        rs = [r for r in results if (r["scenario"], r["policy"]) == (sc, policy) and r["final_eval_loss"] is not None]
        vs_off = [r["final_eval_loss"] / off[(sc, r["seed"])] for r in rs if off.get((sc, r["seed"]))]
        vs_clean = [r["final_eval_loss"] / clean[r["seed"]] for r in rs if r["seed"] in clean]
        q = lambda k: [r["quarantine"][k] for r in rs if (r.get("quarantine") or {}).get(k) is not None]  # noqa: E731
        worse = sum(1 for x in vs_off if x > 1)
        rows.append(" | ".join(["", sc, str(len(rs)), ", ".join(sorted({r["outcome"] for r in rs})),
                                _fmt_interval(vs_off), f"{worse} of {len(vs_off)}", _fmt_interval(vs_clean),
                                _fmt_interval(q("doc_recall"), 3), _fmt_interval(q("doc_precision"), 3),
                                _fmt_interval(q("block_recall"), 3)]).strip())
    return [f"#### This invocation alone: {policy} at {meta['environment'].get('bigtrain')}, seeds {meta['seeds']}",
            "", "Paired by seed; mean [95% t-interval over seeds]. vs off: held-out loss / the monitor-off run's; "
            "worse: seeds where that ratio > 1.", "",
            "| scenario | seeds | outcome | vs off | worse than off | vs clean | doc recall | doc precision | "
            "block recall |", "|---|---|---|---|---|---|---|---|---|", *rows]


def run_diluted(args, argv: list[str] | None) -> int:
    out = Path(args.out or "docs")
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(args.work or f"runs/spike-bench-diluted-{stamp}").resolve()
    corpus = make_corpus(work / "corpus.jsonl")
    scs = diluted_scenarios(corpus)
    chosen = [sc for sc in scs if not args.only or sc.key in args.only]
    seeds = args.seed_ids or list(DILUTED_SEEDS[:args.seeds or 2])
    policies = args.policies or DILUTED_POLICIES
    env = run_env()
    at_start = environment()
    warm_up(env)
    # Tokenize and pack the corpus once, outside the runs (and outside their memory watchdog).
    subprocess.run([sys.executable, "-c",
                    "import sys; from bigtrain.data import DataConfig, build_dataset, build_tokenizer; "
                    "build_dataset(DataConfig(source='files', files=[sys.argv[1]], seq_len=64), build_tokenizer(None), 0)",
                    str(corpus)], env=env, check=True, capture_output=True, cwd=REPO)
    jobs = [(sc, p, s) for sc in chosen for s in seeds for p in policies if sc.kind != "clean" or p == "none"
            or p == BIGTRAIN]
    t0, results = time.monotonic(), []
    for i, (sc, policy, seed) in enumerate(jobs, 1):
        r = run_one(sc, policy, seed, sc.steps, work, env, args.timeout)
        results.append(r)
        print(f"[{i}/{len(jobs)} {(time.monotonic() - t0) / 60:.1f} min] {sc.key} {policy} seed {seed}: "
              f"{r['outcome']}, eval {_fmt(r['final_eval_loss'])}, events {len(r['events'])}, "
              f"quarantine {r.get('quarantine')}", flush=True)
    meta = {"command": shlex.join(["python", "bench/spike_bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "seeds": seeds,
            "work": str(work), "total_minutes": (time.monotonic() - t0) / 60, "environment": at_start}
    with open(out / "spike_benchmark_diluted.jsonl", "a") as f:  # appended: earlier runs stay
        f.write(json.dumps({"meta": meta, "results": [{k: v for k, v in r.items() if k not in ("curve", "eval_curve")}
                                                       for r in results]}) + "\n")
    md = out / "spike_benchmark.md"
    text = md.read_text() if md.exists() else ""
    # The table covers the newest result of every (scenario, policy, seed) in the JSONL, so a run
    # redone later (--only/--policies) joins the runs it is compared with; each row's JSONL line keeps
    # the commit it ran.
    latest: dict[tuple, dict] = {}
    commands = []
    for line in read_jsonl(out / "spike_benchmark_diluted.jsonl"):
        commands.append(f"{line['meta']['command']} (bigtrain {line['meta']['environment'].get('bigtrain')})")
        for r in line["results"]:
            latest[(r["scenario"], r["policy"], r["seed"])] = r
    meta = {**meta, "command": " ; ".join(dict.fromkeys(commands)),
            "seeds": sorted({k[2] for k in latest})}
    section = "\n".join(diluted_report(list(latest.values()), meta))
    if BIGTRAIN in policies and "none" in policies:
        section += "\n\n" + "\n".join(diluted_paired(results, {**meta, "seeds": seeds, "environment": at_start}))
    if DILUTED_MARK not in text:
        text = text.rstrip() + f"\n\n{DILUTED_MARK}\n## Diluted bad data: quarantine precision and recall (issue 14)\n"
    md.write_text(text.rstrip() + "\n\n" + section + "\n")
    print(section)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diluted", action="store_true",
                    help="run the diluted bad-data scenarios (issue 14) and append their section to OUT/spike_benchmark.md")
    ap.add_argument("--variants", action="store_true",
                    help="run the held-out fault variants (V1-V9) instead of the main scenarios (with --merge: add them)")
    ap.add_argument("--dev", action="store_true",
                    help="use the seeds the rules were developed on instead of the held-out ones")
    ap.add_argument("--quick", action="store_true",
                    help=f"1 seed, shorter runs, policies {', '.join(QUICK_POLICIES)} (about 8 minutes on 2 cores)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per (scenario, policy); default: 2; --quick: 1")
    ap.add_argument("--seed-ids", type=int, nargs="*", default=None,
                    help="explicit train.seed values for every chosen scenario (e.g. to --merge one more seed)")
    ap.add_argument("--out", default=None, help="report dir; default docs (--quick: runs/spike-bench-quick)")
    ap.add_argument("--work", default=None, help="run dirs; default runs/spike-bench-<time>")
    ap.add_argument("--only", nargs="*", default=None, help="scenario keys to run (default: all)")
    ap.add_argument("--policies", nargs="*", default=None, help="policies to run (default: all)")
    ap.add_argument("--report-only", action="store_true", help="re-render OUT from OUT/spike_benchmark.jsonl")
    ap.add_argument("--reparse", action="store_true",
                    help="re-measure the run dirs named in OUT/spike_benchmark.jsonl (after changing the "
                         "measurements), keeping their exit codes and timings, then re-render")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the runs done now in OUT/spike_benchmark.jsonl and re-render everything")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run before it is killed")
    args = ap.parse_args(argv)
    if args.diluted:
        return run_diluted(args, argv)

    out = Path(args.out or ("runs/spike-bench-quick" if args.quick else "docs"))
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "spike_benchmark.jsonl"
    every = {sc.key: sc for sc in scenarios(args.quick, args.dev)}
    scs = {k: sc for k, sc in every.items() if sc.variant == args.variants}
    if args.report_only or args.reparse:
        lines = read_jsonl(jsonl)
        meta, results = lines[0], lines[1:]
        scs = {sc.key: sc for sc in scenarios(meta["quick"], meta.get("dev", True))}
        if args.reparse:
            results = [reparse(r, Path(meta["work"]), scs[r["scenario"]]) for r in results]
            # the runs stay the commit they ran; what read their files now is named beside them
            meta["reparsed"] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                "environment": environment()}
            write_jsonl(jsonl, meta, results)
        print(write_report(results, meta, {k: v for k, v in scs.items() if k in meta["steps"]}, out))
        return 0

    chosen = [every[k] for k in (args.only or scs)]
    seeds = {sc.key: args.seed_ids or list(sc.seeds[:args.seeds or (1 if args.quick else sc.n_seeds)])
             for sc in chosen}
    policies = args.policies or (QUICK_POLICIES if args.quick else DEFAULT_POLICIES)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(args.work or f"runs/spike-bench-{stamp}").resolve()
    env = run_env()
    at_start = environment()  # the code every run used, unless someone commits meanwhile (checked below)
    print("warming up (comm op build, data cache) ...", flush=True)
    warm_up(env)
    steps = {sc.key: sc.quick_steps if args.quick else sc.steps for sc in chosen}
    jobs = [(sc, p, s) for sc in chosen for s in seeds[sc.key] for p in policies
            if p not in MODADD_ONLY or sc.base is MODADD]
    t0 = time.monotonic()
    results = []
    for i, (sc, policy, seed) in enumerate(jobs, 1):
        r = run_one(sc, policy, seed, steps[sc.key], work, env, args.timeout)
        results.append(r)
        print(f"[{i}/{len(jobs)} {(time.monotonic() - t0) / 60:.1f} min] {sc.key} {policy} seed {seed}: "
              f"{r['outcome']}, eval {_fmt(r['final_eval_loss'])}, events {len(r['events'])}, spikes "
              f"{len(r['spikes_executed'])}, wasted {r['wasted_steps']}, {r['wall_seconds']} s", flush=True)
    meta = {"command": shlex.join(["python", "bench/spike_bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "quick": args.quick, "dev": args.dev, "seeds": seeds, "steps": steps, "work": str(work),
            "total_minutes": (time.monotonic() - t0) / 60, "environment": at_start,
            "jsonl_name": jsonl.name}
    at_end = environment()
    if at_end["code_sha256"] != at_start["code_sha256"]:
        meta["warning"] = (f"bigtrain's code changed during the benchmark ({at_start['bigtrain']} at the start, "
                           f"{at_end['bigtrain']} at the end): runs may mix code versions")
    shown = {sc.key: sc for sc in chosen}
    new_runs = list(results)
    if args.merge and jsonl.exists():
        old_meta, *old_results = read_jsonl(jsonl)
        if (old_meta.get("dev", True), old_meta["quick"]) != (args.dev, args.quick):
            raise SystemExit(f"--merge: {jsonl} holds {'dev' if old_meta.get('dev', True) else 'held-out'}"
                             f"{', quick' if old_meta['quick'] else ''} runs; these are "
                             f"{'dev' if args.dev else 'held-out'}{', quick' if args.quick else ''}: run without "
                             "--merge (the old set stays in the history file) or with the same sizing")
        done = {(r["scenario"], r["policy"], r["seed"]) for r in results}
        results = [r for r in old_results if (r["scenario"], r["policy"], r["seed"]) not in done] + results
        merged = old_meta.get("merged", []) + [merged_entry(meta)]
        old_meta["steps"] = {**old_meta["steps"], **meta["steps"]}
        for k, new_seeds in meta["seeds"].items():
            have = old_meta["seeds"].get(k, [])
            old_meta["seeds"][k] = [x for x in every[k].seeds if x in have or x in new_seeds]
        meta = {**old_meta, "merged": merged}
        shown = {k: v for k, v in every.items() if k in meta["steps"]}
    append_history(out, meta, [r for r in results if (r["scenario"], r["policy"], r["seed"]) in
                               {(x["scenario"], x["policy"], x["seed"]) for x in new_runs}])
    write_jsonl(jsonl, meta, results)
    print(write_report(results, meta, shown, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
