"""Side-by-side output for migration runs: a rich table, a JSON file and a timeline PNG."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from netpass.analysis import ProbeStats, analyze
from netpass.errors import UsageError
from netpass.results import MigrationTiming, ProbeData

ZOOM_MS = 300.0  # timeline shows STOP - 300 ms .. RESUME + 300 ms
WINDOW_MARGIN_MS = 20.0  # switchover window margin passed to analyze()


@dataclass
class RunRecord:
    """One migration run: what the driver timed, what the probe saw, and the derived stats.

    `stats` is always recomputed from probe + timing (window = src STOP .. dst RESUME), so it
    can never disagree with the raw data it summarises.
    """

    label: str
    timing: MigrationTiming
    probe: ProbeData
    stats: ProbeStats = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.stats = analyze(
            self.probe, self.timing.src_stop_ns, self.timing.dst_resume_ns, WINDOW_MARGIN_MS
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "timing": self.timing.to_dict(),
            "probe": self.probe.to_dict(),
            "stats": self.stats.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        return cls(
            label=str(d["label"]),
            timing=MigrationTiming.from_dict(d["timing"]),
            probe=ProbeData.from_dict(d["probe"]),
        )


def _ms(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _count(n: int) -> str:
    return f"[bold red]{n}[/]" if n else "0"


def _announce_after_resume(t: MigrationTiming) -> str:
    if not t.announce_ns or t.dst_resume_ns is None:
        return "-"
    return _ms((min(t.announce_ns) - t.dst_resume_ns) / 1e6)


def _true_pause(t: MigrationTiming) -> float | None:
    if t.true_pause_ms is not None:
        return t.true_pause_ms
    if t.src_stop_ns is not None and t.dst_resume_ns is not None:
        return (t.dst_resume_ns - t.src_stop_ns) / 1e6
    return None


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def _rtt(r: RunRecord) -> str:
    s = r.stats.rtt
    if s.count == 0:
        return "-"
    # Lab RTTs are microseconds: 3 significant digits rather than fixed ms decimals.
    return " / ".join(f"{v:.3g}" for v in (s.p50_ms, s.p99_ms, s.max_ms) if v is not None)


ROWS: list[tuple[str, Callable[[RunRecord], str]]] = [
    ("mode", lambda r: r.timing.mode),
    ("postcopy", lambda r: "yes" if r.timing.postcopy else "no"),
    ("rate (pps)", lambda r: str(r.probe.rate_pps)),
    ("sent", lambda r: str(r.stats.sent)),
    ("received", lambda r: str(r.stats.received)),
    ("lost", lambda r: _count(r.stats.lost)),
    ("lost in switchover window", lambda r: _count(r.stats.lost_in_window)),
    ("lost outside window", lambda r: _count(r.stats.lost_outside_window)),
    ("duplicates", lambda r: str(r.stats.duplicates)),
    ("reordered", lambda r: str(r.stats.reordered)),
    ("longest blackout (ms)", lambda r: _ms(r.stats.longest_gap_ms)),
    ("true pause STOP→RESUME (ms)", lambda r: _ms(_true_pause(r.timing))),
    ("QEMU-reported downtime (ms)", lambda r: _ms(r.timing.qemu_downtime_ms)),
    ("total migration time (ms)", lambda r: _ms(r.timing.total_time_ms)),
    (
        "RAM transferred (MiB)",
        lambda r: _ms(
            None
            if r.timing.ram_transferred_bytes is None
            else r.timing.ram_transferred_bytes / 2**20
        ),
    ),
    ("announce after RESUME (ms)", lambda r: _announce_after_resume(r.timing)),
    ("rtt p50 / p99 / max (ms)", _rtt),
]


def render_table(runs: Sequence[RunRecord]) -> Table:
    """One column per run; netpass counters (timing.netpass) follow as extra rows."""
    table = Table(title="Migration switchover", show_lines=False)
    # In 80 columns (or a log) the long names wrap; a value is never cut short.
    table.add_column("metric", style="bold", overflow="fold", ratio=2)
    for r in runs:
        table.add_column(r.label, justify="right", overflow="fold", ratio=1, min_width=6)
    for name, cell in ROWS:
        table.add_row(name, *(cell(r) for r in runs))
    counters: list[str] = []
    for r in runs:
        counters += [k for k in r.timing.netpass if k not in counters and k != "nics"]
    if counters:
        table.add_section()
    for key in counters:
        table.add_row(
            f"netpass: {key}",
            *(_number(r.timing.netpass[key]) if key in r.timing.netpass else "-" for r in runs),
        )
    return table


def print_table(runs: Sequence[RunRecord], console: Console | None = None) -> None:
    (console or Console()).print(render_table(runs))


def write_json(runs: Sequence[RunRecord], path: str | os.PathLike[str]) -> None:
    """Write the runs (with their stats) as a JSON list; atomic via temp file + rename."""
    out = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as f:
            json.dump([r.to_dict() for r in runs], f, indent=1)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {out}: {e.strerror}") from e


def read_json(path: str | os.PathLike[str]) -> list[RunRecord]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, list):
        raise UsageError(f"{path}: expected a JSON list of runs")
    try:
        return [RunRecord.from_dict(d) for d in obj]
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a netpass run file ({e!r})") from e


def plot_timeline(runs: Sequence[RunRecord], path: str | os.PathLike[str]) -> None:
    """PNG with one subplot per run: seq vs. time around the switchover.

    x is ms relative to the run's source STOP (first send when unknown), zoomed to
    STOP - 300 ms .. RESUME + 300 ms when both are known; received replies are dots at their
    arrival time, lost echoes red crosses at their send time.
    """
    if not runs:
        raise UsageError("no runs to plot")
    import matplotlib  # here, not at module level: keeps CLI start-up fast

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs, strict=True):
        _plot_run(ax, run)
    try:
        fig.savefig(os.fspath(path), dpi=110, format="png")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from e


def _plot_run(ax: Any, run: RunRecord) -> None:
    t, p, s = run.timing, run.probe, run.stats
    ref = t.src_stop_ns if t.src_stop_ns is not None else (p.send_ns[0] if p.send_ns else 0)

    def rel(ns: int) -> float:
        return (ns - ref) / 1e6

    zoomed = t.src_stop_ns is not None and t.dst_resume_ns is not None
    if zoomed:
        lo, hi = -ZOOM_MS, rel(t.dst_resume_ns or 0) + ZOOM_MS
    else:
        ends = p.send_ns[-1:] + [a for _, a in p.replies[-1:]]
        lo, hi = 0.0, max(1.0, rel(max(ends)) if ends else 1.0)

    rx_x: list[float] = []
    rx_y: list[int] = []
    for seq, arr in p.replies:
        if 0 <= seq < len(p.send_ns):
            x = rel(arr)
            if lo <= x <= hi:
                rx_x.append(x)
                rx_y.append(seq)
    lost_x: list[float] = []
    lost_y: list[int] = []
    for lr in s.lost_runs:
        for seq in range(lr.first_seq, lr.last_seq + 1):
            x = rel(p.send_ns[seq])
            if lo <= x <= hi:
                lost_x.append(x)
                lost_y.append(seq)

    ax.plot(rx_x, rx_y, ".", ms=2, color="tab:blue", label="reply (arrival)")
    ax.plot(lost_x, lost_y, "x", ms=4, color="red", label="lost echo (send)")
    if s.window_start_ns is not None and s.window_end_ns is not None:
        ax.axvspan(
            rel(s.window_start_ns),
            rel(s.window_end_ns),
            color="orange",
            alpha=0.15,
            label="switchover window",
        )
    if t.src_stop_ns is not None:
        ax.axvline(rel(t.src_stop_ns), color="black", lw=1, label="STOP (src)")
    if t.dst_resume_ns is not None:
        ax.axvline(rel(t.dst_resume_ns), color="green", lw=1, label="RESUME (dst)")
    if t.announce_ns:
        ax.axvline(rel(min(t.announce_ns)), color="purple", lw=1, ls="--", label="announce")

    # y: only the seqs sent inside the x range, else the zoomed slice is a flat line.
    in_range = [q for q, ns in enumerate(p.send_ns) if lo <= rel(ns) <= hi]
    if in_range:
        pad = max(1.0, 0.03 * (in_range[-1] - in_range[0]))
        ax.set_ylim(in_range[0] - pad, in_range[-1] + pad)
    ax.set_xlim(lo, hi)
    where = "source STOP" if t.src_stop_ns is not None else "first send"
    zoom = f", zoom STOP-{ZOOM_MS:.0f} .. RESUME+{ZOOM_MS:.0f} ms" if zoomed else ""
    ax.set_xlabel(f"time relative to {where} (ms{zoom})")
    ax.set_ylabel("sequence number")
    ax.set_title(f"{run.label}: lost {s.lost} (window {s.lost_in_window})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="x-small", markerscale=2)


def print_migration(t: MigrationTiming, console: Console | None = None) -> None:
    """The table of `netpass migrate` (no probe): timing and, in netpass mode, the counters."""
    table = Table(title=f"{t.mode} {'postcopy' if t.postcopy else 'precopy'} migration")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("true pause STOP→RESUME (ms)", _ms(_true_pause(t)))
    table.add_row("QEMU-reported downtime (ms)", _ms(t.qemu_downtime_ms))
    table.add_row("total migration time (ms)", _ms(t.total_time_ms))
    mib = None if t.ram_transferred_bytes is None else t.ram_transferred_bytes / 2**20
    table.add_row("RAM transferred (MiB)", _ms(mib))
    for key, value in t.netpass.items():
        if key != "nics":
            table.add_row(f"netpass: {key}", _number(value))
    (console or Console()).print(table)
