"""netpass.agent: mutual TLS, HELLO negotiation, refusals, clock offset, FRAMES, throughput.

Everything runs over real TLS on 127.0.0.1 with ephemeral ports and a PKI generated with the
openssl CLI; each test drives its own event loop with asyncio.run (no plugin needed).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import pytest

from netpass import wire
from netpass.agent import (
    AgentServer,
    Channel,
    HandshakeError,
    TestPki,
    client_context,
    connect,
    estimate_offset,
    make_test_pki,
    server_context,
)
from netpass.agent.clock import best_sample
from netpass.agent.throughput import FrameSink, make_frames, measure_throughput
from netpass.errors import UsageError

T = TypeVar("T")
HOST = "127.0.0.1"
SERVER_SUBJECT = "O=netpass lab,CN=netpass-agent"
CLIENT_SUBJECT = "O=netpass lab,CN=netpass-orchestrator"


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("other-pki"), org="other org")


class Idle:
    """AGENT handler: records its channel and reads until the peer says BYE or leaves."""

    def __init__(self) -> None:
        self.channels: list[Channel] = []
        self.events: list[wire.Event] = []

    def __call__(self) -> Callable[[Channel], Awaitable[None]]:
        return self.handle

    async def handle(self, ch: Channel) -> None:
        self.channels.append(ch)
        while True:
            ev = await ch.recv()
            self.events.append(ev)
            if isinstance(ev, wire.Bye | wire.Error | wire.ConnectionClosed):
                return


def agent_server(pki: TestPki, handler: Idle, **kw: Any) -> AgentServer:
    return AgentServer(HOST, 0, pki.server_context(), handler, identity="agent-1", **kw)


async def orchestrator(pki: TestPki, port: int, **kw: Any) -> Channel:
    return await connect(HOST, port, pki.client_context(), wire.Role.ORCHESTRATOR, "orch", **kw)


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


# --- TLS contexts ---------------------------------------------------------------------------


def test_contexts_are_mutual_tls_1_2_plus(pki: TestPki) -> None:
    for ctx in (pki.server_context(), pki.client_context()):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert pki.client_context().check_hostname
    assert not pki.client_context(check_hostname=False).check_hostname


def test_context_errors_name_the_bad_file(pki: TestPki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(UsageError, match=r"certificate .*nope\.crt does not exist"):
        server_context(missing, pki.server_key, pki.ca_cert)
    with pytest.raises(UsageError, match=r"CA certificate .* is not a regular file"):
        client_context(pki.client_cert, pki.client_key, tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="cannot use certificate"):
        server_context(junk, pki.server_key, pki.ca_cert)
    with pytest.raises(UsageError, match="cannot use certificate"):  # key of another cert
        server_context(pki.server_cert, pki.client_key, pki.ca_cert)
    with pytest.raises(UsageError, match="cannot load CA certificate"):
        client_context(pki.client_cert, pki.client_key, junk)


# --- HELLO negotiation ----------------------------------------------------------------------


def test_hello_negotiation_with_mutual_tls(pki: TestPki) -> None:
    handler = Idle()

    async def main() -> None:
        async with agent_server(pki, handler, features=wire.Feature.COUNTS) as server:
            ch = await orchestrator(pki, server.port)
            assert ch.peer_identity == SERVER_SUBJECT  # from the verified certificate
            assert ch.peer_name == "agent-1"  # from its HELLO
            assert ch.peer_hello.role is wire.Role.AGENT
            assert ch.version == wire.PROTOCOL_VERSION
            assert ch.features == wire.Feature.COUNTS  # the server offered only COUNTS
            assert ch.tls_version in ("TLSv1.2", "TLSv1.3")
            await wait_for(lambda: bool(handler.channels))
            theirs = handler.channels[0]
            assert theirs.peer_identity == CLIENT_SUBJECT
            assert theirs.peer_name == "orch"
            assert theirs.features == wire.Feature.COUNTS
            await ch.close()
            await wait_for(lambda: server.connections == 0)
            assert isinstance(handler.events[-1], wire.Bye)
            assert server.metrics.value("netpass_agent_connections_total", {"outcome": "ok"}) == 1

    run(main())


def test_required_feature_missing_is_refused(pki: TestPki) -> None:
    async def main() -> None:
        async with agent_server(pki, Idle(), features=wire.Feature.NONE) as server:
            with pytest.raises(HandshakeError, match="required but not offered"):
                await orchestrator(pki, server.port, require_features=wire.Feature.COUNTS)

    run(main())


def test_wrong_role_is_refused_with_a_clear_error(pki: TestPki) -> None:
    async def main() -> None:
        async with agent_server(pki, Idle()) as server:  # an AGENT talks to ORCHESTRATORs
            # Both sides send HELLO at once, so each sees the other's wrong role.
            with pytest.raises(HandshakeError, match=r"unacceptable HELLO \(BAD_ROLE\)"):
                await connect(
                    HOST, server.port, pki.client_context(), wire.Role.SOURCE_AGENT, "src"
                )
            await wait_for(lambda: server.connections == 0)
            outcome = {"outcome": "handshake_failed"}
            assert server.metrics.value("netpass_agent_connections_total", outcome) == 1

    run(main())


def test_peer_that_is_not_netpass(pki: TestPki) -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read(1024)
        writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(http, HOST, 0, ssl=pki.server_context())
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            with pytest.raises(HandshakeError, match="does not speak netpass"):
                await orchestrator(pki, port)

    run(main())


# --- refused TLS clients --------------------------------------------------------------------


def test_client_without_certificate_is_rejected_and_server_keeps_serving(
    pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=pki.ca_cert)  # trusts the server, presents nothing

    async def main() -> None:
        async with agent_server(pki, Idle()) as server:
            with pytest.raises(HandshakeError, match=r"rejected the TLS session|reset|closed"):
                await connect(HOST, server.port, bare, wire.Role.ORCHESTRATOR, "anon")
            ch = await orchestrator(pki, server.port)
            await ch.ping()
            await ch.close()
            await wait_for(lambda: server.connections == 0)
            m = server.metrics
            assert m.value("netpass_agent_connections_total", {"outcome": "tls_failed"}) == 1
            assert m.value("netpass_agent_connections_total", {"outcome": "ok"}) == 1

    with caplog.at_level(logging.WARNING, logger="netpass.agent"):
        run(main())
    assert "TLS handshake failed" in caplog.text
    assert "certificate" in caplog.text  # says why


def test_client_with_certificate_from_another_ca_is_rejected(
    pki: TestPki, other_pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    # Trusts our CA (so only the server's check can fail), but its own cert is foreign.
    foreign = client_context(other_pki.client_cert, other_pki.client_key, pki.ca_cert)

    async def main() -> None:
        async with agent_server(pki, Idle()) as server:
            with pytest.raises(HandshakeError):
                await connect(HOST, server.port, foreign, wire.Role.ORCHESTRATOR, "spy")
            await wait_for(lambda: server.connections == 0)
            outcome = {"outcome": "tls_failed"}
            assert server.metrics.value("netpass_agent_connections_total", outcome) == 1
            ch = await orchestrator(pki, server.port)  # still serving
            await ch.close()

    with caplog.at_level(logging.WARNING, logger="netpass.agent"):
        run(main())
    assert "TLS handshake failed: certificate verification failed" in caplog.text


def test_server_from_another_ca_is_rejected_by_the_client(pki: TestPki, other_pki: TestPki) -> None:
    async def main() -> None:
        async with agent_server(other_pki, Idle()) as server:
            with pytest.raises(HandshakeError, match="certificate verification failed"):
                await orchestrator(pki, server.port)

    run(main())


def test_plain_tcp_and_silent_tls_clients_are_dropped(pki: TestPki) -> None:
    async def main() -> None:
        async with agent_server(pki, Idle(), handshake_timeout=0.3) as server:
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(b"\x16\x03\x01\x00\x05hello, not TLS\r\n")
            assert await reader.read(4096) == b"" or reader.at_eof()
            writer.close()
            # TLS is fine, but no HELLO follows: dropped after the handshake timeout.
            reader, writer = await asyncio.open_connection(
                HOST, server.port, ssl=pki.client_context()
            )
            got = b""
            while chunk := await reader.read(4096):
                got += chunk
            assert got.startswith(wire.MAGIC)  # its HELLO, then the close
            writer.close()
            await wait_for(lambda: server.connections == 0)
            m = server.metrics
            assert m.value("netpass_agent_connections_total", {"outcome": "tls_failed"}) == 1
            outcome = {"outcome": "handshake_failed"}
            assert m.value("netpass_agent_connections_total", outcome) == 1

    run(main())


def test_max_connections(pki: TestPki) -> None:
    async def main() -> None:
        async with agent_server(pki, Idle(), max_connections=1) as server:
            first = await orchestrator(pki, server.port)
            with pytest.raises(HandshakeError):
                await orchestrator(pki, server.port, timeout=3)
            await first.close()
            outcome = {"outcome": "rejected_busy"}
            assert server.metrics.value("netpass_agent_connections_total", outcome) == 1

    run(main())


# --- protocol errors ------------------------------------------------------------------------


def test_garbage_after_hello_gets_error_and_others_are_unaffected(
    pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Idle()

    async def main() -> None:
        async with agent_server(pki, handler) as server:
            good = await orchestrator(pki, server.port)  # connected throughout
            reader, writer = await asyncio.open_connection(
                HOST, server.port, ssl=pki.client_context()
            )
            raw = wire.Connection(wire.Role.ORCHESTRATOR)
            writer.write(raw.send(raw.make_hello("rogue")))
            writer.write(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
            await writer.drain()
            events: list[wire.Event] = []
            while True:
                ev = raw.next_event()
                if ev is wire.NEED_DATA:
                    raw.receive_data(await reader.read(65536))
                    continue
                assert isinstance(ev, wire.Event)
                events.append(ev)
                if isinstance(ev, wire.ConnectionClosed):
                    break
            writer.close()
            assert isinstance(events[0], wire.Hello)
            err = events[1]
            assert isinstance(err, wire.Error)
            assert err.code == wire.ErrorCode.MALFORMED
            assert "does not speak netpass" in err.message
            assert events[2] == wire.ConnectionClosed(clean=True)

            est = await estimate_offset(good, rounds=3)  # the other client is fine
            assert est.rounds == 3
            await good.close()
            await wait_for(lambda: server.connections == 0)
            m = server.metrics
            assert m.value("netpass_agent_connections_total", {"outcome": "protocol_error"}) == 1
            assert m.value("netpass_agent_connections_total", {"outcome": "ok"}) == 1

    with caplog.at_level(logging.WARNING, logger="netpass.agent"):
        run(main())
    assert "protocol error, sent ERROR" in caplog.text


def test_handler_failure_sends_internal_error(pki: TestPki) -> None:
    async def broken(ch: Channel) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        async with AgentServer(HOST, 0, pki.server_context(), lambda: broken) as server:
            ch = await orchestrator(pki, server.port)
            ev = await ch.recv()
            assert isinstance(ev, wire.Error)
            assert ev.code == wire.ErrorCode.INTERNAL and "boom" in ev.message
            assert await ch.recv() == wire.ConnectionClosed(clean=True)
            await ch.close()
            await wait_for(lambda: server.connections == 0)
            outcome = {"outcome": "handler_error"}
            assert server.metrics.value("netpass_agent_connections_total", outcome) == 1

    run(main())


# --- clock ----------------------------------------------------------------------------------


def test_ping_pong_offset_near_zero(pki: TestPki) -> None:
    async def main() -> None:
        async with agent_server(pki, Idle()) as server:
            ch = await orchestrator(pki, server.port)
            est = await estimate_offset(ch, rounds=6)
            # Same host, same clock: the true offset is 0 and must lie within the bound.
            assert est.uncertainty_ns > 0
            assert abs(est.offset_ns) <= est.uncertainty_ns + 1_000
            assert est.uncertainty_ns < 50_000_000
            assert est.rounds == 6
            # With a reader task blocked in recv(), the PONG is routed to ping() by it.
            reader = asyncio.create_task(ch.recv())
            await asyncio.sleep(0.01)
            sample = await ch.ping()
            assert sample.delay_ns >= 0
            assert not reader.done()
            reader.cancel()
            await ch.close()

    run(main())


class Follower(Idle):
    """AGENT handler that first measures the client's clock, then answers PREPARE/ABORT."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[wire.ClockSample] = []

    async def handle(self, ch: Channel) -> None:
        self.channels.append(ch)
        self.samples.append(await ch.ping())  # the client answers from its recv()
        while True:
            ev = await ch.recv()
            self.events.append(ev)
            if isinstance(ev, wire.Prepare):
                await ch.send(wire.Prepared(ev.migration_id))
            elif isinstance(ev, wire.Abort):
                await ch.send(wire.Ack(ev.migration_id, wire.MsgType.ABORT))
            elif isinstance(ev, wire.Bye | wire.Error | wire.ConnectionClosed):
                return


