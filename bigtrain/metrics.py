"""What a run writes for people: metrics.jsonl, spikes.jsonl, quarantine.jsonl, TensorBoard, a progress bar.

Only rank 0 writes (``enabled``); other ranks get the same object as a no-op, so the loop never asks
which rank it is on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class Recorder:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._spikes = open(run_dir / "spikes.jsonl", "a", buffering=1)
        self._quarantine = open(run_dir / "quarantine.jsonl", "a", buffering=1)
        self._tb = SummaryWriter(str(run_dir / "tb"))
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         mininterval=1.0)

    def step(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({**row, "time": time.time()}) + "\n")  # after the step's eval and saves
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "eps", "eval_loss"):
            if row.get(key) is not None:
                self._tb.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", row[key], row["step"])
        self._bar.set_postfix(loss=f"{row['loss']:.4g}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
        self._bar.update(row["step"] - self._bar.n)  # throttled by mininterval; negative after a rollback

    def event(self, row: dict[str, Any]) -> None:
        """One spike-monitor event: detection, rollback, give-up. Also mirrored to TensorBoard."""
        if not self.enabled:
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
        if not self.enabled:
            return
        for row in rows:
            self._quarantine.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._tb.close()
        for f in (self._metrics, self._spikes, self._quarantine):
            f.close()
