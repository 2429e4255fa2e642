"""Small host helpers: running commands with one-line errors, root and tool checks."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence

from netpass.errors import HostError

PR_SET_NAME = 15  # linux/prctl.h
_libc = ctypes.CDLL(None, use_errno=True)


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostError("netpass needs root (network namespaces, taps and tc); run it with sudo")


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostError(f"{name} not found: install the Debian package {package}")
    return path


def run(
    argv: Sequence[str], *, netns: str | None = None, check: bool = True, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a command (inside `netns` when given); on failure raise HostError with its stderr."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        detail = err[-1] if err else f"exit code {proc.returncode}"
        raise HostError(f"command failed: {' '.join(full)}: {detail}")
    return proc


def name_this_thread(name: str) -> None:
    """Give the calling OS thread a name (15 bytes) that `top -H`, `ps -L` and `perf` show;
    Python 3.11 names only its own Thread objects."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)  # a failure leaves the old name


_frozen = 0  # migrations inside gc_frozen() in this process


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Leave every object alive now out of garbage collection until the block ends.

    A full collection walks every tracked object: in a process that holds much (the bench
    keeps every run's probe data: 1.8 million objects after 140 runs) it took 230 ms, and one
    falling inside a switchover would make netpass that much late. Frozen, a collection walks
    only what the migration allocated. Nested and concurrent blocks share one freeze.
    """
    global _frozen
    if _frozen == 0:
        gc.freeze()
    _frozen += 1
    try:
        yield
    finally:
        _frozen -= 1
        if _frozen == 0:
            gc.unfreeze()
