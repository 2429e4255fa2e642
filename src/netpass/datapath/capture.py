"""The capture device a tap's egress is redirected to, and the socket that reads it.

Redirected frames are transmitted on the capture device; an AF_PACKET socket bound to it sees
each one once, as PACKET_OUTGOING, in transmit order. The device is a dummy where the kernel
has one, else a veth pair `<base>c0`/`<base>c1` (both up; frames are sent on c0 and die at
c1). IPv6 is disabled on it so the kernel never transmits frames of its own there (router
solicitations, MLD), which the socket could not tell from redirected ones.
"""

from __future__ import annotations

import ctypes
import errno
import select
import socket
import struct
import time
from types import TracebackType
from typing import NamedTuple

from pyroute2.netlink.exceptions import NetlinkError

from netpass.datapath import ethtool
from netpass.datapath.caps import CaptureKind, KernelCaps, detect_caps
from netpass.datapath.netns import check_ifname, in_netns, iproute
from netpass.errors import DatapathError

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # also SCM_TIMESTAMPNS
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
_SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE
_MAX_FRAME = 65536 + 64
_TS_SPACE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("qq")


def _disable_ipv6(ifname: str) -> None:
    # /proc/sys/net resolves against the opening thread's network namespace.
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    try:
        with open(path, "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass  # no IPv6 in this kernel or namespace: nothing would be sent anyway
    except OSError as e:
        raise DatapathError(f"cannot disable IPv6 on {ifname}: {e.strerror}") from e


class CaptureDevice:
    """`<base>c0` (the redirect target and capture point) and, for veth, its peer `<base>c1`."""

    def __init__(
        self, base: str, caps: KernelCaps | None = None, *, netns: str | None = None
    ) -> None:
        self.kind: CaptureKind = (caps or detect_caps()).capture_kind
        self.ifname = check_ifname(base + "c0")
        self.peer = check_ifname(base + "c1") if self.kind == "veth" else None
        self.netns = netns

    def create(self, *, replace: bool = False) -> CaptureDevice:
        """Create the device(s), offloads off, IPv6 off, up. REPLACE deletes a leftover first."""
        with iproute(self.netns) as ipr:
            if ipr.link_lookup(ifname=self.ifname):
                if not replace:
                    raise DatapathError(f"capture device {self.ifname} already exists")
                ipr.link("del", ifname=self.ifname)
            try:
                if self.peer is not None:
                    ipr.link("add", ifname=self.ifname, kind="veth", peer=self.peer)
                else:
                    ipr.link("add", ifname=self.ifname, kind="dummy")
            except NetlinkError as e:
                raise DatapathError(f"cannot create capture device {self.ifname}: {e}") from e
            try:
                with in_netns(self.netns):
                    for name in (self.ifname, self.peer):
                        if name is not None:
                            _disable_ipv6(name)
                    ethtool.offloads_off(self.ifname)
                for name in (self.peer, self.ifname):
                    if name is not None:
                        ipr.link("set", ifname=name, state="up")
            except (NetlinkError, DatapathError) as e:
                ipr.link("del", ifname=self.ifname)
                raise DatapathError(f"cannot set up capture device {self.ifname}: {e}") from e
        return self

    def delete(self) -> None:
        """Delete the device (and its veth peer); no-op if it is gone."""
        with iproute(self.netns) as ipr:
            if ipr.link_lookup(ifname=self.ifname):
                ipr.link("del", ifname=self.ifname)

    def __enter__(self) -> CaptureDevice:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()


class Frame(NamedTuple):
    data: bytes
    ts_ns: int  # kernel time stamp, CLOCK_REALTIME ns (see CaptureSocket)


BpfInsn = tuple[int, int, int, int]  # code, jt, jf, k


def attach_filter(sock: socket.socket, prog: list[BpfInsn]) -> None:
    """Attach classic BPF PROG to SOCK (the kernel copies it: nothing to keep alive)."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# Keep PACKET_OUTGOING frames, drop everything else before it is queued.
_OUTGOING_ONLY: list[BpfInsn] = [
    (0x20, 0, 0, _SKF_AD_PKTTYPE),  # ld  [pkttype]
    (0x15, 0, 1, PACKET_OUTGOING),  # jeq #OUTGOING, keep, drop
    (0x06, 0, 0, 0x40000),  # ret #256K (whole frame)
    (0x06, 0, 0, 0),  # ret #0
]


class CaptureSocket:
    """Non-blocking AF_PACKET socket on a capture device, yielding redirected frames in order.

    Time stamps are the kernel's: when the frame entered the host if it was received from a
    NIC/veth and the kernel time-stamped it then, else when it reached the capture device.
    `stats()` reports frames the socket dropped because its buffer was full.
    """

    def __init__(self, ifname: str, *, rcvbuf: int = 64 << 20, netns: str | None = None) -> None:
        check_ifname(ifname)
        self.ifname = ifname
        self._received = self._dropped = 0
        # Protocol 0 receives nothing until bind(): no frame of another interface slips in
        # before the socket is bound and filtered.
        with in_netns(netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            attach_filter(sock, _OUTGOING_ONLY)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind((ifname, ETH_P_ALL))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise DatapathError(f"cannot open capture socket on {ifname}: {e.strerror}") from e
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def wait(self, timeout: float) -> bool:
        """Block up to TIMEOUT seconds until a frame is ready; True if one is."""
        p = select.poll()
        p.register(self._sock, select.POLLIN)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def recv(self) -> Frame | None:
        """The next captured frame, or None if none is queued."""
        got = self.recv_many(1)
        return got[0] if got else None

    def recv_many(self, max_frames: int = 1024) -> list[Frame]:
        """Up to MAX_FRAMES queued frames, oldest first, without blocking."""
        out: list[Frame] = []
        recvmsg = self._sock.recvmsg
        while len(out) < max_frames:
            try:
                data, anc, flags, addr = recvmsg(_MAX_FRAME, _TS_SPACE)
            except BlockingIOError:
                break
            except OSError as e:
                raise DatapathError(f"capture on {self.ifname} failed: {e.strerror}") from e
            if addr[2] != PACKET_OUTGOING:  # the BPF filter already keeps these out
                continue
            if flags & socket.MSG_TRUNC:
                raise DatapathError(f"captured frame over {_MAX_FRAME} bytes on {self.ifname}")
            if anc and anc[0][1] == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(anc[0][2])
                ts = sec * 1_000_000_000 + nsec
            else:
                ts = time.time_ns()
            out.append(Frame(data, ts))
        self._received += len(out)
        return out

    def stats(self) -> tuple[int, int]:
        """(frames received, frames dropped by the kernel for lack of buffer), cumulative."""
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError as e:
            if e.errno == errno.EBADF:
                return self._received, self._dropped
            raise DatapathError(f"capture statistics on {self.ifname}: {e.strerror}") from e
        _packets, drops = struct.unpack("II", raw)  # the kernel resets them on read
        self._dropped += drops
        return self._received, self._dropped

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CaptureSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
