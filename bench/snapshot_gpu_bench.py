"""GPU part of the snapshot benchmark (issue 9.4), one process, no DeepSpeed needed: the state one
ZeRO rank snapshots (bf16 module + fp32 master weights + Adam's two moments, 14 bytes/parameter, as
CUDA tensors in DeepSpeed's state-dict shape) written by

  sync:  torch.save of the CUDA state dict (what DeepSpeed's TorchCheckpointEngine does; the loop waits
         for the device-to-host copy and the whole write), and
  async: bigtrain.checkpoint.SnapshotEngine.save (pinned host buffers, non_blocking D2H copies on the
         current stream: the loop waits only for the copies to be queued) + the background write.

Per snapshot: the seconds the loop is blocked, when the copies are done on the device, and when the
background write ends. A GPU matmul loop runs between snapshots (the "training"), and its step time is
measured with and without a write in flight. Prints JSON lines; writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bigtrain.checkpoint import HostBuffers, SnapshotEngine  # noqa: E402


def state(params: int, device: str) -> tuple[dict, dict]:
    chunk = 50_000_000  # parameters per tensor, as DeepSpeed's flat groups come in a few large tensors
    sizes = [min(chunk, params - i) for i in range(0, params, chunk)]
    module = {"module": {f"w{i}": torch.randn(n, device=device, dtype=torch.bfloat16) for i, n in enumerate(sizes)}}
    optim = {"optimizer_state_dict": {
        "single_partition_of_fp32_groups": [torch.randn(n, device=device) for n in sizes],
        "base_optimizer_state": {"state": {i: {"exp_avg": torch.randn(n, device=device),
                                               "exp_avg_sq": torch.rand(n, device=device), "step": torch.tensor(5.0)}
                                           for i, n in enumerate(sizes)},
                                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]}}}
    return module, optim


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, nargs="+", default=[1.1e8, 1e9])
    ap.add_argument("--snapshots", type=int, default=4)
    ap.add_argument("--dir", default="/dev/shm/bigtrain-gpu-snapbench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "a") if args.out else None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def train_steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            for _ in range(20):
                torch.mm(a, a)
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    train_steps(3)
    base_step = train_steps(5)
    for params in args.params:
        params = int(params)
        module, optim = state(params, "cuda")
        nbytes = sum(t.numel() * t.element_size() for d in (module["module"], ) for t in d.values())
        nbytes += sum(t.numel() * t.element_size() for t in optim["optimizer_state_dict"]["single_partition_of_fp32_groups"])
        nbytes += sum(t.numel() * t.element_size() for s in optim["optimizer_state_dict"]["base_optimizer_state"]["state"].values()
                      for t in (s["exp_avg"], s["exp_avg_sq"]))
        torch.cuda.synchronize()
        for i in range(args.snapshots):
            t0 = time.perf_counter()
            torch.save(module, root / "sync_model.pt")
            torch.save(optim, root / "sync_optim.pt")
            sync = time.perf_counter() - t0
            emit({"mode": "sync", "params": params, "bytes": nbytes, "snapshot": i, "blocked_s": round(sync, 4)})
        buffers = HostBuffers()  # one set per model size, reused by every snapshot, as CheckpointStore does
        for i in range(args.snapshots):
            engine = SnapshotEngine(buffers=buffers)
            t0 = time.perf_counter()
            engine.save(module, str(root / "async_model.pt"))
            engine.save(optim, str(root / "async_optim.pt"))
            event = torch.cuda.Event()
            event.record()
            blocked = time.perf_counter() - t0
            done = {}

            def write(engine=engine, event=event, t0=t0):
                event.synchronize()
                done["copied"] = time.perf_counter() - t0
                engine.write()
                done["written"] = time.perf_counter() - t0

            thread = threading.Thread(target=write)
            thread.start()
            steps, t1 = 0, time.perf_counter()
            while thread.is_alive():
                train_steps(1)
                steps += 1
            during = (time.perf_counter() - t1) / max(steps, 1)
            thread.join()
            emit({"mode": "async", "params": params, "bytes": nbytes, "snapshot": i, "blocked_s": round(blocked, 4),
                  "copies_done_s": round(done["copied"], 4), "write_done_s": round(done["written"], 4),
                  "train_steps_during_write": steps, "step_s_during_write": round(during, 4),
                  "step_s_alone": round(base_step, 4)})
        del module, optim, buffers, engine
        torch.cuda.empty_cache()
    for p in root.iterdir():
        p.unlink()
    root.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
