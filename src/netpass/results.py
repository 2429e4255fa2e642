"""Plain result records shared by the migration driver, the probe analysis and the reports.

They are dataclasses of JSON-friendly values so a run can be written to disk and re-read
(`to_dict` / `from_dict`) without losing anything the report needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MigrationTiming:
    """What the migration driver measured. Times are wall-clock nanoseconds (QMP timestamps)."""

    mode: str  # "stock" or "netpass"
    postcopy: bool
    src_stop_ns: int | None = None  # source STOP event
    dst_resume_ns: int | None = None  # destination RESUME event
    true_pause_ms: float | None = None  # dst RESUME - src STOP
    qemu_downtime_ms: float | None = None  # QEMU's own 'downtime' from query-migrate
    total_time_ms: float | None = None  # QEMU's 'total-time'
    setup_time_ms: float | None = None
    ram_transferred_bytes: int | None = None
    ram_total_bytes: int | None = None
    ram_downtime_bytes: int | None = None  # RAM sent while both VMs were stopped (QEMU 7.1+)
    migrate_start_ns: int | None = None  # when netpass issued 'migrate'
    completed_ns: int | None = None  # MIGRATION status=completed event on the source
    postcopy_start_ns: int | None = None  # when 'migrate-start-postcopy' was issued
    announce_ns: list[int] = field(default_factory=list)  # RARP/GARP seen leaving the destination
    events: list[dict[str, Any]] = field(default_factory=list)  # (side, event, t_ns, data)
    netpass: dict[str, Any] = field(default_factory=dict)  # netpass counters, when mode=netpass

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationTiming:
        return cls(**d)


@dataclass
class ProbeData:
    """Raw probe output: one send time per sequence number, replies in arrival order."""

    target: str
    rate_pps: int
    payload_bytes: int
    send_ns: list[int]  # send_ns[seq] = wall-clock send time of sequence number seq
    replies: list[tuple[int, int]]  # (seq, arrival wall-clock ns), in arrival order

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "rate_pps": self.rate_pps,
            "payload_bytes": self.payload_bytes,
            "send_ns": self.send_ns,
            "replies": [list(r) for r in self.replies],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeData:
        return cls(
            target=d["target"],
            rate_pps=int(d["rate_pps"]),
            payload_bytes=int(d["payload_bytes"]),
            send_ns=[int(x) for x in d["send_ns"]],
            replies=[(int(a), int(b)) for a, b in d["replies"]],
        )
