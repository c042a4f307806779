"""The benchmarks' entry point: bigtrain's command line with the benchmark's plug-ins registered.

    python bench/bench_entry.py train ARGS                           # as: python -m bigtrain train ARGS
    torchrun --nproc_per_node 2 bench/bench_entry.py train ARGS      # as: torchrun ... -m bigtrain train ARGS

Registers the competitors' spike rules (bench/competitors.py: ``spike.monitor=olmo_skip_step``,
``spike.monitor=llmfoundry_kill``) and the modadd task (bench/modadd.py: ``data.source=modadd``,
``model.preset=modadd``), then runs ``python -m bigtrain`` unchanged. Every rank runs this file, so
every rank registers before its config is parsed. bigtrain itself never imports bench/: these names
exist only when a run starts here.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bigtrain from this checkout
# This file's directory is sys.path[0] when it runs as a script; also when it is imported.
sys.path.insert(1, str(Path(__file__).resolve().parent))

import competitors  # noqa: E402
import modadd  # noqa: E402


def register() -> None:
    """Every plug-in of the benchmarks (idempotent)."""
    competitors.register()
    modadd.register()


if __name__ == "__main__":
    register()
    # bigtrain/__main__.py itself: its stop-file check, then bigtrain.cli.main() and the exit status.
    runpy.run_module("bigtrain", run_name="__main__", alter_sys=True)
