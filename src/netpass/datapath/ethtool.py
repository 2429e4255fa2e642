"""Turn a device's offloads off with the SIOCETHTOOL ioctl (no `ethtool` binary needed).

A capture device must see frames as the guest will receive them: with offloads on, frames are
captured with checksums not filled in and as 10 KB GSO frames, which a guest rejects when they
are injected as-is. Turning every changeable feature off makes the kernel segment and checksum
before the capture point.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from netpass.datapath.netns import check_ifname
from netpass.errors import DatapathError

SIOCETHTOOL = 0x8946
ETHTOOL_GFEATURES = 0x3A
ETHTOOL_SFEATURES = 0x3B
# Legacy getters: position-independent checks of the features that matter.
_LEGACY_GETTERS = {
    "tx-checksumming": 0x16,  # ETHTOOL_GTXCSUM
    "scatter-gather": 0x18,  # ETHTOOL_GSG
    "tcp-segmentation-offload": 0x1E,  # ETHTOOL_GTSO
    "generic-segmentation-offload": 0x23,  # ETHTOOL_GGSO
    "generic-receive-offload": 0x2B,  # ETHTOOL_GGRO
}
_MAX_WORDS = 8  # feature words we allow for; kernels use 2 (64 features)


def _ioctl(sock: socket.socket, ifname: str, data: ctypes.Array[ctypes.c_char]) -> int:
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(data)).ljust(40, b"\0")
    try:
        res = fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    except OSError as e:
        raise DatapathError(f"ethtool ioctl on {ifname} failed: {os.strerror(e.errno or 0)}") from e
    return int(res) if isinstance(res, int) else 0


def offloads_off(ifname: str) -> None:
    """Switch off every changeable offload of IFNAME, then check the important ones are off."""
    check_ifname(ifname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        get = ctypes.create_string_buffer(8 + 16 * _MAX_WORDS)
        struct.pack_into("II", get, 0, ETHTOOL_GFEATURES, _MAX_WORDS)
        _ioctl(sock, ifname, get)
        words = struct.unpack_from("I", get, 4)[0]  # the kernel writes back its word count
        if not 0 < words <= _MAX_WORDS:
            raise DatapathError(f"ethtool on {ifname}: unexpected feature word count {words}")
        blocks = [struct.unpack_from("IIII", get, 8 + 16 * i) for i in range(words)]

        put = ctypes.create_string_buffer(8 + 8 * words)
        struct.pack_into("II", put, 0, ETHTOOL_SFEATURES, words)
        for i, (available, _requested, _active, never_changed) in enumerate(blocks):
            struct.pack_into("II", put, 8 + 8 * i, available & ~never_changed, 0)
        _ioctl(sock, ifname, put)  # may report "some wishes not granted": checked below

        still_on = [name for name, cmd in _LEGACY_GETTERS.items() if _legacy(sock, ifname, cmd)]
        if still_on:
            raise DatapathError(f"cannot turn off on {ifname}: {', '.join(still_on)}")


def offloads_on(ifname: str) -> dict[str, bool]:
    """State of the offloads `offloads_off` checks (True = on)."""
    check_ifname(ifname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return {name: _legacy(sock, ifname, cmd) for name, cmd in _LEGACY_GETTERS.items()}


def _legacy(sock: socket.socket, ifname: str, cmd: int) -> bool:
    val = ctypes.create_string_buffer(8)
    struct.pack_into("II", val, 0, cmd, 0)
    _ioctl(sock, ifname, val)
    return bool(struct.unpack_from("I", val, 4)[0])
