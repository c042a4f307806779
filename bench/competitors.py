"""The competitors' spike rules, reproduced so the spike benchmark runs them under bigtrain's trainer.

Four monitors, each a copy of an upstream rule behind bigtrain's ``Monitor`` protocol
(bigtrain/spike.py): OLMo-core's skip-step rule (allenai/OLMo-core,
src/olmo_core/optim/skip_step_optimizer.py), llm-foundry's KillLossSpike (mosaicml/llm-foundry,
llmfoundry/callbacks/kill_loss_spike_callback.py), Megatron-LM's rerun state machine checks
(NVIDIA/Megatron-LM, megatron/core/rerun_state_machine.py, pretrain_gpt.py) and PaLM's manual recipe
(Chowdhery et al. 2022, sec. 5.1); docs/design.md sec. 2 compares them with bigtrain's.
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


# A step Megatron's spiky-loss check flagged: logged, re-run once, and its update applied (the check
# is not fatal). The trainer does nothing with this verdict kind but log it in the step's row.
FLAGGED = "flagged"


class MegatronRerunMonitor:
    """Megatron-LM's loss checks (NVIDIA/Megatron-LM, read at d98e8a6).

    - NaN / Inf loss (``check_for_nan_in_loss_and_grad``, on by default, fatal): the step is re-run in
      place; a result that does not reproduce is a transient error and the job exits (code 17), one
      that does is checkpointed and the job exits (16) to be re-run elsewhere
      (megatron/core/rerun_state_machine.py ``validate_result``). Either way the job ends here (STOP)
      and the scheduler relaunches it from the newest checkpoint (bench/spike_bench.py ``run_one``).
    - Spiky loss (``--check-for-spiky-loss``, opt-in, enabled in this policy since without it the
      policy is plain training): ``is_unexpectedly_large`` (rerun_state_machine.py L698-763) records
      the max of the first 100 values, then rejects any value >= 10x that max (pretrain_gpt.py
      ``SPIKY_LOSS_FACTOR = 10``); the max is frozen after 100 values and NaN/Inf are ignored. The
      check is not fatal: the step is re-run once in place and its update applied (the rerun costs one
      forward/backward; not executed here, counted by the benchmark). The flag goes to the tracker
      file, and on the next launch the iterations flagged reproducibly are skipped
      (``get_skipped_iterations_from_tracker_file``; ``run_one`` passes them as ``train.skip_steps``).
    - Upstream checks each rank's per-microbatch summed loss; here the all-reduced mean, like every
      monitor (the ratio to the max is the same for a constant token count; a fault on one rank of R
      is diluted R-fold). The first iteration is not checked (L592-595). Upstream saves the max in its
      checkpoint only with ``ckpt_format == "torch_dist"``; this copy keeps it across a relaunch too.
    """

    num_samples = 100
    threshold = 10.0

    def __init__(self) -> None:
        self._max = 0.0
        self._seen = 0
        self._first = True

    def observe(self, step: int, loss: float, grad_norm: float, nonfinite: bool = False,
                ds_skipped: bool = False) -> Verdict:
        if not math.isfinite(loss):
            return Verdict(STOP, f"non-finite loss {loss}: Megatron's NaN check ends the job (exit 16/17)", step)
        if self._first:  # validation is skipped on the job's first iteration
            self._first = False
            return Verdict(OK, "first iteration")
        value = abs(loss)
        if self._seen < self.num_samples:
            self._seen += 1
            self._max = max(self._max, value)
            return Verdict(OK, "warmup", stats={"max": self._max})
        if value >= self._max * self.threshold:
            return Verdict(FLAGGED, f"loss >= {self.threshold:g}x the max of the first {self.num_samples}: "
                           "re-run, update applied, skipped on the next launch", step, value / self._max,
                           {"max": self._max})
        return Verdict(OK, "normal", stats={"max": self._max})

    def reset_pending(self) -> None:
        """Nothing is pending."""

    def state_dict(self) -> dict[str, Any]:
        return {"max": self._max, "seen": self._seen}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._max, self._seen = d["max"], d["seen"]
        self._first = True  # a relaunched job skips validation on its first iteration again


class PalmManualMonitor:
    """The person of PaLM's recipe (Chowdhery et al. 2022, "PaLM", sec. 5.1 "Training Instability"):
    "we re-started training from a checkpoint roughly 100 steps before the spike started, and skipped
    roughly 200-500 data batches, which cover the batches that were seen before and during the spike".
    The paper gives no detection rule, so the person stops the run at a spike by the definition this
    benchmark labels natural spikes with: loss > 1.5x the median of the previous 100 steps (after 20
    steps). Non-finite losses stop it too (a person sees a NaN). The restart itself (100 steps back,
    200 batches skipped) is ``run_one``'s. Nothing is kept across a restart: a person has no window."""

    window = 100
    factor = 1.5
    min_losses = 20

    def __init__(self) -> None:
        self._losses: deque[float] = deque(maxlen=self.window)

    def observe(self, step: int, loss: float, grad_norm: float, nonfinite: bool = False,
                ds_skipped: bool = False) -> Verdict:
        if not math.isfinite(loss):
            return Verdict(STOP, f"non-finite loss {loss}: the person restarts", step)
        verdict = Verdict(OK, "warmup" if len(self._losses) < self.min_losses else "normal")
        if len(self._losses) >= self.min_losses:
            median = statistics.median(self._losses)
            if loss > self.factor * median:
                verdict = Verdict(STOP, f"loss {loss:.4g} > {self.factor:g}x the median {median:.4g} of the last "
                                  f"{len(self._losses)} steps", step, loss / median, {"median": median})
        self._losses.append(loss)
        return verdict

    def reset_pending(self) -> None:
        """Nothing is pending."""

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Nothing: a restarted run starts with no window (the person looks at the new curve)."""


def register() -> None:
    """Make ``spike.monitor=`` ``olmo_skip_step``, ``llmfoundry_kill``, ``megatron_rerun`` and
    ``palm_manual`` valid names."""
    register_monitor("olmo_skip_step", _olmo_skip_step)
    register_monitor("llmfoundry_kill", _llmfoundry_kill)
    register_monitor("megatron_rerun", _megatron_rerun)
    register_monitor("palm_manual", _palm_manual)


def _olmo_skip_step(cfg: SpikeConfig, total_steps: int) -> OlmoSkipStepMonitor:
    return OlmoSkipStepMonitor()  # upstream's constants; bigtrain's thresholds do not apply


def _llmfoundry_kill(cfg: SpikeConfig, total_steps: int) -> KillLossSpikeMonitor:
    return KillLossSpikeMonitor(total_steps)  # its window is a share of the run


def _megatron_rerun(cfg: SpikeConfig, total_steps: int) -> MegatronRerunMonitor:
    return MegatronRerunMonitor()


def _palm_manual(cfg: SpikeConfig, total_steps: int) -> PalmManualMonitor:
    return PalmManualMonitor()
