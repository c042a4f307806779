"""The stop request a launcher leaves for the worker groups torchrun restarts after it
(launch/torchrun_multinode.sh sets ``BIGTRAIN_STOP_FILE``). Imports nothing heavy: it is checked
before torch is imported, so a restarted group exits within seconds of SLURM's grace period."""

from __future__ import annotations

import os
from pathlib import Path

EXIT_PREEMPTED = 143  # 128 + SIGTERM: saved after a stop signal; rerun with --resume auto


def stop_requested() -> str | None:
    """The message to exit with when a stop was requested before this start, else None."""
    path = os.environ.get("BIGTRAIN_STOP_FILE")
    if path and os.path.exists(path):
        return (f"bigtrain: a stop was requested before this start ({path} exists): not training; "
                "the job continues with --resume auto when it is requeued")
    return None


def mark_stop_requested() -> str | None:
    """Leave the stop request for this node's launcher (when it set ``BIGTRAIN_STOP_FILE``): the ranks
    agreed on a stop, but the launcher may not have had the signal (only another node's wrapper got it,
    or it came between worker groups), and torchrun's restarts on every node must exit at once. Returns
    why it could not, for the log."""
    path = os.environ.get("BIGTRAIN_STOP_FILE")
    if path:
        try:
            Path(path).touch()
        except OSError as e:
            return f"could not mark the stop in {path} ({e}): torchrun may restart this node's ranks"
    return None
