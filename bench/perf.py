"""bigtrain's performance benchmark: throughput vs a bare DeepSpeed loop and the HF Trainer, resume cost
against data position, checkpoint / snapshot / rollback latency per ZeRO stage, and scaling.

    .venv/bin/python bench/perf.py --quick --out /tmp/perf-quick.md     # harness check, ~5 min on 2 cores
    .venv/bin/python bench/perf.py --out docs/perf.md                   # the published run, ~25 min on 2 cores

Run it on an otherwise idle machine: every number is wall time. The load average before and after is
written into the report, and a warning when the machine was busy.

How it measures
  * Every contender is a fresh ``torchrun --standalone`` job with the same bigtrain dotted overrides:
    bench/bare_deepspeed.py (the floor), bench/perf_worker.py (bigtrain's own loop, timed from outside),
    bench/hf_trainer.py (transformers.Trainer with the same resolved DeepSpeed JSON).
  * Step time = interval between consecutive step ends, so everything a loop does per step counts
    (bigtrain: sampler, all-reduce, monitor, metrics/TensorBoard row, snapshots). The first
    ``--discard`` steps and the last step (bigtrain evaluates there) are dropped.
  * Contenders are interleaved round-robin, the order rotated each round, ``--repeats`` rounds.
  * ``OMP_NUM_THREADS`` = cores / ranks, ``GLOO_SOCKET_IFNAME=lo``.
Raw per-job results (every step time) go to the .jsonl next to the markdown file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TORCHRUN = Path(sys.executable).parent / "torchrun"
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

CONTENDERS = {
    # label: (script, extra overrides)
    "bare_deepspeed": ("bare_deepspeed.py", []),
    "bigtrain_monitor_off": ("perf_worker.py", ["spike.enabled=false", "checkpoint.snapshot_interval=0"]),
    "bigtrain_monitor_on_nosnap": ("perf_worker.py", ["checkpoint.snapshot_interval=0"]),
    "bigtrain_monitor_on": ("perf_worker.py", []),  # the defaults: monitor on, snapshot every 10 steps
    "hf_trainer": ("hf_trainer.py", []),
}

# A third, larger size for the scaling table (the presets stop at small-llama on CPU): saved once as a
# local model directory and trained through model.path, the fine-tuning path.
MEDIUM = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
              num_key_value_heads=6)


def plan(quick: bool, repeats: int | None) -> dict:
    if quick:
        return dict(preset="tiny-llama", steps=30, discard=8, repeats=repeats or 2, section_repeats=1,
                    contenders=["bare_deepspeed", "bigtrain_monitor_off", "bigtrain_monitor_on", "hf_trainer"],
                    stages=[2], scaling_sizes=["tiny-llama"], scaling_stages=[2], scaling_steps=12)
    return dict(preset="small-llama", steps=60, discard=10, repeats=repeats or 3, section_repeats=2,
                contenders=list(CONTENDERS), stages=[1, 2, 3], scaling_sizes=["tiny-llama", "small-llama", "medium"],
                scaling_stages=[1, 2, 3], scaling_steps=14)


class Runner:
    """Launches jobs, appends their result rows (or the failure) to the raw JSONL."""

    def __init__(self, work: Path, raw: Path, common: list[str]):
        self.work, self.raw, self.common = work, raw, common
        self.n = 0

    def launch(self, script: str, args: list[str], nproc: int, meta: dict, timeout: int = 900) -> dict | None:
        self.n += 1
        result = self.work / f"job{self.n:03d}.json"
        env = harness.job_env(omp_threads=max(1, (os.cpu_count() or 1) // nproc))
        cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(BENCH / script),
               "--result", str(result), "--launched", repr(time.time()), *args]
        t0 = time.time()
        try:
            proc = harness.run(cmd, env, timeout=timeout, cwd=ROOT)
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, err = "timeout", (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) \
                else (exc.stderr or "")
        wall = time.time() - t0
        row = json.loads(result.read_text().splitlines()[-1]) if result.exists() and result.read_text() else None
        if row is None or code != 0 and row.get("exit_code") is None:
            tail = "\n".join(err.splitlines()[-25:])
            print(f"  FAILED ({code}) {meta}: {shlex.join(cmd)}\n{tail}", flush=True)
            self.record({**meta, "error": f"exit {code}", "stderr_tail": tail, "cmd": shlex.join(cmd), "job_wall": wall})
            return None
        row = {**meta, **row, "job_wall": wall, "nproc": nproc}
        self.record(row)
        return row

    def record(self, row: dict) -> None:
        with open(self.raw, "a") as f:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------
# Statistics


def step_seconds(row: dict, discard: int) -> list[float]:
    """Steady-state step intervals: drop the first ``discard`` steps and the last one."""
    ends = row["ends"]
    return [b - a for a, b in zip(ends[discard:-2], ends[discard + 1:-1])]


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs: list[float]) -> str:
    return f"{fmt(min(xs))}-{fmt(max(xs))}" if len(xs) > 1 else "-"


# ------------------------------------------------------------------------------------------------
# Sections


def throughput(r: Runner, p: dict, base: list[str]) -> tuple[str, dict]:
    rows: dict[str, list[dict]] = {c: [] for c in p["contenders"]}
    cs = p["contenders"]
    for rep in range(p["repeats"]):
        order = cs[rep % len(cs):] + cs[:rep % len(cs)]  # rotate: no contender always runs first
        for c in order:
            script, extra = CONTENDERS[c]
            args = [f"--label={c}"] + ([] if script != "hf_trainer.py" else [f"--out-dir={r.work / f'hf-tp-{rep}'}"])
            args += base + extra + [f"train.steps={p['steps']}"]
            if script == "perf_worker.py":
                args += [f"run_dir={r.work / f'tp-{c}-{rep}'}", f"checkpoint.snapshot_dir={snapdir(r, f'tp-{c}-{rep}')}"]
            print(f"  throughput round {rep + 1}/{p['repeats']}: {c}", flush=True)
            row = r.launch(script, args, 2, {"section": "throughput", "repeat": rep, "label": c})
            if row:
                rows[c].append(row)
    stats = {}
    for c, runs in rows.items():
        if not runs:
            continue
        tok = runs[0]["tokens_per_step"]
        per_run = [step_seconds(x, p["discard"]) for x in runs]
        pooled = [tok / s for secs in per_run for s in secs]
        run_med = [tok / statistics.median(secs) for secs in per_run]
        run_mean = [tok * len(secs) / sum(secs) for secs in per_run]  # window tokens / window seconds
        stats[c] = dict(n=len(runs), median=med(run_med), p25=quantile(pooled, 0.25), p75=quantile(pooled, 0.75),
                        mean=med(run_mean), run_med=run_med, run_mean=run_mean, repeats=[x["repeat"] for x in runs],
                        deepspeed=runs[0].get("is_deepspeed_enabled", True))
    bare = stats.get("bare_deepspeed")

    def paired(c: str, key: str) -> float | None:
        """Median over rounds of (contender / bare in the same round): cancels slow drifts of the machine."""
        if not bare or c not in stats:
            return None
        b = dict(zip(bare["repeats"], bare[key]))
        ratios = [v / b[rep] for rep, v in zip(stats[c]["repeats"], stats[c][key]) if rep in b]
        return med(ratios)

    lines = ["| contender | runs | median step tokens/s | p25-p75 of steps | mean tokens/s (incl. snapshots) "
             "| run means min-max | median / bare | mean / bare |", "|---|---|---|---|---|---|---|---|"]
    for c, s in stats.items():
        lines.append(f"| {c}{'' if s['deepspeed'] else ' (DDP, no DeepSpeed)'} | {s['n']} | {fmt(s['median'])} | "
                     f"{fmt(s['p25'])}-{fmt(s['p75'])} | {fmt(s['mean'])} | {spread(s['run_mean'])} | "
                     f"{ratio(paired(c, 'run_med'))} | {ratio(paired(c, 'run_mean'))} |")
    verdicts = []
    on, hf = stats.get("bigtrain_monitor_on"), stats.get("hf_trainer")
    if on and bare:
        gap = 1 - paired("bigtrain_monitor_on", "run_mean")
        verdicts.append(f"* bigtrain (monitor on, snapshots every 10 steps) vs the bare loop, mean throughput: "
                        f"{gap:+.1%} slower (goal: within 3%): **{'met' if gap <= 0.03 else 'NOT met'}**.")
    if on and hf:
        vs_hf = on["mean"] / hf["mean"]
        verdicts.append(f"* bigtrain (monitor on) / HF Trainer, mean throughput: {vs_hf:.3f} (goal: > 1): "
                        f"**{'met' if vs_hf > 1 else 'NOT met'}**.")
    return "\n".join(lines + [""] + verdicts), stats


def snapdir(r: Runner, name: str) -> str:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else r.work
    return str(base / f"bigtrain-perf-{os.getpid()}-{name}")


def edit_json(src: Path, dst: Path, rel: str, **changes) -> None:
    """Copy checkpoint ``src`` to ``dst`` and change only these keys of the JSON file ``rel``."""
    shutil.copytree(src, dst)
    state = json.loads((dst / rel).read_text())
    state.update(changes)
    (dst / rel).write_text(json.dumps(state))
    marker = dst / "COMPLETE"  # bigtrain's manifest records file sizes and refuses a mismatch: keep it true
    if marker.is_file():
        manifest = json.loads(marker.read_text())
        if rel in manifest.get("files", {}):
            manifest["files"][rel] = (dst / rel).stat().st_size
            marker.write_text(json.dumps(manifest, indent=1))


def resume_cost(r: Runner, p: dict, base: list[str], n_train: int) -> str:
    gb = 8 * 2  # micro 8 x 2 ranks (train.micro_batch=8, grad_accum=1)
    deep_steps = int(0.9 * (n_train // gb))  # 90% into the HF Trainer's epoch: its longest skip
    deep = deep_steps * gb
    # One short run per trainer writes a checkpoint; copies differ only in the data position.
    bt = r.launch("perf_worker.py", ["--label=bigtrain_base", *base, "train.steps=4", f"run_dir={r.work / 'rs-bt'}",
                                     f"checkpoint.snapshot_dir={snapdir(r, 'rs-bt')}"], 2, {"section": "resume_base"})
    hf = r.launch("hf_trainer.py", ["--label=hf_base", f"--out-dir={r.work / 'rs-hf'}", "--save-at-end", *base,
                                    "train.steps=4"], 2, {"section": "resume_base"})
    jobs = []
    if bt:
        src = r.work / "rs-bt" / "checkpoints" / "step_00000004"
        for pos in (0, deep, 10**9):
            dst = r.work / f"rs-bt-ckpt-{pos}"
            edit_json(src, dst, "bigtrain_state.json", cursor=pos)
            jobs.append(("bigtrain", pos, "perf_worker.py", [f"--resume={dst}", *base, "train.steps=7"], dst))
    if hf:
        src = r.work / "rs-hf" / "checkpoint-4"
        for steps in (0, deep_steps):
            dst = r.work / f"rs-hf-ckpt-{steps}"
            edit_json(src, dst, "trainer_state.json", global_step=steps)
            jobs.append(("hf_trainer", steps * gb, "hf_trainer.py", [f"--resume={dst}", *base, f"train.steps={steps + 3}"],
                         dst))
    results: dict[tuple[str, int], list[dict]] = {}
    for rep in range(p["section_repeats"]):
        for trainer, pos, script, args, dst in jobs:
            name = f"rs-run-{trainer}-{pos}-{rep}"
            extra = [f"run_dir={r.work / name}", f"checkpoint.snapshot_dir={snapdir(r, name)}"] \
                if script == "perf_worker.py" else [f"--out-dir={r.work / name}"]
            print(f"  resume round {rep + 1}/{p['section_repeats']}: {trainer} at sample {pos:,}", flush=True)
            row = r.launch(script, [f"--label={trainer}", *args, *extra], 2,
                           {"section": "resume", "trainer": trainer, "position": pos, "repeat": rep})
            if row:
                results.setdefault((trainer, pos), []).append(row)
    lines = ["| trainer | resume position (samples) | launch -> first step end, s (median) | min-max "
             "| checkpoint load, s | vs position 0 |", "|---|---|---|---|---|---|"]
    zero = {}
    for (trainer, pos), rows in results.items():
        total = [x["first_step_end_wall"] - x["launched"] for x in rows if x.get("first_step_end_wall")]
        loads = [x["loads"][0]["seconds"] for x in rows if x.get("loads")]
        m = med(total)
        if pos == 0:
            zero[trainer] = m
        delta = f"{m - zero[trainer]:+.2f} s" if trainer in zero and m is not None and pos else "-"
        lines.append(f"| {trainer} | {pos:,} | {fmt(m)} | {spread(total)} | {fmt(med(loads))} | {delta} |")
    note = (f"\nPositions: 0, {deep:,} samples ({deep_steps:,} steps, 90% of one epoch of {n_train:,} blocks, the "
            "Trainer's longest skip: it fast-forwards only within the current epoch), and 10^9 for bigtrain. "
            "Each checkpoint is a copy of one short run's checkpoint with only the position edited "
            "(bigtrain_state.json `cursor`; the Trainer's trainer_state.json `global_step`).")
    return "\n".join(lines) + "\n" + note


def checkpoint_latency(r: Runner, p: dict, base: list[str]) -> str:
    steps = ["train.steps=16", "checkpoint.interval=8", "faults.nan_steps=[14]"]
    out: dict[int, dict[str, list[float]]] = {}
    for rep in range(p["section_repeats"]):
        for stage in p["stages"]:
            acc = out.setdefault(stage, {})
            z = [f"train.deepspeed=zero{stage}"]
            name_a, name_b, name_c = (f"ck-z{stage}-{k}-{rep}" for k in "abc")
            print(f"  checkpoint round {rep + 1}/{p['section_repeats']}: ZeRO-{stage}", flush=True)
            a = r.launch("perf_worker.py", ["--label=rollback_snapshot", *base, *z, *steps, "checkpoint.snapshot_interval=4",
                                            f"run_dir={r.work / name_a}", f"checkpoint.snapshot_dir={snapdir(r, name_a)}"],
                         2, {"section": "checkpoint", "stage": stage, "repeat": rep, "tier": "snapshot"})
            b = r.launch("perf_worker.py", ["--label=rollback_durable", *base, *z, *steps, "checkpoint.snapshot_interval=0",
                                            f"run_dir={r.work / name_b}", f"checkpoint.snapshot_dir={snapdir(r, name_b)}"],
                         2, {"section": "checkpoint", "stage": stage, "repeat": rep, "tier": "durable"})
            for row in (a, b):
                if not row:
                    continue
                for s in row["saves"]:
                    acc.setdefault(f"save_{s['kind']}", []).append(s["seconds"])
                tier = "snapshot" if row is a else "durable"
                for rec in row["recovers"]:
                    acc.setdefault(f"recover_{tier}", []).append(rec["seconds"])
                for ld in row["loads"]:
                    acc.setdefault(f"load_{tier}", []).append(ld["seconds"])
            if a:  # restart the whole job from the durable checkpoint of step 8 (what people do by hand)
                ckpt = r.work / name_a / "checkpoints" / "step_00000008"
                c = r.launch("perf_worker.py", ["--label=restart", f"--resume={ckpt}", *base, *z, "train.steps=16",
                                                "checkpoint.interval=8", f"run_dir={r.work / name_c}",
                                                f"checkpoint.snapshot_dir={snapdir(r, name_c)}"],
                             2, {"section": "checkpoint", "stage": stage, "repeat": rep, "tier": "restart"})
                if c:
                    acc.setdefault("restart", []).append(c["first_step_end_wall"] - c["launched"])
                    acc.setdefault("load_restart", []).extend(ld["seconds"] for ld in c["loads"])
    lines = ["| ZeRO | snapshot save, s | durable save, s | rollback from snapshot: spike -> next step, s "
             "| (of which load) | rollback from durable, s | (of which load) | restart the job from a checkpoint: "
             "launch -> first step, s |", "|---|---|---|---|---|---|---|---|"]
    for stage, acc in out.items():
        g = lambda k: fmt(med(acc.get(k, [])))  # noqa: E731
        lines.append(f"| {stage} | {g('save_snapshot')} | {g('save_durable')} | {g('recover_snapshot')} | "
                     f"{g('load_snapshot')} | {g('recover_durable')} | {g('load_durable')} | {g('restart')} |")
    return "\n".join(lines) + ("\n\nMedians over every save / load / rollback of the section. 'spike -> next step' is "
                               "bigtrain's recover(): from the verdict to the first instruction of the next step "
                               "(load, skip list, eps, records). Snapshots live in /dev/shm, durable checkpoints "
                               "under the run directory.")


def scaling(r: Runner, p: dict, base: list[str], sizes: dict[str, tuple[list[str], int]]) -> str:
    res: dict[tuple, list[dict]] = {}
    for rep in range(p["section_repeats"]):
        for size in p["scaling_sizes"]:
            for stage in p["scaling_stages"]:
                for nproc in (1, 2):
                    name = f"sc-{size}-z{stage}-n{nproc}-{rep}"
                    print(f"  scaling round {rep + 1}/{p['section_repeats']}: {size} ZeRO-{stage} x{nproc}", flush=True)
                    row = r.launch("perf_worker.py", ["--label=scaling", *base, *sizes[size][0], f"train.deepspeed=zero{stage}",
                                                      f"train.steps={p['scaling_steps']}", f"run_dir={r.work / name}",
                                                      f"checkpoint.snapshot_dir={snapdir(r, name)}"],
                                   nproc, {"section": "scaling", "size": size, "stage": stage, "repeat": rep})
                    if row:
                        res.setdefault((size, stage, nproc), []).append(row)
    lines = ["| model | params | ZeRO | ranks | median step, s | tokens/s | peak RSS per rank, MB (max over ranks) |",
             "|---|---|---|---|---|---|---|"]
    for (size, stage, nproc), rows in res.items():
        secs = [s for x in rows for s in step_seconds(x, 4)]
        m = med(secs)
        tok = rows[0]["tokens_per_step"]
        lines.append(f"| {size} | {sizes[size][1] / 1e6:.2f} M | {stage} | {nproc} | {fmt(m)} | {fmt(tok / m if m else None)} "
                     f"| {fmt(max(x['peak_rss_mb_max_rank'] or 0 for x in rows))} |")
    return "\n".join(lines) + ("\n\nbigtrain with its defaults (monitor on, snapshots every 10 steps), micro-batch 8 per "
                               "rank: 2 ranks train twice the tokens per step. Median over steady-state steps (the first "
                               "4 dropped) of all repeats.")


# ------------------------------------------------------------------------------------------------


def prepare(work: Path, base: list[str], need_medium: bool) -> tuple[int, dict[str, tuple[list[str], int]]]:
    """Tokenize the corpus once (so no job pays for it) and write the medium model; count parameters."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bigtrain.config import load_config
    from bigtrain.data import build_dataset, build_tokenizer
    from bigtrain.model import PRESETS, preset_config

    cfg = load_config(None, base)
    tok = build_tokenizer(None)
    data = build_dataset(cfg.data, tok, cfg.train.seed)
    sizes = {}
    for name in ("tiny-llama", "small-llama"):
        c = preset_config(load_config(None, [f"model.preset={name}"]).model, len(tok), cfg.data.seq_len, tok.pad_token_id)
        sizes[name] = ([f"model.preset={name}"], count_params(c))
    if need_medium:
        path = work / "medium-llama"
        c = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max(cfg.data.seq_len, 128),
                        pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                        **MEDIUM)
        if not (path / "config.json").exists():
            import torch
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(c).save_pretrained(path)
        sizes["medium"] = ([f"model.path={path}"], count_params(c))
    assert set(PRESETS) >= {"tiny-llama", "small-llama"}
    return data.train.shape[0], sizes


