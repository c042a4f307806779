"""The floor: a minimal hand-written DeepSpeed loop on bigtrain's model, data and resolved DeepSpeed JSON.

No trainer can step faster than this with the same engine, so the benchmark reports every contender as a
ratio to it. The loop does forward(labels) / backward / step per micro-batch and nothing else: no loss
read-back, no all-reduce, no LR schedule, no logging, no snapshots, no evaluation.

Usage (settings are bigtrain's dotted overrides, so every contender reads one config):
    GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/bare_deepspeed.py \
        --result /tmp/bare.jsonl model.preset=tiny-llama train.steps=60

Rank 0 appends one JSON line to --result: per-step end times (time.perf_counter), wall time of the first
step end, peak RSS (max over ranks).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

T_IMPORT = time.time()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from bigtrain.config import load_config  # noqa: E402
from bigtrain.data import build_dataset, build_tokenizer  # noqa: E402
from bigtrain.distributed import init_distributed, shutdown  # noqa: E402
from bigtrain.engine import resolve_ds_config  # noqa: E402
from bigtrain.model import build_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True, help="JSONL file rank 0 appends its result line to")
    p.add_argument("--label", default="bare_deepspeed")
    p.add_argument("--launched", type=float, help="time.time() when the driver launched this job")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import deepspeed

    cfg = load_config(None, args.overrides)
    t = cfg.train
    rank, world, _ = init_distributed()
    tokenizer = build_tokenizer(cfg.model.path)
    if rank != 0:  # rank 0 fills the packed-data cache, the others read it
        dist.barrier()
    data = build_dataset(cfg.data, tokenizer, t.seed)
    if rank == 0:
        dist.barrier()
    model = build_model(cfg.model, tokenizer, cfg.data.seq_len, t.seed)
    ds = resolve_ds_config(cfg, world)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)

    # Same shuffled order on every rank, each rank takes its slice of the global batch.
    order = torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(t.seed))
    per_rank = t.micro_batch * t.grad_accum
    ends: list[float] = []
    first_wall = None
    t_loop = time.perf_counter()
    for step in range(t.steps):
        base = step * per_rank * world + rank * per_rank
        for m in range(t.grad_accum):
            rows = order[(base + m * t.micro_batch + torch.arange(t.micro_batch)) % order.numel()]
            x = data.batch(rows.tolist())["input_ids"].to(engine.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        ends.append(time.perf_counter())
        if first_wall is None:
            first_wall = time.time()

    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])  # KiB on Linux
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        row = {"contender": args.label, "world": world, "tokens_per_step": per_rank * world * cfg.data.seq_len,
               "ends": ends, "t_fit_start": t_loop, "first_step_end_wall": first_wall, "launched": args.launched,
               "t_import": T_IMPORT, "zero_stage": ds["zero_optimization"]["stage"],
               "peak_rss_mb_max_rank": round(rss.item(), 1), "overrides": args.overrides}
        with open(args.result, "a") as f:
            f.write(json.dumps(row) + "\n")
    shutdown(barrier=True)  # as bigtrain's CLI does: gloo's threads left to finalization can abort a rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
