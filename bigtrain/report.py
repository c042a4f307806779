"""``bigtrain report RUN_DIR``: one PNG of loss / grad norm / eps+LR with spikes and rollbacks, and a
plain-text table of spike events on stdout.

Reads only the files a run leaves behind (metrics.jsonl, spikes.jsonl, summary.json), so it works on
a live, a killed or a finished run, and needs neither torch nor DeepSpeed.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

Row = dict[str, Any]

# One colour per event kind, shared by the plot and its legend.
_ONSET = "tab:red"
_ROLLBACK = "tab:orange"
_GIVE_UP = "black"
_STOP = "tab:purple"


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSON-lines file; [] if it is missing. NaN/Infinity are accepted (json.loads does).

    A line that does not parse is skipped with a note on stderr: a killed run can leave its last
    line half written, and the report is most wanted exactly then."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: {path.name}:{n} is not valid JSON, skipped", file=sys.stderr)
    return rows


def discarded_mask(rows: list[Row]) -> list[bool]:
    """True for each row a rollback threw away: some later row has a step <= its step.

    Scanning backwards with the smallest step seen so far handles nested rollbacks (1..60, back to
    50..80, back to 70..100 keeps 1..49, 50..69, 70..100), which "all segments but the last" would not."""
    mask = [False] * len(rows)
    later_min = math.inf
    for i in range(len(rows) - 1, -1, -1):
        step = rows[i]["step"]
        mask[i] = later_min <= step
        later_min = min(later_min, step)
    return mask


def surviving_rows(rows: list[Row]) -> list[Row]:
    """The path the final model actually trained along, one row per step, in step order."""
    return [r for r, gone in zip(rows, discarded_mask(rows)) if not gone]


def discarded_rows(rows: list[Row]) -> list[Row]:
    """Rows of steps later undone by a rollback, in file order."""
    return [r for r, gone in zip(rows, discarded_mask(rows)) if gone]


def discarded_runs(rows: list[Row]) -> list[list[Row]]:
    """Maximal runs of consecutive discarded rows, each prefixed by the row it branched off from (if
    any) so the faint line visibly leaves the surviving curve."""
    mask = discarded_mask(rows)
    runs: list[list[Row]] = []
    for i, gone in enumerate(mask):
        if not gone:
            continue
        if i == 0 or not mask[i - 1]:
            runs.append([rows[i - 1]] if i > 0 else [])
        runs[-1].append(rows[i])
    return runs


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _change(e: Row, key: str) -> str:
    """'before->after' for eps / lr_scale, or the single value when it did not change."""
    before, after = e.get(f"{key}_before"), e.get(f"{key}_after")
    if before is None and after is None:
        return "-"
    if before == after or after is None:
        return _fmt(before)
    return f"{_fmt(before)}->{_fmt(after)}"


def event_table(events: list[Row]) -> str:
    """Aligned plain-text table, one row per spike event; reason last because it is the long one."""
    if not events:
        return "no spike events"
    header = ["step", "event", "onset", "restored", "skipped", "eps", "lr_scale", "wasted", "cause", "share", "reason"]
    body = [[_fmt(e.get("step")), str(e.get("event", "?")), _fmt(e.get("onset_step")), _fmt(e.get("restored_step")),
             _fmt(e.get("skipped_samples")), _change(e, "eps"), _change(e, "lr_scale"), _fmt(e.get("wasted_steps")),
             str(e.get("cause") or "-"), _share(e.get("offending_share")), str(e.get("reason", ""))] for e in events]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header) - 1)]
    lines = []
    for r in [header, *body]:
        cells = [r[c].rjust(w) if c != 1 else r[c].ljust(w) for c, w in enumerate(widths)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _share(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def attribution_lines(events: list[Row], limit: int = 8) -> list[str]:
    """Per event with offending samples: their ids, share of the suspect samples and the documents
    skipped whole (issue 14: what the recovery blamed, so a person can check it)."""
    lines = []
    for e in events:
        ids, docs = e.get("offending_samples") or [], e.get("offending_document_names") or []
        if not ids and not docs:
            continue
        more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
        line = (f"step {_fmt(e.get('step'))}: cause {e.get('cause')}, {len(ids)} offending sample(s) = "
                f"{_share(e.get('offending_share'))} of {_fmt(e.get('suspect_samples'))} suspects: "
                f"{ids[:limit]}{more}")
        if e.get("rank_aligned"):
            line += "; exactly some ranks' samples (a rank fault looks the same): documents not convicted"
        lines.append(line)
        if docs:
            names = ", ".join(docs[:limit]) + (f" (+{len(docs) - limit} more)" if len(docs) > limit else "")
            lines.append(f"    documents skipped whole: {names}")
    return lines


def totals_lines(events: list[Row], rows: list[Row], summary: Row) -> list[str]:
    """Event counts, wasted steps, skipped samples, and the final losses (summary.json first, since
    it is what the run itself reported; else the last surviving metrics row)."""
    counts = Counter(str(e.get("event", "?")) for e in events)
    by_type = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "0 events"
    wasted = sum(e.get("wasted_steps") or 0 for e in events)
    skipped = sum(e.get("skipped_samples") or 0 for e in events)
    alive = surviving_rows(rows)
    final_loss = summary.get("final_loss", alive[-1].get("loss") if alive else None)
    evals = [r["eval_loss"] for r in alive if r.get("eval_loss") is not None]
    eval_loss = summary.get("eval_loss", evals[-1] if evals else None)
    source = "summary.json" if "final_loss" in summary else "metrics.jsonl"
    return [f"totals: {by_type}; {wasted} wasted steps; {skipped} skipped samples",
            f"final: loss {_fmt(final_loss)}, eval loss {_fmt(eval_loss)} (from {source})"]


def _positive(rows: list[Row], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) where the value is finite and > 0: what a log axis can show."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _mark_events(ax: Any, events: list[Row], arrows: bool) -> None:
    """Onsets as red lines, rollbacks as a shaded span restored_step..step (plus an arrow back on the
    loss panel), give_up / stop as dashed lines."""
    for e in events:
        step, kind = e.get("step"), e.get("event")
        if kind == "rollback" and step is not None and e.get("restored_step") is not None:
            ax.axvspan(e["restored_step"], step, color=_ROLLBACK, alpha=0.15, lw=0)
            if arrows:
                # Axes-fraction y so the arrow sits above the curve whatever the loss scale.
                ax.annotate("", xy=(e["restored_step"], 0.93), xytext=(step, 0.93),
                            xycoords=("data", "axes fraction"),
                            arrowprops=dict(arrowstyle="-|>", color=_ROLLBACK, lw=1.5))
        if e.get("onset_step") is not None:
            ax.axvline(e["onset_step"], color=_ONSET, lw=1.0, alpha=0.8)
        if kind in ("give_up", "stop") and step is not None:
            ax.axvline(step, color=_GIVE_UP if kind == "give_up" else _STOP, lw=1.5, ls="--")


def _mark_nonfinite(ax: Any, rows: list[Row], key: str) -> bool:
    """NaN/inf values cannot sit on a log axis: draw them as x's along the top edge instead."""
    xs = [r["step"] for r in rows
          if isinstance(r.get(key), (int, float)) and not math.isfinite(r[key])]
    if xs:
        ax.scatter(xs, [0.98] * len(xs), marker="x", color=_ONSET, s=40, zorder=5,
                   transform=ax.get_xaxis_transform(), clip_on=False)
    return bool(xs)


