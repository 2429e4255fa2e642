"""`netpass agent`: the long-running per-host agent process.

It listens for the orchestrator on PORT (control channel) and for source agents on PORT + 1
(frame channel), both mutual TLS with the same CA. At start it removes whatever a previous
agent in this network namespace left on its taps (redirects, capture devices, closed holds),
and it starts a watchdog process that does the same the moment this process dies, so a killed
agent never leaves a VM's tap black-holed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from netpass import wire
from netpass.agent.host import DEFAULT_FRAME_BUDGET, HostAgent
from netpass.agent.server import AgentServer
from netpass.agent.tls import client_context, server_context
from netpass.cleanup import sweep_namespace
from netpass.errors import UsageError
from netpass.sysutil import name_this_thread

log = logging.getLogger("netpass.agent")

READY_LINE = "NETPASS-AGENT-READY"


@dataclass
class AgentOptions:
    host: str
    port: int
    cert: str
    key: str
    ca: str
    metrics_port: int | None = None
    frame_budget: int = DEFAULT_FRAME_BUDGET
    identity: str = ""
    watchdog: bool = True


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) < 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT (PORT + 1 is used too)")
    return host.strip("[]") or "0.0.0.0", int(port)


def own_netns() -> str:
    return f"/proc/{os.getpid()}/ns/net"


async def serve(opts: AgentOptions) -> None:
    if opts.frame_budget < 1 << 20:
        raise UsageError("--frame-budget must be at least 1 MiB")
    srv_ctx = server_context(opts.cert, opts.key, opts.ca)
    # Agents reach each other by address; the CA is the check for the frame channel.
    cli_ctx = client_context(opts.cert, opts.key, opts.ca, check_hostname=False)
    loop = asyncio.get_running_loop()
    # Named OS threads, so `top -H` or `perf` tell the agent's workers from its event loop.
    name_this_thread("np-agent")
    loop.set_default_executor(
        ThreadPoolExecutor(initializer=name_this_thread, initargs=("np-agent-worker",))
    )
    # pyroute2's synchronous API cannot run in the event loop's thread.
    for line in await asyncio.to_thread(sweep_namespace, own_netns()):
        log.warning("startup sweep: %s", line)
    registry = CollectorRegistry()
    identity = opts.identity or socket.gethostname()
    agent = HostAgent(identity, cli_ctx, registry, opts.frame_budget)
    control = AgentServer(
        opts.host, opts.port, srv_ctx, lambda: agent.control, role=wire.Role.AGENT,
        identity=identity, metrics_port=opts.metrics_port, registry=registry,
    )  # fmt: skip
    frames = AgentServer(
        opts.host, opts.port + 1, srv_ctx, lambda: agent.frames, role=wire.Role.DEST_AGENT,
        identity=identity, registry=registry, metrics_prefix="netpass_agent_frame_channel",
    )  # fmt: skip
    watchdog = _start_watchdog() if opts.watchdog else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with control, frames:
        print(
            f"{READY_LINE} control {opts.host}:{control.port} frames {opts.host}:{frames.port}"
            + (f" metrics :{control.metrics_port}" if control.metrics_port else ""),
            flush=True,
        )
        await stop.wait()
    if watchdog is not None:
        # A clean exit leaves nothing behind; the watchdog has nothing to do.
        watchdog.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(2)


def _start_watchdog() -> subprocess.Popen[bytes]:
    # Its own session: a signal to the agent's process group does not take it along.
    return subprocess.Popen(
        [sys.executable, "-m", "netpass.agent.watchdog", str(os.getpid()), own_netns()],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
