from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from netpass.errors import UsageError
from netpass.report import (
    RunRecord,
    plot_timeline,
    print_table,
    read_json,
    render_table,
    write_json,
)
from netpass.results import MigrationTiming, ProbeData

T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def make_run(label: str, mode: str, lost: set[int], with_timing: bool = True) -> RunRecord:
    n = 2000  # 2 s at 1000 pps
    send = [T0 + i * MS for i in range(n)]
    replies = [(s, send[s] + MS // 4) for s in range(n) if s not in lost]
    stop, resume = T0 + 1000 * MS, T0 + 1030 * MS
    timing = MigrationTiming(mode=mode, postcopy=False)
    if with_timing:
        timing = MigrationTiming(
            mode=mode,
            postcopy=mode == "netpass",
            src_stop_ns=stop,
            dst_resume_ns=resume,
            true_pause_ms=30.0,
            qemu_downtime_ms=25.0,
            total_time_ms=1800.0,
            ram_transferred_bytes=300 * 2**20,
            announce_ns=[resume + 2 * MS, resume + 50 * MS],
            events=[{"side": "src", "event": "STOP", "t_ns": stop, "data": {}}],
            netpass={"frames_buffered": 31, "frames_replayed": 31, "drain_ms": 0.42},
        )
    return RunRecord(label, timing, ProbeData("10.0.0.2", 1000, 56, send, replies))


@pytest.fixture
def runs() -> list[RunRecord]:
    stock = make_run("stock", "stock", set(range(995, 1040)) | {1500})
    stock.timing.netpass = {}
    return [stock, make_run("netpass", "netpass", set())]


def render(runs: list[RunRecord]) -> str:
    console = Console(width=160, record=True, color_system=None)
    print_table(runs, console)
    return console.export_text()


def test_stats_use_timing_window(runs: list[RunRecord]) -> None:
    s = runs[0].stats
    assert (s.sent, s.lost, s.lost_in_window, s.lost_outside_window) == (2000, 46, 45, 1)
    assert runs[1].stats.lost == 0


def test_table_one_run(runs: list[RunRecord]) -> None:
    table = render_table(runs[:1])
    assert len(table.columns) == 2
    text = render(runs[:1])
    assert "lost in switchover window" in text
    assert "longest blackout (ms)" in text
    assert "netpass:" not in text  # the stock run has no counters


def test_table_two_runs_side_by_side(runs: list[RunRecord]) -> None:
    assert len(render_table(runs).columns) == 3
    text = render(runs)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "46" in lines["lost"] and "0" in lines["lost"]
    assert "netpass: frames_buffered" in lines
    assert "-" in lines["netpass: frames_buffered"]  # stock column has no counter
    assert "2.0" in lines["announce after RESUME (ms)"]
    assert "300.0" in lines["RAM transferred (MiB)"]


def test_table_fits_80_columns_without_cutting_values(runs: list[RunRecord]) -> None:
    """A log or an 80-column terminal: names may wrap, numbers are never cut short."""
    runs[0].label = "stock precopy 1000 pps"
    runs[1].label = "netpass precopy 1000 pps"
    runs[1].timing.netpass["destination rescued_injected_after_resume_us"] = 2415
    runs[1].timing.netpass["destination start"] = "cont queued during the load, run as it ended"
    console = Console(width=80, record=True, color_system=None)
    print_table(runs, console)
    text = console.export_text()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    pause = next(ln for ln in text.splitlines() if "true pause" in ln)
    assert pause.count("30.0") == 2  # both runs' values, whole
    assert "2415" in text


def test_table_without_timing() -> None:
    run = make_run("bare", "stock", {5}, with_timing=False)
    assert run.stats.window_start_ns is None
    text = render([run])
    assert "announce after RESUME" in text


def test_json_round_trip(runs: list[RunRecord], tmp_path: Path) -> None:
    path = tmp_path / "runs.json"
    write_json(runs, path)
    back = read_json(path)
    assert back == runs
    assert [r.stats for r in back] == [r.stats for r in runs]
    raw = json.loads(path.read_text())
    assert raw[0]["stats"]["lost"] == 46
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_read_json_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError):
        read_json(bad)
    bad.write_text('[{"label": "x"}]')
    with pytest.raises(UsageError):
        read_json(bad)


def test_plot_png(runs: list[RunRecord], tmp_path: Path) -> None:
    path = tmp_path / "timeline.png"
    runs.append(make_run("no timing", "stock", {7, 8}, with_timing=False))
    plot_timeline(runs, path)
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_needs_runs(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        plot_timeline([], tmp_path / "x.png")


def test_bench_command_is_rebuilt_from_the_cells() -> None:
    # `netpass bench --from-raw` puts this in the report header.
    from netpass.bench import Cell, bench_command

    cells = [
        Cell(m, pc, 1000, 10 if pc else 20) for pc in (False, True) for m in ("stock", "netpass")
    ]
    cells.insert(2, Cell("stock", False, 5000, 20))
    assert bench_command(cells, agents=True) == (
        "netpass bench --runs 20 --postcopy-runs 10 --rates 1000 5000 --postcopy-rates 1000 "
        "--mode stock --mode netpass --agents"
    )
