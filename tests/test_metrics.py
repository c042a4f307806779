"""The recorder (bigtrain/metrics.py): rank 0's writes fail loudly, and on every rank."""

import pytest

from bigtrain.checkpoint import TrainState
from bigtrain.metrics import Recorder


def test_a_failed_write_on_rank_0_is_raised_not_swallowed(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")  # like a full or read-only disk
    rec = Recorder(blocker, enabled=True, total_steps=4)
    with pytest.raises(OSError, match="writing summary.json failed on rank 0"):
        rec.write_json("summary.json", {"steps": 4})
    with pytest.raises(OSError, match="opening the run's logs failed on rank 0"):
        rec.start(TrainState(), resumed=False)
    # Other ranks write nothing and, without a process group to agree through, raise nothing.
    Recorder(blocker, enabled=False, total_steps=4).write_json("summary.json", {})
