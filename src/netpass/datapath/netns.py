"""Run code, and open sockets, inside a named network namespace.

Everything in `netpass.datapath` works in the *calling thread's* network namespace. A caller
that lives elsewhere wraps calls in `in_netns(name)`, or passes `netns=` where offered. Sockets
(netlink, AF_PACKET) stay bound to the namespace they were opened in, so they keep working
after the thread has switched back.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute

from netpass.errors import DatapathError, HostError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
IFNAMSIZ = 16  # including the terminating NUL

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    """`/run/netns/NAME`, or NAME itself when it is already a path (e.g. /proc/PID/ns/net)."""
    return name if "/" in name else os.path.join(NETNS_DIR, name)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == 1:  # EPERM
            raise HostError(f"cannot enter network namespace {what}: netpass must run as root")
        raise DatapathError(f"cannot enter network namespace {what}: {os.strerror(err)}")


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Move the calling thread (only it) into network namespace NAME for the block.

    `None` stays in the current namespace. The thread returns to its previous namespace even
    when the block raises; threads started inside the block start in NAME.
    """
    if name is None:
        yield
        return
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DatapathError(f"network namespace {name!r} not found: {e.strerror}") from e
    try:
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, repr(name))
            try:
                yield
            finally:
                _setns(back, "of the caller (returning)")
        finally:
            os.close(back)
    finally:
        os.close(target)


def open_iproute(netns: str | None = None) -> IPRoute:
    """An `IPRoute` whose netlink socket lives in NETNS (default: the caller's namespace).

    Cheaper than `IPRoute(netns=...)`, which forks a helper process (and creates a missing
    namespace by default).
    """
    with in_netns(netns):
        ipr = IPRoute()
    # pyroute2 0.9.7's sync IPRoute lacks this key, which nlm_request() reads.
    ipr.asyncore.status.setdefault("nlm_generator", False)
    return ipr


@contextmanager
def iproute(netns: str | None = None) -> Iterator[IPRoute]:
    """`open_iproute` as a context manager that closes the socket."""
    ipr = open_iproute(netns)
    try:
        yield ipr
    finally:
        ipr.close()


def check_ifname(name: str) -> str:
    """Reject interface names the kernel would refuse or truncate."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise DatapathError(f"invalid interface name {name!r} (1-15 characters, no '/' or space)")
    return name


def ifindex(ipr: IPRoute, ifname: str) -> int:
    """Index of IFNAME in IPR's namespace, or a DatapathError naming it."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise DatapathError(f"no interface {ifname!r} in this network namespace")
    return int(found[0])
