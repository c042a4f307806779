"""MFU benchmark (issue 9 item 5): llama-1b, bf16, seq 2048, ZeRO-2, one GPU; tokens/s and MFU against
the GPU's dense bf16 peak. Not a test. Run on a CUDA machine:

    python bench/mfu.py --steps 30 --micro-batch 4 --peak-tflops 989

(989 TFLOP/s: H100/H200 SXM dense bf16.) Appends one JSON line to --out (docs/mfu.jsonl) and prints
it; it holds the run's memory report (summary.json's memory_mb: host RSS and, on CUDA, the GPU's
allocated and peak bytes).
FLOPs per token: 6 x the matmul parameters (all but an untied input embedding) + 12 x layers x hidden
x seq, PaLM's convention (appendix B), which counts the whole attention score matrix; ``mfu_causal``
counts the half that causal kernels compute. The run directory is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--out", default=str(REPO / "docs" / "mfu.jsonl"), help="JSON-lines file the result is appended to")
    args = ap.parse_args()
    # A stage's time limit ends with SIGTERM: unwind, so the finally below removes the run directory.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_dir = Path(tempfile.mkdtemp(prefix="bigtrain-mfu-"))
    cmd = [sys.executable, "-m", "bigtrain", "train", "model.preset=llama-1b", f"run_dir={run_dir}",
           "train.precision=bf16", "train.deepspeed=zero2", f"data.seq_len={args.seq}",
           f"train.micro_batch={args.micro_batch}", f"train.steps={args.steps}", "train.eval_interval=0",
           "checkpoint.snapshot_interval=0", "checkpoint.interval=0", "train.log_interval=1", *args.extra]
    try:
        subprocess.run(cmd, check=True, cwd=REPO)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((run_dir / "summary.json").read_text())
        hf = json.loads(next((run_dir / "checkpoints").glob("step_*/hf/config.json")).read_text())
    finally:  # two checkpoints of ~14 B/param each (the initial state and the final one): ~20 GB at 722M
        shutil.rmtree(run_dir, ignore_errors=True)
    steady = [r["tokens_per_sec"] for r in rows[len(rows) // 3:]]  # drop warm-up steps
    tps = sorted(steady)[len(steady) // 2]
    h, layers, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    params = summary["parameters"]
    # 6 N over the matmul weights: the input embedding is a lookup (its matrix counts when tied to lm_head).
    matmul_params = params - (0 if hf.get("tie_word_embeddings") else vocab * h)
    attention = 12 * layers * h * args.seq  # PaLM appendix B: the full s x s score matrix, forward + backward
    flops_per_token = 6 * matmul_params + attention
    flops_causal = 6 * matmul_params + attention / 2  # what causal kernels compute (half the matrix)
    import torch
    out = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "params": params,
           "seq": args.seq, "micro_batch": args.micro_batch, "median_tokens_per_sec": round(tps, 1),
           "flops_per_token": flops_per_token, "mfu": round(tps * flops_per_token / (args.peak_tflops * 1e12), 4),
           "mfu_causal": round(tps * flops_causal / (args.peak_tflops * 1e12), 4), "peak_tflops": args.peak_tflops,
           "memory_mb": summary.get("memory_mb"), "command": " ".join(cmd)}
    print(json.dumps(out))
    with open(args.out, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
