#!/usr/bin/env python3
"""A fake RAPL powercap tree whose counters advance at a known power, until killed.

    python scripts/fake_rapl.py /tmp/powercap --watts 40 &
    MOE_ENERGY_POWERCAP_ROOT=/tmp/powercap moe-energy run --preset small

Builds <root>/intel-rapl:0 (package-0), its sub-zones intel-rapl:0:0 (core: inside the package, must not
be counted twice) and, with --dram-watts, intel-rapl:0:1 (dram), then rewrites each energy_uj every
--period seconds as start + watts x elapsed, wrapping at max_energy_range_uj like the real counter.
Each write is a rename of a complete file, so a reader never sees a half-written number.
Prints "ready <root>" once the tree exists. Standard library only.

A tree that lies, for tests of what the meter refuses: --wrap-uj makes the counter wrap somewhere other
than the max_energy_range_uj it states (which may then be 0), --reset-every sets it back to 0 every so many
seconds (a reset, not a wrap), --max-power-w states a package power limit (constraint_0_max_power_uw)
below what the counter draws.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build(root: Path, zones: dict[str, tuple[str, float]], max_range_uj: int, start_uj: int,
          wrap_uj: int | None = None) -> None:
    """zones: directory name -> (zone name, watts); the counter starts at start_uj modulo where it wraps."""
    for zid, (name, _) in zones.items():
        d = root / zid
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "name", name + "\n")
        write_atomic(d / "max_energy_range_uj", f"{max_range_uj}\n")
        write_atomic(d / "energy_uj", f"{start_uj % (wrap_uj or max_range_uj)}\n")


def counter_uj(watts: float, elapsed: float, start_uj: int, wrap_uj: int, reset_every: float) -> int:
    """The counter after ``elapsed`` seconds: back to 0 every ``reset_every`` s (0: never), wrapped at wrap_uj."""
    if reset_every > 0:
        return int(watts * (elapsed % reset_every) * 1e6) % wrap_uj
    return int(start_uj + watts * elapsed * 1e6) % wrap_uj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="directory to create the tree in (point MOE_ENERGY_POWERCAP_ROOT here)")
    ap.add_argument("--watts", type=float, default=40.0, help="package-0 power (default 40)")
    ap.add_argument("--dram-watts", type=float, default=0.0, help="DRAM zone power; 0 = no DRAM zone (default)")
    ap.add_argument("--max-range-uj", type=int, default=262_143_328_850, help="wrap point (the real default)")
    ap.add_argument("--start-uj", type=int, default=0, help="initial counter (near the range: a quick wrap)")
    ap.add_argument("--period", type=float, default=0.01, help="seconds between updates (default 0.01)")
    ap.add_argument("--wrap-uj", type=int, help="where the counter really wraps (default: the stated range)")
    ap.add_argument("--reset-every", type=float, default=0.0, help="seconds between resets to 0 (default never)")
    ap.add_argument("--max-power-w", type=float, help="package-0's stated constraint_0_max_power_uw, in W")
    a = ap.parse_args(argv)
    try:  # a real counter never falls behind: run ahead of the measured work on a busy 2-core host
        os.nice(-10)
    except (OSError, AttributeError):  # not root, or no nice(): the default priority, a little staler
        pass

    root = Path(a.root)
    wrap = a.wrap_uj or a.max_range_uj
    zones = {"intel-rapl:0": ("package-0", a.watts), "intel-rapl:0:0": ("core", a.watts * 0.6)}
    if a.dram_watts > 0:
        zones["intel-rapl:0:1"] = ("dram", a.dram_watts)
    build(root, zones, a.max_range_uj, a.start_uj, wrap)
    if a.max_power_w is not None:
        write_atomic(root / "intel-rapl:0" / "constraint_0_max_power_uw", f"{int(a.max_power_w * 1e6)}\n")
    print(f"ready {root}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    t0 = time.perf_counter()
    try:
        while True:
            elapsed = time.perf_counter() - t0
            for zid, (_, watts) in zones.items():
                uj = counter_uj(watts, elapsed, a.start_uj, wrap, a.reset_every)
                write_atomic(root / zid / "energy_uj", f"{uj}\n")
            time.sleep(a.period)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