def test_ping_keeps_other_events_for_recv_and_pings_are_answered(pki: TestPki) -> None:
    handler = Follower()

    async def main() -> None:
        async with agent_server(pki, handler) as server:
            ch = await orchestrator(pki, server.port)
            mid = uuid4()
            nic = wire.NicSpec(0, "tap0", bytes.fromhex("525400000001"))
            await ch.send(wire.Prepare(mid, "vm", (nic,)))
            # PREPARED arrives before our PONG; ping() reads it and keeps it for recv().
            # Meanwhile the server's own PING to us is answered without surfacing.
            await ch.ping()
            assert await ch.recv() == wire.Prepared(mid)
            assert len(handler.samples) == 1
            assert handler.samples[0].delay_ns >= 0
            await ch.send(wire.Abort(mid, "test over"))
            assert await ch.recv() == wire.Ack(mid, wire.MsgType.ABORT)
            await ch.close()
            await wait_for(lambda: server.connections == 0)
            assert isinstance(handler.events[-1], wire.Bye)

    run(main())


def test_best_sample_keeps_the_smallest_delay() -> None:
    samples = [
        wire.clock_offset(0, 600, 700, 1_000),  # delay 900
        wire.clock_offset(0, 5_040, 5_060, 100),  # delay 80, offset +5000
        wire.clock_offset(0, 300, 400, 2_000),  # delay 1900
    ]
    est = best_sample(samples)
    assert (est.offset_ns, est.delay_ns, est.uncertainty_ns, est.rounds) == (5_000, 80, 40, 3)
    assert est.to_local(10_000) == 5_000
    with pytest.raises(ValueError):
        best_sample([])


