"""MFU benchmark (issue 9 item 5): llama-1b, bf16, seq 2048, ZeRO-2, one GPU; tokens/s and MFU against
the GPU's dense bf16 peak. Not a test. Run on a CUDA machine:

    python bench/mfu.py --steps 30 --micro-batch 4 --peak-tflops 989

(989 TFLOP/s: H100/H200 SXM dense bf16.) Appends one JSON line to --out (docs/mfu.jsonl) and prints it; it holds the run's memory report
(summary.json's memory_mb: host RSS and, on CUDA, the GPU's allocated and peak bytes).
FLOPs per token: 6 * params + 12 * layers * hidden * seq (PaLM appendix B, causal attention included).
"""

from __future__ import annotations

import argparse
import json
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
    run_dir = Path(tempfile.mkdtemp(prefix="bigtrain-mfu-"))
    cmd = [sys.executable, "-m", "bigtrain", "train", "model.preset=llama-1b", f"run_dir={run_dir}",
           "train.precision=bf16", "train.deepspeed=zero2", f"data.seq_len={args.seq}",
           f"train.micro_batch={args.micro_batch}", f"train.steps={args.steps}", "train.eval_interval=0",
           "checkpoint.snapshot_interval=0", "checkpoint.interval=0", "train.log_interval=1", *args.extra]
    subprocess.run(cmd, check=True, cwd=REPO)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r["tokens_per_sec"] for r in rows[len(rows) // 3:]]  # drop warm-up steps
    tps = sorted(steady)[len(steady) // 2]
    from transformers import LlamaConfig

    from bigtrain.model import PRESETS
    c = LlamaConfig(vocab_size=257, **PRESETS["llama-1b"])
    h, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = h * c.num_key_value_heads // c.num_attention_heads
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * 257 * h
    flops_per_token = 6 * params + 12 * layers * h * args.seq
    mfu = tps * flops_per_token / (args.peak_tflops * 1e12)
    import torch
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "params": params,
           "seq": args.seq, "micro_batch": args.micro_batch, "median_tokens_per_sec": round(tps, 1),
           "mfu": round(mfu, 4), "peak_tflops": args.peak_tflops,
           "memory_mb": summary.get("memory_mb"), "command": " ".join(cmd)}
    print(json.dumps(out))
    with open(args.out, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
