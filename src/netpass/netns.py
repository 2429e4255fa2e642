"""Listing the network namespaces netpass created and the processes inside them.

(Entering a namespace lives in `netpass.datapath.netns.in_netns`.)
"""

from __future__ import annotations

import os

NETNS_DIR = "/run/netns"


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