# --- frames ---------------------------------------------------------------------------------


def test_frames_round_trip_preserves_order_and_bytes(pki: TestPki) -> None:
    sink = FrameSink(keep=True)
    # Small batches on the server side, so the stream spans many FRAMES messages.
    limits = wire.Limits(max_frames_per_batch=7)
    vnet = bytes(12)
    frames = [
        wire.FrameRecord(vnet + f.data, 12) if i % 3 == 0 else f
        for i, f in enumerate(make_frames(50, 60))
    ]
    frames += make_frames(10, 1514, start=50) + make_frames(5, 9000, start=60)

    async def main() -> None:
        async with AgentServer(
            HOST, 0, pki.server_context(), lambda: sink, role=wire.Role.DEST_AGENT, limits=limits
        ) as server:
            ch = await connect(
                HOST, server.port, pki.client_context(), wire.Role.SOURCE_AGENT, "src"
            )
            mid = uuid4()
            nic = wire.NicSpec(3, "tap-src", bytes.fromhex("525400000002"))
            await ch.send(wire.Prepare(mid, "vm1", (nic,)))
            assert isinstance(await ch.recv(), wire.Prepared)
            await ch.send(wire.CaptureOn(mid))
            assert await ch.recv() == wire.Ack(mid, wire.MsgType.CAPTURE_ON)
            batches = ch.conn.batch_frames(3, frames)
            assert len(batches) == 10
            await ch.send_many(batches)
            await ch.send(wire.End(mid, ch.conn.frame_summaries()))
            assert await ch.recv() == wire.Ack(mid, wire.MsgType.END)
            await ch.close()
            await wait_for(lambda: server.connections == 0)
            assert server.metrics.value("netpass_agent_frames_received_total") == len(frames)
            total = sum(len(f.data) for f in frames)
            assert server.metrics.value("netpass_agent_frame_bytes_received_total") == total

    run(main())
    assert sink.received == frames  # same bytes, same vnet header lengths, same order
    assert [b.first_index for b in sink.batches] == list(range(0, len(frames), 7))


def test_metrics_endpoint(pki: TestPki) -> None:
    async def main() -> None:
        async with agent_server(pki, Idle(), metrics_port=0) as server:
            ch = await orchestrator(pki, server.port)
            await ch.close()
            await wait_for(lambda: server.connections == 0)
            assert server.metrics_port
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            text = body.decode()
            assert 'netpass_agent_connections_total{outcome="ok"} 1.0' in text
            assert "netpass_agent_frames_received_total 0.0" in text

    run(main())


def test_throughput_smoke() -> None:
    res = measure_throughput(64, 0.2, batch=256, isolate=False)
    assert res["frames"] == res["received"]
    assert isinstance(res["frames"], int) and res["frames"] > 0
    assert isinstance(res["frames_per_s"], int) and res["frames_per_s"] > 0
    assert isinstance(res["payload_gbit_s"], float)
