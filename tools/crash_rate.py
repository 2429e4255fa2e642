"""How often does the lab guest die right after a migration? (Not part of the package.)

    .venv/bin/python tools/crash_rate.py NAME RATE N [--mode stock|netpass] [--first] [--append S]

Migrates the lab VM N times under a RATE pps probe and counts migrations after which the guest
died (QEMU's SHUTDOWN/RESET/GUEST_PANICKED). By default one warmed-up guest goes back and forth
(what `netpass bench` does); --first boots a new guest for every run and migrates it after the
5 s settle only, without the warm-up, which is how the crash was first seen. --append adds
guest kernel parameters. Serial logs of dead guests are copied to the lab's run directory.
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from netpass import guest, lab, trial, vm
from netpass.cli import lab_driver

DEATH = ("SHUTDOWN", "RESET", "GUEST_PANICKED")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("rate", type=int)
    p.add_argument("n", type=int)
    p.add_argument("--mode", default="stock", choices=["stock", "netpass"])
    p.add_argument("--first", action="store_true")
    p.add_argument("--append", default="")
    a = p.parse_args()
    if a.append:
        orig = vm.VmSpec.argv

        def argv(self: vm.VmSpec, image: guest.GuestImage) -> list[str]:
            v = orig(self, image)
            v[v.index("-append") + 1] += " " + a.append
            return v

        vm.VmSpec.argv = argv  # type: ignore[method-assign]
    st = lab.load(a.name) if lab.is_up(a.name) else lab.up(a.name, 1, False, False)
    paused = a.mode == "netpass"
    dead, t0 = 0, time.monotonic()
    for i in range(a.n):
        if a.first:
            lab._reboot(st)
            lab.settle()
        elif not lab.vm_running(st):
            lab.fresh_vm(st)
        lab.ensure_incoming(st, paused=paused)
        dst = st.instance("b" if st.vm_host == "a" else "a", incoming=True)
        assert dst is not None
        rec = trial.run_trial(st, "x", a.rate, lab_driver(a.mode, False, None, None))
        died = any(e["event"] in DEATH for e in rec.timing.events)
        print(i, "lost", rec.stats.lost, "pause", rec.timing.true_pause_ms, "DIED" * died)
        if died:
            dead += 1
            shutil.copy(dst.serial, st.run_dir / f"died-{i}.serial")
            _show_oops(dst.serial)
    took = time.monotonic() - t0
    print(f"SUMMARY first={a.first} append={a.append!r} rate={a.rate} n={a.n} died={dead} "
          f"in {took:.0f} s")  # fmt: skip


def _show_oops(serial: Any) -> None:
    with open(serial, errors="replace") as f:
        text = f.read()
    k = max(text.find("PANIC"), text.find("general protection"))
    print(text[k : k + 800] if k >= 0 else text[-800:])


if __name__ == "__main__":
    main()
