"""Fixtures shared by the tests (helpers to import live in helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bigtrain.distributed import extension_root, stale_extension_locks

# No test process holds torch's JIT-build lock between tests for longer than this (the op is built once,
# at session start, and each load checks it in about a second).
_LOCK_GRACE_SECONDS = 60


def _clear_stale_locks() -> None:
    """A test that kills a rank inside the load window leaves DeepSpeed's op lock behind, and every
    later process would wait for it forever (see bigtrain.distributed.stale_extension_locks). Only in
    the venv's own extension directory (make test sets it): a shared cache may hold another job's
    live build."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    if not root or not os.path.realpath(root).startswith(os.path.realpath(sys.prefix) + os.sep):
        return
    for lock in stale_extension_locks(extension_root(), older_than=_LOCK_GRACE_SECONDS):
        try:
            os.remove(lock)
        except FileNotFoundError:
            pass


def pytest_sessionstart(session) -> None:
    _clear_stale_locks()
    # Build (or check) DeepSpeed's CPU comm op once, here, not inside the first test's ranks.
    try:
        subprocess.run([sys.executable, "-c", "from bigtrain.distributed import load_comm_op; load_comm_op()"],
                       check=False, capture_output=True, timeout=900)
    except subprocess.TimeoutExpired:  # the tests that need the op will fail and say so
        pass


@pytest.fixture(autouse=True)
def _no_stale_extension_lock():
    _clear_stale_locks()
    yield


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenized corpus for the whole session."""
    return str(tmp_path_factory.mktemp("data_cache"))
