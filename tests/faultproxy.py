"""A TCP relay a test puts between a netpass peer and an agent, to break the channel on cue.

It runs inside a network namespace (the agent's host), forwards bytes both ways untouched (TLS
stays end to end), and at a moment the test chooses it can:
- `cut()`: reset every connection (SO_LINGER 0, so the peers see ECONNRESET), and refuse new
  ones: a link or middlebox failure;
- `corrupt()`: flip one bit in the next chunk sent towards the agent: a TLS record then fails
  its integrity check, the agent's TLS layer raises, the connection dies.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from netpass.datapath.netns import in_netns


class FaultProxy:
    def __init__(self, netns: str, host: str, port: int, target_port: int) -> None:
        self.netns, self.host, self.port, self.target_port = netns, host, port, target_port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0
        self.is_cut = False
        self._corrupt_next = False
        self.corrupted = 0

    async def __aenter__(self) -> FaultProxy:
        sock = await asyncio.to_thread(self._listen_socket)
        self.server = await asyncio.start_server(self._serve, sock=sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()

    def _listen_socket(self) -> socket.socket:
        with in_netns(self.netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(16)
        s.setblocking(False)
        return s

    def _connect_socket(self) -> socket.socket:
        with in_netns(self.netns):
            s = socket.create_connection((self.host, self.target_port), timeout=5)
        s.setblocking(False)
        return s

    def cut(self) -> None:
        self.is_cut = True
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()

    def corrupt(self) -> None:
        self._corrupt_next = True

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.is_cut:
            w.transport.abort()
            return
        self.accepted += 1
        tr, tw = await asyncio.open_connection(sock=await asyncio.to_thread(self._connect_socket))
        self.writers += [w, tw]
        await asyncio.gather(self._pump(r, tw, True), self._pump(tr, w, False))

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, to_agent: bool) -> None:
        try:
            while data := await r.read(65536):
                if to_agent and self._corrupt_next:
                    self._corrupt_next = False
                    self.corrupted += 1
                    i = len(data) // 2
                    data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.transport.abort() if self.is_cut else w.close()
