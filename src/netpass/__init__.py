"""netpass: lossless network switchover for QEMU live migration, from the management layer.

`await netpass.migrate(src_qmp, dst_qmp, uri, ...)` runs one migration (see
`netpass.orchestrator.migrate`).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["migrate"]


def __getattr__(name: str) -> Any:
    # Lazy: `netpass --help` and the probe need not import qemu.qmp.
    if name == "migrate":
        from netpass.orchestrator import migrate

        return migrate
    raise AttributeError(f"module 'netpass' has no attribute {name!r}")
