"""A hypervisor's tap file descriptors: find them, copy them, look into the tap's queue.

A copy of QEMU's tap fd (pidfd_getfd) shares the tap queue with QEMU. It can tell whether
frames are waiting (`queued`, via poll: nothing is consumed) and, once QEMU no longer reads
the tap, take them out (`drain`). Reading while QEMU also reads splits the frames between the
two readers, so `drain` is only valid when the hypervisor is stopped or is not polling the tap.
The copy works from any network namespace. The open-file flags (O_NONBLOCK) are shared with
QEMU's fd, so nothing here changes them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct

from netpass.datapath.netns import check_ifname, in_netns
from netpass.errors import DatapathError, HostError

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
_READ_SIZE = 65536 + 256  # a 64 KB GSO frame plus its virtio header

_libc = ctypes.CDLL(None, use_errno=True)


def find_tap_fds(pid: int, tapname: str) -> list[int]:
    """Descriptor numbers of PID that are attached to tap TAPNAME (several if multiqueue)."""
    check_ifname(tapname)
    want = f"iff:\t{tapname}"
    base = f"/proc/{pid}/fdinfo"
    try:
        entries = os.listdir(base)
    except FileNotFoundError as e:
        raise DatapathError(f"no process {pid}") from e
    except PermissionError as e:
        raise HostError(f"cannot read {base}: netpass must run as root") from e
    found = []
    for name in entries:
        try:
            with open(f"{base}/{name}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue  # closed meanwhile
        if want in lines:
            found.append(int(name))
    return sorted(found)


def copy_fd(pid: int, fd: int) -> int:
    """A copy (new descriptor in this process, close-on-exec) of PID's descriptor FD."""
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        err = ctypes.get_errno()
        raise DatapathError(f"pidfd_open({pid}) failed: {os.strerror(err)}")
    try:
        copy = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            err = ctypes.get_errno()
            if err == errno.EPERM:
                raise HostError(f"pidfd_getfd on process {pid} not permitted: run as root")
            raise DatapathError(f"pidfd_getfd({pid}, {fd}) failed: {os.strerror(err)}")
        return int(copy)
    finally:
        os.close(pidfd)


def tap_info(fd: int) -> tuple[str, int]:
    """(interface name, IFF_* flags) of a tun/tap descriptor."""
    try:
        res = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError as e:
        raise DatapathError(f"fd {fd} is not an attached tun/tap: {e.strerror}") from e
    name, flags = struct.unpack_from("16sH", res)
    return name.rstrip(b"\0").decode(), flags


def vnet_hdr_size(fd: int) -> int:
    """Bytes of virtio-net header in front of every frame read from FD (0 without one)."""
    _, flags = tap_info(fd)
    if not flags & IFF_VNET_HDR:
        return 0
    res = fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4))
    return int(struct.unpack("i", res)[0])


def queued(fd: int) -> bool:
    """True if at least one frame waits in the tap's queue; consumes nothing."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def drain(fd: int, hdr_len: int, max_frames: int | None = None) -> list[bytes]:
    """Read the queued frames (oldest first, at most MAX_FRAMES), virtio header stripped.

    Never blocks and never touches the shared O_NONBLOCK flag (RWF_NOWAIT reads). Only valid
    while the hypervisor is not reading this tap, else frames are split between the readers.
    """
    out: list[bytes] = []
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    while max_frames is None or len(out) < max_frames:
        n = _read_nowait(fd, buf)
        if n is None:
            break
        if n < hdr_len:
            raise DatapathError(f"short read ({n} bytes) from tap fd {fd}")
        out.append(bytes(view[hdr_len:n]))
    return out


def _read_nowait(fd: int, buf: bytearray) -> int | None:
    try:
        return os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise DatapathError(f"read from tap fd {fd} failed: {e.strerror}") from e
    # Kernels without RWF_NOWAIT on tun: read only what poll() promises.
    if not queued(fd):
        return None
    return os.readv(fd, [buf])


def open_tap(
    ifname: str, *, vnet_hdr: bool = True, hdr_len: int | None = None, netns: str | None = None
) -> int:
    """Create (or attach to) tap IFNAME as its reader, like a hypervisor does; returns the fd.

    The tap lives while the fd is open, unless it was made persistent elsewhere.
    """
    check_ifname(ifname)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    with in_netns(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
        if vnet_hdr and hdr_len is not None:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_len))
    except OSError as e:
        os.close(fd)
        raise DatapathError(f"cannot open tap {ifname}: {e.strerror}") from e
    return fd
