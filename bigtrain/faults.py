"""Deterministic fault injection (config section ``faults``), for tests and the spike benchmark.

Each fault fires once, the first time its step is reached, and is remembered in TrainState so a
rollback does not replay a transient fault. Poisoned data is remembered as stream ranges: bad data
stays bad if it is ever drawn again (it is not: recovery skips it). Faults act on the ranks in
``faults.ranks`` only, yet every rank records them identically, so decisions stay collective.
"""

from __future__ import annotations

import torch

from bigtrain.checkpoint import TrainState
from bigtrain.config import FaultConfig
from bigtrain.sampler import Sampler


class FaultInjector:
    def __init__(self, cfg: FaultConfig, rank: int):
        self.cfg = cfg
        self.here = not cfg.ranks or rank in cfg.ranks
        self._loss_factor: float | None = None

    def _fire(self, state: TrainState, kind: str, step: int, steps: list[int]) -> bool:
        key = f"{kind}@{step}"
        if step not in steps or key in state.faults_fired:
            return False
        state.faults_fired.append(key)
        return True

    def begin_step(self, state: TrainState, step: int, stream: list[int], per_rank: int, engine) -> None:
        """Arm this step's faults. ``stream`` is the global batch, rank-major, ``per_rank`` samples each."""
        cfg = self.cfg
        self._loss_factor = None
        if not cfg.any:
            return
        if self._fire(state, "poison", step, cfg.poison_steps):
            ranks = cfg.ranks or range(len(stream) // per_rank)
            bad = [(i, i + 1) for r in ranks for i in stream[r * per_rank:(r + 1) * per_rank]]
            state.poisoned = [list(r) for r in Sampler.merge_ranges([*map(tuple, state.poisoned), *bad])]
        if self._fire(state, "corrupt", step, [cfg.corrupt_weights_step]) and self.here:
            corrupt_weights(engine)
        if self._fire(state, "nan", step, cfg.nan_steps) and self.here:
            self._loss_factor = float("nan")
        if self._fire(state, "scale_grad", step, cfg.scale_grad_steps) and self.here:
            self._loss_factor = cfg.grad_scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self._loss_factor is None else loss * self._loss_factor


@torch.no_grad()
def corrupt_weights(engine) -> None:
    """Silent data corruption on this rank: the output projection x1000. Under ZeRO-3 the rank holds
    only its partition (``ds_tensor``); under ZeRO-1/2 its full bf16/fp32 working copy."""
    weight = engine.module.get_output_embeddings().weight
    target = weight.ds_tensor if hasattr(weight, "ds_tensor") else weight.data
    target.mul_(1000.0)
