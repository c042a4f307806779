"""Memory benchmark (issue 9): host RSS per rank at each start-up phase for a >= 150M-parameter model
directory on 2 ranks, under each ZeRO stage, and bytes per parameter per rank.

1. Writes a Llama model directory (default: hidden 768, 12 layers, intermediate 3072, vocab 32000,
   untied: 162M parameters) in bf16 with small safetensors shards (``max_shard_size``, as real
   checkpoints are), plus the built-in byte-level tokenizer.
2. Measures a baseline: the RSS of a bare python process that has imported torch, deepspeed and
   transformers (and one that has also imported bigtrain.train), so a phase's number less the
   baseline is what bigtrain's phase added.
3. For each ``--stages``: ``torchrun --nproc_per_node 2 -m bigtrain train model.path=DIR
   train.deepspeed=zeroN train.precision=bf16 ...`` on the embedded default data, reads
   ``summary.json`` ``memory_mb`` (max over ranks) and appends one JSON line per run to
   ``docs/memory.jsonl``: the command, the readings, the parameter count and, per phase,
   (MB * 2**20 - baseline) / params bytes per parameter per rank.

``--probe`` launches ``bench/memory_probe.py`` instead of ``-m bigtrain`` (the same training, with
RSS/RssAnon/RssFile sampled per DeepSpeed set-up step on every rank) and stores its per-rank
breakdown in the line too. ``--ds-config FILE`` (repeatable, with ``--stages`` ignored) runs a
DeepSpeed JSON file instead of a shipped stage, e.g. to try smaller buckets.

    .venv/bin/python bench/memory_bench.py                       # ZeRO-2 and ZeRO-3, ~5 min on 2 cores
    .venv/bin/python bench/memory_bench.py --stages 3 --probe    # where the ZeRO-3 peak comes from
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness import BIN, free_port, job_env, run  # noqa: E402
PHASES = ("before_model_load", "after_model_load", "peak_at_after_model_load", "after_engine_init", "peak_at_after_engine_init",
          "after_first_step", "peak_at_after_first_step", "peak")


def make_model(path: Path, hidden: int, layers: int, intermediate: int, vocab: int, shard: str) -> int:
    """Write the bf16 model directory and tokenizer once; return the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bigtrain.data import build_tokenizer

    tok = build_tokenizer(None)
    if vocab < len(tok):
        raise SystemExit(f"--vocab {vocab} is smaller than the tokenizer ({len(tok)} tokens)")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, eos_token_id=None)
    marker = path / "bench_params.json"
    key = [hidden, layers, intermediate, vocab, shard]
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return json.loads(marker.read_text())["params"]
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=shard)
    tok.save_pretrained(path)
    marker.write_text(json.dumps({"params": params, "key": key}))
    del model
    return params


