"""What a run writes for people: metrics.jsonl, spikes.jsonl, quarantine.jsonl, TensorBoard, a progress bar.

Only rank 0 writes (``enabled``); other ranks get the same object as a no-op, so the loop never asks
which rank it is on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigtrain.checkpoint import TrainState

log = logging.getLogger("bigtrain")


# Rows with these keys are always logged, whatever train.log_interval says.
ALWAYS_LOGGED = {"eval_loss", "eval_accuracy", "snapshot_seconds", "checkpoint_seconds"}


class Recorder:
    """``start`` opens the files (after a resume, first dropping what the killed run logged past its
    checkpoint); until then, and on ranks other than 0, every method is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, log_interval: int = 1):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.log_interval = log_interval
        self._tb = None
        self._bar = None
        self._open = False

    def start(self, state: TrainState, resumed: bool) -> None:
        """Collective (every rank calls it): rank 0 opens the files; a failure there is every rank's."""
        error = None
        if self.enabled:
            try:
                self._open_files(state, resumed)
            except Exception as exc:  # noqa: BLE001 - agreed below: rank 0 alone must not leave the others waiting
                error = exc
        _agree(error, "opening the run's logs")

    def _open_files(self, state: TrainState, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        if resumed:
            truncate_metrics(self.run_dir, state)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._spikes = open(self.run_dir / "spikes.jsonl", "a", buffering=1)
        self._quarantine = open(self.run_dir / "quarantine.jsonl", "a", buffering=1)
        self._tb = SummaryWriter(str(self.run_dir / "tb"))
        self._bar = tqdm(total=self.total_steps, initial=state.progress.step, desc="train", unit="step",
                         dynamic_ncols=True, mininterval=1.0)
        self._open = True

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file of the run (ds_config.json, summary.json), written by rank 0. Collective: a
        failure (a full disk) is raised on every rank."""
        error = None
        if self.enabled:
            try:
                (self.run_dir / name).write_text(json.dumps(obj, indent=2))
            except Exception as exc:  # noqa: BLE001 - agreed below
                error = exc
        _agree(error, f"writing {name}")

    def maybe_log(self, row: dict[str, Any]) -> None:
        """Log the step's row every ``log_interval`` steps, at the last step, and whenever it carries
        an eval loss or a save's timing."""
        if row["step"] % self.log_interval == 0 or row["step"] == self.total_steps or ALWAYS_LOGGED & row.keys():
            self.step(row)

    def step(self, row: dict[str, Any]) -> None:
        if not self._open:
            return
        self._metrics.write(json.dumps({**row, "time": time.time()}) + "\n")  # after the step's eval and saves
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "eps", "eval_loss", "eval_accuracy"):
            if row.get(key) is not None:
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self._tb.add_scalar(tag, row[key], row["step"])
        self._bar.set_postfix(loss=f"{row['loss']:.4g}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
        self._bar.update(row["step"] - self._bar.n)  # throttled by mininterval; negative after a rollback

    def event(self, row: dict[str, Any]) -> None:
        """One spike-monitor event: detection, rollback, give-up. Also mirrored to TensorBoard."""
        if not self._open:
            return
        row = {"time": time.time(), **row}
        self._spikes.write(json.dumps(row) + "\n")
        self._tb.add_scalar(f"spike/{row['event']}", row.get("severity", 1.0), row["step"])
        if "eps_after" in row:
            self._tb.add_scalar("spike/eps", row["eps_after"], row["step"])
        if "lr_scale_after" in row:
            self._tb.add_scalar("spike/lr_scale", row["lr_scale_after"], row["step"])
        self._bar.write(f"[spike] step {row['step']}: {row['event']} - {row.get('reason', '')}")

    def quarantine(self, rows: Iterable[dict[str, Any]]) -> None:
        if not self._open:
            return
        for row in rows:
            self._quarantine.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._bar.close()
        self._tb.close()
        for f in (self._metrics, self._spikes, self._quarantine):
            f.close()


def _truncate_jsonl(path: Path, keep) -> int:
    """Keep the rows ``keep(row)`` accepts; drop unparseable lines (the torn last line of a killed
    run or a full disk) with a warning instead of failing: rank 0 alone runs this, and an exception
    on one rank ends the run for all. Returns the rows dropped."""
    if not path.exists():
        return 0
    rows, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict) and keep(row):
            rows.append(line)
    if torn:
        log.warning("%s: dropped %d unreadable line(s) (a torn write of the killed run)", path, torn)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)
    return torn


def truncate_metrics(run_dir: Path, state: TrainState) -> None:
    """On resume (rank 0), drop what the killed run logged after its checkpoint, since the resumed
    run redoes it: metrics rows and events after the step, quarantine rows of rollbacks and noise
    screens the checkpoint does not hold. Otherwise `bigtrain report` counts them twice."""
    _truncate_jsonl(run_dir / "metrics.jsonl", lambda r: r.get("step", 0) <= state.progress.step)
    _truncate_jsonl(run_dir / "spikes.jsonl", lambda r: keep_event(r, state))
    _truncate_jsonl(run_dir / "quarantine.jsonl", lambda r: r.get("rollback", 0) <= state.history.rollbacks
                    and r.get("screen", 0) <= state.history.screens)


def keep_event(row: dict, state: TrainState) -> bool:
    """Whether a spikes.jsonl event belongs to the history a checkpoint continues. A rollback is
    identified by its ordinal (``rollback``), not its step: a checkpoint saved after a rollback to an
    earlier step holds that rollback although the event's step is later than the checkpoint's. A
    give-up or stop ended a process: never redone, always kept. Other rows: by step."""
    if "rollback" in row:
        return row["rollback"] <= state.history.rollbacks
    if "screen" in row:  # a noise screen: by ordinal too (it survives a rollback to before its step)
        return row["screen"] <= state.history.screens
    if row.get("event") == "skip_steps":  # by the history that holds it, like the ordinals above
        return row.get("range") in state.history.manual_skips
    return row.get("event") in ("give_up", "stop") or row.get("step", 0) <= state.progress.step


def _agree(error: Exception | None, what: str) -> None:
    """Raise on every rank when rank 0's write failed (one small all-reduce; without a process group,
    this process's own outcome)."""
    from bigtrain.checkpoint import all_ok

    if not all_ok(error is None):
        raise OSError(f"{what} failed on rank 0: {error}" if error is not None else
                      f"{what} failed on rank 0 (see its log)") from error
