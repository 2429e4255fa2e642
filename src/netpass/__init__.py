"""netpass: lossless network switchover for QEMU live migration, driven from the management layer."""

__version__ = "0.1.0"
