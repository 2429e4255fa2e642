"""Crash recovery: undo what a killed netpass left on this host's taps.

netpass must never leave a VM's tap black-holed. After a crash this removes netpass's egress
redirect filters, opens any closed hold (held frames go to the guest), deletes netpass capture
devices, and can cancel a migration left waiting in pre-switchover so the source VM runs again.
It looks in the root namespace, every named namespace and every QEMU process's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re

from netpass.datapath import tc
from netpass.datapath.netns import iproute
from netpass.errors import NetpassError
from netpass.qmp import Qmp

CAPTURE_RE = re.compile(r"^np\d+s\d+c[01]$")


def _namespaces() -> list[str]:
    """Distinct network namespaces to look at, as paths."""
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    cands = ["/proc/self/ns/net"]
    with contextlib.suppress(FileNotFoundError):
        cands += [f"/run/netns/{n}" for n in sorted(os.listdir("/run/netns"))]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        # QEMU renames its process (-name ...,process=), so look at the binary instead.
        with contextlib.suppress(OSError):
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-system"):
                cands.append(f"/proc/{pid}/ns/net")
    for path in cands:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(path)
    return out


def sweep_host(remove_holds: bool = False) -> list[str]:
    """Remove netpass redirects and capture devices everywhere; open (or remove) holds."""
    done: list[str] = []
    for ns in _namespaces():
        done += sweep_namespace(ns, remove_holds)
    return done


def sweep_namespace(ns: str, remove_holds: bool = False) -> list[str]:
    """The same in one network namespace (a name or a /proc/PID/ns/net path)."""
    done: list[str] = []
    with iproute(ns) as ipr:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    for name in names:
        if CAPTURE_RE.match(name) and name.endswith("c0"):
            with iproute(ns) as ipr:
                ipr.link("del", ifname=name)
            done.append(f"{ns}: capture device {name}")
    keep = [n for n in names if not CAPTURE_RE.match(n)]
    done += [f"{ns}: {line}" for line in tc.sweep(keep, keep_hold_open=not remove_holds, netns=ns)]
    return done


async def cancel_stuck(qmp_paths: list[str]) -> list[str]:
    """Cancel migrations left running or waiting in pre-switchover; the source VM resumes."""
    done: list[str] = []
    for path in qmp_paths:
        q = Qmp("vm", path)
        await q.connect()
        try:
            info = await q.cmd("query-migrate")
            if info.get("status") in ("setup", "active", "pre-switchover", "device"):
                await q.cmd("migrate_cancel")
                done.append(f"{path}: migration ({info['status']}) cancelled")
        except NetpassError as e:
            done.append(f"{path}: {e}")
        finally:
            await q.close()
    return done


def cleanup(qmp_paths: list[str], remove_holds: bool = False) -> list[str]:
    done = asyncio.run(cancel_stuck(qmp_paths)) if qmp_paths else []
    return done + sweep_host(remove_holds)
