"""Unit tests for bigtrain.report: discarded-row logic, the event table, and the PNG on a synthetic run."""

import json
import math
from pathlib import Path

import pytest

from bigtrain.report import discarded_mask, discarded_rows, discarded_runs, event_table, report, surviving_rows


def steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]


def metric_row(step: int, loss: float, **extra) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * min(1.0, step / 10), "grad_norm": 1.0 + 0.1 * loss,
            "tokens_per_sec": 30000.0, "samples": 8 * step, "tokens": 1016 * step, "eps": 1e-8,
            "step_applied": True, "verdict": "ok", **extra}


ROLLBACK = {"time": 0.0, "event": "rollback", "step": 60, "onset_step": 57, "verdict": "spike",
            "reason": "loss 3.2x median for 3 steps", "severity": 3.2, "loss": 9.1, "grad_norm": 40.0,
            "action": "rollback+skip+eps", "level": 0, "restored_step": 49, "restored_from": "/dev/shm/x",
            "skipped_range": [392, 480], "skipped_samples": 88, "eps_before": 1e-08, "eps_after": 1e-09,
            "lr_scale_before": 1.0, "lr_scale_after": 1.0, "beta2_before": 0.95, "beta2_after": 0.95,
            "wasted_steps": 11, "recover_seconds": 0.4}


def write_run(run_dir: Path, rows: list[dict], events: list[dict], summary: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "spikes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def rollback_run(run_dir: Path) -> Path:
    """Steps 1..60 with a spike from 57 (one NaN), then back to 50..100 at eps 1e-9; eval every 20."""
    rows = []
    for s in range(1, 61):
        loss = 2 + 8 * math.exp(-s / 30) if s < 57 else 9.0 * (s - 55)
        rows.append(metric_row(s, float("nan") if s == 59 else loss, **({"eval_loss": loss} if s % 20 == 0 else {})))
    for s in range(50, 101):
        loss = 2 + 8 * math.exp(-s / 30)
        rows.append(metric_row(s, loss, eps=1e-9, **({"eval_loss": loss * 1.02} if s % 20 == 0 else {})))
    return write_run(run_dir, rows, [ROLLBACK],
                     {"steps": 100, "seconds": 3.0, "final_loss": 2.2, "eval_loss": 2.3, "rollbacks": 1,
                      "wasted_steps": 11})


def test_discarded_single_rollback():
    rows = [{"step": s} for s in [*range(1, 61), *range(50, 101)]]
    assert steps(surviving_rows(rows)) == list(range(1, 101))
    assert steps(discarded_rows(rows)) == list(range(50, 61))
    [run] = discarded_runs(rows)
    assert steps(run) == [49, *range(50, 61)]  # prefixed by the row it branched from


def test_discarded_nested_rollbacks_keep_each_restored_prefix():
    rows = [{"step": s} for s in [*range(1, 61), *range(50, 81), *range(70, 101)]]
    assert steps(surviving_rows(rows)) == list(range(1, 101))
    assert steps(discarded_rows(rows)) == [*range(50, 61), *range(70, 81)]
    assert discarded_mask([]) == []
    assert discarded_mask([{"step": 3}, {"step": 3}]) == [True, False]  # a repeated step: the later one counts


def test_report_rollback_run(tmp_path, capsys):
    run_dir = rollback_run(tmp_path / "run")
    out = report(run_dir, None)
    assert out == run_dir / "report.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert len(data) > 20_000
    text = capsys.readouterr().out
    [row] = [line for line in text.splitlines() if "rollback" in line and "median" in line]
    cells = row.split()
    assert cells[:5] == ["60", "rollback", "57", "49", "88"]
    assert "1e-08->1e-09" in row and "11" in cells
    assert "totals: 1 rollback; 11 wasted steps; 88 skipped samples" in text
    assert "final: loss 2.2, eval loss 2.3 (from summary.json)" in text


def test_report_custom_out_and_no_events(tmp_path, capsys):
    run_dir = write_run(tmp_path / "quiet", [metric_row(s, 5.0 / s) for s in range(1, 31)], [])
    (run_dir / "spikes.jsonl").unlink()  # missing spikes.jsonl is fine
    out = report(run_dir, tmp_path / "plots" / "q.png")
    assert out.read_bytes().startswith(b"\x89PNG")
    text = capsys.readouterr().out
    assert "no spike events" in text
    assert "totals: 0 events; 0 wasted steps; 0 skipped samples" in text
    assert "final: loss 0.1667" in text  # no summary.json: the last metrics row


def test_report_give_up_and_stop(tmp_path, capsys):
    events = [{**ROLLBACK}, {"event": "give_up", "step": 80, "onset_step": 78, "reason": "rollback budget spent",
                             "restored_step": 60},
              {"event": "stop", "step": 90, "reason": "loss is NaN", "severity": 1e30}]
    run_dir = write_run(tmp_path / "gave_up", [metric_row(s, 3.0) for s in range(1, 91)], events)
    report(run_dir)
    text = capsys.readouterr().out
    assert "1 give_up, 1 rollback, 1 stop" in text
    assert "rollback budget spent" in text


def test_report_without_metrics_raises(tmp_path):
    with pytest.raises(ValueError, match="has no metrics.jsonl: is this a bigtrain run directory?"):
        report(tmp_path)


def test_event_table_aligned():
    table = event_table([ROLLBACK, {"event": "stop", "step": 1234, "reason": "x"}]).splitlines()
    header, rule, *body = table
    # Columns line up: "event" starts at the same offset on every line.
    starts = {line.index(word) for line, word in zip([header, *body], ["event", "rollback", "stop"])}
    assert starts == {header.index("event")}
    assert set(rule) == {"-"}


def test_report_shows_cause_and_offending_samples():
    from bigtrain.report import attribution_lines, event_table

    events = [{"step": 42, "event": "rollback", "onset_step": 40, "restored_step": 36, "skipped_samples": 130,
               "eps_before": 1e-8, "eps_after": 1e-8, "lr_scale_before": 1.0, "lr_scale_after": 1.0,
               "wasted_steps": 6, "cause": "data", "offending_samples": [776, 2635, 2727], "offending_share": 0.1667,
               "suspect_samples": 18, "offending_document_names": ["stdlib:abc.py"], "reason": "3 consecutive"},
              {"step": 60, "event": "rollback", "cause": "optimizer", "offending_samples": [], "reason": "x"}]
    table = event_table(events)
    header = table.splitlines()[0].split()
    row = table.splitlines()[2].split()
    assert header[8:10] == ["cause", "share"] and row[8:10] == ["data", "17%"]
    assert table.splitlines()[3].split()[8:10] == ["optimizer", "-"]
    lines = attribution_lines(events)
    assert lines == ["step 42: cause data, 3 offending sample(s) = 17% of 18 suspects: [776, 2635, 2727]",
                     "    documents skipped whole: stdlib:abc.py"]
