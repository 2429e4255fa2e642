"""One authenticated netpass connection: an asyncio TLS stream driving a ``wire.Connection``.

The wire layer decides what is legal; this module only moves bytes and maps failures onto
errors a user can act on. Reads are sized so the wire buffer never holds more than
``Limits.max_buffer_bytes`` (docs/protocol.md §7), which bounds a connection's memory however
the peer behaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from netpass import wire
from netpass.agent.tls import peer_subject
from netpass.errors import NetpassError, UsageError

__all__ = [
    "DEFAULT_READ_SIZE",
    "HANDSHAKE_TIMEOUT",
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "ChannelStats",
    "ConnectError",
    "HandshakeError",
    "accept",
    "connect",
]

log = logging.getLogger("netpass.agent")

# Larger reads mean fewer trips through the event loop and the SSL layer; 256 KiB is where
# the gain flattens out on loopback while keeping per-connection memory modest.
DEFAULT_READ_SIZE: Final = 256 * 1024
HANDSHAKE_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 2.0
# Events a ping() may read on behalf of recv() while it waits for its PONG; beyond that the
# peer is streaming and a clock estimate would be meaningless anyway.
MAX_STASHED_EVENTS: Final = 64


M = TypeVar("M", bound=wire.Message)


class ChannelError(NetpassError):
    """The channel failed: the stream broke or the peer vanished."""


class ConnectError(ChannelError):
    """No TCP connection could be made."""


class HandshakeError(ChannelError):
    """No netpass session: TLS failed, the peer refused our HELLO, or it does not speak netpass."""


class ChannelClosed(ChannelError):
    """The channel was used after it closed."""


@dataclass(slots=True)
class ChannelStats:
    bytes_read: int = 0
    bytes_written: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    frames_received: int = 0
    frames_sent: int = 0


def describe_io_error(exc: BaseException) -> str:
    """One line for an I/O or TLS failure; TLS alerts say which side objected."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        text = reason.lower().replace("_", " ")
        if "ALERT" in reason.upper():
            return f"the peer rejected the TLS session ({text})"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client presented no certificate"
        return f"TLS error: {text}"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own strerror repeats the address
    return str(exc) or type(exc).__name__


def stream_address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else "?"