def count_params(hf_config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(x.numel() for x in model.parameters())


# What the throughput runs execute: the trainer, its configs, and the contenders' scripts.
PERF_CODE = ("bigtrain", "ds_configs", "bench/perf.py", "bench/perf_worker.py", "bench/bare_deepspeed.py",
             "bench/hf_trainer.py", "bench/harness.py")


def environment() -> list[str]:
    v = harness.versions(("torch", "deepspeed", "transformers", "accelerate"))
    commit, dirty = harness.code_version(PERF_CODE)
    return [f"* CPU: {harness.cpu_model() or '?'}, {os.cpu_count()} logical cores; {platform.platform()}",
            f"* Python {platform.python_version()}, torch {v['torch']}, deepspeed {v['deepspeed']}, "
            f"transformers {v['transformers']}, accelerate {v['accelerate']}",
            f"* bigtrain commit {commit}{' + uncommitted changes in the measured code' if dirty else ''}"]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer points: checks the harness (~5 min)")
    ap.add_argument("--repeats", type=int, help="throughput rounds (default 3; --quick 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "perf.md", help="markdown report; raw JSONL next to it")
    ap.add_argument("--work", type=Path, help="scratch directory for runs (default runs/perf-<time>)")
    ap.add_argument("--sections", default="throughput,resume,checkpoint,scaling")
    ap.add_argument("--keep-work", action="store_true", help="keep run directories and checkpoints")
    args = ap.parse_args()

    p = plan(args.quick, args.repeats)
    sections = args.sections.split(",")
    started = datetime.datetime.now().astimezone()
    work = (args.work or ROOT / "runs" / f"perf-{started:%Y%m%d-%H%M%S}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".jsonl")
    raw.write_text("")
    # Same model, data, ZeRO stage, precision, batch and sequence length for every contender.
    base = [f"model.preset={p['preset']}", "data.seq_len=128", "train.micro_batch=8", "train.grad_accum=1",
            "train.deepspeed=zero2", "train.precision=bf16", "optim.warmup_steps=0", "train.eval_interval=0",
            "checkpoint.interval=0", f"data.cache_dir={work / 'data_cache'}"]
    command = "python bench/perf.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before = loadavg()
    print(f"bench/perf.py: work dir {work}, load average {load_before}", flush=True)
    n_train, sizes = prepare(work, base, "scaling" in sections and "medium" in p["scaling_sizes"])
    r = Runner(work, raw, base)
    r.record({"section": "plan", **p, "base": base, "command": command, "started": started.isoformat()})

    body, timings = [], {}
    for name in sections:
        t0 = time.time()
        print(f"[{name}]", flush=True)
        if name == "throughput":
            table, _ = throughput(r, p, base)
            body += ["## Step throughput", "",
                     f"{p['preset']}, 2 ranks, ZeRO-2, bf16, seq 128, micro-batch 8 per rank (global 16 x 128 tokens), "
                     f"{p['steps']} steps per run of which the first {p['discard']} and the last are discarded, "
                     f"{p['repeats']} interleaved rounds.", "", table, "",
                     "Median step tokens/s: median over runs of each run's median step. Mean tokens/s: tokens / seconds "
                     "over the steady-state window, so periodic work (snapshots) counts; ratios are medians over rounds "
                     "of contender / bare loop in the same round. `bigtrain_monitor_on_nosnap` separates the monitor's "
                     "cost from the snapshots'."]
        elif name == "resume":
            body += ["## Resume cost against position in the data", "", resume_cost(r, p, base, n_train)]
        elif name == "checkpoint":
            body += ["## Checkpoint, snapshot and rollback latency", "",
                     f"{p['preset']}, 2 ranks, bf16, 16 steps: snapshots every 4 (or off), durable checkpoint at 8, a "
                     "NaN injected at step 14 (`faults.nan_steps=[14]`).", "", checkpoint_latency(r, p, base)]
        elif name == "scaling":
            body += ["## Scaling: ZeRO stage x ranks x model size", "", scaling(r, p, base, sizes)]
        timings[name] = time.time() - t0
        body.append("")
        print(f"[{name}] {timings[name]:.0f} s", flush=True)

    load_after = loadavg()
    ended = datetime.datetime.now().astimezone()
    head = ["# bigtrain performance", "",
            f"Generated {started:%Y-%m-%d %H:%M %Z} by:", "", "```bash", f".venv/bin/{command}", "```", "",
            f"Wall time {(ended - started).total_seconds() / 60:.1f} min ("
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + f"). Raw results: `{raw.name}`.", "",
            "## Environment", "", *environment(),
            f"* load average (1 min) before / after: {load_before} / {load_after}", ""]
    if max(load_before, load_after) > 0.5:
        head += [f"> **Warning: the machine was busy (load average up to {max(load_before, load_after)}); "
                 "these timings are contaminated. Rerun on an idle machine.**", ""]
    args.out.write_text("\n".join(head + body))
    r.record({"section": "done", "timings": timings, "load_before": load_before, "load_after": load_after})
    print("\n".join(head + body))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
        for d in Path("/dev/shm").glob(f"bigtrain-perf-{os.getpid()}-*"):
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
