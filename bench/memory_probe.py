"""Worker for ``bench/memory_bench.py --probe``: runs ``bigtrain train`` unchanged, with host memory
sampled per named phase, to see what the peak is made of.

Launched by torchrun in place of ``-m bigtrain``. Wraps (without changing what they do) the model
load, ``deepspeed.initialize`` and the ZeRO optimizers' set-up steps, forward/backward/step, and a
thread samples /proc/self/status (VmRSS, RssAnon, RssFile) every few ms. Each wrapped call records
its RSS on entry and exit and the largest sample while it (or anything it called) ran. Each rank
writes ``$MEMPROBE_OUT/rank<N>.json`` at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) / 1024.0
    return out


class Probe:
    def __init__(self, interval: float = 0.003) -> None:
        self.stack: list[str] = []
        self.phases: dict[str, dict] = {}  # path -> {calls, enter, exit, max (a status sample)}
        self.order: list[str] = []
        self.top = {"VmRSS": 0.0}
        self.top_at = ""
        self.lock = threading.Lock()
        self.interval = interval
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            s = status_mb()
            with self.lock:
                path = "/".join(self.stack)
                if s["VmRSS"] > self.top["VmRSS"]:
                    self.top, self.top_at = s, path or "(outside)"
                for i in range(1, len(self.stack) + 1):
                    rec = self.phases["/".join(self.stack[:i])]
                    if s["VmRSS"] > rec["max"]["VmRSS"]:
                        rec["max"] = s
            time.sleep(self.interval)

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        probe = self

        def wrapper(*args, **kwargs):
            s = status_mb()
            with probe.lock:
                probe.stack.append(label)
                path = "/".join(probe.stack)
                rec = probe.phases.get(path)
                if rec is None:
                    rec = probe.phases[path] = {"calls": 0, "enter": s, "max": s}
                    probe.order.append(path)
                rec["calls"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                s = status_mb()
                with probe.lock:
                    rec["exit"] = s
                    if s["VmRSS"] > rec["max"]["VmRSS"]:
                        rec["max"] = s
                    probe.stack.pop()

        wrapper.__wrapped__ = fn
        setattr(owner, attr, wrapper if not isinstance(fn, (classmethod, staticmethod)) else type(fn)(wrapper))

    def dump(self, path: str) -> None:
        with self.lock:
            out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                   "sampled_top": self.top, "sampled_top_at": self.top_at,
                   "phases": [{"phase": p, **self.phases[p]} for p in self.order]}
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def install(probe: Probe) -> None:
    import deepspeed
    import transformers
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    import bigtrain.train as bt

    probe.wrap(bt, "build_model", "build_model")
    probe.wrap(transformers.AutoModelForCausalLM, "from_pretrained", "from_pretrained")
    probe.wrap(deepspeed, "initialize", "deepspeed.initialize")
    probe.wrap(bt, "build_engine", "build_engine")
    z3 = stage3.DeepSpeedZeroOptimizer_Stage3
    probe.wrap(z3, "__init__", "Stage3.__init__")
    for name in ("initialize_ds_offload", "_create_fp16_partitions_with_defragmentation", "_setup_for_real_optimizer",
                 "_create_fp32_partitions", "initialize_optimizer_states", "step", "backward",
                 "_partitioned_buffers_all_gather"):
        if hasattr(z3, name):
            probe.wrap(z3, name, f"Stage3.{name}")
    probe.wrap(DeepSpeedZeRoOffload, "__init__", "ZeRoOffload.__init__")
    z12 = stage_1_and_2.DeepSpeedZeroOptimizer
    probe.wrap(z12, "__init__", "Stage12.__init__")
    for name in ("initialize_optimizer_states", "step", "backward"):
        if hasattr(z12, name):
            probe.wrap(z12, name, f"Stage12.{name}")
    from deepspeed.runtime.engine import DeepSpeedEngine
    for name in ("forward", "backward", "step", "_configure_zero_optimizer", "_configure_optimizer"):
        probe.wrap(DeepSpeedEngine, name, f"engine.{name}")


def main() -> int:
    probe = Probe()
    out_dir = os.environ["MEMPROBE_OUT"]
    rank = int(os.environ.get("RANK", 0))
    atexit.register(lambda: probe.dump(os.path.join(out_dir, f"rank{rank}.json")))
    install(probe)
    from bigtrain.cli import main as cli_main
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