class Channel:
    """A connected netpass channel (HELLOs exchanged). Obtain one with connect() or accept().

    * ``recv()`` returns the next event. PINGs are answered automatically and not returned;
      PONGs that answer our own ``ping()`` are consumed by it.
    * ``send()`` writes one message and waits while the transport is backed up.
    * A peer that breaks the protocol gets an ERROR and the channel closes; ``recv()`` then
      raises the ``wire.RemoteProtocolError``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: wire.Connection,
        *,
        read_size: int = DEFAULT_READ_SIZE,
        on_message: Callable[[wire.Message], None] | None = None,
    ) -> None:
        if read_size < 1:
            raise ValueError("read_size must be positive")
        self.conn = conn
        self.stats = ChannelStats()
        self.peer_address = stream_address(writer)
        # The verified certificate subject: who the peer *is*, whatever its HELLO claims.
        self.peer_identity = peer_subject(writer.get_extra_info("ssl_object"))
        self.on_message = on_message
        self._reader = reader
        self._writer = writer
        self._read_size = read_size
        self._read_lock = asyncio.Lock()
        self._stash: deque[wire.Event] = deque()
        self._pong_waiters: dict[int, asyncio.Future[wire.ClockSample]] = {}
        self._last_ping_t1 = 0
        self._last_read_ns = 0
        self._closed = False

    # -- introspection --

    @property
    def role(self) -> wire.Role:
        return self.conn.our_role

    @property
    def peer_hello(self) -> wire.Hello:
        hello = self.conn.peer_hello
        assert hello is not None, "Channel exists only after the HELLO exchange"
        return hello

    @property
    def peer_name(self) -> str:
        """The identity the peer announced in its HELLO (unauthenticated; see peer_identity)."""
        return self.peer_hello.identity

    @property
    def features(self) -> wire.Feature:
        return self.conn.negotiated_features or wire.Feature.NONE

    @property
    def version(self) -> tuple[int, int]:
        v = self.conn.negotiated_version
        assert v is not None
        return v

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tls_version(self) -> str | None:
        obj = self._writer.get_extra_info("ssl_object")
        return obj.version() if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None

    def __repr__(self) -> str:
        who = self.peer_identity or "unauthenticated"
        return f"<Channel {self.role.name} <-> {self.peer_address} ({who})>"

    # -- sending --

    async def send(self, event: wire.Message) -> None:
        """Send one message; raises wire.LocalProtocolError if it is not allowed now."""
        self._write(event)
        await self._drain()

    async def send_many(self, events: Iterable[wire.Message]) -> None:
        """Send several messages with one flow-control wait (fewer event-loop round trips)."""
        for event in events:
            self._write(event)
        await self._drain()

    def _write(self, event: wire.Message) -> None:
        if self._closed:
            raise ChannelClosed(f"channel to {self.peer_address} is closed")
        data = self.conn.send(event)
        # conn.send() and write() with no await between them: concurrent senders (the PONG
        # answered from recv(), say) can never interleave bytes or reorder the state machine.
        self._writer.write(data)
        st = self.stats
        st.bytes_written += len(data)
        st.messages_sent += 1
        if isinstance(event, wire.Frames):
            st.frames_sent += len(event.frames)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (OSError, ssl.SSLError) as exc:
            self._abort()
            raise ChannelError(f"writing to {self.peer_address}: {describe_io_error(exc)}") from exc
        # drain() returns without yielding while the transport is below its high-water mark,
        # and loopback socket buffers take megabytes: a task streaming FRAMES would otherwise
        # starve every other connection on this loop.
        await asyncio.sleep(0)

    # -- receiving --

    async def recv(self) -> wire.Event:
        """The next event from the peer: a wire.Message, or wire.ConnectionClosed once.

        Raises ChannelClosed after that, ChannelError if the stream breaks, and
        wire.RemoteProtocolError (after sending ERROR and closing) if the peer misbehaves.
        """
        async with self._read_lock:
            while True:
                if self._stash:
                    return self._stash.popleft()
                event = await self._read_event()
                if event is not None:
                    return event

    async def expect(self, kind: type[M], timeout: float = 10.0) -> M:
        """The next event, which must be a KIND message (ChannelError otherwise)."""
        ev = await asyncio.wait_for(self.recv(), timeout)
        if not isinstance(ev, kind):
            raise ChannelError(f"expected {kind.__name__} from {self.peer_address}, got {ev!r}")
        return ev

    async def _read_event(self) -> wire.Event | None:
        """Read until one event is decoded; None if it was handled here (PING, our PONGs)."""
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
                if event is wire.NEED_DATA:
                    conn.receive_data(await self._read_some())
                    continue
            except wire.RemoteProtocolError as exc:
                await self._refuse(exc)
                raise
            if event is wire.PAUSED:
                raise ChannelClosed(f"{self.peer_address} has closed the channel")
            assert isinstance(event, wire.Event)
            if not isinstance(event, wire.Message):
                return event  # ConnectionClosed
            st = self.stats
            st.messages_received += 1
            if isinstance(event, wire.Frames):
                st.frames_received += len(event.frames)
            if self.on_message is not None:
                self.on_message(event)
            if isinstance(event, wire.Ping):
                await self._answer(event)
                return None
            if isinstance(event, wire.Pong) and self._pong_arrived(event):
                return None
            return event

    async def _read_some(self) -> bytes:
        # Never more than the wire buffer can still take: a peer can make us hold at most
        # max_buffer_bytes, however large the messages it announces.
        room = self.conn.limits.max_buffer_bytes - self.conn.buffered_bytes
        try:
            data = await self._reader.read(max(1, min(self._read_size, room)))
        except (OSError, ssl.SSLError) as exc:
            self._abort()
            raise ChannelError(
                f"reading from {self.peer_address}: {describe_io_error(exc)}"
            ) from exc
        # Arrival time of whatever this read completes: t2 of a PING, t4 of a PONG.
        self._last_read_ns = time.time_ns()
        self.stats.bytes_read += len(data)
        return data

    async def _refuse(self, exc: wire.ProtocolError) -> None:
        """Tell the peer why (ERROR), then close without waiting on it."""
        log.debug("%s: protocol error from peer: %s", self.peer_address, exc)
        if not self._closed and self.conn.can_send(wire.Error.from_exception(exc)):
            with contextlib.suppress(Exception):
                self._write(wire.Error.from_exception(exc))
        await self._shutdown(timeout=0.5)

    # -- clock probes --

    async def ping(self, timeout: float = 5.0) -> wire.ClockSample:
        """Send a PING and return the offset sample from its PONG (see clock.py).

        Works whether or not another task is blocked in recv(): whoever reads routes the PONG
        here; if nobody is reading, ping() reads itself and keeps other events for recv().
        """
        loop = asyncio.get_running_loop()
        # Strictly increasing t1: PONGs are matched to waiters by the echoed t1.
        t1 = max(time.time_ns(), self._last_ping_t1 + 1)
        self._last_ping_t1 = t1
        fut: asyncio.Future[wire.ClockSample] = loop.create_future()
        self._pong_waiters[t1] = fut
        try:
            await self.send(wire.Ping(t1))
        except BaseException:
            self._pong_waiters.pop(t1, None)
            raise
        try:
            async with asyncio.timeout(timeout):
                return await self._pump_until(fut)
        except TimeoutError:
            raise ChannelError(f"no PONG from {self.peer_address} within {timeout} s") from None
        finally:
            # If no PONG came, the waiter stays registered but cancelled, so a late PONG is
            # dropped instead of surfacing from recv(); the wire's limit of 16 unanswered
            # PINGs bounds the dict.
            fut.cancel()

    def _pong_arrived(self, pong: wire.Pong) -> bool:
        fut = self._pong_waiters.pop(pong.t1_ns, None)
        if fut is None:
            return False  # answers a PING the application sent itself
        if not fut.done():
            t4 = self._last_read_ns
            try:
                fut.set_result(wire.clock_offset(pong.t1_ns, pong.t2_ns, pong.t3_ns, t4))
            except ValueError as exc:  # our wall clock stepped, or the peer's stamps are bogus
                fut.set_exception(ChannelError(f"unusable PONG from {self.peer_address}: {exc}"))
        return True

    async def _pump_until(self, fut: asyncio.Future[wire.ClockSample]) -> wire.ClockSample:
        while not fut.done():
            acquire = asyncio.ensure_future(self._read_lock.acquire())
            try:
                await asyncio.wait((fut, acquire), return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                _drop_acquire(acquire, self._read_lock)
                raise
            if not acquire.done():
                _drop_acquire(acquire, self._read_lock)
                continue  # fut is done: another reader routed the PONG
            try:
                if not fut.done():
                    event = await self._read_event()
                    if event is not None:
                        if len(self._stash) >= MAX_STASHED_EVENTS:
                            raise ChannelError(
                                f"{self.peer_address} sent {MAX_STASHED_EVENTS} messages while"
                                " a PING was outstanding; read them with recv() first"
                            )
                        self._stash.append(event)
            finally:
                self._read_lock.release()
        return fut.result()

    async def _answer(self, ping: wire.Ping) -> None:
        t2 = self._last_read_ns
        if self._closed:
            return
        pong = wire.Pong(ping.t1_ns, t2, max(t2, time.time_ns()))
        if self.conn.can_send(pong):  # not after our BYE, say
            await self.send(pong)

    # -- closing --

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Say BYE if the protocol allows it now, then close TLS and TCP. Idempotent."""
        if self._closed:
            return
        if self.conn.can_send(wire.Bye()):
            with contextlib.suppress(Exception):
                self._write(wire.Bye())
        await self._shutdown(timeout)

    async def abort_with(self, code: int, message: str) -> None:
        """Send ERROR(code, message) and close: for refusals decided by the application."""
        if not self._closed:
            err = wire.Error(
                code, message.encode()[: wire.MAX_TEXT_BYTES].decode("utf-8", "ignore")
            )
            if self.conn.can_send(err):
                with contextlib.suppress(Exception):
                    self._write(err)
        await self._shutdown(CLOSE_TIMEOUT)

    def close_nowait(self, error: wire.Error | None = None) -> None:
        """Start closing without waiting: ``error`` (or BYE, if allowed) is flushed first.

        For cancellation paths, where awaiting a peer's close_notify is not an option.
        """
        if self._closed:
            return
        msg: wire.Message = error if error is not None else wire.Bye()
        if self.conn.can_send(msg):
            with contextlib.suppress(Exception):
                self._write(msg)
        self._closed = True
        self._fail_pings()
        self._writer.close()

    def _fail_pings(self) -> None:
        for fut in self._pong_waiters.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"channel to {self.peer_address} closed"))
                fut.exception()  # mark retrieved: nobody may be waiting any more

    async def _shutdown(self, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_pings()
        self._writer.close()
        try:
            # TLS close waits for the peer's close_notify; a peer that never answers must
            # not hold us (or a server's connection slot) for long.
            await asyncio.wait_for(self._writer.wait_closed(), timeout)
        except (TimeoutError, OSError, ssl.SSLError):
            self._writer.transport.abort()

    def _abort(self) -> None:
        self._closed = True
        self._fail_pings()
        self._writer.transport.abort()


def _drop_acquire(acquire: asyncio.Task[Literal[True]], lock: asyncio.Lock) -> None:
    # An acquire that already succeeded holds the lock and must give it back; a pending one
    # is cancelled, and asyncio.Lock guarantees a cancelled acquire never holds it.
    if acquire.done():
        if not acquire.cancelled() and acquire.exception() is None:
            lock.release()
    else:
        acquire.cancel()


def error_code_name(code: int) -> str:
    try:
        return wire.ErrorCode(code).name
    except ValueError:
        return f"code {code}"


# --- opening channels -----------------------------------------------------------------------


async def _hello_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    role: wire.Role,
    identity: str,
    *,
    limits: wire.Limits,
    features: wire.Feature,
    require_features: wire.Feature,
    timeout: float,
    read_size: int,
    on_message: Callable[[wire.Message], None] | None,
) -> Channel:
    conn = wire.Connection(role, limits=limits)
    ch = Channel(reader, writer, conn, read_size=read_size, on_message=on_message)
    where = ch.peer_address
    try:
        hello = conn.make_hello(identity, features)
        async with asyncio.timeout(timeout):
            await ch.send(hello)
            event = await ch._read_event()
    except wire.LocalProtocolError as exc:
        await ch._shutdown(0)
        raise UsageError(f"cannot send HELLO: {exc}") from None
    except wire.RemoteProtocolError as exc:
        # _read_event() already answered with ERROR and closed.
        if exc.error_code == wire.ErrorCode.MALFORMED and "magic" in str(exc):
            raise HandshakeError(f"{where} does not speak netpass: {exc}") from exc
        raise HandshakeError(
            f"{where} sent an unacceptable HELLO ({error_code_name(exc.error_code)}): {exc}"
        ) from exc
    except TimeoutError:
        await ch._shutdown(0)
        raise HandshakeError(f"no HELLO from {where} within {timeout} s") from None
    except ChannelError as exc:
        await ch._shutdown(0)
        raise HandshakeError(f"HELLO exchange with {where} failed: {exc}") from exc

    if isinstance(event, wire.Error):
        await ch._shutdown(0.5)
        code = error_code_name(event.code)
        raise HandshakeError(f"{where} refused the session: {code}: {event.message}")
    if isinstance(event, wire.ConnectionClosed) or event is None:
        await ch._shutdown(0)
        raise HandshakeError(
            f"{where} closed the connection before its HELLO (not a netpass agent, or it"
            " refused our certificate)"
        )
    if not isinstance(event, wire.Hello):  # the wire refuses anything else before HELLO
        await ch.abort_with(wire.ErrorCode.UNEXPECTED_MESSAGE, "expected HELLO")
        raise HandshakeError(f"{where} sent {type(event).__name__} instead of HELLO")
    missing = require_features & ~ch.features
    if missing:
        text = f"features {missing!r} are required but not offered by both sides"
        await ch.abort_with(wire.ErrorCode.FEATURE_NOT_NEGOTIATED, text)
        raise HandshakeError(f"{where}: {text}")
    return ch


