"""One training run's collaborators, bundled: what the loop and the recovery act on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigtrain.checkpoint import CheckpointStore, TrainState
from bigtrain.config import Config
from bigtrain.data import PackedData
from bigtrain.faults import FaultInjector
from bigtrain.memory import MemoryReport
from bigtrain.metrics import Recorder
from bigtrain.sampler import Sampler, SkipSet
from bigtrain.spike import Escalation, Monitor


@dataclass
class Layout:
    """Who trains on what: the global batch of one step is split rank-major into micro-batches."""

    rank: int
    world: int
    micro: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def per_rank(self) -> int:
        return self.micro * self.accum

    def local(self, stream: list[int]) -> list[list[int]]:
        mine = stream[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.accum)]


@dataclass
class Run:
    """Everything one run trains with. ``state`` is bigtrain's own (see TrainState); the monitor, the
    escalation and the fault injector keep theirs and copy it into ``state`` only when it is saved."""

    cfg: Config
    engine: Any
    model: Any
    state: TrainState
    layout: Layout
    data: PackedData
    sampler: Sampler
    monitor: Monitor
    escalation: Escalation
    faults: FaultInjector
    rec: Recorder
    snaps: CheckpointStore
    durable: CheckpointStore
    memory: MemoryReport = field(default_factory=MemoryReport)
    started: float = field(default_factory=time.time)
    resume_load_seconds: float | None = None
    vocab: int = 0
    """The tokenizer's vocabulary size (the ids the data can hold; the model's may be padded)."""
    skips: SkipSet = field(init=False)
    """Sample ids never trained on (``state.history.skipped_samples``), rebuilt by each recovery: the
    only place that list grows."""

    def __post_init__(self) -> None:
        self.skips = SkipSet(self.state.history.skipped_samples)

    @property
    def stores(self) -> list[CheckpointStore]:
        """Rollback targets: the snapshot ring first (on a tie of steps the snapshot wins), when on."""
        return [self.snaps, self.durable] if self.snaps.interval else [self.durable]

    def save(self, store: CheckpointStore) -> Path:
        """Save the run into ``store`` (collective), with the components' state copied in: only here,
        since the monitor's statistics are too large to copy every step."""
        s = self.state
        s.progress.monitor = self.monitor.state_dict()
        s.history.escalation = self.escalation.state_dict()
        s.history.faults = self.faults.state_dict()
        return store.save(self.engine, s)
