"""Prometheus counters of one AgentServer, and the optional HTTP endpoint that exposes them.

Each server gets its own CollectorRegistry unless given one: two servers in one process must
not collide on metric names in the global registry. An agent's control and frame servers share
one registry (one /metrics endpoint) under different name prefixes.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from netpass import wire

__all__ = ["OUTCOMES", "AgentMetrics"]

# Every connection ends in exactly one of these (label values of connections_total).
OUTCOMES: Final = (
    "ok",  # handler returned normally
    "tls_failed",  # no certificate, wrong CA, not TLS at all, TLS timeout
    "handshake_failed",  # TLS fine, but no acceptable HELLO (refused, not netpass, timeout)
    "protocol_error",  # the peer broke the protocol after HELLO; it got an ERROR
    "io_error",  # the stream broke (reset, TLS error mid-stream)
    "handler_error",  # our handler raised; the peer got ERROR(INTERNAL)
    "rejected_busy",  # max_connections reached
    "cancelled",  # the server shut down
)


class AgentMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, prefix: str = "netpass_agent"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, prefix
        self.connections = Counter(
            f"{p}_connections",
            "Connections accepted, by how they ended",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:  # export zeros, so rates work from the first scrape
            self.connections.labels(outcome)
        self.active = Gauge(f"{p}_active_connections", "Connections open now", registry=r)
        self.messages = Counter(
            f"{p}_messages_received", "Messages received, by type", ["type"], registry=r
        )
        self.frames = Counter(f"{p}_frames_received", "Frames received", registry=r)
        self.frame_bytes = Counter(
            f"{p}_frame_bytes_received",
            "Bytes of frame records received (vnet header included)",
            registry=r,
        )
        self._by_type = {t: self.messages.labels(t.name) for t in wire.MsgType}
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def observe(self, msg: wire.Message) -> None:
        """Count one received message (Channel.on_message hook)."""
        self._by_type[msg.TYPE].inc()
        if isinstance(msg, wire.Frames):
            self.frames.inc(len(msg.frames))
            self.frame_bytes.inc(sum(len(r.data) for r in msg.frames))

    def connection_ended(self, outcome: str) -> None:
        self.connections.labels(outcome).inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (for tests and reports); 0 if absent."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    # -- HTTP exposition --

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0 picks a port); returns the port bound."""
        if self._http is None:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http[0].server_address[1])

    async def stop_serving(self) -> None:
        if self._http is None:
            return
        httpd, thread = self._http
        self._http = None
        # shutdown() blocks until serve_forever notices (up to its 0.5 s poll): off the loop.
        await asyncio.to_thread(httpd.shutdown)
        httpd.server_close()
        await asyncio.to_thread(thread.join, 2.0)
