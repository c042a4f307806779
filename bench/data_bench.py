"""Data benchmark: preparation throughput and memory, and per-rank training memory vs corpus size.

Generates a synthetic JSONL corpus of N tokens under /tmp (random words; the built-in byte-level
tokenizer makes one token per byte), then for each corpus size:

1. ``bigtrain prepare`` in a subprocess, for each ``--num-proc``: wall time, tokens/s, the peak
   memory of the whole process tree (sum of PSS: the preparing process plus its datasets workers,
   shared pages counted once) and the peak RSS of its largest single process, sampled every 0.1 s
   with psutil.
2. ``torchrun --nproc_per_node 2 -m bigtrain train`` on the prepared cache (tiny model, a few steps):
   the peak RSS of the worst rank, from the run's ``summary.json``.

Each corpus and its cache are deleted after its size is measured. Results are appended to
``docs/data_bench.jsonl`` (one line per measurement, with the command) and printed.

    .venv/bin/python bench/data_bench.py --tokens 10e6 200e6 --num-proc 1 2
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

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness import BIN, free_port, job_env  # noqa: E402
WORDS = ("the of and to in is was for on that with as by at from his her an which or be are this had not but "
         "model data train token block rank memory disk cache loss spike step batch layer weight").split()


def make_corpus(out: Path, tokens: int, doc_bytes: int = 4000, file_bytes: int = 8_000_000, seed: int = 0) -> int:
    """JSONL files of ~doc_bytes documents until ~tokens bytes; returns the bytes written."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    written, f_idx = 0, 0
    while written < tokens:
        with open(out / f"part{f_idx:05d}.jsonl", "w") as f:
            in_file = 0
            while in_file < file_bytes and written < tokens:
                text = " ".join(words[rng.integers(0, len(words), doc_bytes // 5)])[:doc_bytes]
                f.write(json.dumps({"text": text}) + "\n")
                in_file += len(text)
                written += len(text) + 1  # + eos
        f_idx += 1
    return written


def rss_anon(pid: int) -> int:
    """Anonymous resident memory (heap; not file pages, which a map or the page cache can give back)."""
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)  # 0: exiting


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, float, float, str]:
    """(seconds, peak tree PSS MB, peak single-process RSS MB, peak single-process anonymous RSS MB,
    stdout) of a subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root, peak, single, anon = psutil.Process(proc.pid), 0, 0, 0
    out_chunks: list[str] = []
    while proc.poll() is None:
        try:
            # PSS for the sum: forked workers share the parent's pages, which RSS would count twice.
            tree = [root, *root.children(recursive=True)]
            mem = [p.memory_full_info() for p in tree]
            peak, single = max(peak, sum(m.pss for m in mem)), max(single, *(m.rss for m in mem))
            anon = max(anon, *(rss_anon(p.pid) for p in tree))
        except (psutil.Error, OSError, StopIteration):
            pass
        time.sleep(0.1)
    out_chunks.append(proc.stdout.read())
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}\n{''.join(out_chunks)[-3000:]}")
    return seconds, peak / 2**20, single / 2**20, anon / 2**20, "".join(out_chunks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, nargs="+", default=[10e6, 200e6])
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-train", action="store_true", help="measure preparation only")
    p.add_argument("--work", default=None, help="scratch directory (default: a new one under /tmp)")
    p.add_argument("--out", default=str(ROOT / "docs" / "data_bench.jsonl"))
    args = p.parse_args()
    env = job_env()
    base_meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host_cpus": os.cpu_count(),
                 "python": platform.python_version(), "bench_command": " ".join([Path(sys.executable).name, *sys.argv])}
    results = []
    scratch = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bigtrain-databench-"))
    for n_tokens in map(int, args.tokens):
        work = scratch / f"{n_tokens}"
        corpus = work / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        try:
            t0 = time.perf_counter()
            size = make_corpus(corpus, n_tokens)
            print(f"corpus {size / 1e6:.0f}M tokens in {time.perf_counter() - t0:.0f}s", flush=True)
            data = ["data.source=files", f"data.files=[{corpus}/*.jsonl]", f"data.seq_len={args.seq_len}",
                    "data.eval_fraction=0.001"]
            cache = None
            for num_proc in args.num_proc:
                cache = work / f"cache-np{num_proc}"
                cmd = [sys.executable, "-m", "bigtrain", "prepare", *data, f"data.cache_dir={cache}",
                       f"data.num_proc={num_proc}"]
                seconds, tree_mb, single_mb, anon_mb, out = run_measured(cmd, env)
                stats = json.loads(out[out.index("{"):out.rindex("}") + 1])
                row = {"bench": "prepare", "corpus_tokens": size, "num_proc": num_proc, "seconds": round(seconds, 1),
                       "tokens_per_sec": round(size / seconds), "peak_pss_tree_mb": round(tree_mb),
                       "peak_rss_single_process_mb": round(single_mb), "peak_anon_rss_single_process_mb": round(anon_mb),
                       "stats": stats,
                       "command": " ".join(cmd), **base_meta}
                print(json.dumps({k: v for k, v in row.items() if k not in ("stats", "command")}), flush=True)
                results.append(row)
                if num_proc != args.num_proc[-1]:
                    shutil.rmtree(cache)  # keep one prepared cache for the training run
            if args.skip_train:
                continue
            run_dir = work / "run"
            cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "-m", "bigtrain", "train", *data, f"data.cache_dir={cache}", f"run_dir={run_dir}",
                   f"train.steps={args.steps}", "train.micro_batch=4", "train.eval_interval=0", "train.eval_batches=2",
                   "optim.warmup_steps=2", "checkpoint.snapshot_interval=0", "checkpoint.interval=0",
                   "train.precision=fp32"]
            seconds, tree_mb, _, anon_mb, _ = run_measured(cmd, env)
            summary = json.loads((run_dir / "summary.json").read_text())
            row = {"bench": "train", "corpus_tokens": size, "ranks": 2, "steps": args.steps,
                   "peak_rss_mb_max_rank": summary["peak_rss_mb_max_rank"], "peak_pss_tree_mb": round(tree_mb),
                   "peak_anon_rss_single_process_mb": round(anon_mb),
                   "seconds": round(seconds, 1), "command": " ".join(cmd), **base_meta}
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
            results.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not args.work:
        shutil.rmtree(scratch, ignore_errors=True)
    with open(args.out, "a") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
