"""Chaos: kill -9 a random rank at random points (including mid-checkpoint) under torchrun
--max-restarts, and check every run ends with weights identical to an uninterrupted one.

    python tools/chaos.py --trials 10 [--steps 40] [--seed 0]

Each trial: 2 ranks on CPU (gloo), tiny model, a checkpoint every 5 steps, `--resume auto`; a
killer thread waits for a random step (or for a checkpoint directory that is not complete yet) and
SIGKILLs one worker; torchrun restarts the workers, which resume from the newest complete
checkpoint. Exit status 1 if any trial did not finish or ended with different weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

BIN = Path(sys.executable).parent
TINY = ["data.max_bytes=200000", "data.seq_len=32", "train.micro_batch=2", "train.eval_interval=0",
        "optim.warmup_steps=2", "checkpoint.interval=5"]


def launch(run_dir: Path, steps: int, cache: str, restarts: int) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PATH": f"{BIN}:{os.environ['PATH']}"}
    # --standalone = c10d rendezvous: each restart is a new round. With the static rendezvous
    # (--master_port) restarted workers failed to connect (gloo connectFullMesh refused; cf. pytorch#167288).
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "bigtrain", "train", *TINY, f"data.cache_dir={cache}",
           f"run_dir={run_dir}", f"train.steps={steps}", "--resume", "auto"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def saving(run_dir: Path) -> bool:
    return any(not (p / "COMPLETE").exists() for p in (run_dir / "checkpoints").glob("step_*"))


def kill_one(proc: subprocess.Popen, rng: random.Random) -> int | None:
    kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if "bigtrain" in " ".join(c.cmdline())]
    if not kids:
        return None
    victim = rng.choice(kids)
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


def weights(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bigtrain-chaos-"))
    cache = str(work / "cache")
    ref = work / "reference"
    proc = launch(ref, args.steps, cache, 0)
    out, _ = proc.communicate()
    if proc.returncode:
        print(out[-3000:])
        return 1
    ref_w = weights(ref / "checkpoints" / f"step_{args.steps:08d}")
    failures = 0
    print(f"{'trial':>5} {'kill at':>10} {'during save':>11} {'exit':>5} {'steps':>6} {'identical':>9}")
    for trial in range(args.trials):
        run_dir = work / f"trial{trial}"
        mid_save = rng.random() < 0.3
        at = rng.randint(2, args.steps - 2)
        proc = launch(run_dir, args.steps, cache, restarts=2)
        killed_at = None
        while proc.poll() is None and killed_at is None:
            step = last_step(run_dir)
            if step >= at and (not mid_save or saving(run_dir) or step >= at + 10):
                if kill_one(proc, rng):
                    killed_at = step
            time.sleep(0.01)
        out, _ = proc.communicate()
        final = run_dir / "checkpoints" / f"step_{args.steps:08d}"
        same = False
        if proc.returncode == 0 and (final / "COMPLETE").exists():
            w = weights(final)
            same = w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k]) for k in w)
        ok = proc.returncode == 0 and same
        failures += not ok
        print(f"{trial:>5} {str(killed_at):>10} {str(mid_save):>11} {proc.returncode:>5} {last_step(run_dir):>6} "
              f"{str(same):>9}")
        if not ok:
            (work / f"trial{trial}.log").write_text(out)
            print(f"      log: {work / f'trial{trial}.log'}")
    print(f"{args.trials - failures} of {args.trials} trials ended identical to the uninterrupted run")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