def baseline_mb(env: dict, modules: str) -> float:
    code = f"import {modules}\nfrom bigtrain.memory import rss_mb\nprint(rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[1, 2, 3])
    p.add_argument("--ds-config", action="append", default=[], help="a DeepSpeed JSON file to run instead of --stages")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard", default="100MB", help="save_pretrained(max_shard_size=...)")
    p.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                   help="set zero_optimization.KEY (a JSON value) in a copy of the shipped config, e.g. "
                        "--zero reduce_bucket_size=5e6; the run is named zeroN+KEY=VALUE")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the training job, e.g. --env MALLOC_MMAP_THRESHOLD_=131072")
    p.add_argument("--probe", action="store_true", help="run bench/memory_probe.py: per-DeepSpeed-step breakdown")
    p.add_argument("--label", default="", help="free text stored with each line")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bigtrain-memory-bench"),
                   help="scratch: model directory (kept and reused), data cache, run directories")
    p.add_argument("--out", default=str(ROOT / "docs" / "memory.jsonl"))
    args = p.parse_args()
    env = job_env()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"llama-h{args.hidden}-l{args.layers}-i{args.intermediate}-v{args.vocab}-bf16-{args.shard}"
    t0 = time.perf_counter()
    params = make_model(model_dir, args.hidden, args.layers, args.intermediate, args.vocab, args.shard)
    shards = sorted(f.name for f in model_dir.glob("*.safetensors"))
    print(f"model {model_dir}: {params:,} parameters ({params / 1e6:.1f}M), {len(shards)} shards, "
          f"{sum(f.stat().st_size for f in model_dir.glob('*.safetensors')) / 2**20:.0f} MB on disk "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    base = baseline_mb(env, "torch, deepspeed, transformers")
    base_bt = baseline_mb(env, "torch, deepspeed, transformers, bigtrain.train")
    print(f"baseline RSS: {base:.0f} MB (torch+deepspeed+transformers), {base_bt:.0f} MB (+ bigtrain.train)", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host_cpus": os.cpu_count(),
            "python": platform.python_version(), "bench_command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        import deepspeed
        import torch
        import transformers
        meta["versions"] = {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                            "transformers": transformers.__version__}
    except ImportError:
        pass
    runs = [(f"zero{s}", f"zero{s}") for s in args.stages] if not args.ds_config else \
        [(Path(c).stem, str(Path(c).resolve())) for c in args.ds_config]
    if args.zero:
        edits = dict(kv.split("=", 1) for kv in args.zero)
        derived = []
        for name, ds in runs:
            src = ROOT / "ds_configs" / f"{ds}.json" if not ds.endswith(".json") else Path(ds)
            conf = json.loads(src.read_text())
            for k, v in edits.items():
                value = json.loads(v)  # 5e6 -> 5000000.0 -> 5000000: DeepSpeed wants integers for sizes
                conf["zero_optimization"][k] = int(value) if isinstance(value, float) and value.is_integer() else value
            name = name + "+" + "+".join(args.zero)
            path = work / f"{name}.json"
            path.write_text(json.dumps(conf, indent=2))
            derived.append((name, str(path)))
        runs = derived
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    data = [f"model.path={model_dir}", f"data.seq_len={args.seq_len}", f"data.cache_dir={work / 'data_cache'}"]
    # Prepare the data cache first, so that no rank's RSS includes tokenizing the corpus.
    subprocess.run([sys.executable, "-m", "bigtrain", "prepare", *data], env=env, check=True, capture_output=True)
    for i, (name, ds) in enumerate(runs):
        run_dir = work / f"run-{i}{'-probe' if args.probe else ''}"
        shutil.rmtree(run_dir, ignore_errors=True)
        probe_dir = work / f"probe-{i}"
        shutil.rmtree(probe_dir, ignore_errors=True)
        target = [str(ROOT / "bench" / "memory_probe.py")] if args.probe else ["-m", "bigtrain"]
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(args.nproc), "--master_port", str(free_port()), *target,
               "train", *data, f"train.deepspeed={ds}", "train.precision=bf16",
               f"train.steps={args.steps}", f"train.micro_batch={args.micro_batch}", "train.grad_accum=1",
               "optim.warmup_steps=0",
               "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.snapshot_interval=0",
               f"run_dir={run_dir}"]
        run_env = {**env, **extra_env}
        if args.probe:
            probe_dir.mkdir(parents=True)
            run_env["MEMPROBE_OUT"] = str(probe_dir)
        print(f"[{name}] {' '.join(f'{k}={v}' for k, v in extra_env.items())} {' '.join(cmd)}".strip(), flush=True)
        t0 = time.perf_counter()
        proc = run(cmd, run_env)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"[{name}] exited {proc.returncode}")
        summary = json.loads((run_dir / "summary.json").read_text())
        mem = summary["memory_mb"]
        bpp = {k: round((mem[k] * 2**20 - base * 2**20) / params, 2) for k in PHASES if k in mem}
        bpp_bt = {k: round((mem[k] * 2**20 - base_bt * 2**20) / params, 2) for k in PHASES if k in mem}
        row = {"bench": "memory", "deepspeed": name, "env": extra_env, "ranks": args.nproc, "params": params, "model_dir": str(model_dir),
               "shards": len(shards), "shard_size": args.shard, "steps": args.steps, "seq_len": args.seq_len,
               "micro_batch": args.micro_batch, "baseline_rss_mb": round(base, 1),
               "baseline_rss_mb_with_bigtrain": round(base_bt, 1), "memory_mb": mem,
               "bytes_per_param_per_rank_over_baseline": bpp,
               "bytes_per_param_per_rank_over_baseline_with_bigtrain": bpp_bt,
               "model_load_added_bytes_per_param": round(mem["model_load_added"] * 2**20 / params, 2),
               "load_goal_bytes_per_param": 2.0, "seconds": round(seconds, 1), "label": args.label,
               "command": " ".join(cmd), **meta}
        if args.probe:
            row["probe"] = {f.stem: json.loads(f.read_text()) for f in sorted(probe_dir.glob("rank*.json"))}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{name}] {seconds:.0f}s  memory_mb: " + ", ".join(f"{k} {v:,.0f}" for k, v in mem.items()), flush=True)
        print(f"[{name}] bytes/param/rank over baseline: " + ", ".join(f"{k} {v}" for k, v in bpp.items()), flush=True)
        print(f"[{name}] the load added {row['model_load_added_bytes_per_param']} bytes/param on one rank "
              f"(goal <= 2.0)", flush=True)
        if args.probe:
            for rank, rep in row["probe"].items():
                print(f"  {rank}: ru_maxrss {rep['ru_maxrss_mb']:,.0f} MB; sampled top {rep['sampled_top']} "
                      f"in {rep['sampled_top_at']}")
                for ph in rep["phases"]:
                    e, x, m = ph["enter"]["VmRSS"], ph.get("exit", {}).get("VmRSS", float("nan")), ph["max"]
                    print(f"    {ph['phase']:<70} x{ph['calls']:<3} enter {e:7,.0f}  exit {x:7,.0f}  "
                          f"max {m['VmRSS']:7,.0f} (anon {m.get('RssAnon', 0):,.0f}, file {m.get('RssFile', 0):,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
