"""netpass: lossless network switchover for QEMU live migration, from the management layer."""

__version__ = "0.1.0"
