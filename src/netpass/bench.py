"""`netpass bench`: repeated lab migrations per cell, summarised as median [min–max].

One warmed-up lab VM (lab.warm_up) is migrated back and forth between host A and host B, a
new incoming QEMU for every run; a VM that died is replaced by a new warmed-up one. When
several modes are benchmarked, their runs are interleaved so they share the machine's
conditions, and they land in the same report.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from netpass import lab, report, trial
from netpass.analysis import SILENT_TAIL_MS, silent_at_end
from netpass.errors import NetpassError, UsageError

Metric = Callable[[report.RunRecord], float | None]


def _announce_ms(r: report.RunRecord) -> float | None:
    t = r.timing
    if not t.announce_ns or t.dst_resume_ns is None:
        return None
    return (t.announce_ns[0] - t.dst_resume_ns) / 1e6


def _np(r: report.RunRecord, key: str) -> float | None:
    v = r.timing.netpass.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


METRICS: list[tuple[str, Metric]] = [
    ("sent", lambda r: r.stats.sent),
    ("received", lambda r: r.stats.received),
    ("lost", lambda r: r.stats.lost),
    ("lost in switchover window", lambda r: r.stats.lost_in_window),
    ("lost outside window", lambda r: r.stats.lost_outside_window),
    ("duplicates", lambda r: r.stats.duplicates),
    ("reordered", lambda r: r.stats.reordered),
    ("longest blackout (ms)", lambda r: r.stats.longest_gap_ms),
    ("true pause STOP→RESUME (ms)", lambda r: r.timing.true_pause_ms),
    ("QEMU-reported downtime (ms)", lambda r: r.timing.qemu_downtime_ms),
    ("total migration time (ms)", lambda r: r.timing.total_time_ms),
    ("RAM transferred (MiB)", lambda r: _mib(r.timing.ram_transferred_bytes)),
    ("RAM sent while stopped (MiB)", lambda r: _mib(r.timing.ram_downtime_bytes)),
    ("announce after RESUME (ms)", _announce_ms),
    ("rescued frames (netpass)", lambda r: _np(r, "rescued")),
    ("rescued injected after RESUME (ms)", lambda r: _np(r, "rescued injected after RESUME (ms)")),
    ("held at destination (netpass)", lambda r: _np(r, "held")),
    ("rtt p50 (ms)", lambda r: r.stats.rtt.p50_ms),
    ("rtt p99 (ms)", lambda r: r.stats.rtt.p99_ms),
]


@dataclass(frozen=True)
class Cell:
    mode: str
    postcopy: bool
    rate: int
    runs: int

    @property
    def label(self) -> str:
        return f"{self.mode} {'postcopy' if self.postcopy else 'precopy'} {self.rate} pps"


def summarize(values: Sequence[float | None]) -> str:
    """'median [min–max]' of the values that exist, '-' when none do."""
    vs = [float(v) for v in values if v is not None]
    if not vs:
        return "-"

    def f(x: float) -> str:
        return f"{x:.0f}" if x == int(x) else f"{x:.1f}"

    return f"{f(statistics.median(vs))} [{f(min(vs))}–{f(max(vs))}]"


def cell_of(label: str, runs: int) -> Cell:
    """Inverse of Cell.label ("netpass postcopy 1000 pps")."""
    mode, copy, rate, _ = label.split()
    return Cell(mode, copy == "postcopy", int(rate), runs)


def bench_command(cells: list[Cell], agents: bool, prealloc: bool = True) -> str:
    """The `netpass bench` command line that measures CELLS."""
    pre = [c for c in cells if not c.postcopy]
    post = [c for c in cells if c.postcopy]
    rates = list(dict.fromkeys(c.rate for c in pre)) or list(dict.fromkeys(c.rate for c in post))
    pc_rates = list(dict.fromkeys(c.rate for c in post)) or rates
    modes = list(dict.fromkeys(c.mode for c in cells))
    runs = pre[0].runs if pre else 0
    pc_runs = post[0].runs if post else 0
    return (
        f"netpass bench --runs {runs} --postcopy-runs {pc_runs} --rates "
        f"{' '.join(map(str, rates))} --postcopy-rates {' '.join(map(str, pc_rates))} "
        + " ".join(f"--mode {m}" for m in modes)
        + (" --agents" if agents else "")
        + ("" if prealloc else " --no-prealloc")
    )


def render_raw(raw_json: Path, out_md: Path, command: str | None, agents: bool = False) -> None:
    """Rewrite the report from a --raw file (e.g. after a change to the report itself); the
    command line in its header is rebuilt from the cells unless COMMAND is given."""
    data = json.loads(raw_json.read_text())
    results = {
        cell_of(label, len(runs)): [report.RunRecord.from_dict(r) for r in runs]
        for label, runs in data.items()
    }
    cells = list(results)
    command = command or bench_command(cells, agents)
    _write_keeping_setup(out_md, render_markdown(cells, results, machine_info(), command))


def _write_keeping_setup(out_md: Path, text: str) -> None:
    """Write the migration report, keeping a set-up/tear-down section measured separately and
    adding the hand-written reading of the numbers (bench-notes.md beside the report)."""
    # BENCHMARKS.md -> bench-notes.md, BENCHMARKS-two-host.md -> bench-two-host-notes.md
    notes = out_md.with_name(out_md.stem.lower().replace("benchmarks", "bench") + "-notes.md")
    if notes.exists():
        text = text.rstrip() + "\n\n" + notes.read_text()
    old = out_md.read_text() if out_md.exists() else ""
    if SETUP_HEADING in old:
        text = text.rstrip() + "\n\n" + old[old.index(SETUP_HEADING) :]
    out_md.write_text(text)


def machine_info() -> dict[str, str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "unknown",
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
        "memory": f"{mem_kb / 2**20:.0f} GiB",
        "host kernel": platform.release(),
        "QEMU": qemu[0] if qemu else "unknown",
        "python": platform.python_version(),
    }


def render_markdown(
    cells: Sequence[Cell],
    results: dict[Cell, list[report.RunRecord]],
    info: dict[str, str],
    command: str,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}. Every cell is "
        "median [min–max] over its runs; every run migrates the lab VM (booted, then warmed up "
        "by two unmeasured migrations) to a new incoming QEMU on the other host, alternately "
        "A → B and B → A, under an ICMP probe from the client namespace. The switchover "
        "window is source STOP "
        "− 20 ms .. destination RESUME + 20 ms (by echo send time).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Results",
        "",
        "| metric | " + " | ".join(f"{c.label} (n={len(results[c])})" for c in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for name, fn in METRICS:
        row = [summarize([fn(r) for r in results[c]]) for c in cells]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    silent = [sum(silent_at_end(r.probe) for r in results[c]) for c in cells]
    lines.append(
        f"| VM stopped answering (runs; no reply in the last {SILENT_TAIL_MS:g} ms) | "
        + " | ".join(f"{k} of {len(results[c])}" for k, c in zip(silent, cells, strict=True))
        + " |"
    )
    lines += [
        "",
        "## Runs",
        "",
        "| cell | run | lost | in window | reordered | pause (ms) | QEMU downtime (ms) "
        "| VM answering at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        for i, r in enumerate(results[c], 1):
            pause = summarize([r.timing.true_pause_ms])
            qemu = summarize([r.timing.qemu_downtime_ms])
            lost, window, reord = r.stats.lost, r.stats.lost_in_window, r.stats.reordered
            alive = "no" if silent_at_end(r.probe) else "yes"
            lines.append(
                f"| {c.label} | {i} | {lost} | {window} | {reord} | {pause} | {qemu} | {alive} |"
            )
    return "\n".join(lines) + "\n"


def run_bench(
    name: str,
    modes: list[str] | None,
    runs: int,
    rates: list[int],
    postcopy_runs: int | None,
    out_md: Path,
    raw_json: Path | None,
    console: Console,
    postcopy_rates: list[int] | None = None,
    driver_for: Callable[[Cell], trial.Driver] | None = None,
    agents: bool = False,
    prealloc: bool = True,
) -> dict[Cell, list[report.RunRecord]]:
    """AGENTS: the lab runs an agent on each host and netpass runs through them (two hosts)."""
    if runs < 1:
        raise UsageError("--runs must be at least 1")
    modes = modes or ["stock"]
    if driver_for is None:
        from netpass.cli import driver_for_cell

        driver_for = driver_for_cell
    pc_runs = runs if postcopy_runs is None else postcopy_runs
    pc_rates = rates if postcopy_rates is None else postcopy_rates
    cells = [Cell(m, False, rate, runs) for rate in rates for m in modes]
    cells += [Cell(m, True, rate, pc_runs) for rate in pc_rates for m in modes]
    cells = [c for c in cells if c.runs > 0]
    results: dict[Cell, list[report.RunRecord]] = {c: [] for c in cells}
    total = sum(c.runs for c in cells)
    command = bench_command(cells, agents, prealloc)
    st = lab.up(name, progress=True, agents=agents, prealloc=prealloc)
    done = 0
    try:
        for i in range(max(c.runs for c in cells)):
            for c in cells:
                if i >= c.runs:
                    continue
                done += 1
                rec = _one_run(st, c, driver_for, console)
                results[c].append(rec)
                console.print(
                    f"[{done}/{total}] {c.label}: lost {rec.stats.lost} "
                    f"(window {rec.stats.lost_in_window}), reordered {rec.stats.reordered}, "
                    f"dup {rec.stats.duplicates}, pause {summarize([rec.timing.true_pause_ms])} ms",
                    highlight=False,
                )
    finally:
        if raw_json is not None:  # also when the bench stops early: the runs done are kept
            raw_json.write_text(
                json.dumps({c.label: [r.to_dict() for r in rs] for c, rs in results.items()})
            )
        lab.down(name)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    _write_keeping_setup(out_md, render_markdown(cells, results, machine_info(), command))
    console.print(f"wrote {out_md}")
    return results


def _one_run(
    st: lab.LabState, c: Cell, driver_for: Callable[[Cell], trial.Driver], console: Console
) -> report.RunRecord:
    """One measured run, made on a new VM if the lab's died, also between the check and the
    run (a guest that panics after a migration takes a moment to end its QEMU)."""
    _vm_ready(st, c, console)
    try:
        return trial.run_trial(st, c.label, c.rate, driver_for(c))
    except NetpassError:
        if lab.vm_running(st):
            raise
    _vm_ready(st, c, console)
    return trial.run_trial(st, c.label, c.rate, driver_for(c))


def _vm_ready(st: lab.LabState, c: Cell, console: Console) -> None:
    # One warmed-up guest goes back and forth between the hosts; a new one only when it died
    # (lab.warm_up says why a guest's first migration is avoided).
    if lab.vm_running(st):
        lab.ensure_incoming(st, paused=(c.mode == "netpass"))
    else:
        why = lab.vm_death(st)
        console.print(f"the lab VM is gone ({why}): booting a new one", highlight=False)
        lab.fresh_vm(st, paused_incoming=(c.mode == "netpass"))


# --- set-up and tear-down under traffic -------------------------------------------------------
SETUP_HEADING = "## Set-up and tear-down under a probe (no migration)"


async def _setup_teardown_cycle(qmp_path: str, relay_s: float) -> int:
    """Capture on, relay for RELAY_S, capture off; returns frames relayed."""
    import asyncio

    from netpass.discovery import discover, used_idx
    from netpass.qmp import Qmp
    from netpass.switchover import SourceNic

    q = Qmp("src", qmp_path)
    await q.connect()
    try:
        info = await discover(q)
        nics = [SourceNic(n, info.pid, info.netns, k) for k, n in enumerate(info.nics)]
        for nic in nics:
            await asyncio.to_thread(nic.prepare)
            await asyncio.to_thread(nic.capture_on)
            await asyncio.to_thread(nic.wait_tap_empty)
            nic.start_relay(await used_idx(q, nic.nic))
        await asyncio.sleep(relay_s)
        for nic in nics:
            await asyncio.to_thread(nic.give_back, None)
            await asyncio.to_thread(nic.close)
        return sum(n.counters.relayed for n in nics)
    finally:
        await q.close()


def run_setup_teardown(
    name: str, rates: list[int], runs: int, out_md: Path, console: Console
) -> None:
    """Measure that switching capture on and off loses, duplicates and reorders nothing."""
    import asyncio
    import time

    from netpass.analysis import analyze

    st = lab.up(name, progress=True)
    rows: list[str] = []
    try:
        for rate in rates:
            lost, dup, reord, relayed = [], [], [], []
            for i in range(runs):
                with trial.probe(st, rate) as finish:
                    time.sleep(0.5)
                    relayed.append(
                        asyncio.run(_setup_teardown_cycle(st.status()["source"]["qmp"], 1.0))
                    )
                    time.sleep(0.5)
                    s = analyze(finish())
                lost.append(s.lost)
                dup.append(s.duplicates)
                reord.append(s.reordered)
                console.print(
                    f"[set-up/tear-down {rate} pps {i + 1}/{runs}] lost {s.lost}, "
                    f"dup {s.duplicates}, reordered {s.reordered}",
                    highlight=False,
                )
            rows.append(
                f"| {rate} | {runs} | {summarize(relayed)} | {summarize(lost)} | "
                f"{summarize(dup)} | {summarize(reord)} |"
            )
    finally:
        lab.down(name)
    section = "\n".join(
        [
            SETUP_HEADING,
            "",
            "Each run: probe on, netpass prepares the tap, switches capture on, relays every "
            "frame for 1 s, gives the rest back and switches capture off, probe off. Taps are "
            "prepared with `netpass prepare-tap` at creation, as the lab does.",
            "",
            "| rate (pps) | runs | frames relayed | lost | duplicates | reordered |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    text = out_md.read_text() if out_md.exists() else "# Benchmarks\n"
    if SETUP_HEADING in text:
        text = text[: text.index(SETUP_HEADING)].rstrip() + "\n"
    out_md.write_text(text.rstrip() + "\n\n" + section)
    console.print(f"wrote {out_md}")
