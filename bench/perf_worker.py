"""bigtrain under a stopwatch: runs ``bigtrain.train.train`` unchanged and times it from the outside.

The loop itself is not edited; four module attributes are wrapped so the benchmark sees what the loop
does not log:
  Recorder.step          -> a perf_counter stamp per logged step (train.log_interval=1: every step), taken
                            after eval / snapshot / checkpoint of that step, so step-to-step intervals
                            are the whole loop iteration, the same quantity bench/bare_deepspeed.py times
  CheckpointStore.save   -> seconds per save, by store (snapshot ring or durable)
  checkpoint.load        -> seconds per load (resume and rollback)
  train.recover          -> seconds from the spike verdict to the end of the rollback

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

from bigtrain import checkpoint  # noqa: E402
from bigtrain import train as train_mod  # noqa: E402
from bigtrain.config import load_config  # noqa: E402
from bigtrain.distributed import shutdown  # noqa: E402

ends: list[float] = []
steps: list[int] = []
saves: list[dict] = []
loads: list[dict] = []
recovers: list[dict] = []
first_wall: list[float] = []


class TimedRecorder(train_mod.Recorder):
    def step(self, row):
        ends.append(time.perf_counter())
        steps.append(row["step"])
        if not first_wall:
            first_wall.append(time.time())
        super().step(row)


_save, _load, _recover = checkpoint.CheckpointStore.save, checkpoint.load, train_mod.recover


def timed_save(self, engine, state):
    t0 = time.perf_counter()
    path = _save(self, engine, state)
    kind = "durable" if self.hf_files else "snapshot"  # only the durable store writes hf/ files
    saves.append({"kind": kind, "step": state.step, "seconds": time.perf_counter() - t0, "root": str(self.root)})
    return path


def timed_load(engine, path):
    t0 = time.perf_counter()
    state = _load(engine, path)
    loads.append({"path": str(path), "seconds": time.perf_counter() - t0})
    return state


def timed_recover(*args, **kwargs):
    t0 = time.perf_counter()
    reason = _recover(*args, **kwargs)
    recovers.append({"seconds": time.perf_counter() - t0, "at_end_index": len(ends)})
    return reason


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True)
    p.add_argument("--label", default="bigtrain")
    p.add_argument("--resume")
    p.add_argument("--launched", type=float)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    train_mod.Recorder = TimedRecorder
    checkpoint.CheckpointStore.save = timed_save
    checkpoint.load = timed_load
    train_mod.recover = timed_recover

    cfg = load_config(None, args.overrides)
    t_fit = time.perf_counter()
    code = train_mod.train(cfg, resume=args.resume)
    if dist.get_rank() == 0:
        run_dir = Path(cfg.run_dir)
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        spikes = [json.loads(x) for x in (run_dir / "spikes.jsonl").read_text().splitlines() if x.strip()] \
            if (run_dir / "spikes.jsonl").exists() else []
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        row = {"contender": args.label, "world": dist.get_world_size(), "exit_code": code,
               "tokens_per_step": cfg.train.micro_batch * cfg.train.grad_accum * dist.get_world_size()
               * cfg.data.seq_len,
               "ends": ends, "steps": steps, "t_fit_start": t_fit,
               "first_step_end_wall": first_wall[0] if first_wall else None, "launched": args.launched,
               "t_import": T_IMPORT, "saves": saves, "loads": loads, "recovers": recovers,
               "rollbacks": [{k: s.get(k) for k in ("step", "restored_step", "restored_from", "recover_seconds")}
                             for s in spikes if s.get("event") == "rollback"],
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
