"""CPU package and DRAM energy from RAPL, read through the Linux powercap sysfs tree.

Each zone ``<root>/intel-rapl:N[:M]`` has ``name``, ``energy_uj`` (a cumulative counter in microjoules)
and ``max_energy_range_uj`` (where it wraps back to 0). The root defaults to ``/sys/class/powercap`` and
is overridden by ``MOE_ENERGY_POWERCAP_ROOT`` (containers mount the host's tree elsewhere; tests build a
fake tree of real files).

Which zones count: top-level ``package-N`` zones (the whole socket: cores, uncore, caches) and ``dram``
sub-zones (memory, outside the package). ``core``/``uncore`` sub-zones are already inside their package
and ``psys`` (whole platform) overlaps the packages, so summing them would count energy twice.
Since Linux 5.10 (CVE-2020-8694) ``energy_uj`` is readable by root only: the error says how to open it.

A tree can lie (a container's bind mount, a broken driver, a fake): a zone whose files do not parse, whose
range is not positive or whose counter sits outside its range is unusable (RaplUnavailable, kind
"unusable": auto falls back, ``--meter rapl`` exits 2). At run time a counter that goes back further than a
wrap explains (a reset), or a window whose power is below zero or above the zone's ceiling, raises
ImpossibleReading: GuardedMeter fails that window instead of keeping the figure.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Unavailable
from .meter import Ceilings, CounterMeter, impossible
from .trace import DEFAULT_PERIOD_S

ENV_ROOT = "MOE_ENERGY_POWERCAP_ROOT"
DEFAULT_ROOT = "/sys/class/powercap"
# Physical ceilings per zone kind: the largest shipping sockets draw 500 W (EPYC 9965, Xeon 6980P), so a
# package reading above 1000 W is no CPU; a socket's DRAM is at most 24 DIMMs (12 channels x 2) at ~15 W
# under load, 360 W, so above 500 W is no memory.
PACKAGE_MAX_W = 1000.0
DRAM_MAX_W = 500.0
# Where a zone states its power limits (constraint_N_max_power_uw / _power_limit_uw), a window above this
# many times the largest of them is impossible: the short-term limit (PL2) bounds every window's average
# power, and twice it still allows a PL2 missing from the tree (laptops run PL2 at 2-3x a 15 W TDP).
LIMIT_MARGIN = 2.0
# RAPL updates energy_uj about every 1 ms; ten times that allows for updates that firmware (SMM) or a
# hypervisor delays. Only a window of a few ms can tell the difference.
STALE_S = 0.01

_ZONE = re.compile(r"^(intel-rapl|amd-rapl)((?::\d+)+)$")
_LIMIT = re.compile(r"^constraint_\d+_(max_power_uw|power_limit_uw)$")


class RaplUnavailable(Unavailable):
    """RAPL cannot be read here; the message is one line saying why and, where possible, how to fix it."""


def powercap_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


@dataclass(frozen=True)
class Zone:
    path: Path
    device: str  # "cpu:package-0" or "dram:package-0"
    max_range_uj: int
    ceiling_w: float = PACKAGE_MAX_W  # above this the zone's window is impossible
    ceiling_source: str = "physical ceiling of a CPU package"


def _unusable(path: Path, why: str) -> RaplUnavailable:
    """A zone whose file says something no real counter says: the tree cannot be trusted."""
    return RaplUnavailable(f"RAPL: zone {path.parent.name} is unusable: {path} {why}", kind="unusable")


def _read_text(path: Path, root: Path) -> str:
    """One sysfs file's text; every failure becomes a one-line RaplUnavailable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except PermissionError:
        raise RaplUnavailable(
            f"RAPL: no permission to read {path}; grant read access with "
            f"'sudo chmod a+r {root}/intel-rapl:*/energy_uj {root}/intel-rapl:*/intel-rapl:*/energy_uj' "
            "(lasts until reboot) or run as root",
            kind="no permission",
        ) from None
    except OSError as e:
        raise RaplUnavailable(
            f"RAPL: cannot read {path} ({e.strerror or e}); check that {ENV_ROOT} (or {DEFAULT_ROOT}) "
            "is a powercap tree whose zones hold readable energy_uj files",
            kind="unreadable",
        ) from None
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _unusable(path, f"holds {raw[:16]!r}, not text") from None


def _read_int(path: Path, root: Path) -> int:
    text = _read_text(path, root)
    try:
        return int(text)
    except ValueError:
        raise _unusable(path, f"holds {text[:40]!r}, not a whole number") from None