def plot(run_dir: Path, rows: list[Row], events: list[Row], out: Path) -> None:
    """Three panels sharing the step axis: loss, grad norm, eps + LR."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the report is run on login nodes and in CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogFormatter

    alive, runs = surviving_rows(rows), discarded_runs(rows)
    fig, (ax_loss, ax_grad, ax_eps) = plt.subplots(3, 1, sharex=True, figsize=(14, 10), dpi=100,
                                                    height_ratios=[3, 2, 2], layout="constrained")
    counts = Counter(str(e.get("event")) for e in events)
    steps = alive[-1]["step"] if alive else 0
    wasted = sum(e.get("wasted_steps") or 0 for e in events)
    fig.suptitle(f"{run_dir.resolve().name}: {_n(steps, 'step')}, {_n(counts['rollback'], 'rollback')}, "
                 f"{_n(wasted, 'wasted step')}, {_n(counts['give_up'], 'give-up')}, {_n(counts['stop'], 'stop')}",
                 fontsize=14)

    handles: list[Any] = []
    nonfinite = False
    for ax, key, label, color in ((ax_loss, "loss", "train loss", "tab:blue"),
                                  (ax_grad, "grad_norm", "grad norm", "tab:green")):
        for run in runs:
            ax.plot(*_positive(run, key), color="0.55", alpha=0.8, lw=1.0)
        ax.plot(*_positive(alive, key), color=color, lw=1.3)
        nonfinite |= _mark_nonfinite(ax, rows, key)
        _mark_events(ax, events, arrows=ax is ax_loss)
        ax.set_yscale("log")
        # Plain "2", "3" instead of "2x10^0": loss and grad norm often span less than a decade.
        for set_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_fmt(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_ylabel(label + " (log)")
        ax.grid(True, which="major", alpha=0.3)

    ev_x, ev_y = _positive(alive, "eval_loss")
    if ev_x:
        ax_loss.plot(ev_x, ev_y, "o", color="tab:red", ms=6, mfc="white", mew=1.5, zorder=4)
        handles.append(Line2D([], [], marker="o", color="tab:red", mfc="white", ls="", label="eval loss"))
    gone_x, gone_y = _positive([r for run in runs for r in run[1:]], "eval_loss")
    if gone_x:
        ax_loss.plot(gone_x, gone_y, "o", color="0.6", ms=5, mfc="none")

    handles[:0] = [Line2D([], [], color="tab:blue", label="train loss"),
                   Line2D([], [], color="tab:green", label="grad norm")]
    if runs:
        handles.append(Line2D([], [], color="0.6", label="discarded by rollback"))
    if any(e.get("onset_step") is not None for e in events):
        handles.append(Line2D([], [], color=_ONSET, label="spike onset"))
    if counts["rollback"]:
        handles.append(Patch(color=_ROLLBACK, alpha=0.3, label="rollback: restored step → step"))
    if counts["give_up"]:
        handles.append(Line2D([], [], color=_GIVE_UP, ls="--", label="give up"))
    if counts["stop"]:
        handles.append(Line2D([], [], color=_STOP, ls="--", label="stop"))
    if nonfinite:
        handles.append(Line2D([], [], marker="x", color=_ONSET, ls="", label="non-finite value"))
    ax_eps.plot(*_positive(alive, "eps"), color="tab:brown", drawstyle="steps-post", lw=1.5)
    ax_eps.set_yscale("log")
    ax_eps.set_ylabel("Adam eps (log)", color="tab:brown")
    ax_eps.grid(True, which="major", alpha=0.3)
    _mark_events(ax_eps, events, arrows=False)
    ax_lr = ax_eps.twinx()
    ax_lr.plot(*_positive(alive, "lr"), color="tab:cyan", lw=1.3)
    ax_lr.set_ylabel("learning rate", color="tab:cyan")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_eps.set_xlabel("optimizer step")
    handles += [Line2D([], [], color="tab:brown", label="Adam eps"), Line2D([], [], color="tab:cyan", label="lr")]
    # Below the panels: above them it collides with the title, inside them with the curves.
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def report(run_dir: Path, out: Path | None = None) -> Path:
    """Plot RUN_DIR to ``out`` (default RUN_DIR/report.png), print the event table; return the PNG path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir} has no metrics.jsonl: is this a bigtrain run directory?")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    events = read_jsonl(run_dir / "spikes.jsonl")
    summary_path = run_dir / "summary.json"
    summary_text = summary_path.read_text().strip() if summary_path.exists() else ""
    summary: Row = json.loads(summary_text) if summary_text else {}
    out = Path(out) if out is not None else run_dir / "report.png"

    plot(run_dir, rows, events, out)
    print(event_table(events))
    for line in [*attribution_lines(events), *totals_lines(events, rows, summary)]:
        print(line)
    print(f"plot: {out}")
    return out
