"""Entering a network namespace from Python, for the calling thread only.

setns(2) changes the namespace of the calling thread; sockets keep the namespace they were
created in, so a socket made inside `in_netns` stays usable from any thread afterwards.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """setns(2) for a network namespace (os.setns only exists from Python 3.12)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch the calling thread into /run/netns/NAME for the duration of the block."""
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"{NETNS_DIR}/{name}", "rb") as ns:
        setns(ns.fileno())
        try:
            yield
        finally:
            setns(home.fileno())


def exists(name: str) -> bool:
    return os.path.exists(f"{NETNS_DIR}/{name}")


def list_names(prefix: str) -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def pids_in(name: str) -> list[int]:
    """PIDs of processes whose network namespace is NAME (what `ip netns pids` does)."""
    try:
        target = os.stat(f"{NETNS_DIR}/{name}")
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(int(entry))
    return found
