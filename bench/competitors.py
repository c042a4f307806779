"""The competitors' spike rules, reproduced so the spike benchmark runs them under bigtrain's trainer.

Two monitors, each a faithful copy of an upstream rule behind bigtrain's ``Monitor`` protocol
(bigtrain/spike.py): OLMo-core's skip-step rule (allenai/OLMo-core,
src/olmo_core/optim/skip_step_optimizer.py) and llm-foundry's KillLossSpike (mosaicml/llm-foundry,
llmfoundry/callbacks/kill_loss_spike_callback.py); docs/design.md sec. 2 compares them with bigtrain's.
They answer with the protocol's generic verdicts (``SKIP_UPDATE``: undo this one update; ``STOP``: end
the run), which the trainer handles without knowing who asked.

bigtrain does not ship them: a product does not import its benchmark (the benchmark would become part
of every install, and every rule change in it a product change). ``register()`` adds them to
``bigtrain.spike.MONITORS`` under the names the benchmark's configs use; ``bench/bench_entry.py`` calls
it before handing over to bigtrain's CLI.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from bigtrain.spike import OK, SKIP_UPDATE, STOP, SpikeConfig, Verdict, register_monitor

def _olmo_nonfinite(loss: float, nonfinite: bool, ds_skipped: bool) -> Verdict | None:
    """OLMo-core's trainer raises on a non-finite loss (src/olmo_core/train/trainer.py L1430-1436):
    the run ends (STOP), and a person restarts it (bench/spike_bench.py ``run_one``). Non-finite
    gradients that DeepSpeed skipped are DeepSpeed's business, not OLMo's."""
    if not math.isfinite(loss) or (nonfinite and not ds_skipped):
        return Verdict(STOP, f"non-finite loss {loss}: OLMo-core's trainer raises")
    if nonfinite:
        return Verdict(OK, "DeepSpeed skipped a non-finite step")
    return None


class OlmoSkipStepMonitor:
    """OLMo-core ``SkipStepOptimizer.get_step_factor`` (src/olmo_core/optim/skip_step_optimizer.py).

    Keeps the last 129 values (128 previous + current); no decision until 64 values including the
    current one (``len(self._losses) < max(20, 128 // 2)``); mean and unbiased std
    (``torch.std_mean``) of the previous values; skip iff ``loss - mu > 6 sigma`` or
    ``gnorm - mu > 6 sigma`` (one-sided). Every value enters the lists, flagged or not.
    Upstream does not checkpoint the lists (docs/design.md sec. 2); the state_dict here
    exists for the common interface, and a faithful benchmark does not restore it.
    """

    rolling_interval_length = 128
    sigma_factor = 6.0

    def __init__(self) -> None:
        self._losses: list[float] = []
        self._grad_norms: list[float] = []

    def observe(self, step: int, loss: float, grad_norm: float, nonfinite: bool = False,
                ds_skipped: bool = False) -> Verdict:
        bad = _olmo_nonfinite(loss, nonfinite, ds_skipped)
        if bad is not None:
            return bad
        keep = self.rolling_interval_length + 1
        self._losses = (self._losses + [loss])[-keep:]  # latest_loss setter
        if math.isfinite(grad_norm) and grad_norm > 0:  # latest_grad_norm setter (GradClipper)
            self._grad_norms = (self._grad_norms + [grad_norm])[-keep:]
        if len(self._losses) < max(20, self.rolling_interval_length // 2):
            return Verdict(OK, "warmup")
        prev = self._losses[:-1]
        mu, sd = statistics.fmean(prev), statistics.stdev(prev)
        stats = {"loss_mean": mu, "loss_std": sd}
        flagged = loss - mu > self.sigma_factor * sd
        severity = (loss - mu) / sd if sd > 0 else 0.0  # z-score of the loss
        # Upstream uses the grad rule whenever grad norms were set; std needs two previous values.
        if len(self._grad_norms) >= 3:
            prev_g = self._grad_norms[:-1]
            mu_g, sd_g = statistics.fmean(prev_g), statistics.stdev(prev_g)
            stats |= {"grad_mean": mu_g, "grad_std": sd_g}
            flagged = flagged or self._grad_norms[-1] - mu_g > self.sigma_factor * sd_g
        if flagged:
            return Verdict(SKIP_UPDATE, "loss or grad norm > mean + 6 sigma of last 128", step,
                           severity, stats)
        return Verdict(OK, "normal", stats=stats)

    def reset_pending(self) -> None:
        """Nothing is pending in a one-step rule."""

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses), "grad_norms": list(self._grad_norms)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Nothing: upstream keeps the lists in memory only, so a restarted run starts with none (and 64
        unprotected steps)."""


class KillLossSpikeMonitor:
    """llm-foundry ``KillLossSpike`` (llmfoundry/callbacks/kill_loss_spike_callback.py).

    ``window_size = max(100, round(0.05 * total_steps))``; nothing is checked until the window is
    full; outlier iff ``loss >= 2 * mean(window)``, stop when the outlier counter exceeds
    ``patience = 4`` (the 5th consecutive outlier); otherwise, after ``2 * window_size`` steps, stop
    when ``count(loss > loss_cap) >= window_size / 2`` with ``loss_cap = min(max(first full
    window), 10)``. Every loss is appended after the check, spikes included. Upstream reads the
    rank-local last-microbatch loss; here it gets the all-reduced one like every monitor.
    """

    patience = 4
    outlier_multiplier = 2.0

    def __init__(self, total_steps: int) -> None:
        self.window_size = max(100, round(0.05 * total_steps))  # _MIN_WINDOW_SIZE, _WINDOW_FRACTION
        self._window: deque[float] = deque(maxlen=self.window_size)
        self._outliers = 0
        self._seen = 0  # losses observed, standing in for Composer's state.timestamp.batch
        self._loss_cap = 10.0  # _MAX_LOSS_CAP
        self._cap_set = False

    def observe(self, step: int, loss: float, grad_norm: float, nonfinite: bool = False,
                ds_skipped: bool = False) -> Verdict:
        # Upstream has no non-finite rule: a NaN loss fails ``loss >= 2 x mean`` and enters the window,
        # whose mean is then NaN, so nothing is an outlier until it leaves the window (llm-foundry's
        # YAMLs add no NaN monitor: scripts/train/yamls/pretrain/mpt-7b.yaml). What DeepSpeed does with
        # the step is DeepSpeed's business.
        self._seen = max(self._seen + 1, step)  # Composer's batch count is restored on a resume
        verdict = Verdict(OK, "warmup" if len(self._window) < self.window_size else "normal")
        if len(self._window) == self.window_size:
            if not self._cap_set and self._seen == self.window_size:
                # Upstream sets the cap when state.timestamp.batch == window_size ("the maximum loss
                # from the first loss window"); a run restarted past that step keeps the default 10.
                self._loss_cap, self._cap_set = min(max(self._window), self._loss_cap), True
            mean = statistics.fmean(self._window)
            stats = {"window_mean": mean, "loss_cap": self._loss_cap}
            high = sum(1 for x in self._window if x > self._loss_cap)
            if loss >= mean * self.outlier_multiplier:
                self._outliers += 1
            else:
                self._outliers = 0
            if self._outliers > self.patience:  # _detect_loss_spike
                verdict = Verdict(STOP, f"loss >= 2x window mean for {self._outliers} steps",
                                  step - self._outliers + 1, loss / mean, stats)
            # `elif` upstream: the high-loss rule runs whenever the spike rule did not fire.
            elif self._seen >= 2 * self.window_size and high >= self.window_size / 2:
                verdict = Verdict(STOP, f"{high}/{self.window_size} losses above "
                                  f"{self._loss_cap:.4g}", None, float(high), stats)
        self._window.append(loss)
        return verdict

    def reset_pending(self) -> None:
        self._outliers = 0

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self._window), "outliers": self._outliers, "seen": self._seen,
                "loss_cap": self._loss_cap, "cap_set": self._cap_set}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Nothing: the callback defines no state_dict upstream (Composer's default is empty), so a
        restarted run fills a new window first (the batch count, Composer's, continues: ``observe``)."""


def register() -> None:
    """Make ``spike.monitor=olmo_skip_step`` and ``spike.monitor=llmfoundry_kill`` valid names."""
    register_monitor("olmo_skip_step", _olmo_skip_step)
    register_monitor("llmfoundry_kill", _llmfoundry_kill)


def _olmo_skip_step(cfg: SpikeConfig, total_steps: int) -> OlmoSkipStepMonitor:
    return OlmoSkipStepMonitor()  # upstream's constants; bigtrain's thresholds do not apply


def _llmfoundry_kill(cfg: SpikeConfig, total_steps: int) -> KillLossSpikeMonitor:
    return KillLossSpikeMonitor(total_steps)  # its window is a share of the run
