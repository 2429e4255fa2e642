"""Watchdog of one agent: when the agent process dies, undo netpass in its namespace at once.

    python -m netpass.agent.watchdog AGENT_PID NETNS_PATH

pidfd_open + poll wakes up the moment the agent exits (no polling interval), then the same
sweep as `netpass cleanup` runs in the agent's network namespace: redirects deleted, capture
devices deleted, holds opened. A SIGTERM (the agent's clean exit) ends the watchdog quietly.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys

SYS_PIDFD_OPEN = 434


def wait_for_exit(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    if fd < 0:
        return  # already gone
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        while not p.poll(1000):
            pass
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].isdigit():
        print("usage: python -m netpass.agent.watchdog AGENT_PID NETNS_PATH", file=sys.stderr)
        return 2
    pid, netns = int(args[0]), args[1]
    # Hold the namespace open: the path under /proc/PID goes away with the agent.
    ns_fd = os.open(netns, os.O_RDONLY)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    wait_for_exit(pid)
    from netpass.cleanup import sweep_namespace

    for line in sweep_namespace(f"/proc/{os.getpid()}/fd/{ns_fd}"):
        print(f"netpass watchdog: {line}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