async def connect(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    role: wire.Role,
    identity: str,
    *,
    server_hostname: str | None = None,
    limits: wire.Limits = wire.DEFAULT_LIMITS,
    features: wire.Feature = wire.SUPPORTED_FEATURES,
    require_features: wire.Feature = wire.Feature.NONE,
    timeout: float = HANDSHAKE_TIMEOUT,
    read_size: int = DEFAULT_READ_SIZE,
    on_message: Callable[[wire.Message], None] | None = None,
    netns: str | None = None,
) -> Channel:
    """Open a TLS connection to an agent and exchange HELLOs; returns a ready Channel.

    NETNS (a name or a path): open the TCP connection from that network namespace (the lab's
    orchestrator reaches agents on the lab network this way).

    ``identity`` goes into our HELLO (host name, say). Raises ConnectError (no TCP),
    HandshakeError (TLS, refusal, not netpass, missing ``require_features``).
    """
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            if netns is None:
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=ctx,
                    server_hostname=server_hostname,
                    limit=read_size,
                    ssl_handshake_timeout=timeout,
                )
            else:
                sock = await asyncio.to_thread(_tcp_in_netns, netns, host, port, timeout)
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    ssl=ctx,
                    server_hostname=server_hostname or host,
                    limit=read_size,
                    ssl_handshake_timeout=timeout,
                )
    except TimeoutError:
        raise HandshakeError(f"connecting to {where}: no TLS session within {timeout} s") from None
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        # A reset here comes after the TCP connect: the peer dropped us during TLS.
        why = describe_io_error(exc)
        raise HandshakeError(f"TLS handshake with {where} failed: {why}") from exc
    except OSError as exc:
        raise ConnectError(f"cannot connect to {where}: {describe_io_error(exc)}") from exc
    return await _hello_exchange(
        reader,
        writer,
        role,
        identity,
        limits=limits,
        features=features,
        require_features=require_features,
        timeout=timeout,
        read_size=read_size,
        on_message=on_message,
    )


def _tcp_in_netns(netns: str, host: str, port: int, timeout: float) -> socket.socket:
    from netpass.datapath.netns import in_netns

    with in_netns(netns):
        sock = socket.create_connection((host, port), timeout=timeout)
    sock.setblocking(False)
    return sock


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    role: wire.Role,
    identity: str,
    *,
    limits: wire.Limits = wire.DEFAULT_LIMITS,
    features: wire.Feature = wire.SUPPORTED_FEATURES,
    require_features: wire.Feature = wire.Feature.NONE,
    timeout: float = HANDSHAKE_TIMEOUT,
    read_size: int = DEFAULT_READ_SIZE,
    on_message: Callable[[wire.Message], None] | None = None,
) -> Channel:
    """Server side of connect(): the stream is already TLS; exchange HELLOs."""
    return await _hello_exchange(
        reader,
        writer,
        role,
        identity,
        limits=limits,
        features=features,
        require_features=require_features,
        timeout=timeout,
        read_size=read_size,
        on_message=on_message,
    )
