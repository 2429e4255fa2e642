"""Guest image builder: Debian's cloud kernel plus a busybox-static initramfs.

The guest boots in a few seconds under TCG, loads the virtio-net driver chain, sets each NIC's
address from the kernel command line (`netpass.ip=eth0:10.0.0.2/24,...`) and prints a ready
marker on the serial port. The kernel answers ICMP echo itself, so no userland is needed.
The result is cached under /var/cache/netpass/guest/<key>/ and rebuilt only when an input
(kernel package, busybox binary, init script, this builder) changes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from netpass.errors import HostError
from netpass.sysutil import require_tool, run

CACHE_DIR = Path("/var/cache/netpass")
READY_MARKER = "NETPASS-GUEST-READY"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUILDER_VERSION = "1"
# napi_tx=0: the driver orphans each skb it queues for transmit, so echo replies waiting for the
# host to take them no longer count against the ICMP socket's send buffer. With the default
# (napi_tx=1) a guest handed hundreds of rescued frames at once answers faster than QEMU
# completes its transmits, its ICMP socket runs out of buffer and it drops replies (Ip:
# OutDiscards): the probe then counted frames netpass had delivered as lost.
VIRTIO_NET_ARGS = "napi_tx=0"
# Load order matters: each module needs the ones before it (no depmod/modprobe in the guest).
MODULES = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
]

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {" ".join(Path(m).stem for m in MODULES)}; do
  args=""
  [ "$m" = virtio_net ] && args="{VIRTIO_NET_ARGS}"
  insmod /lib/modules/$m.ko $args || echo "insmod $m failed"
done
ip link set lo up
# Several NICs share one L2 in the lab: each answers ARP only for its own address.
echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore
echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    netpass.ip=*)
      for spec in $(echo "${{arg#netpass.ip=}}" | tr ',' ' '); do
        dev="${{spec%%:*}}"; addr="${{spec#*:}}"
        ip link set "$dev" up && ip addr add "$addr" dev "$dev"
      done ;;
  esac
done
echo "{READY_MARKER}" > /dev/ttyS0
while true; do sleep 3600; done
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc-format cpio archive (what the kernel unpacks as initramfs)."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        )
        out.write(hdr.encode() + nameb)
        out.write(b"\0" * (-(110 + len(nameb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def _kernel_package() -> tuple[str, str]:
    """(package name, version) of the newest Debian cloud kernel apt knows."""
    deps = run(["apt-cache", "depends", KERNEL_META_PACKAGE], check=False).stdout
    name = next((ln.split()[-1] for ln in deps.splitlines() if "Depends: linux-image-" in ln), None)
    if name is None:
        run(["apt-get", "update", "-q"], timeout=600)
        deps = run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
        name = next(
            (ln.split()[-1] for ln in deps.splitlines() if "Depends: linux-image-" in ln), None
        )
    if name is None:
        raise HostError(f"apt knows no {KERNEL_META_PACKAGE}: check the Debian apt sources")
    policy = run(["apt-cache", "policy", name]).stdout
    version = next(
        (ln.split()[-1] for ln in policy.splitlines() if ln.strip().startswith("Candidate:")), ""
    )
    return name, version


def _download_deb(name: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{name}_*.deb"))
    if found:
        return found[-1]
    # apt-get download writes into the current directory; the _apt sandbox cannot write there.
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        subprocess.run(
            ["apt-get", "download", "-q", f"{name}={version}" if version else name],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise HostError(f"could not download {name} with apt-get download")
        target = dest / debs[0].name
        shutil.move(str(debs[0]), target)
    return target


def build(cache_dir: Path = CACHE_DIR, progress: bool = False) -> GuestImage:
    """Return the cached guest image, building it first when an input changed."""
    busybox = Path(require_tool("busybox", "busybox-static")).resolve()
    require_tool("dpkg-deb", "dpkg")
    name, version = _kernel_package()
    key = hashlib.sha256(
        "\0".join([name, version, INIT_SCRIPT, BUILDER_VERSION]).encode()
        + hashlib.sha256(busybox.read_bytes()).digest()
    ).hexdigest()[:16]
    out = cache_dir / "guest" / key
    image = GuestImage(out / "vmlinuz", out / "initrd.img", name.removeprefix("linux-image-"))
    if image.kernel.exists() and image.initrd.exists():
        return image
    if progress:
        print(f"netpass: building guest image ({name} {version}) into {out}", flush=True)
    deb = _download_deb(name, version, cache_dir / "debs")
    with tempfile.TemporaryDirectory() as tmp:
        run(["dpkg-deb", "-x", str(deb), tmp], timeout=300)
        root = Path(tmp)
        vmlinuz = next(root.glob("boot/vmlinuz-*"))
        moddir = next(root.glob("lib/modules/*/kernel"))
        entries: list[tuple[str, int, bytes]] = [
            (d, stat.S_IFDIR | 0o755, b"")
            for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp"]
        ]
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
        entries.append(("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
        for rel in MODULES:
            src = moddir / rel
            if not src.exists():
                raise HostError(f"guest kernel {name} lacks module {rel}")
            entries.append((f"lib/modules/{src.name}", stat.S_IFREG | 0o644, src.read_bytes()))
        staging = cache_dir / "guest" / f".{key}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
        (staging / "initrd.img").write_bytes(gzip.compress(_cpio_newc(entries), 6))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)  # atomic: a reader never sees half an image
    return image