def _limits_w(path: Path, root: Path) -> list[float]:
    """The zone's stated power limits and maxima (W) above 0; a file the kernel cannot read is skipped."""
    out: list[float] = []
    for f in sorted(path.iterdir()):
        if not _LIMIT.match(f.name):
            continue
        try:
            uw = _read_int(f, root)
        except RaplUnavailable as e:
            if e.kind == "unusable":
                raise
            continue  # ENODATA and friends: the kernel has no value for this constraint
        if uw > 0:
            out.append(uw / 1e6)
    return out


def _ceiling(device: str, limits_w: list[float]) -> tuple[float, str]:
    """The zone's ceiling: its kind's physical one, or LIMIT_MARGIN x its largest stated limit if lower."""
    cap, source = (DRAM_MAX_W, "physical ceiling of a socket's DRAM") if device.startswith("dram:") else \
        (PACKAGE_MAX_W, "physical ceiling of a CPU package")
    if limits_w and LIMIT_MARGIN * max(limits_w) < cap:
        return LIMIT_MARGIN * max(limits_w), f"{LIMIT_MARGIN:g} x the zone's largest stated limit, {max(limits_w):g} W"
    return cap, source


def _zone(path: Path, device: str, root: Path) -> Zone:
    """The zone, its files read once to prove each is readable and says what a real counter says."""
    energy = _read_int(path / "energy_uj", root)
    span = _read_int(path / "max_energy_range_uj", root)
    if span <= 0:
        raise _unusable(path / "max_energy_range_uj", f"is {span}: a counter's range (where it wraps) must be > 0")
    if not 0 <= energy <= span:
        raise _unusable(path / "energy_uj", f"reads {energy}, outside its range 0..{span} uJ")
    return Zone(path, device, span, *_ceiling(device, _limits_w(path, root)))


def _zone_dirs(root: Path) -> dict[str, Path]:
    """Zone id -> directory, top-level zones and the sub-zones the real tree nests inside them."""
    found: dict[str, Path] = {}
    for top in sorted(root.iterdir()):
        if _ZONE.match(top.name) and top.is_dir():
            found.setdefault(top.name, top)
            for sub in sorted(top.iterdir()):
                if _ZONE.match(sub.name) and sub.is_dir():
                    found.setdefault(sub.name, sub)
    return found


def discover(root: Path | None = None) -> list[Zone]:
    """The zones to sum, each read once to prove it is usable; raises RaplUnavailable otherwise."""
    root = root or powercap_root()
    if not root.is_dir():
        hint = f" ({ENV_ROOT} points there)" if os.environ.get(ENV_ROOT) else \
            f" (no RAPL on this CPU or VM; if the host's tree is mounted elsewhere set {ENV_ROOT})"
        raise RaplUnavailable(f"RAPL: no powercap tree at {root}{hint}")
    found = _zone_dirs(root)
    zones: list[Zone] = []
    packages: dict[str, str] = {}  # "intel-rapl:0" -> "package-0"
    for zid in sorted(found, key=lambda z: (z.count(":"), z)):
        path = found[zid]
        name = _read_text(path / "name", root)
        parent = zid.rsplit(":", 1)[0]
        if zid.count(":") == 1:
            if not name.startswith("package"):
                continue  # psys overlaps the packages
            packages[zid] = name
            device = f"cpu:{name}"
        elif name == "dram" and parent in packages:
            device = f"dram:{packages[parent]}"
        else:
            continue  # core/uncore: already inside their package
        zones.append(_zone(path, device, root))
    if not zones:
        raise RaplUnavailable(f"RAPL: no package zones (intel-rapl:N with name package-N) under {root}")
    return zones


