"""Kernel data path around a VM's tap: what netpass does to frames on the host.

* `caps`    — which kernel features exist (tried in a scratch namespace), and the fallbacks.
* `tc`      — clsact egress redirect filters, the hold (root qdisc), crash-safe `sweep`.
* `capture` — the device redirected frames go to, and the socket that reads them in order.
* `inject`  — frames straight into a tap's queue, past its filters and hold.
* `tapfd`   — a hypervisor's tap fds: find, copy (pidfd_getfd), peek (`queued`), `drain`.
* `netns`   — `in_netns` and netlink sockets in a named namespace.

Everything acts in the calling thread's network namespace unless given `netns=`.
"""
