"""AgentServer: accepts mutual-TLS netpass connections and runs one handler per connection.

Every failure is confined to its connection: TLS is negotiated inside the connection's own
task (not by asyncio.start_server, which would fail silently before our code runs), so a
client without a certificate or from another CA is logged and counted like any other
outcome, and nothing a peer sends can reach another connection's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

from prometheus_client import CollectorRegistry

from netpass import wire
from netpass.agent.channel import (
    DEFAULT_READ_SIZE,
    HANDSHAKE_TIMEOUT,
    Channel,
    ChannelError,
    HandshakeError,
    accept,
    describe_io_error,
    error_code_name,
    stream_address,
)
from netpass.agent.metrics import AgentMetrics
from netpass.errors import UsageError

__all__ = ["AgentServer", "Handler", "HandlerFactory"]

log = logging.getLogger("netpass.agent")

Handler = Callable[[Channel], Awaitable[None]]
"""Runs one connection: reads with channel.recv() until it is done. Closing is the server's."""
HandlerFactory = Callable[[], Handler]
"""Called once per accepted connection, so each connection gets fresh handler state."""

DEFAULT_MAX_CONNECTIONS: Final = 64


class AgentServer:
    """Serve netpass on ``listen_host:port`` (port 0: ephemeral; see ``.port``).

    ``role`` is this side's role (AGENT for the control channel, DEST_AGENT for frames); one
    server speaks one role. Per-connection memory is bounded by ``limits.max_buffer_bytes``
    plus twice ``read_size`` (the stream buffer) plus one decoded message, and at most
    ``max_connections`` are served at once; the rest are closed on arrival.
    """

    def __init__(
        self,
        listen_host: str,
        port: int,
        ssl_ctx: ssl.SSLContext,
        handler_factory: HandlerFactory,
        *,
        role: wire.Role = wire.Role.AGENT,
        identity: str | None = None,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        features: wire.Feature = wire.SUPPORTED_FEATURES,
        require_features: wire.Feature = wire.Feature.NONE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        read_size: int = DEFAULT_READ_SIZE,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = None,
        registry: CollectorRegistry | None = None,
        metrics_prefix: str = "netpass_agent",
    ) -> None:
        if ssl_ctx.verify_mode != ssl.CERT_REQUIRED:
            raise UsageError("AgentServer needs an SSLContext that requires client certificates")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.listen_host = listen_host
        self.role = wire.Role(role)
        self.identity = identity or socket.gethostname()
        self.metrics = AgentMetrics(registry, metrics_prefix)
        self._requested_port = port
        self._ctx = ssl_ctx
        self._factory = handler_factory
        self._limits = limits
        self._features = features
        self._require = require_features
        self._max = max_connections
        self._hs_timeout = handshake_timeout
        self._read_size = read_size
        self._metrics_host = metrics_host
        self._metrics_req = metrics_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.metrics_port: int | None = None

    def __repr__(self) -> str:
        return f"<AgentServer {self.role.name} {self.listen_host}:{self.port}>"

    # -- lifecycle --

    async def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._on_connect,
                self.listen_host,
                self._requested_port,
                limit=self._read_size,
            )
        except OSError as exc:
            where = f"{self.listen_host}:{self._requested_port}"
            raise UsageError(f"cannot listen on {where}: {describe_io_error(exc)}") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self._metrics_req is not None:
            try:
                self.metrics_port = self.metrics.serve(self._metrics_host, self._metrics_req)
            except OSError as exc:
                await self.close()
                raise UsageError(
                    f"cannot serve metrics on {self._metrics_host}:{self._metrics_req}:"
                    f" {describe_io_error(exc)}"
                ) from exc
        log.info("agent %s listening on %s:%d", self.role.name, self.listen_host, self.port)

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening, end every connection (outcome "cancelled"), stop /metrics."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        await self.metrics.stop_serving()

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        return len(self._tasks)

    # -- one connection --

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        where = stream_address(writer)
        if len(self._tasks) >= self._max:
            log.warning(
                "agent %s: refused %s: %d connections already open",
                self.role.name,
                where,
                self._max,
            )
            self.metrics.connection_ended("rejected_busy")
            writer.transport.abort()
            return
        self._tasks.add(task)
        self.metrics.active.inc()
        outcome = "cancelled"
        try:
            outcome = await self._serve(reader, writer, where)
        except asyncio.CancelledError:
            # Only close() cancels us. Finish instead of re-raising: on Python 3.11 the
            # streams machinery calls task.exception() on a cancelled client_connected_cb task
            # and logs a spurious error.
            writer.transport.abort()
        except Exception:  # a bug here must still not escape into the event loop
            log.exception("agent %s: connection from %s failed", self.role.name, where)
            outcome = "handler_error"
            writer.transport.abort()
        finally:
            self._tasks.discard(task)
            self.metrics.active.dec()
            self.metrics.connection_ended(outcome)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str
    ) -> str:
        name = self.role.name
        try:
            await writer.start_tls(self._ctx, ssl_handshake_timeout=self._hs_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # start_tls has closed the transport already.
            why = "timed out" if isinstance(exc, TimeoutError) else describe_io_error(exc)
            log.warning("agent %s: closed %s: TLS handshake failed: %s", name, where, why)
            writer.transport.abort()
            return "tls_failed"
        try:
            ch = await accept(
                reader,
                writer,
                self.role,
                self.identity,
                limits=self._limits,
                features=self._features,
                require_features=self._require,
                timeout=self._hs_timeout,
                read_size=self._read_size,
                on_message=self.metrics.observe,
            )
        except HandshakeError as exc:
            log.warning("agent %s: closed connection: %s", name, exc)  # exc names the peer
            return "handshake_failed"
        log.info(
            "agent %s: %s connected from %s as %r (%s, features %s)",
            name,
            ch.peer_identity,
            where,
            ch.peer_name,
            ch.tls_version,
            ch.features.name or "none",
        )
        try:
            await self._factory()(ch)
        except wire.RemoteProtocolError as exc:
            # The channel has sent ERROR and closed.
            log.warning(
                "agent %s: closed %s (%s): protocol error, sent ERROR %s: %s",
                name,
                where,
                ch.peer_identity,
                error_code_name(exc.error_code),
                exc,
            )
            return "protocol_error"
        except ChannelError as exc:
            log.warning("agent %s: lost %s (%s): %s", name, where, ch.peer_identity, exc)
            return "io_error"
        except asyncio.CancelledError:
            ch.close_nowait(wire.Error(wire.ErrorCode.INTERNAL, "agent shutting down"))
            raise
        except Exception as exc:
            log.exception("agent %s: handler for %s failed", name, where)
            await ch.abort_with(wire.ErrorCode.INTERNAL, f"agent handler failed: {exc}")
            return "handler_error"
        finally:
            await ch.close()
        return "ok"
