"""The stop request a launcher leaves for the worker groups torchrun restarts after it
(launch/torchrun_multinode.sh sets ``BIGTRAIN_STOP_FILE``). Imports nothing heavy: it is checked
before torch is imported, so a restarted group exits within seconds of SLURM's grace period."""

from __future__ import annotations

import os

EXIT_PREEMPTED = 143  # 128 + SIGTERM: saved after a stop signal; rerun with --resume auto


def stop_requested() -> str | None:
    """The message to exit with when a stop was requested before this start, else None."""
    path = os.environ.get("BIGTRAIN_STOP_FILE")
    if path and os.path.exists(path):
        return (f"bigtrain: a stop was requested before this start ({path} exists): not training; "
                "the job continues with --resume auto when it is requeued")
    return None
