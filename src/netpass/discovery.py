"""What netpass needs to know about a VM's NICs, asked of QEMU (QMP) and of /proc.

QMP's `info network` pairs each NIC with its netdev (type and tap ifname), `query-rx-filter`
gives the MAC and the guest's RX filter, `x-query-virtio` the device path whose RX queue
`used-idx` counts frames handed to the guest. The QEMU process (peer of the QMP unix socket)
owns the tap fds; its network namespace is the tap's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netpass.datapath import tapfd
from netpass.errors import UsageError
from netpass.qmp import Qmp

_NIC_RE = re.compile(r"^(\S+): index=\d+,type=nic,model=([^,]+),macaddr=([0-9a-f:]+)", re.M)
_TAP_RE = re.compile(r"^ \\ (\S+): index=\d+,type=(\w+)(?:,ifname=([^,\s]+))?(.*)$", re.M)


@dataclass
class RxFilter:
    """The guest's receive filter: frames it rejects never take a used-ring entry."""

    mac: bytes
    promiscuous: bool = False
    multicast_all: bool = False
    multicast: set[bytes] = field(default_factory=set)
    unicast_all: bool = False
    unicast: set[bytes] = field(default_factory=set)

    @classmethod
    def from_qmp(cls, d: dict[str, Any]) -> RxFilter:
        return cls(
            mac=_mac(d["main-mac"]),
            promiscuous=bool(d.get("promiscuous")),
            multicast_all=d.get("multicast") == "all" or bool(d.get("multicast-overflow")),
            multicast={_mac(m) for m in d.get("multicast-table", [])},
            unicast_all=d.get("unicast") == "all" or bool(d.get("unicast-overflow")),
            unicast={_mac(m) for m in d.get("unicast-table", [])},
        )

    def accepts(self, frame: bytes) -> bool:
        # Broadcast is always taken: QEMU 7.2 reports 'broadcast-allowed' inverted, and guests
        # that refuse broadcast are not a case netpass meets.
        dst = frame[:6]
        if self.promiscuous or dst == self.mac or dst == b"\xff" * 6:
            return True
        if dst[0] & 1:
            return self.multicast_all or dst in self.multicast
        return self.unicast_all or dst in self.unicast


@dataclass
class NicInfo:
    nic_id: str  # QOM id, e.g. nic0
    mac: str
    tap: str
    virtio_path: str
    rx_queues: list[int]  # virtqueue indexes of the RX queues (even ones)
    rx_filter: RxFilter
    tap_fds: list[int]  # descriptor numbers in the QEMU process


@dataclass
class VmInfo:
    pid: int
    netns: str  # path of the QEMU process's network namespace
    nics: list[NicInfo]


def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


async def discover(q: Qmp, taps: dict[str, str] | None = None, *, local: bool = True) -> VmInfo:
    """NICs of the VM behind Q with their taps; `taps` (MAC -> tap) overrides discovery.

    LOCAL=False: QEMU runs on another host (its agent finds the tap descriptors there), so
    pid, netns and tap_fds are left empty."""
    pid = q.peer_pid() if local else 0
    text = str(await q.cmd("human-monitor-command", **{"command-line": "info network"}))
    filters = {f["name"]: f for f in await q.cmd("query-rx-filter")}
    paths = {d["path"].split("/")[-2]: d["path"] for d in await q.cmd("x-query-virtio")}
    nics: list[NicInfo] = []
    lines = text.splitlines()
    for m in _NIC_RE.finditer(text):
        nic_id, model, mac = m.group(1), m.group(2), m.group(3)
        if not model.startswith("virtio-net"):
            raise UsageError(f"{q.side} NIC {nic_id} is {model}: netpass supports virtio-net")
        # The netdev line follows its NIC line.
        idx = next(i for i, ln in enumerate(lines) if ln.startswith(f"{nic_id}:"))
        nd = _TAP_RE.match(lines[idx + 1]) if idx + 1 < len(lines) else None
        if nd is None or nd.group(2) != "tap":
            raise UsageError(f"{q.side} NIC {nic_id} has no tap netdev: netpass needs a tap")
        if "vhost=on" in (nd.group(4) or ""):
            raise UsageError(f"{q.side} NIC {nic_id} uses vhost-net: netpass needs vhost=off")
        tap = (taps or {}).get(mac) or nd.group(3)
        if not tap:
            raise UsageError(f"{q.side} NIC {nic_id}: tap name unknown (pass it with --tap)")
        fds = tapfd.find_tap_fds(pid, tap) if local else [0]
        if not fds:
            raise UsageError(f"{q.side} tap {tap} of NIC {nic_id} not found in QEMU pid {pid}")
        if len(fds) > 1:
            raise UsageError(f"{q.side} tap {tap} is multiqueue: netpass supports one queue")
        if nic_id not in paths or nic_id not in filters:
            raise UsageError(f"{q.side} NIC {nic_id}: QEMU lacks x-query-virtio for it")
        rxf = RxFilter.from_qmp(filters[nic_id])
        nics.append(NicInfo(nic_id, mac, tap, paths[nic_id], [0], rxf, fds if local else []))
    if not nics:
        raise UsageError(f"{q.side} VM has no NIC")
    return VmInfo(pid, f"/proc/{pid}/ns/net" if local else "", nics)


async def used_idx(q: Qmp, nic: NicInfo) -> int:
    """RX used-idx (16-bit) of the NIC's RX queue: frames handed to the guest, mod 65536."""
    st = await q.cmd("x-query-virtio-queue-status", path=nic.virtio_path, queue=nic.rx_queues[0])
    return int(st["used-idx"])


def qemu_has_flag(pid: int, flag: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return flag.encode() in argv
