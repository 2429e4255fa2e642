"""QMP access on top of qemu.qmp: commands with one-line errors and a timestamped event log.

Every QMP event carries QEMU's own wall-clock timestamp (gettimeofday at emission); netpass
measures the pause from those, not from when Python happened to read the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

from netpass.errors import MigrationError, UsageError

# qemu.qmp logs every connection problem at ERROR level; netpass reports them itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Event:
    side: str
    name: str
    t_ns: int  # QEMU's timestamp
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "event": self.name, "t_ns": self.t_ns, "data": self.data}


class Qmp:
    """One QMP session ("src" or "dst") that records all events from connect to close."""

    def __init__(self, side: str, path: str | Path) -> None:
        self.side = side
        self.path = str(path)
        self.client = QMPClient(f"netpass-{side}")
        self.events: list[Event] = []
        self._listener = EventListener()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._gone = False

    async def connect(self, timeout: float = 5.0) -> None:
        if not Path(self.path).exists():
            raise UsageError(f"{self.side} QMP socket {self.path} does not exist")
        try:
            await asyncio.wait_for(self.client.connect(self.path), timeout)
        except TimeoutError:
            raise UsageError(
                f"cannot connect to {self.side} QMP socket {self.path}: no greeting within "
                f"{timeout:.0f} s (QEMU serves one QMP client per socket: is another connected?)"
            ) from None
        except (ConnectError, OSError) as e:
            raise UsageError(f"cannot connect to {self.side} QMP socket {self.path}: {e}") from e
        self.client.register_listener(self._listener)
        self._task = asyncio.create_task(self._pump())
        self._watch = asyncio.create_task(self._watch_connection())

    async def _watch_connection(self) -> None:
        # Without this a wait for an event from a QEMU that exited lasts its whole timeout.
        while self.client.runstate == Runstate.RUNNING:
            await self.client.runstate_changed()
        async with self._changed:
            self._gone = True
            self._changed.notify_all()

    @property
    def gone(self) -> bool:
        """The QEMU closed the connection (it exited: a failed incoming QEMU does). Also true
        before the watcher ran: a command that failed on it left the client disconnecting."""
        return self._gone or self.client.runstate == Runstate.DISCONNECTING

    async def _pump(self) -> None:
        async for msg in self._listener:
            ts: dict[str, int] = msg.get("timestamp", {})  # type: ignore[assignment]
            data: dict[str, Any] = msg.get("data", {})  # type: ignore[assignment]
            t_ns = int(ts.get("seconds", 0)) * 1_000_000_000 + int(ts.get("microseconds", 0)) * 1000
            ev = Event(self.side, str(msg["event"]), t_ns, dict(data))
            async with self._changed:
                self.events.append(ev)
                self._changed.notify_all()

    async def close(self) -> None:
        for task in (self._watch, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # A QEMU that exited (a failed incoming VM does) makes disconnect re-raise its EOF.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.client.disconnect()

    async def cmd(self, name: str, **args: Any) -> Any:
        try:
            return await self.client.execute(name, args or None)
        except ExecuteError as e:
            raise MigrationError(f"{self.side} QEMU refused {name}: {e.error.error.desc}") from e
        except QMPError as e:
            raise MigrationError(f"{self.side} QMP connection failed during {name}: {e}") from e

    async def wait_event(
        self,
        pred: Callable[[Event], bool],
        timeout: float,
        start: int = 0,
        what: str = "event",
    ) -> Event:
        """First recorded event at index >= start matching pred (waits up to timeout)."""

        def find() -> Event | None:
            return next((e for e in self.events[start:] if pred(e)), None)

        async def waiter() -> Event:
            async with self._changed:
                while (ev := find()) is None:
                    if self.gone:
                        raise MigrationError(
                            f"{self.side} QEMU closed its QMP connection (exited?) while "
                            f"netpass waited for {what}"
                        )
                    await self._changed.wait()
                return ev

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            raise MigrationError(f"timed out after {timeout:.0f} s waiting for {what}") from None

    def peer_pid(self) -> int:
        """PID of the QEMU at the other end of the QMP unix socket (SO_PEERCRED)."""
        writer = getattr(self.client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            raise MigrationError(f"{self.side} QMP is not connected over a unix socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        return int(pid)


def is_event(name: str, **data: Any) -> Callable[[Event], bool]:
    return lambda e: e.name == name and all(e.data.get(k) == v for k, v in data.items())
