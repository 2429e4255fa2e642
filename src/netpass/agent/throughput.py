"""How fast FRAMES move over a real TLS channel on 127.0.0.1.

A SOURCE_AGENT client streams FRAMES batches (filter-mirror records) to an AgentServer whose
DEST_AGENT handler is a FrameSink, then sends END; the clock stops at the ACK(END), which
the receiver only sends once the frame count and digest of everything it received match.

By default the server runs in a child process, as it would on the destination host: sharing
one interpreter would make the two ends take turns on one core and halve the result.

    python -m netpass.agent.throughput 64 3     # frame size, seconds: prints JSON
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Final
from uuid import uuid4

from netpass import wire
from netpass.agent.channel import Channel, HandshakeError, connect
from netpass.agent.server import AgentServer
from netpass.agent.tls import TestPki, make_test_pki
from netpass.datapath.netns import in_netns

__all__ = ["FrameSink", "make_frames", "measure_throughput", "measure_throughput_async"]

_DST: Final = bytes.fromhex("525400000001")
_SRC: Final = bytes.fromhex("525400000002")
_ETHERTYPE: Final = b"\x88\xb5"  # IEEE local experimental
DEFAULT_BATCH: Final = 1024

Result = dict[str, float | int | str | bool]


class FrameSink:
    """DEST_AGENT handler: follows migrations, acknowledges them and counts the frames.

    Usable directly as an AgentServer handler factory (``AgentServer(..., FrameSink)``) or,
    with ``keep=True``, to check in tests what arrived.
    """

    def __init__(self, *, keep: bool = False) -> None:
        self.keep = keep
        self.frames = 0
        self.received: list[wire.FrameRecord] = []
        self.batches: list[wire.Frames] = []
        self.ended = asyncio.Event()
        self.cpu_s = 0.0  # this process's CPU time from CAPTURE_ON to END
        self._cpu0 = 0.0

    async def __call__(self, ch: Channel) -> None:
        while True:
            ev = await ch.recv()
            if isinstance(ev, wire.Frames):
                self.frames += len(ev.frames)
                if self.keep:
                    self.batches.append(ev)
                    self.received.extend(ev.frames)
            elif isinstance(ev, wire.Prepare):
                await ch.send(wire.Prepared(ev.migration_id))
            elif isinstance(ev, wire.CaptureOn):
                self._cpu0 = time.process_time()
                await ch.send(wire.Ack(ev.migration_id, wire.MsgType.CAPTURE_ON))
            elif isinstance(ev, wire.End):
                # The wire layer has checked counts and digests against what arrived.
                self.cpu_s = time.process_time() - self._cpu0
                await ch.send(wire.Ack(ev.migration_id, wire.MsgType.END))
                self.ended.set()
            elif isinstance(ev, wire.Abort):
                await ch.send(wire.Ack(ev.migration_id, wire.MsgType.ABORT))
            elif isinstance(ev, wire.Bye | wire.Error | wire.ConnectionClosed):
                return


def make_frames(count: int, frame_size: int, *, start: int = 0) -> list[wire.FrameRecord]:
    """``count`` distinct Ethernet frames of ``frame_size`` bytes (no vnet header)."""
    if frame_size < wire.ETH_HLEN + 4:
        raise ValueError(f"frame_size must be at least {wire.ETH_HLEN + 4}")
    pad = bytes(frame_size - wire.ETH_HLEN - 4)
    head = _DST + _SRC + _ETHERTYPE
    return [wire.FrameRecord(head + (start + i).to_bytes(4, "big") + pad) for i in range(count)]


@dataclass(frozen=True)
class Endpoints:
    """Where the two ends run: the server on HOST inside SERVER_NETNS, the client inside
    CLIENT_NETNS (None: this namespace). The default is both on 127.0.0.1 here."""

    host: str = "127.0.0.1"
    server_netns: str | None = None
    client_netns: str | None = None


LOOPBACK: Final = Endpoints()


async def _drive(
    port: int,
    pki: TestPki,
    frame_size: int,
    seconds: float,
    batch: int,
    where: Endpoints = LOOPBACK,
) -> Result:
    ch = await connect(
        where.host, port, pki.client_context(), wire.Role.SOURCE_AGENT, "bench",
        netns=where.client_netns,
    )  # fmt: skip
    try:
        mid = uuid4()
        nic = wire.NicSpec(0, "np-bench0", _SRC)
        await ch.send(wire.Prepare(mid, "bench", (nic,)))
        await ch.expect(wire.Prepared)
        await ch.send(wire.CaptureOn(mid))
        await ch.expect(wire.Ack)
        pool = tuple(make_frames(batch, frame_size))
        sent = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            await ch.send(wire.Frames(mid, 0, sent, pool))
            sent += batch
        await ch.send(wire.End(mid, ch.conn.frame_summaries()))
        await ch.expect(wire.Ack)  # everything arrived and matched its digest
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        wire_bytes = ch.stats.bytes_written
        tls = f"{ch.tls_version}"
    finally:
        await ch.close()
    return {
        "frame_size": frame_size,
        "batch": batch,
        "seconds": round(elapsed, 3),
        "frames": sent,
        "frames_per_s": round(sent / elapsed),
        "payload_gbit_s": round(sent * frame_size * 8 / elapsed / 1e9, 3),
        "wire_gbit_s": round(wire_bytes * 8 / elapsed / 1e9, 3),
        "sender_cpu_s": round(cpu, 3),
        "tls": tls,
    }


async def measure_throughput_async(
    frame_size: int, seconds: float, *, pki: TestPki, batch: int = DEFAULT_BATCH
) -> Result:
    """Both ends in this event loop (a test smoke: the two ends share one core)."""
    sink = FrameSink()
    async with AgentServer(
        "127.0.0.1", 0, pki.server_context(), lambda: sink, role=wire.Role.DEST_AGENT
    ) as server:
        result = await _drive(server.port, pki, frame_size, seconds, batch)
    result["isolate"] = False
    result["received"] = sink.frames
    result["receiver_cpu_s"] = round(sink.cpu_s, 3)
    return result


def _server_main(pki_dir: str, pipe: Pipe, where: Endpoints = LOOPBACK) -> None:
    # Child process: one DEST_AGENT server, report the port, serve one stream, report.
    async def main() -> None:
        pki = TestPki.at(pki_dir)
        sink = FrameSink()
        async with AgentServer(
            where.host, 0, pki.server_context(), lambda: sink, role=wire.Role.DEST_AGENT
        ) as server:
            pipe.send(server.port)
            await sink.ended.wait()
            while server.connections:  # let the client close cleanly
                await asyncio.sleep(0.01)
            pipe.send({"received": sink.frames, "receiver_cpu_s": round(sink.cpu_s, 3)})

    # The event loop's sockets belong to the namespace of the thread that creates them.
    with in_netns(where.server_netns):
        asyncio.run(main())


def measure_throughput(
    frame_size: int,
    seconds: float,
    *,
    batch: int = DEFAULT_BATCH,
    isolate: bool = True,
    where: Endpoints = LOOPBACK,
) -> Result:
    """Stream ``frame_size``-byte frames for ``seconds`` over TLS (on 127.0.0.1, or between
    two namespaces as WHERE says).

    Returns frames_per_s, payload_gbit_s (frame bytes), wire_gbit_s (netpass messages,
    before TLS), and the CPU seconds each end spent from CAPTURE_ON to END (with
    ``isolate`` false both ends share one process, so both figures are the same process's).
    Runs its own event loop: call it from synchronous code.
    """
    with tempfile.TemporaryDirectory(prefix="netpass-tput-") as tmp:
        pki = make_test_pki(tmp, server_names=("localhost", "127.0.0.1", "::1", where.host))
        if not isolate:
            return asyncio.run(measure_throughput_async(frame_size, seconds, pki=pki, batch=batch))
        mp = multiprocessing.get_context("spawn")
        parent, child = mp.Pipe()
        proc = mp.Process(target=_server_main, args=(tmp, child, where), daemon=True)
        proc.start()
        try:
            if not parent.poll(30):
                raise HandshakeError("throughput server did not start within 30 s")
            port = int(parent.recv())
            result = asyncio.run(_drive(port, pki, frame_size, seconds, batch, where))
            if parent.poll(10):
                result.update(parent.recv())
        finally:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    result["isolate"] = True
    result["path"] = (
        where.host
        if where.server_netns is None
        else (f"{where.client_netns} -> {where.server_netns} ({where.host})")
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    where = LOOPBACK
    if "--lab" in args:
        # Between the lab's host namespaces: client on host A, server on host B's address.
        i = args.index("--lab")
        from netpass import lab

        st = lab.load(args[i + 1])
        where = Endpoints(st.host_ip("b"), st.host_ns("b"), st.host_ns("a"))
        del args[i : i + 2]
    if len(args) not in (2, 3):
        print("usage: python -m netpass.agent.throughput FRAME_SIZE SECONDS [BATCH] [--lab NAME]")
        return 2
    batch = int(args[2]) if len(args) == 3 else DEFAULT_BATCH
    res = measure_throughput(int(args[0]), float(args[1]), batch=batch, isolate=True, where=where)
    res["cpus"] = os.cpu_count() or 0
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
