"""One exception hierarchy for everything netpass reports to a user.

Every error carries a one-line message meant for a human; the CLI prints exactly that line
and exits non-zero.
"""


class NetpassError(Exception):
    """Base class: a failure netpass understands and can explain in one line."""


class UsageError(NetpassError):
    """Bad input from the user (arguments, paths, a lab already up, ...)."""


class HostError(NetpassError):
    """The host cannot do what is asked (not root, QEMU missing, kernel feature absent)."""


class LabError(NetpassError):
    """The built-in lab could not be brought up, queried or torn down."""


class MigrationError(NetpassError):
    """QEMU reported a failed or cancelled migration, or QMP misbehaved."""


class DatapathError(NetpassError):
    """A kernel data-path operation (tc, AF_PACKET, tap fd) failed."""
