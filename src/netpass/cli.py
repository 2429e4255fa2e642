"""Command line: `netpass lab ...`, `netpass demo`, `netpass bench`, `netpass guest`.

Every failure netpass understands ends as one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console

from netpass import __version__
from netpass.errors import NetpassError, UsageError
from netpass.orchestrator import Progress, ProgressFn
from netpass.results import MigrationTiming

if TYPE_CHECKING:
    from netpass.bench import Cell
    from netpass.report import RunRecord
    from netpass.trial import Driver

err_console = Console(stderr=True)
out_console = Console()
NO_PREALLOC_HELP = (
    "boot the lab's QEMUs without -mem-prealloc: a destination then faults guest RAM in while "
    "it loads, which makes the pause longer and noisier (the lab before 2026-11-26)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage dump.
        sys.stderr.write(f"netpass: error: {message} (see: {self.prog} --help)\n")
        sys.exit(2)


def _rate(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: give frames per second") from None
    if not 1 <= v <= 50000:
        raise argparse.ArgumentTypeError(f"rate {v} out of range 1..50000 pps")
    return v


def _progress_printer() -> ProgressFn:
    last = [""]

    def show(p: Progress) -> None:
        line = f"{p.phase:<10} {p.status:<16}"
        if p.ram_total:
            line += f" RAM remaining {p.ram_remaining / 2**20:7.1f} / {p.ram_total / 2**20:.0f} MiB"
        if line != last[0] and err_console.is_terminal:
            err_console.print(line, end="\r", highlight=False)
            last[0] = line

    return show


# --- lab ---------------------------------------------------------------------------------------
def cmd_lab_up(a: argparse.Namespace) -> int:
    from netpass import lab

    st = lab.up(a.name, nics=a.nics, agents=a.agents, prealloc=not a.no_prealloc)
    s = st.status()
    out_console.print(
        f"lab {st.name} up: VM {', '.join(s['vm']['ip'])} on host A ({st.accel}), "
        f"client namespace {st.client_ns}"
    )
    return 0


def cmd_lab_down(a: argparse.Namespace) -> int:
    from netpass import lab

    removed = lab.down(a.name)
    out_console.print(f"lab {a.name} down: removed {len(removed)} objects")
    return 0


def cmd_lab_status(a: argparse.Namespace) -> int:
    from netpass import lab

    st = lab.load(a.name)
    s = st.status()
    if a.json:
        print(json.dumps(s, indent=2))
    else:
        out_console.print_json(json.dumps(s))
    return 0


def _write_outputs(recs: list[RunRecord], json_path: str | None, png_path: str | None) -> None:
    from netpass import report

    report.print_table(recs, out_console)
    if json_path:
        report.write_json(recs, json_path)
        out_console.print(f"JSON: {json_path}")
    if png_path:
        report.plot_timeline(recs, png_path)
        out_console.print(f"timeline PNG: {png_path}")


def lab_driver(mode: str, postcopy: bool, downtime: int | None, show: ProgressFn | None) -> Driver:
    """A trial driver that migrates the lab VM from its status dict, in the given mode."""
    from netpass.orchestrator import migrate

    def drive(s: dict[str, Any]) -> Coroutine[Any, Any, MigrationTiming]:
        if mode == "netpass" and s.get("agents"):
            return _lab_two_hosts(s, postcopy, downtime, show)
        return migrate(
            s["source"]["qmp"],
            s["destination"]["qmp"],
            s["migration_uri"],
            netpass=(mode == "netpass"),
            postcopy=postcopy,
            downtime_ms=downtime,
            progress=show,
        )

    return drive


def _lab_two_hosts(
    s: dict[str, Any], postcopy: bool, downtime: int | None, show: ProgressFn | None
) -> Coroutine[Any, Any, MigrationTiming]:
    """The lab's agents do each host's half; netpass talks to them from the client namespace."""
    from netpass.agent.tls import client_context
    from netpass.twohost import AgentAddress, migrate_two_hosts

    def addr(host: str) -> AgentAddress:
        a = s["agents"][host]
        return dataclasses.replace(AgentAddress.parse(a["address"]), netns=a["reach_from"])

    pki = Path(s["pki"])
    tls = client_context(
        pki / "client.crt", pki / "client.key", pki / "ca.crt", check_hostname=False
    )
    return migrate_two_hosts(
        s["source"]["qmp"],
        s["destination"]["qmp"],
        s["migration_uri"],
        addr(s["source"]["host"]),
        addr(s["destination"]["host"]),
        tls,
        postcopy=postcopy,
        downtime_ms=downtime,
        progress=show,
    )


def driver_for_cell(cell: Cell) -> Driver:
    return lab_driver(cell.mode, cell.postcopy, None, None)


def lab_trial(name: str, mode: str, postcopy: bool, rate: int, downtime: int | None) -> RunRecord:
    from netpass import lab, trial

    st = lab.load(name)
    lab.ensure_incoming(st, paused=(mode == "netpass"))
    label = f"{mode} {'postcopy' if postcopy else 'precopy'} {rate} pps"
    return trial.run_trial(
        st, label, rate, lab_driver(mode, postcopy, downtime, _progress_printer())
    )


def cmd_lab_migrate(a: argparse.Namespace) -> int:
    run = lab_trial(a.name, a.mode, a.postcopy, a.rate, a.downtime)
    _write_outputs([run], a.json, a.png)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from netpass import lab

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lab.up(a.name, agents=True)  # two hosts: netpass runs through the agents of A and B
    try:
        runs = [lab_trial(a.name, mode, False, a.rate, None) for mode in ("stock", "netpass")]
    finally:
        lab.down(a.name)
    _write_outputs(runs, str(out / "demo.json"), str(out / "demo-timeline.png"))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from netpass import bench

    if a.setup_teardown:
        bench.run_setup_teardown(a.name, a.rates, a.runs, Path(a.out), out_console)
        return 0
    if a.from_raw:
        bench.render_raw(Path(a.from_raw), Path(a.out), a.command_text, agents=a.agents)
        out_console.print(f"wrote {a.out}")
        return 0
    bench.run_bench(
        name=a.name,
        modes=a.mode,
        runs=a.runs,
        rates=a.rates,
        postcopy_runs=a.postcopy_runs,
        out_md=Path(a.out),
        raw_json=Path(a.raw) if a.raw else None,
        console=out_console,
        postcopy_rates=a.postcopy_rates,
        agents=a.agents,
        prealloc=not a.no_prealloc,
    )
    return 0


def _tls_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--tls-cert", required=required, metavar="PEM", help="this side's certificate")
    p.add_argument("--tls-key", required=required, metavar="PEM", help="its private key")
    p.add_argument("--tls-ca", required=required, metavar="PEM", help="CA that signs the peers")


def cmd_agent(a: argparse.Namespace) -> int:
    from netpass.agent.daemon import AgentOptions, parse_listen, serve
    from netpass.sysutil import require_root

    require_root()
    # A daemon's log: what it gave back, cleaned up or refused, with the time it happened.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host, port = parse_listen(a.listen)
    opts = AgentOptions(host, port, a.tls_cert, a.tls_key, a.tls_ca, a.metrics_port,
                        a.frame_budget, watchdog=not a.no_watchdog)  # fmt: skip
    asyncio.run(serve(opts))
    return 0


def cmd_migrate(a: argparse.Namespace) -> int:
    from netpass import report
    from netpass.orchestrator import migrate_netpass, migrate_stock

    kw: dict[str, Any] = dict(
        postcopy=a.postcopy,
        downtime_ms=a.downtime,
        max_bandwidth=a.max_bandwidth,
        progress=_progress_printer(),
    )
    if a.src_agent or a.dst_agent:
        timing = _migrate_with_agents(a, kw)
    elif a.no_netpass:
        timing = asyncio.run(migrate_stock(a.src_qmp, a.dst_qmp, a.uri, **kw))
    else:
        kw["pause_before_switchover"] = a.pause_before_switchover
        kw["early_start"] = not a.late_start
        timing = asyncio.run(migrate_netpass(a.src_qmp, a.dst_qmp, a.uri, **kw))  # fmt: skip
    report.print_migration(timing, out_console)
    if a.json:
        Path(a.json).write_text(json.dumps(timing.to_dict(), indent=2))
        out_console.print(f"JSON: {a.json}")
    error = timing.netpass.get("error")
    if error:
        err_console.print(f"netpass: data path failed, frames counted lost: {error}", markup=False)
    return 0


def _migrate_with_agents(a: argparse.Namespace, kw: dict[str, Any]) -> MigrationTiming:
    from netpass.agent.tls import client_context
    from netpass.twohost import AgentAddress, migrate_two_hosts

    if not (a.src_agent and a.dst_agent):
        raise UsageError("--src-agent and --dst-agent go together")
    if not (a.tls_cert and a.tls_key and a.tls_ca):
        raise UsageError("agents need --tls-cert, --tls-key and --tls-ca")
    src, dst = AgentAddress.parse(a.src_agent), AgentAddress.parse(a.dst_agent)
    tls = client_context(a.tls_cert, a.tls_key, a.tls_ca, check_hostname=False)
    return asyncio.run(
        migrate_two_hosts(
            a.src_qmp, a.dst_qmp, a.uri, src, dst, tls, netpass=a.netpass,
            early_start=not a.late_start, **kw,
        )
    )  # fmt: skip


def cmd_cleanup(a: argparse.Namespace) -> int:
    from netpass.cleanup import cleanup

    done = cleanup(a.qmp or [], remove_holds=a.remove_holds)
    for line in done:
        out_console.print(line, markup=False, highlight=False)
    out_console.print(f"cleanup: {len(done)} actions")
    return 0


def cmd_prepare_tap(a: argparse.Namespace) -> int:
    from netpass.datapath import tc

    for tap in a.tap:
        tc.prepare_tap(tap, netns=a.netns)
        out_console.print(f"{tap}: clsact and an open netpass hold installed")
    return 0


def cmd_guest_build(a: argparse.Namespace) -> int:
    from netpass import guest

    img = guest.build(progress=True)
    out_console.print(f"kernel {img.kernel}\ninitrd {img.initrd}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netpass", description="Lossless network switchover for QEMU live migration")
    p.add_argument("--version", action="version", version=f"netpass {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    labp = sub.add_parser("lab", help="the built-in two-host lab")
    labsub = labp.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    name_kw = {"default": "nplab", "help": "lab name / prefix of everything it creates"}
    up = labsub.add_parser("up", help="create namespaces, boot the VM on host A")
    up.add_argument("--name", **name_kw)  # type: ignore[arg-type]
    up.add_argument("--nics", type=int, default=1, help="NICs per VM (1-4)")
    up.add_argument(
        "--agents", action="store_true", help="run a netpass agent on each host (two-host mode)"
    )
    up.add_argument("--no-prealloc", action="store_true", help=NO_PREALLOC_HELP)
    up.set_defaults(func=cmd_lab_up)
    down = labsub.add_parser("down", help="remove everything the lab created")
    down.add_argument("--name", **name_kw)  # type: ignore[arg-type]
    down.set_defaults(func=cmd_lab_down)
    status = labsub.add_parser("status", help="what is up: namespaces, VM, taps, QMP, PIDs")
    status.add_argument("--name", **name_kw)  # type: ignore[arg-type]
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_lab_status)
    mig = labsub.add_parser("migrate", help="one migration under a probe, with a report")
    mig.add_argument("--name", **name_kw)  # type: ignore[arg-type]
    mig.add_argument("--mode", choices=["stock", "netpass"], default="stock")
    mig.add_argument("--postcopy", action="store_true")
    mig.add_argument("--rate", type=_rate, default=1000, help="probe rate, pps (default 1000)")
    mig.add_argument("--downtime", type=int, default=None, help="downtime-limit in ms")
    mig.add_argument("--json", metavar="FILE", help="write the run as JSON")
    mig.add_argument("--png", metavar="FILE", help="write the timeline PNG")
    mig.set_defaults(func=cmd_lab_migrate)

    demo = sub.add_parser("demo", help="lab up, migrations under a probe, report, lab down")
    demo.add_argument("--name", default="npdemo")
    demo.add_argument("--rate", type=_rate, default=1000)
    demo.add_argument("--out", default="out", help="directory for JSON and PNG")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="repeated migrations, docs/BENCHMARKS.md")
    bench.add_argument("--name", default="npbench")
    bench.add_argument("--mode", action="append", choices=["stock", "netpass"], default=None)
    bench.add_argument("--runs", type=int, default=5, help="precopy runs per cell")
    bench.add_argument("--postcopy-runs", type=int, default=None, help="postcopy runs per cell")
    bench.add_argument("--rates", type=_rate, nargs="+", default=[1000, 5000])
    bench.add_argument(
        "--postcopy-rates",
        type=_rate,
        nargs="+",
        default=None,
        help="probe rates for postcopy cells (default: --rates)",
    )
    bench.add_argument("--out", default="docs/BENCHMARKS.md")
    bench.add_argument("--from-raw", metavar="FILE", help="only re-render the report from --raw")
    bench.add_argument(
        "--setup-teardown",
        action="store_true",
        help="only measure capture on/off under a probe (appended to --out)",
    )
    bench.add_argument("--command-text", default=None, help=argparse.SUPPRESS)
    bench.add_argument("--raw", default=None, help="also write every run as JSON here")
    bench.add_argument("--no-prealloc", action="store_true", help=NO_PREALLOC_HELP)
    bench.add_argument(
        "--agents", action="store_true", help="netpass through per-host agents (two hosts)"
    )
    bench.set_defaults(func=cmd_bench)

    m = sub.add_parser("migrate", help="migrate a VM with the netpass switchover")
    m.add_argument("--src-qmp", required=True, metavar="PATH", help="source QEMU QMP socket")
    m.add_argument("--dst-qmp", required=True, metavar="PATH", help="destination QMP socket")
    m.add_argument("--uri", required=True, help="migration URI, e.g. tcp:10.0.0.2:4444")
    m.add_argument("--postcopy", action="store_true")
    m.add_argument("--downtime", type=int, default=None, metavar="MS", help="downtime-limit")
    m.add_argument("--max-bandwidth", type=int, default=None, metavar="BYTES_PER_S")
    m.add_argument("--no-netpass", action="store_true", help="plain QEMU switchover, measured")
    m.add_argument(
        "--late-start",
        action="store_true",
        help="send the destination's `cont` only once it has loaded the VM (always done when "
        "it has writable block devices; costs about one QMP round trip of pause)",
    )
    m.add_argument(
        "--pause-before-switchover",
        action="store_true",
        help="let QEMU wait in pre-switchover for netpass (adds a QMP round trip)",
    )
    m.add_argument("--json", metavar="FILE", help="write the timing and counters as JSON")
    m.add_argument("--src-agent", metavar="HOST:PORT", help="the source host's netpass agent")
    m.add_argument("--dst-agent", metavar="HOST:PORT", help="the destination host's agent")
    m.add_argument(
        "--netpass",
        choices=["required", "preferred", "off"],
        default="required",
        help="with agents: refuse, or migrate stock, when they cannot do netpass",
    )
    _tls_args(m, required=False)
    m.set_defaults(func=cmd_migrate)

    ag = sub.add_parser("agent", help="run this host's netpass agent (mutual TLS)")
    ag.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="control channel on PORT, frame channel on PORT + 1",
    )
    _tls_args(ag, required=True)
    ag.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    ag.add_argument(
        "--frame-budget",
        type=int,
        default=256 << 20,
        metavar="BYTES",
        help="rescued frames one migration may buffer (default 256 MiB)",
    )
    ag.add_argument("--no-watchdog", action="store_true", help=argparse.SUPPRESS)
    ag.set_defaults(func=cmd_agent)

    c = sub.add_parser("cleanup", help="undo what a killed netpass left on this host")
    c.add_argument(
        "--qmp",
        action="append",
        metavar="PATH",
        help="also cancel a migration left running on this QEMU (repeatable)",
    )
    c.add_argument(
        "--remove-holds",
        action="store_true",
        help="delete holds too (may drop a few frames on a busy tap)",
    )
    c.set_defaults(func=cmd_cleanup)

    pt = sub.add_parser("prepare-tap", help="give a new tap netpass's qdiscs before it is busy")
    pt.add_argument("tap", nargs="+")
    pt.add_argument("--netns", default=None, help="network namespace name or path")
    pt.set_defaults(func=cmd_prepare_tap)

    g = sub.add_parser("guest", help="guest image")
    gsub = g.add_subparsers(dest="guest_command", required=True, parser_class=_Parser)
    gb = gsub.add_parser("build", help="build (or find cached) kernel + initramfs")
    gb.set_defaults(func=cmd_guest_build)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("lab", "demo", "bench", "guest", "migrate", "cleanup", "prepare-tap"):
            from netpass.sysutil import require_root

            require_root()
        rc: int = args.func(args)
        return rc
    except NetpassError as e:
        err_console.print(f"netpass: {e}", highlight=False, markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err_console.print("netpass: interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