class Unwrapper:
    """Cumulative joules per zone that keep counting across the counters' wrap-around to 0.

    A step back is a wrap only if the energy a wrap implies fits the zone's ceiling over the time since the
    last read; otherwise the counter was reset (or lies about its range): counting goes on from the old
    value and the step is kept in ``jumps`` (device, reason) for the window to fail on.

    Two reads can tell one wrap only, so every read of a window goes through one unwrapper: its edges' and its
    sampler's (a thread; a lock keeps each read and its step together). ``longest_gap_s`` is the most time
    between two reads since ``restart()``: a zone's range over its ceiling is the least time another wrap takes.
    """

    def __init__(self, zones: list[Zone], root: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.zones, self.root, self.clock = zones, root, clock
        self._last: dict[str, tuple[int, float]] = {}
        self._offset: dict[str, int] = {}
        self._lock = threading.Lock()
        self.wraps = 0
        self.jumps: list[tuple[str, str]] = []
        self.longest_gap_s = 0.0

    def restart(self) -> None:
        """A new window: the next read is its baseline, whatever the counters did since the last one."""
        with self._lock:
            self._last.clear()
            self.jumps.clear()
            self.longest_gap_s = 0.0

    def __call__(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._lock:
            for z in self.zones:
                raw = _read_int(z.path / "energy_uj", self.root)
                self._step(z, raw, self.clock())
                out[z.device] = (raw + self._offset.get(z.device, 0)) / 1e6
        return out

    def _step(self, z: Zone, raw: int, now: float) -> None:
        prev = self._last.get(z.device)
        self._last[z.device] = (raw, now)
        if prev is not None:
            self.longest_gap_s = max(self.longest_gap_s, now - prev[1])
        if raw > z.max_range_uj:
            self.jumps.append((z.device, f"{z.device}: energy_uj reads {raw}, above its range {z.max_range_uj} uJ"))
            return
        if prev is None or raw >= prev[0]:
            return
        last, dt = prev[0], now - prev[1]
        wrap_j = (z.max_range_uj - last + raw) / 1e6
        if wrap_j <= z.ceiling_w * (dt + STALE_S):
            self._offset[z.device] = self._offset.get(z.device, 0) + z.max_range_uj
            self.wraps += 1
            return
        self._offset[z.device] = self._offset.get(z.device, 0) + last  # a reset: count on from there
        self.jumps.append((z.device, (
            f"{z.device}: counter went back from {last} to {raw} uJ in {dt:.3g} s; a wrap at its range "
            f"{z.max_range_uj} uJ would mean {wrap_j / max(dt, 1e-9):.4g} W, above its {z.ceiling_w:g} W "
            "ceiling: a reset, not a wrap")))


def _first_per_device(jumps: list[tuple[str, str]]) -> dict[str, str]:
    """Each device's first jump, with how many it had."""
    out: dict[str, str] = {}
    for dev, why in jumps:
        if dev not in out:
            n = sum(1 for d, _ in jumps if d == dev)
            out[dev] = why + (f" ({n} such steps in the window)" if n > 1 else "")
    return out


class RaplMeter(CounterMeter):
    """RAPL's CPU package and DRAM counters, read at the window's edges; one device per zone."""

    name = "rapl"
    method = "counter"
    stale_s = STALE_S

    def __init__(self, root: Path | str | None = None, trace_period_s: float = DEFAULT_PERIOD_S) -> None:
        super().__init__(trace_period_s)
        self.root = Path(root) if root is not None else powercap_root()
        self.zones = discover(self.root)
        self.devices = [z.device for z in self.zones]
        self._unwrap = Unwrapper(self.zones, self.root)

    def _read(self) -> dict[str, float]:
        return self._unwrap()  # the edges and the sampler (the default trace) read through the one unwrapper

    def begin(self) -> None:
        self._refuse_open()  # before the restart: an open window's unwrapper is still counting
        self._unwrap.restart()  # a step back between windows is no part of this one
        super().begin()

    def _ceilings(self, state_end: dict[str, dict[str, Any]]) -> Ceilings:
        return {z.device: (z.ceiling_w, z.ceiling_source) for z in self.zones}

    def _problems(self, joules: dict[str, float], seconds: float,
                  state_end: dict[str, dict[str, Any]]) -> list[str]:
        """A step back no wrap explains, seen at the edges or by the sampler, then impossible powers."""
        jumps = _first_per_device(self._unwrap.jumps)
        rest = {d: j for d, j in joules.items() if d not in jumps}
        return list(jumps.values()) + impossible(rest, seconds, self._ceilings(state_end), self.stale_s)

    def _flags(self, joules: dict[str, float], seconds: float) -> list[str]:
        flags: list[str] = []
        gap = self._unwrap.longest_gap_s
        for z in self.zones:
            if gap > z.max_range_uj / 1e6 / z.ceiling_w:
                flags.append(f"{z.device}: reads {gap:.3g} s apart may hide a wrap of its {z.max_range_uj / 1e6:g} J "
                             f"RAPL counter range (at its {z.ceiling_w:g} W ceiling); energy could be undercounted")
            if joules[z.device] <= 0:
                flags.append(f"{z.device}: RAPL counter did not advance (zero-joule reading)")
        return flags

    def _versions(self) -> dict[str, Any]:
        return {"powercap_root": str(self.root), "kernel": os.uname().release}
