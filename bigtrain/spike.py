"""Loss-spike detection and the escalation ladder that decides how to recover.

Everything here is pure Python (no torch, no I/O, no ranks, no clock, no randomness): the trainer
feeds each monitor the *globally reduced* loss, grad norm and flags once per step, so every rank
computes the same verdict and takes the same collective action. Detection is a small object with a
``state_dict``; recovery stays in the trainer's control flow (after OLMo-core's SkipStepOptimizer and
StabilityMonitorCallback).

Monitors are looked up by name in ``MONITORS`` (``spike.monitor``). Only bigtrain's own and "none" are
built in; the spike benchmark's reproductions of competitors' rules register themselves from outside
(bench/competitors.py), because a product that imported its benchmark would ship it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# Verdict kinds, the whole vocabulary a monitor can answer with; the trainer acts on the kind, not on
# which monitor gave it. SPIKE and INCIDENT mean "roll back"; SKIP_UPDATE means "undo this one update"
# (a one-step rule such as OLMo-core's skip-step optimizer); STOP means "end the run" (a kill rule such
# as llm-foundry's KillLossSpike). bigtrain's own SpikeMonitor gives only the first four.
OK, ANOMALOUS, SPIKE, INCIDENT = "ok", "anomalous", "spike", "incident"
SKIP_UPDATE, STOP = "skip_update", "stop"

# Consistency constant for the MAD: 1.4826 * MAD estimates sigma of a normal distribution.
_MAD_TO_SIGMA = 1.4826


@dataclass
class SpikeConfig:
    """Config section ``spike``: detection thresholds, escalation ladder and budgets."""

    enabled: bool = True
    """Watch for spikes at all. False behaves like monitor "none" (plain DeepSpeed)."""

    monitor: str = "bigtrain"
    """The detector, by registered name: "bigtrain" (robust detector, rollback + skip + escalation) or
    "none" (do nothing). Other monitors are added by a launch script that calls
    ``bigtrain.spike.register_monitor(name, factory)`` and then ``bigtrain.cli.main()``; the settings
    below belong to "bigtrain"."""

    window: int = 64
    """Accepted (non-anomalous) steps the median/MAD use. 64 is half of OLMo-core's 128: medians
    are robust, so fewer values suffice, and a shorter window follows a fast-falling loss."""

    warmup: int = 20
    """Accepted observations before any verdict other than non-finite (OLMo-core waits for 64,
    Lightning for 1). A median/MAD of 20 values is already stable; early loss falls too fast for a
    long baseline anyway."""

    z_threshold: float = 6.0
    """Robust z-score of log(value) against median/MAD above which a step is anomalous. 6 matches
    OLMo-core's 6 sigma; the log makes the rule scale-free (a 1% wiggle at loss 8 or 0.01)."""

    z_persist: float = 3.0
    """Lower z-score that marks a step anomalous for the persistence rule: ``patience`` steps in a
    row above 3 sigma happen by chance about (0.00135)^3 ~ 2.5e-9 of the time under Gaussian noise,
    so a sustained moderate jump (bad data on one rank of many) is caught without false alarms.
    Single-step (blow-up) verdicts still need ``z_threshold``."""

    min_loss_ratio: float = 1.1
    """An anomalous loss must also exceed the level by this factor: on a very flat curve the MAD
    is tiny and a z-score alone would flag harmless wiggles."""

    min_spike_loss: float = 1e-3
    """A loss below this is never anomalous, whatever its ratio to the level, and below it only a
    grad-norm blow-up (``grad_blowup_ratio`` x the run's max) counts: the research rule
    (docs/design.md sec. 3) is loss > max(1e-3, 10 x the recent minimum). Once a task is memorised,
    the relative noise of a tiny loss and grad norm is large and harmless, and rollbacks for it only
    spend the budget (docs/spike_benchmark.md, "Where the spike defaults come from").
    Language-model losses are far above it."""

    min_grad_ratio: float = 3.0
    """Same guard for the grad norm, which is far noisier than the loss (OPT/GLM logs show 2-3x
    grad-norm swings without any loss spike)."""

    mad_floor: float = 0.01
    """Lower bound on the scaled MAD in log space (about 1%), so z stays finite on a flat curve."""

    patience: int = 3
    """Consecutive anomalous steps that make a spike: one hard batch is not a spike (GLM-130B saw
    benign self-recovering spikes). llm-foundry uses 5 consecutive steps; 3 reacts sooner."""

    grad_blowup_ratio: float = 10.0
    """Grad norm this many times the largest accepted one of the run (and z above threshold) is a
    spike at once: Megatron-LM's large-grad check is 10x the max of its first 100 values
    (rerun_state_machine.is_unexpectedly_large), a catastrophe detector. The reference is the run's
    largest, not the median (a grad norm that climbs while the loss falls fast is learning, not a
    blow-up) nor a recent window (once a task is memorised its grad norm decays by orders of
    magnitude, and ordinary bursts would look like blow-ups; docs/spike_benchmark.md). Moderate grad
    anomalies still count through the persistence rule."""

    loss_blowup_ratio: float = 4.0
    """Loss this many times the median (and z above threshold) is a spike at once: waiting for
    `patience` steps of a 4x loss lets Adam's moments absorb the burst (the 10-50x spikes of
    docs/design.md sec. 3 are caught on their first step)."""

    max_ds_skipped_run: int = 5
    """Consecutive steps DeepSpeed itself skipped (fp16 overflow, bf16 non-finite grads) that count
    as an incident. Isolated skips are normal dynamic loss scaling; a run of them means the model
    produces non-finite gradients whatever the scale."""

    skip_margin_batches: int = 16
    """Extra global batches skipped beyond the spike, converted to samples at the current batch size.
    Bad data comes in blocks (PaLM skipped 200-500 batches after rewinding ~100 steps, i.e. 100-400
    past the spike; OLMo 2 traced spikes to runs of repeated n-gram documents), and a spike is
    detected at the block's first batch, not its last. Skipping costs no compute (the step count is
    unchanged), only those samples go unseen. A margin shorter than a bad block lets its tail cause
    a second rollback, which escalates and cuts the LR for nothing (docs/spike_benchmark.md).
    0 skips exactly the restored-position-to-spike window."""

    eps_factor: float = 0.1
    """Adam eps multiplier on each rollback when `lower_eps` (Wortsman et al. 2023, OLMo 2: smaller
    eps limits the uncorrelated large updates of Molybog et al. 2023)."""

    eps_floor: float = 1e-15
    """Smallest eps ever set: 1e-15 is the lowest value Wortsman et al. 2023 report as stable."""

    lower_eps: bool = True
    """Lower eps on rollback. A measured lever, not a cure: docs/design.md sec. 3 saw no change in
    spike count for eps in 1e-15..1e-6, so it is cheap to turn off."""

    lr_factor: float = 1.0
    """LR multiplier applied on every rollback (1.0 = off, PaLM changed nothing). GLM-130B and OPT
    lowered the LR by hand."""

    lr_floor_scale: float = 0.01
    """Never scale the LR below this fraction of the schedule: halving on every rollback without a
    floor drives the LR towards zero and stalls training (docs/design.md sec. 3)."""

    lr_cooldown_steps: int = 200
    """A lowered LR returns linearly to the schedule over this many steps after the rollback (a
    cool-down, not a permanent cut); 0 keeps it lowered for the rest of the run. A cut that is never
    undone keeps costing held-out loss long after the spike is gone (docs/spike_benchmark.md)."""

    region_steps: int = 200
    """A spike whose onset lies within this many steps of the previous rollback's onset is "the
    same region" and escalates: optimizer-driven spikes came back 100-250 steps after each
    rollback in docs/design.md sec. 3."""

    max_rollbacks: int = 10
    """Rollbacks allowed with onsets within ``region_steps`` steps of each other before stopping
    with a report: that many in one stretch means the run is not getting past it. A cap per run
    would end healthy long runs, which meet spikes throughout while their loss keeps falling (PaLM
    met ~20 in one run; docs/spike_benchmark.md)."""

    max_wasted_fraction: float = 0.5
    """Stop when steps discarded by rollbacks exceed this share of all steps run (counted over at
    least ``region_steps`` steps, so an incident early in the run rolls back like any other): plain
    rewind-and-skip can discard most of the compute on optimizer-driven spikes (docs/design.md
    sec. 3)."""

    escalate_lr_factor: float = 0.5
    """Extra LR multiplier from escalation level 1 on: a recurring spike in the same region is
    optimizer dynamics, not data, and a lower LR gave the lowest final loss (docs/design.md sec. 3)."""

    escalate_beta2: float | None = 0.95
    """Adam beta2 set from escalation level 2 on if the current one is larger (OPT went 0.98 ->
    0.95; a larger beta2 brings spikes earlier and more often, docs/design.md sec. 3). None leaves
    beta2 alone."""

    max_skip_multiplier: int = 16
    """Cap on the widening of the skipped data window (1, 2, 4, ...) so escalation cannot skip an
    unbounded share of the data."""

    data_repeat_window: bool = True
    """A data rollback whose onset follows the previous data rollback's within ``region_steps``
    also skips a stream window from the restored position, as an optimizer rollback does (1, 2, 4,
    ... x the rolled-back steps' samples, plus ``skip_margin_batches``), besides the samples it
    convicts. A data rollback skips only the outliers it saw, the samples of the few steps before the
    detection; a bad block longer than that brings the next rollback a few steps later, and a
    100-batch block spent the whole rollback budget that way (docs/spike_benchmark.md, V3). A
    second data rollback in a region is the evidence that the bad stretch goes on past what was
    seen; the window's good samples are skipped for that one pass only. False: a data rollback
    skips by sample id only."""

    sample_window: int = 256
    """Per-sample losses (summed token loss / label count of each sample) of recent accepted steps that
    the attribution's median/MAD use: at a global batch of 16 that is the last 16 steps, at 1,024 a
    quarter of the last step. Short, so the reference follows a falling loss: a long window holds
    older, higher losses that widen the spread and hide outliers."""

    sample_z: float = 3.0
    """Robust z-score of a sample's log loss against that median/MAD above which the sample is an
    outlier. Per-sample losses spread far more than step losses but with a light upper tail, and
    random-token garbage sits at ~ln(vocab): 1.5x the median with a 257-token vocab, ~3x with a 32k
    one, so 3 sigma separates it (measurements: docs/spike_benchmark.md)."""

    sample_min_ratio: float = 1.25
    """An outlier sample's loss must also be at least this multiple of the recent median sample's."""

    sample_alpha: float = 0.05
    """Family-wise false-alarm rate of the outlier test: with n samples tested, the z bar is
    ``max(sample_z, Phi^-1(1 - sample_alpha / n))`` (Bonferroni), so a global batch of 1,024 needs
    z ~3.9 where one of 16 needs ``sample_z``. A fixed bar flags ~n x 0.13% clean samples of a normal
    spread (more of a heavy-tailed one) in every spike, so a large batch would always convict some."""

    max_convicted_blocks: int = 65_536
    """Absolute cap on the blocks one rollback skips as whole documents (each document is also held to
    ``max_document_share``); documents past it lose only their flagged blocks. Bounds what one
    rollback adds to the checkpointed id set (~10 bytes per id in bigtrain_state.json): 2% of a
    10^9-block corpus would be 2e7 ids."""

    max_document_share: float = 0.02
    """A document convicted by an outlier sample is skipped whole (every block, in every epoch) only
    if its blocks are at most this share of the training blocks; a larger one loses only its flagged
    blocks. What a wrong conviction costs is the share of the corpus it removes, so the bound is a
    share: a 800-block book in 10^9 blocks may go, a file that is half of a small corpus may not.
    0.02 is the value that convicted nearly all injected bad documents in the diluted benchmark's
    tuning run (docs/spike_benchmark.md). 1.0: no limit."""

    rescore: bool = True
    """After the rollback's load, score the spiked steps' samples again with the restored weights
    (forward only, each rank scoring its neighbour's samples) and attribute on both: a sample is bad
    data only if the healthy weights also find it out of line, and the other samples are judged as the
    healthy weights score them, not as the bad updates left them. Costs the suspects' forward passes
    once per rollback. False: judge on the spiked steps' losses alone."""

    noise_fraction: float = 0.95
    """Screen of every step that is not rolled back: a sample whose mean token loss is at least this
    fraction of ln(vocab) - a uniform guess over the tokenizer's vocabulary - (and
    ``noise_min_ratio`` x the recent median sample) is a noise candidate (:func:`noise_samples`);
    with tokens as varied as uniform draws (``noise_min_distinct``) it is noise, and it and its
    documents are skipped from then on, without a rollback. Token ids drawn uniformly from the
    vocabulary score at least ln(vocab) under any model (cross-entropy >= entropy), and a model that
    has learned anything scores text well below it; so such garbage is caught even when it is too
    thin to spike a step. Only that kind: garbage a model can partly predict (repeated boilerplate,
    shuffled text, byte-fallback tokens of binary content, which use a few hundred ids) passes here
    and is left to the spike rules. 0.95 keeps a margin over a sample's own chance fluctuation
    around ln(vocab); text scored at most 0.87 ln(vocab) from step 30 on in one tuning run of the
    diluted benchmark (vocab 257, 63 labelled tokens a sample). 0 turns it off."""

    noise_min_tokens: int = 48
    """Samples with fewer labelled tokens are not screened: the mean loss of a short completion can be
    one surprising token (a new special token at ~10 nats is a uniform guess over 32k tokens), and
    short spans of text repeat no token, so the distinct-token test cannot tell them from noise.
    Over 48 tokens one or two surprising tokens move the mean little."""

    noise_max_blocks: int = 4096
    """Blocks one screen skips as whole documents (documents past it lose only their noise blocks, and
    each is also held to ``max_document_share``): what one step can add to the checkpointed id set."""

    noise_max_total_blocks: int = 1_000_000
    """When the screens together have skipped this many blocks, the screen turns itself off for the
    rest of the run (a ``screen_off`` event and a warning; the spike rules go on). A bound on cost:
    every skipped id is checkpointed (10^6 ids are ~11 MB of bigtrain_state.json) and each screen
    that skips something re-sorts them all (1.7 s at 10^6 ids on a busy 2-core box)."""

    noise_min_ratio: float = 1.5
    """The screen also needs a noise sample at this multiple of the recent median sample's loss, so it
    stays quiet while the model is still near a uniform guess on everything (the first steps)."""

    noise_min_distinct: float = 0.75
    """The screen's second test: a noise sample's tokens must also be as varied as uniform draws, at
    least this share of the distinct tokens T draws from the vocabulary would give on average
    (V (1 - (1 - 1/V)^T); 57 of 64 with 257 tokens). A model can score worse than a uniform guess on
    text it gets confidently wrong - a line of 63 slashes scored 1.12 ln(vocab) at step 114 of the
    tuning run - but such text repeats a few tokens; uniform noise does not."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"spike.{name} must be {rule}, got {getattr(self, name)!r}")

        if self.monitor not in MONITORS:
            raise ValueError(
                f"spike.monitor must be a registered monitor ({', '.join(sorted(MONITORS))}), got "
                f"{self.monitor!r}: a monitor from outside bigtrain is registered by a launch script that "
                "calls bigtrain.spike.register_monitor(name, factory) and then bigtrain.cli.main() "
                "(the repository's bench/bench_entry.py does so for the spike benchmark's competitors)")
        need(self.window >= 8, "window", ">= 8")
        need(4 <= self.warmup <= self.window, "warmup", "between 4 and spike.window")
        need(self.z_threshold > 0, "z_threshold", "> 0")
        need(0 < self.z_persist <= self.z_threshold, "z_persist", "in (0, spike.z_threshold]")
        need(self.min_loss_ratio >= 1.0, "min_loss_ratio", ">= 1.0")
        need(self.min_grad_ratio >= 1.0, "min_grad_ratio", ">= 1.0")
        need(self.mad_floor > 0, "mad_floor", "> 0")
        need(self.patience >= 1, "patience", ">= 1")
        need(self.grad_blowup_ratio >= self.min_grad_ratio, "grad_blowup_ratio",
             ">= spike.min_grad_ratio")
        need(self.loss_blowup_ratio >= self.min_loss_ratio, "loss_blowup_ratio",
             ">= spike.min_loss_ratio")
        need(self.max_ds_skipped_run >= 1, "max_ds_skipped_run", ">= 1")
        need(self.min_spike_loss >= 0, "min_spike_loss", ">= 0")
        need(self.skip_margin_batches >= 0, "skip_margin_batches", ">= 0")
        need(0 < self.eps_factor <= 1, "eps_factor", "in (0, 1]")
        need(self.eps_floor > 0, "eps_floor", "> 0 (eps = 0 divides by zero where v = 0)")
        need(0 < self.lr_factor <= 1, "lr_factor", "in (0, 1]")
        need(0 < self.lr_floor_scale <= 1, "lr_floor_scale", "in (0, 1]")
        need(self.lr_cooldown_steps >= 0, "lr_cooldown_steps", ">= 0")
        need(self.region_steps >= 0, "region_steps", ">= 0")
        need(self.max_rollbacks >= 0, "max_rollbacks", ">= 0")
        need(0 < self.max_wasted_fraction <= 1, "max_wasted_fraction", "in (0, 1]")
        need(0 < self.escalate_lr_factor <= 1, "escalate_lr_factor", "in (0, 1]")
        need(self.escalate_beta2 is None or 0 < self.escalate_beta2 < 1, "escalate_beta2",
             "None or in (0, 1)")
        need(self.max_skip_multiplier >= 1, "max_skip_multiplier", ">= 1")
        need(self.sample_window >= 16, "sample_window", ">= 16")
        need(0 < self.max_document_share <= 1, "max_document_share", "in (0, 1]")
        need(self.sample_z > 0, "sample_z", "> 0")
        need(self.sample_min_ratio >= 1.0, "sample_min_ratio", ">= 1.0")
        need(0 < self.sample_alpha < 1, "sample_alpha", "in (0, 1)")
        need(self.max_convicted_blocks >= 1, "max_convicted_blocks", ">= 1")
        need(0 <= self.noise_fraction, "noise_fraction", ">= 0 (0: no noise screen)")
        need(self.noise_min_ratio >= 1.0, "noise_min_ratio", ">= 1.0")
        need(0 <= self.noise_min_distinct <= 1, "noise_min_distinct", "in [0, 1]")
        need(self.noise_min_tokens >= 1, "noise_min_tokens", ">= 1")
        need(self.noise_max_blocks >= 1, "noise_max_blocks", ">= 1")
        need(self.noise_max_total_blocks >= 1, "noise_max_total_blocks", ">= 1")


@dataclass(frozen=True)
class Verdict:
    """What a monitor concluded about one step; ``stats`` holds JSON-safe floats for the log."""

    kind: str
    reason: str
    onset_step: int | None = None
    severity: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def recover(self) -> bool:
        """True when the trainer must roll back (bigtrain's spike or incident)."""
        return self.kind in (SPIKE, INCIDENT)


class Monitor(Protocol):
    """The seam the trainer uses: SpikeMonitor and NullMonitor satisfy it, and so must any monitor
    added with :func:`register_monitor`. ``observe`` gets only globally reduced values and must be
    deterministic, so every rank reaches the same verdict and takes the same collective action; ``state_dict`` travels in
    every checkpoint and is restored on resume and rollback."""

    def observe(self, step: int, loss: float, grad_norm: float, nonfinite: bool = False,
                ds_skipped: bool = False) -> Verdict: ...

    def reset_pending(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


# The level is the median of the newest accepted values only, so it follows a falling loss.
_LEVEL_WINDOW = 8


def _median_mad(xs: deque[float] | list[float], floor: float) -> tuple[float, float]:
    """Robust level and noise of a (log) series that may be trending.

    Level: median of the last ``_LEVEL_WINDOW`` values. Noise: MAD of successive differences over the
    whole window, / sqrt(2) (the differences of i.i.d. noise have sqrt(2) x its spread). Differencing
    removes the trend, so early in training - loss falling fast - the noise estimate is the
    step-to-step jitter, not the slope; a plain MAD around the window median counts the slope as
    noise and misses moderate jumps of a few bad steps.
    """
    xs = list(xs)
    level = statistics.median(xs[-_LEVEL_WINDOW:])
    diffs = [b - a for a, b in zip(xs, xs[1:])]
    if not diffs:
        return level, floor
    d_med = statistics.median(diffs)
    mad = _MAD_TO_SIGMA * statistics.median([abs(d - d_med) for d in diffs]) / math.sqrt(2)
    return level, max(mad, floor)


class SpikeMonitor:
    """bigtrain's detector: robust z-scores of log loss / log grad norm, severity plus persistence.

    Unlike OLMo-core and llm-foundry, values flagged anomalous never enter the baseline
    (docs/design.md sec. 2), and the whole state is checkpointed.
    """

    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self._loss: deque[float] = deque(maxlen=cfg.window)  # log(loss) of accepted steps
        self._grad: deque[float] = deque(maxlen=cfg.window)  # log(grad_norm) of accepted steps
        self._grad_max = -math.inf  # largest accepted log(grad_norm) of the run
        self._pending: list[int] = []  # steps of the current run of anomalous steps
        self._pending_severity = 0.0
        self._ds_run = 0  # consecutive steps DeepSpeed skipped
        # Per-sample reference for attribution; restored with the monitor on rollback and resume.
        self.samples = SampleLosses(cfg.sample_window)

    def observe(self, step: int, loss: float, grad_norm: float, nonfinite: bool = False,
                ds_skipped: bool = False) -> Verdict:
        """Classify one step from globally reduced values; updates the baseline if accepted.

        ``nonfinite``: the all-reduced "grads or loss not finite" flag. ``ds_skipped``: DeepSpeed
        did not apply the update (``not engine.was_step_applied()``). A non-positive or non-finite
        ``grad_norm`` with ``nonfinite=False`` means "unknown" and disables the grad rule.
        """
        cfg = self.cfg
        if not math.isfinite(loss):
            # A NaN/Inf loss comes from the forward pass, which no loss scale can excuse.
            return self._fire(INCIDENT, f"non-finite loss {loss}", step, math.inf, {})
        if ds_skipped:
            # fp16 overflow / bf16 non-finite grads: DeepSpeed already dropped the update on all
            # ranks (runtime/engine.py check_overflow). Not baseline data; only a run counts.
            self._ds_run += 1
            if self._ds_run >= cfg.max_ds_skipped_run:
                run = self._ds_run
                return self._fire(INCIDENT, f"DeepSpeed skipped {run} consecutive steps",
                                  step - run + 1, float(run), {})
            return Verdict(OK, f"DeepSpeed skipped the step ({self._ds_run} in a row)")
        self._ds_run = 0
        if nonfinite:
            # Non-finite grads that DeepSpeed did not skip have reached the weights.
            return self._fire(INCIDENT, "non-finite gradients applied", step, math.inf, {})
        if loss <= 0:
            return Verdict(OK, "non-positive loss carries no signal for a log-scale detector")

        log_loss = math.log(loss)
        has_grad = math.isfinite(grad_norm) and grad_norm > 0
        log_grad = math.log(grad_norm) if has_grad else 0.0
        if len(self._loss) < cfg.warmup:
            self._accept(log_loss, log_grad, has_grad)
            return Verdict(OK, "warmup", stats={"accepted": float(len(self._loss))})

        med_l, mad_l = _median_mad(self._loss, cfg.mad_floor)
        z_l, ratio_l = (log_loss - med_l) / mad_l, math.exp(log_loss - med_l)
        stats = {"log_loss_median": med_l, "log_loss_mad": mad_l, "loss_z": z_l,
                 "loss_ratio": ratio_l}
        loss_anom = z_l > cfg.z_persist and ratio_l > cfg.min_loss_ratio and loss >= cfg.min_spike_loss
        grad_anom, grad_blowup, ratio_g, z_g = False, False, 0.0, 0.0
        if has_grad and len(self._grad) >= cfg.warmup:
            med_g, mad_g = _median_mad(self._grad, cfg.mad_floor)
            z_g, ratio_g = (log_grad - med_g) / mad_g, math.exp(log_grad - med_g)
            ratio_max = math.exp(log_grad - self._grad_max)
            stats |= {"log_grad_median": med_g, "log_grad_mad": mad_g, "grad_z": z_g,
                      "grad_ratio": ratio_g}
            grad_anom = z_g > cfg.z_persist and ratio_g > cfg.min_grad_ratio
            # Megatron-LM's rule: against the largest grad norm of the run, not the median or a
            # recent window (a grad norm that climbs during fast learning is not a blow-up, nor
            # is a burst to 0.02 once a memorised task's grad norm has decayed to 1e-4).
            grad_blowup = grad_anom and z_g > cfg.z_threshold and ratio_max >= cfg.grad_blowup_ratio
            if loss < cfg.min_spike_loss:
                # Memorised (loss under the floor): tiny grad norms swing wildly relative to their
                # median; only a blow-up counts.
                grad_anom = grad_blowup

        if not (loss_anom or grad_anom):
            self._pending, self._pending_severity = [], 0.0  # a normal step ends the run
            self._accept(log_loss, log_grad, has_grad)
            return Verdict(OK, "normal", stats=stats)

        # Anomalous: never accepted, so the spike cannot inflate its own baseline.
        severity = max(ratio_l if loss_anom else 0.0, ratio_g if grad_anom else 0.0)
        self._pending.append(step)
        self._pending_severity = max(self._pending_severity, severity)
        onset = self._pending[0]
        if loss_anom and z_l > cfg.z_threshold and ratio_l >= cfg.loss_blowup_ratio:
            return self._fire(SPIKE, f"loss blow-up {ratio_l:.2f}x median", onset, ratio_l, stats)
        if grad_blowup:
            return self._fire(SPIKE, f"grad-norm blow-up {ratio_max:.2f}x the run's max", onset, ratio_g,
                              stats)
        if len(self._pending) >= cfg.patience:
            return self._fire(SPIKE, f"{len(self._pending)} consecutive anomalous steps",
                              onset, self._pending_severity, stats)
        what = "loss" if loss_anom else "grad norm"
        return Verdict(ANOMALOUS, f"anomalous {what} ({len(self._pending)}/{cfg.patience})",
                       onset, severity, stats)

    def _accept(self, log_loss: float, log_grad: float, has_grad: bool) -> None:
        self._loss.append(log_loss)
        if has_grad:
            self._grad.append(log_grad)
            self._grad_max = max(self._grad_max, log_grad)

    def loss_band(self) -> float | None:
        """The highest step loss this monitor calls normal now (the loss rule's bar: z ``z_persist``
        or ratio ``min_loss_ratio``, whichever is wider); None in warm-up. Anomalous steps never enter
        the baseline, so after a spike this is still the pre-spike band."""
        if len(self._loss) < self.cfg.warmup:
            return None
        med, mad = _median_mad(self._loss, self.cfg.mad_floor)
        return math.exp(med + max(self.cfg.z_persist * mad, math.log(self.cfg.min_loss_ratio)))

    def _fire(self, kind: str, reason: str, onset: int, severity: float,
              stats: dict[str, float]) -> Verdict:
        # Re-arm: the trainer recovers now, so the next spike must build its own evidence. The
        # per-sample suspects stay until the trainer has attributed the spike (then reset_pending).
        self._pending, self._pending_severity, self._ds_run = [], 0.0, 0
        # JSON cannot hold inf; report non-finite severity as a large finite number.
        return Verdict(kind, reason, onset, severity if math.isfinite(severity) else 1e30, stats)

    def reset_pending(self) -> None:
        """Forget the in-progress anomalous run and DeepSpeed-skip run (call after a rollback)."""
        self._pending, self._pending_severity, self._ds_run = [], 0.0, 0
        self.samples.reset_pending()

    def state_dict(self) -> dict[str, Any]:
        return {"log_loss": list(self._loss), "log_grad": list(self._grad),
                "pending": list(self._pending), "pending_severity": self._pending_severity,
                "ds_run": self._ds_run, "log_grad_max": self._grad_max if self._grad else None,
                "samples": self.samples.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        # maxlen keeps only the newest values if the window was shrunk between runs.
        self._loss = deque((float(x) for x in d["log_loss"]), maxlen=self.cfg.window)
        self._grad = deque((float(x) for x in d["log_grad"]), maxlen=self.cfg.window)
        self._pending = [int(s) for s in d["pending"]]
        self._pending_severity = float(d["pending_severity"])
        self._ds_run = int(d["ds_run"])
        grad_max = d.get("log_grad_max")  # absent in checkpoints of bigtrain <= 0.1: the window's
        self._grad_max = float(grad_max) if grad_max is not None else max(self._grad, default=-math.inf)
        self.samples.load_state_dict(d.get("samples", {}))  # absent before per-sample losses existed


class NullMonitor:
    """``spike.monitor=none``, plain DeepSpeed: no detector. Non-finite steps are left to DeepSpeed's
    own overflow skip."""

    def observe(self, step: int, loss: float, grad_norm: float, nonfinite: bool = False,
                ds_skipped: bool = False) -> Verdict:
        return Verdict(OK, "no monitor")

    def reset_pending(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass


MonitorFactory = Callable[[SpikeConfig, int], Monitor]
"""Builds a monitor from the ``spike`` section and the run's total steps (a window may be sized by it)."""

# Monitors by name, for ``spike.monitor``. A monitor from outside bigtrain (the spike benchmark's
# competitor rules, a user's own detector) is added with register_monitor by a launch script before
# it calls bigtrain.cli.main(): bigtrain never imports them, so the product carries no benchmark code
# and this module keeps its rule of no imports beyond the standard library.
MONITORS: dict[str, MonitorFactory] = {
    "bigtrain": lambda cfg, total_steps: SpikeMonitor(cfg),
    "none": lambda cfg, total_steps: NullMonitor(),
}


def register_monitor(name: str, factory: MonitorFactory) -> None:
    """Make ``spike.monitor=name`` build ``factory(spike_config, total_steps)``. Call it on every rank
    before the config is parsed (a script that registers, then runs ``bigtrain.cli.main()``), since
    validating ``spike.monitor`` looks the name up here. Registering the same factory again is a no-op;
    another factory under a taken name is refused, so two plug-ins cannot silently replace each other."""
    if MONITORS.get(name, factory) is not factory:
        raise ValueError(f"spike.monitor {name!r} is already registered")
    MONITORS[name] = factory


def build_monitor(cfg: SpikeConfig, total_steps: int) -> Monitor:
    """The monitor registered as ``cfg.monitor``; ``spike.enabled=false`` is "none" whatever the name."""
    if not cfg.enabled:
        return NullMonitor()
    return MONITORS[cfg.monitor](cfg, total_steps)


# Causes of a recovery (spike.attribute): they pick the medicine (Escalation.decide).
DATA, OPTIMIZER, CAUSE_INCIDENT, NOISE = "data", "optimizer", "incident", "noise"
# Reference values needed before samples are judged at all (non-finite ones are always outliers).
_MIN_REFERENCE = 32
# Control samples needed before the restored weights' soundness is judged by them.
_MIN_CONTROL = 8


@dataclass(frozen=True)
class Attribution:
    """Which samples of the spiked steps stand out, and what that says about the cause."""

    cause: str
    """DATA: outliers explain the spike (the other samples sit at the usual level); OPTIMIZER: no
    sample stands out, or every sample rose; CAUSE_INCIDENT: the step was non-finite."""
    outliers: list[int]
    """Positions (into the per-sample lists given) of the offending samples."""
    stats: dict[str, float]
    rank_aligned: bool = False
    """The outliers are exactly every sample of some ranks: what a fault of those ranks (silent data
    corruption) looks like, as well as bad data on them. Their samples are skipped, but their
    documents are not convicted on this evidence alone."""


def _log_losses(sums: list[float], counts: list[float]) -> list[float | None]:
    """Log mean token loss of each sample (None: no labelled token; inf: non-finite)."""
    logs: list[float | None] = []
    for s, c in zip(sums, counts):
        x = s / c if c > 0 else None
        logs.append(None if x is None else math.inf if not math.isfinite(x) else math.log(max(x, 1e-30)))
    return logs


def attribute(sums: list[float], counts: list[float], reference: tuple[float, float] | None, cfg: SpikeConfig,
              incident: bool = False, per_rank: int = 0, band: float | None = None,
              rescored: list[float] | None = None,
              control: tuple[list[float], list[float], float] | None = None) -> Attribution:
    """Find the samples that caused a spike. Pure and cheap (milliseconds for thousands of samples).

    ``sums``/``counts``: each sample's summed token loss and label count over the steps from the
    spike's onset to the spike; ``reference``: (level, sigma) of the log per-sample loss of recent
    accepted samples (:meth:`SampleLosses.reference`), None while there are too few to judge;
    ``band``: the highest step loss the monitor calls normal (:meth:`SpikeMonitor.loss_band`);
    ``rescored``: the same samples' loss sums again, computed by the restored model (the state before
    the onset, whose own losses the monitor accepted) on other ranks (:func:`bigtrain.recovery.rescore`);
    ``control``: (loss sums, label counts, level) the same restored weights gave samples they were
    trained on just before (:func:`bigtrain.recovery.control_ids`), and the log per-sample level the
    monitor saw then: the check that those weights are sound.

    A sample is an outlier when its loss is non-finite, or when its log loss lies more than
    ``z_n = max(cfg.sample_z, Phi^-1(1 - cfg.sample_alpha / n))`` sigmas above the level for n samples
    tested (Bonferroni: the bar grows with the batch, so the clean tail of 1,024 samples does not stand
    out by chance) *and* it is at least ``cfg.sample_min_ratio`` x the level. The spike is explained by
    data only when all of these hold:
    - there are outliers, and the median of the remaining samples rose by less than ``cfg.min_loss_ratio``
      (bad documents raise their own losses, an optimizer blow-up raises everyone's);
    - the loss of all the suspects is above ``band`` (the loss spiked: a spike on grad norm alone, with
      step losses inside the band, is never data), and the loss of the remaining samples is inside it
      (the outliers explain the spike: a heavy tail of an optimizer spike, whose bulk also rose, does not).
    With no remaining sample (all stand out) the cause is OPTIMIZER, unless the rescore below shows it.

    With ``rescored``, the judgement uses what the healthy weights say, as Megatron-LM reruns a step
    to tell a transient fault from a persistent one: a sample is an outlier only if it stands out in
    both, "the remaining samples" are judged by their rescored losses, and the suspects' loss must be
    above ``band`` under the healthy weights too (the outliers alone lift it there: a blow-up with a
    few naturally hard samples does not). So the updates of the bad steps, which raise every sample's
    loss after the onset, no longer hide data behind a risen median, and a blow-up of the optimizer or
    of one rank's arithmetic leaves no outlier (the healthy weights score those samples as usual, on
    another rank). The rescored losses are judged against the level of the restored weights' own
    time (``control[2]``; the bar, the rest's rise and the band move with it), so weights restored
    from when the loss was higher do not make every suspect an outlier.

    A restored state that is itself damaged would score everything high, and DATA bans every outlier
    for good, so the restored weights are trusted as a judge only when the ``control`` (at least
    ``_MIN_CONTROL`` samples) shows them sound: its median under ``cfg.min_loss_ratio`` x the level of
    its time (stats ``control_ratio``), and its share of outliers (above the same bar) at most half the
    suspects' (stats ``control_outlier_share``: damage that hits some inputs, or one faulty rank whose
    arithmetic scored its neighbour's slice, makes the control stand out as much as the suspects;
    bad data stands out only in the suspects). Then every suspect may stand out (a whole batch of
    garbage is data, its documents convicted). Without a control, more than half the samples
    standing out stays OPTIMIZER. With a trusted rescore, an outlier set that is exactly some ranks'
    samples is not ``rank_aligned``: other ranks' arithmetic scored them high too.
    When most samples are non-finite the model state is broken (corrupted weights), not the data: no
    sample is an outlier (stats ``nonfinite_share``) and the recovery only rewinds.
    ``per_rank``: samples per rank per step (the lists are steps of whole global batches, rank-major),
    to recognise rank-aligned outliers; only at ``per_rank >= 4``: with one or two samples per rank
    every outlier is trivially "all of its rank's samples".
    """
    logs = _log_losses(sums, counts)
    again = _log_losses(rescored, counts) if rescored is not None else None
    tested = [x for x in logs if x is not None]
    stats: dict[str, float] = {"samples": float(len(sums))}
    bar = math.inf
    if reference is not None:
        level, sigma = reference
        z_n = max(cfg.sample_z, statistics.NormalDist().inv_cdf(1 - cfg.sample_alpha / max(1, len(tested))))
        bar = max(level + z_n * sigma, level + math.log(cfg.sample_min_ratio))
        stats |= {"ref_level_loss": math.exp(level), "ref_sigma_log": sigma, "outlier_z": z_n,
                  "outlier_above_loss": math.exp(min(bar, 700.0))}  # exp overflows past ~709
    nonfinite = sum(1 for x in tested if x == math.inf)
    stats["nonfinite_share"] = nonfinite / max(1, len(tested))

    # The restored weights are judged against the level of their own time (``control[2]``, what the
    # monitor saw when they were current): restored from when the loss was higher, they score every
    # sample higher, which is no outlier. ``shift`` is 0 without a control.
    shift = control[2] - level if control is not None and reference is not None else 0.0

    def high(xs: list[float | None], i: int, above: float = 0.0) -> bool:
        return xs[i] is not None and (xs[i] == math.inf or xs[i] > bar + above)

    if nonfinite * 2 > len(tested):
        outliers = []  # the model, not the data: see the docstring
    else:
        outliers = [i for i in range(len(logs)) if high(logs, i) and (again is None or high(again, i, shift))]
    flagged = set(outliers)
    judged = logs if again is None else again  # the remaining samples, as the healthy weights score them
    base = level + shift if again is not None and reference is not None else None  # their usual level
    rest = [x for i, x in enumerate(judged) if x is not None and i not in flagged]
    explained = False
    if again is not None:
        stats |= {"rescored": 1.0, "transient_outliers": float(sum(1 for i in range(len(logs)) if high(logs, i)
                                                                     and i not in flagged))}
    sound = None  # can the restored weights judge? (see the docstring)
    usual = [x for x in _log_losses(*control[:2]) if x is not None] if control is not None else []
    if reference is not None and len(usual) >= _MIN_CONTROL:
        stray = sum(1 for x in usual if x == math.inf or x > bar + shift) / len(usual)
        stats |= {"control_ratio": math.exp(min(statistics.median(usual) - control[2], 700.0)),
                  "control_outlier_share": stray}
        sound = (stats["control_ratio"] < cfg.min_loss_ratio
                 and stray <= 0.5 * len(outliers) / max(1, len(tested)))
    trusted = sound if sound is not None else again is None or 2 * len(outliers) <= len(tested)
    if reference is not None and outliers and trusted and (rest or sound):
        explained = True
        if rest:
            rise = statistics.median(rest) - (level if base is None else base)
            stats["rest_median_ratio"] = math.exp(rise)
            explained = rise < math.log(cfg.min_loss_ratio)
        if band is None:
            explained = False
        else:
            def mean_loss(values, idx):
                c = sum(counts[i] for i in idx)
                return sum(values[i] for i in idx) / c if c > 0 else math.inf
            labelled = [i for i, x in enumerate(logs) if x is not None]
            total = mean_loss(sums, labelled)
            stats |= {"band_loss": band, "suspects_loss": total}
            explained = explained and total > band
            healthy_band = band * math.exp(min(shift, 700.0))  # the band in the restored weights' terms
            if again is not None:
                healthy_total = mean_loss(rescored, labelled)
                stats["suspects_loss_rescored"] = healthy_total
                explained = explained and healthy_total > healthy_band
            others = [i for i in labelled if i not in flagged]
            if others:
                kept = mean_loss(sums if again is None else rescored, others)
                stats["rest_loss"] = kept
                explained = explained and kept <= (band if again is None else healthy_band)
    stats["outlier_share"] = len(outliers) / max(1, len(sums))
    finite = [x for x in logs if x is not None and x != math.inf]
    if finite:
        stats |= {"suspect_median_loss": math.exp(statistics.median(finite)), "suspect_max_loss": math.exp(max(finite))}
    cause = CAUSE_INCIDENT if incident else DATA if explained else OPTIMIZER
    aligned = False
    if per_rank >= 4 and outliers and not (again is not None and trusted):
        slices = {i // per_rank for i in outliers}
        aligned = flagged == {i for r in slices for i in range(r * per_rank, (r + 1) * per_rank) if i < len(sums)}
    return Attribution(cause, outliers, stats, aligned)


def noise_bar(level: float, vocab: int, cfg: SpikeConfig) -> float:
    """The mean token loss from which a sample is a noise candidate (:func:`noise_samples`)."""
    return max(cfg.noise_fraction * math.log(vocab), cfg.noise_min_ratio * math.exp(level))


def noise_samples(sums: list[float], counts: list[float], level: float | None, vocab: int, cfg: SpikeConfig) -> list[int]:
    """Positions of the samples of an accepted step that score like noise: mean token loss at least
    ``cfg.noise_fraction`` x ln(``vocab``) and ``cfg.noise_min_ratio`` x exp(``level``) (the log
    per-sample level of :meth:`SampleLosses.reference` before this step; None: too few samples yet,
    nothing flagged), over at least ``cfg.noise_min_tokens`` labelled tokens.
    The candidates of the noise screen; :func:`uniform_like` is its second test. Pure; the same on
    every rank (its inputs came through the step's all-reduce)."""
    if cfg.noise_fraction <= 0 or level is None or vocab < 2:
        return []
    bar = noise_bar(level, vocab, cfg)
    return [i for i, (s, c) in enumerate(zip(sums, counts))
            if c >= cfg.noise_min_tokens and math.isfinite(s / c) and s / c >= bar]


def uniform_like(tokens: list[int], vocab: int, cfg: SpikeConfig) -> bool:
    """Whether ``tokens`` (a sample's labelled tokens) are as varied as uniform draws from ``vocab``:
    at least ``cfg.noise_min_distinct`` x the distinct values ``len(tokens)`` uniform draws give on
    average. Pure."""
    if not tokens or vocab < 2:
        return False
    expected = vocab * (1 - (1 - 1 / vocab) ** len(tokens))
    return len(set(tokens)) >= cfg.noise_min_distinct * expected


class SampleLosses:
    """Per-sample losses the attribution needs: the reference from recent accepted samples and the
    samples of the steps not accepted since (the suspects). Pure, checkpointed with the monitor.

    The reference separates level from spread so that a falling loss does not look like noise: the
    level is the median of the newest ``_LEVEL_SAMPLES`` log losses; the spread is the MAD of each
    sample's deviation from its own step's median, which removes the trend between steps (a plain
    window median lags behind a falling loss and counts its slope as spread).
    """

    max_pending_steps = 16
    _LEVEL_SAMPLES = 64

    def __init__(self, window: int) -> None:
        self.window = window
        self._ref: deque[float] = deque(maxlen=window)  # log per-sample loss, accepted steps
        self._dev: deque[float] = deque(maxlen=window)  # the same minus its step's median
        self._pending: list[tuple[int, list[int], list[float], list[float]]] = []

    def observe(self, step: int, ids: list[int], sums: list[float], counts: list[float], accepted: bool) -> None:
        """Record one step's globally reduced per-sample values (identical on every rank)."""
        if accepted:
            logs = [math.log(s / c) for s, c in zip(sums, counts) if c > 0 and s > 0 and math.isfinite(s / c)]
            if logs:
                mid = statistics.median(logs)
                self._ref.extend(logs)
                self._dev.extend(x - mid for x in logs)
            self._pending = []
        else:
            self._pending = (self._pending + [(step, list(ids), list(sums), list(counts))])[-self.max_pending_steps:]

    def reference(self, floor: float) -> tuple[float, float] | None:
        """(level, sigma) of recent accepted log per-sample losses; None below 32 samples."""
        if len(self._ref) < _MIN_REFERENCE:
            return None
        level = statistics.median(list(self._ref)[-self._LEVEL_SAMPLES:])
        dev = list(self._dev)
        mid = statistics.median(dev)
        return level, max(_MAD_TO_SIGMA * statistics.median([abs(d - mid) for d in dev]), floor)

    def reset_pending(self) -> None:
        self._pending = []

    def suspects(self, onset_step: int) -> tuple[list[int], list[float], list[float]]:
        """Sample ids, loss sums and label counts of the unaccepted steps from ``onset_step`` on."""
        ids: list[int] = []
        sums: list[float] = []
        counts: list[float] = []
        for step, i, s, c in self._pending:
            if step >= onset_step:
                ids += i
                sums += s
                counts += c
        return ids, sums, counts

    def state_dict(self) -> dict[str, Any]:
        return {"reference": list(self._ref), "deviations": list(self._dev),
                "pending": [list(p) for p in self._pending]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._ref = deque((float(x) for x in d.get("reference", [])), maxlen=self.window)
        self._dev = deque((float(x) for x in d.get("deviations", [])), maxlen=self.window)
        self._pending = [(int(p[0]), [int(x) for x in p[1]], [float(x) for x in p[2]], [float(x) for x in p[3]])
                         for p in d.get("pending", [])]


@dataclass(frozen=True)
class RecoveryPlan:
    """The whole recovery from one spike, decided before anything is restored: stop, or roll back to
    ``restored_step`` and carry on with these optimizer settings and this skip window."""

    stop: bool
    reason: str
    level: int
    skip_multiplier: int
    """The window an optimizer rollback skips: ``skip_multiplier`` x the samples the rolled-back steps
    drew, plus ``margin_batches`` global batches (a data or incident rollback skips by sample id,
    and a repeated data rollback the window too: ``skip_stream``)."""
    eps: float
    lr_scale: float
    beta2: float
    wasted_steps: int
    restored_step: int = 0
    """The rollback target; also where the LR cool-down of ``lr_scale`` starts."""
    margin_batches: int = 0
    budgeted: bool = True
    """A rollback counted against the budgets (False: a skip-update verdict, which has none)."""
    skip_stream: bool = False
    """Skip the stream window (``skip_multiplier``, ``margin_batches``) from the restored position: an
    optimizer rollback, or a data rollback that repeats one in its region (``data_repeat_window``)."""
    restore_monitor: bool = True
    """Restore the monitor's statistics from the target (from before the onset). A skip-update
    verdict keeps them: the flagged value stays in the monitor's window, as in OLMo-core
    (src/olmo_core/optim/skip_step_optimizer.py); restoring it would flag the same step again."""


class Escalation:
    """The ladder: rollback + skip; a repeat in the same region widens the skip and lowers the LR,
    then beta2; budgets on rollbacks and wasted compute end the run instead of looping.

    Motivation: rewind-and-skip alone only moved optimizer-driven spikes and discarded most of the
    compute (docs/design.md sec. 3); none of the trainers in docs/design.md sec. 2 has such a ladder.
    """

    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self.rollbacks = 0
        self.wasted = 0
        self.onsets: list[int] = []  # onset step of every rollback taken
        self.levels: list[int] = []  # escalation level of every rollback taken
        self.causes: list[str] = []  # cause of every rollback taken

    def decide(self, step: int, onset_step: int, rollback_to_step: int, steps_executed: int,
               eps: float, lr_scale: float, beta2: float, cause: str = OPTIMIZER,
               kind: str = "rollback") -> RecoveryPlan:
        """Plan the recovery from a spike at ``step`` (onset ``onset_step``) by restoring the state
        of ``rollback_to_step``. ``steps_executed``: steps kept as progress so far, excluding those
        discarded by rollbacks (Escalation counts those itself), so kept + wasted is all compute.
        ``eps``, ``lr_scale`` (the LR multiplier in force, cool-down included) and ``beta2`` are the
        run's current settings. Records the rollback unless the plan is to stop.

        ``cause`` (see :func:`attribute`) picks the medicine. OPTIMIZER climbs the ladder (eps, then
        LR, then beta2, and a wider skip window on each repeat in the region). DATA and
        CAUSE_INCIDENT rewind and change no hyper-parameter: bad samples are skipped by id (and, on a
        data rollback that follows another in its region, the stream window ahead too:
        ``SpikeConfig.data_repeat_window``), a non-finite step is retried; they count against the budgets like any rollback, and they
        neither raise nor reset the level of a later optimizer spike (recorded at level -1; the
        level comes from the last optimizer rollback of the region).

        ``kind`` SKIP_UPDATE (a monitor that skips one update): restore the state before it and change
        nothing else, no margin, no budget, monitor statistics kept."""
        cfg = self.cfg
        if not rollback_to_step <= onset_step <= step:
            raise ValueError(f"need rollback_to_step <= onset_step <= step, got "
                             f"{rollback_to_step}, {onset_step}, {step}")
        wasted = step - rollback_to_step
        if kind == SKIP_UPDATE:
            return RecoveryPlan(False, "skip one update (no budget applies)", 0, 1, eps, lr_scale, beta2, wasted, rollback_to_step,
                                margin_batches=0, budgeted=False, restore_monitor=False, skip_stream=cause == OPTIMIZER)
        # Chain on the previous rollback (not the first of the region): spikes that drift a
        # little later after each rollback still escalate, as in docs/design.md sec. 3.
        # The ladder counts optimizer rollbacks only: a data or incident rollback in between (level
        # -1) neither resets nor raises it.
        opt = [(o, lv) for o, lv in zip(self.onsets, self.levels) if lv >= 0]
        same_region = bool(opt) and abs(onset_step - opt[-1][0]) <= cfg.region_steps
        level = opt[-1][1] + 1 if same_region else 0
        if cause != OPTIMIZER:
            level = -1
        multiplier = min(2 ** max(level, 0), cfg.max_skip_multiplier)
        skip_stream = cause == OPTIMIZER
        repeats = self.data_repeats(onset_step) if cause == DATA and cfg.data_repeat_window else 0
        if repeats:  # the bad stretch goes on past the samples seen: skip ahead, widening on each repeat
            multiplier, skip_stream = min(2 ** (repeats - 1), cfg.max_skip_multiplier), True
        total_wasted = self.wasted + wasted
        # Judged over at least region_steps steps: in the first steps of a run one rollback is "all
        # of the compute" (7 of 7), and a run that keeps failing early is stopped by max_rollbacks.
        fraction = total_wasted / max(1, cfg.region_steps, steps_executed + total_wasted)

        new_eps, new_lr, new_beta2 = eps, lr_scale, beta2
        if cause == OPTIMIZER:
            new_eps = max(eps * cfg.eps_factor, cfg.eps_floor) if cfg.lower_eps else eps
            new_lr = lr_scale * cfg.lr_factor * (cfg.escalate_lr_factor if level >= 1 else 1.0)
            new_lr = max(new_lr, cfg.lr_floor_scale)
            if level >= 2 and cfg.escalate_beta2 is not None:
                new_beta2 = min(beta2, cfg.escalate_beta2)

        def stop(reason: str) -> RecoveryPlan:
            return RecoveryPlan(True, reason, level, multiplier, eps, lr_scale, beta2, wasted, rollback_to_step,
                                cfg.skip_margin_batches, skip_stream=skip_stream)

        recent = 1 + sum(1 for o in self.onsets if onset_step - o <= cfg.region_steps)
        if recent > cfg.max_rollbacks:
            return stop(f"rollback budget exhausted: {recent} rollbacks with onsets within "
                        f"spike.region_steps={cfg.region_steps} steps would exceed "
                        f"spike.max_rollbacks={cfg.max_rollbacks}")
        if fraction > cfg.max_wasted_fraction:
            return stop(f"wasted-compute budget exhausted: {total_wasted} of "
                        f"{steps_executed + total_wasted} steps discarded ({fraction:.2f} > "
                        f"spike.max_wasted_fraction={cfg.max_wasted_fraction})")

        self.rollbacks += 1
        self.wasted = total_wasted
        self.onsets.append(onset_step)
        self.levels.append(level)
        self.causes.append(cause)
        where = "same region as the previous rollback" if same_region else "new region"
        reason = (f"rollback {self.rollbacks} at level {level} ({where})" if cause == OPTIMIZER else
                  f"rollback {self.rollbacks}, cause {cause}: no hyper-parameter changed")
        if repeats:
            reason += (f"; data rollback {repeats + 1} of a chain in the region: the stream ahead is skipped too "
                       f"(x{multiplier} window)")
        return RecoveryPlan(False, reason, level, multiplier, new_eps, new_lr, new_beta2, wasted, rollback_to_step,
                            cfg.skip_margin_batches, skip_stream=skip_stream)

    def data_repeats(self, onset_step: int) -> int:
        """Data rollbacks just before this one, each onset within ``region_steps`` of the next data
        rollback's (a gap longer than a region ends the chain, whatever the cause of the rollback
        across it; a rollback of another cause within the region is passed over)."""
        n, ref = 0, onset_step
        for o, c in zip(reversed(self.onsets), reversed(self.causes)):
            if abs(ref - o) > self.cfg.region_steps:
                break
            if c == DATA:
                n, ref = n + 1, o
        return n

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "wasted": self.wasted, "onsets": list(self.onsets),
                "levels": list(self.levels), "causes": list(self.causes)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.rollbacks, self.wasted = int(d["rollbacks"]), int(d["wasted"])
        self.onsets = [int(s) for s in d["onsets"]]
        self.levels = [int(s) for s in d["levels"]]
        # a state saved before causes were kept: optimizer rollbacks are those with a level; the
        # others (data or incident) cannot be told apart, so none of them counts as a data repeat
        self.causes = [str(c) for c in d.get("causes", [OPTIMIZER if lv >= 0 else "" for lv in self.levels])]
