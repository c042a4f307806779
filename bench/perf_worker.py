"""bigtrain under a stopwatch: runs ``bigtrain.train.train`` unchanged and reads the timings it logs.

From the run directory (rank 0, after the run):
  metrics.jsonl ``time``   -> a wall-clock stamp per logged step (train.log_interval=1: every step), taken
                              after eval / snapshot / checkpoint of that step, so step-to-step intervals
                              are the whole loop iteration, the same quantity bench/bare_deepspeed.py times
  metrics.jsonl ``snapshot_seconds`` / ``checkpoint_seconds``, summary.json ``final_save_seconds``
                           -> seconds per save, by store (snapshot ring or durable; the initial save
                              before the first step is not logged)
  summary.json ``resume_load_seconds``, spikes.jsonl rollbacks' ``load_seconds``
                           -> seconds per load (resume and rollback)
  spikes.jsonl rollbacks' ``recover_seconds`` -> seconds from the spike verdict to the end of the rollback

Usage (bigtrain's own arguments after the worker's):
    GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/perf_worker.py \
        --result /tmp/bt.jsonl --label bigtrain_monitor_on [--resume PATH] run_dir=/tmp/r1 train.steps=60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T_IMPORT = time.time()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import torch.distributed as dist  # noqa: E402

from bigtrain.config import load_config  # noqa: E402
from bigtrain.distributed import shutdown  # noqa: E402
from bigtrain.report import read_jsonl  # noqa: E402
from bigtrain.train import train  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True)
    p.add_argument("--label", default="bigtrain")
    p.add_argument("--resume")
    p.add_argument("--launched", type=float)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    cfg = load_config(None, args.overrides)
    t_fit = time.time()
    code = train(cfg, resume=args.resume)
    if dist.get_rank() == 0:
        run_dir = Path(cfg.run_dir)
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        # This job's rows only: a run directory resumed into keeps the earlier jobs' lines.
        # (rows without a time were written by an older bigtrain: an earlier job's)
        spikes = [x for x in read_jsonl(run_dir / "spikes.jsonl") if x.get("time", 0) >= T_IMPORT]
        metrics = [x for x in read_jsonl(run_dir / "metrics.jsonl") if x.get("time", 0) >= T_IMPORT]
        rollbacks = [s for s in spikes if s.get("event") == "rollback"]
        ends, steps = [m["time"] for m in metrics], [m["step"] for m in metrics]
        saves = [{"kind": kind, "step": m["step"], "seconds": m[key]} for m in metrics
                 for kind, key in (("snapshot", "snapshot_seconds"), ("durable", "checkpoint_seconds")) if key in m]
        if summary.get("final_save_seconds") is not None:
            saves.append({"kind": "durable", "step": summary["steps"], "seconds": summary["final_save_seconds"]})
        loads = ([{"path": args.resume, "seconds": summary["resume_load_seconds"]}]
                 if summary.get("resume_load_seconds") is not None else [])
        loads += [{"path": s["restored_from"], "seconds": s["load_seconds"]} for s in spikes
                  if s.get("event") in ("rollback", "skip_update") and "load_seconds" in s]
        recovers = [{"seconds": s["recover_seconds"], "step": s["step"]} for s in rollbacks]
        row = {"contender": args.label, "world": dist.get_world_size(), "exit_code": code,
               "tokens_per_step": cfg.train.micro_batch * cfg.train.grad_accum * dist.get_world_size()
               * cfg.data.seq_len,
               "ends": ends, "steps": steps, "t_fit_start": t_fit,
               "first_step_end_wall": ends[0] if ends else None, "launched": args.launched,
               "t_import": T_IMPORT, "saves": saves, "loads": loads, "recovers": recovers,
               "rollbacks": [{k: s.get(k) for k in ("step", "restored_step", "restored_from", "recover_seconds")}
                             for s in rollbacks],
               "loop_tokens_per_sec": [m["tokens_per_sec"] for m in metrics],
               "peak_rss_mb_max_rank": summary.get("peak_rss_mb_max_rank"),
               "final_save_seconds": summary.get("final_save_seconds"), "resume": args.resume,
               "overrides": args.overrides}
        with open(args.result, "a") as f:
            f.write(json.dumps(row) + "\n")
    shutdown(barrier=True)  # as bigtrain's CLI does: gloo's threads left to finalization can abort a rank
    return code


if __name__ == "__main__":
    sys.exit(main())
