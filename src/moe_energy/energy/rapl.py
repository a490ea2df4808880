"""CPU package and DRAM energy from RAPL, read through the Linux powercap sysfs tree.

Each zone ``<root>/intel-rapl:N[:M]`` has ``name``, ``energy_uj`` (a cumulative counter in microjoules)
and ``max_energy_range_uj`` (where it wraps back to 0). The root defaults to ``/sys/class/powercap`` and
is overridden by ``MOE_ENERGY_POWERCAP_ROOT`` (containers mount the host's tree elsewhere; tests build a
fake tree of real files).

Which zones count: top-level ``package-N`` zones (the whole socket: cores, uncore, caches) and ``dram``
sub-zones (memory, outside the package). ``core``/``uncore`` sub-zones are already inside their package
and ``psys`` (whole platform) overlaps the packages, so summing them would count energy twice.
Since Linux 5.10 (CVE-2020-8694) ``energy_uj`` is readable by root only: the error says how to open it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Unavailable
from .meter import CounterMeter
from .trace import DEFAULT_PERIOD_S, PowerTrace

ENV_ROOT = "MOE_ENERGY_POWERCAP_ROOT"
DEFAULT_ROOT = "/sys/class/powercap"
# A window longer than the counter's range at this power could wrap twice, which no reader can see.
MAX_PLAUSIBLE_W = 1000.0

_ZONE = re.compile(r"^(intel-rapl|amd-rapl)((?::\d+)+)$")


class RaplUnavailable(Unavailable):
    """RAPL cannot be read here; the message is one line saying why and, where possible, how to fix it."""


def powercap_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


@dataclass(frozen=True)
class Zone:
    path: Path
    device: str  # "cpu:package-0" or "dram:package-0"
    max_range_uj: int


def _read_text(path: Path, root: Path) -> str:
    """One sysfs file's text; every failure becomes a one-line RaplUnavailable."""
    try:
        with open(path) as f:
            return f.read().strip()
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


def _read_int(path: Path, root: Path) -> int:
    text = _read_text(path, root)
    try:
        return int(text)
    except ValueError:
        raise RaplUnavailable(f"RAPL: {path} holds {text[:40]!r}, not a whole number of microjoules",
                              kind="unreadable") from None


def discover(root: Path | None = None) -> list[Zone]:
    """The zones to sum, each read once to prove it is readable; raises RaplUnavailable otherwise."""
    root = root or powercap_root()
    if not root.is_dir():
        hint = f" ({ENV_ROOT} points there)" if os.environ.get(ENV_ROOT) else \
            f" (no RAPL on this CPU or VM; if the host's tree is mounted elsewhere set {ENV_ROOT})"
        raise RaplUnavailable(f"RAPL: no powercap tree at {root}{hint}")
    found: dict[str, Path] = {}
    for top in sorted(root.iterdir()):
        if _ZONE.match(top.name) and top.is_dir():
            found.setdefault(top.name, top)
            for sub in sorted(top.iterdir()):  # the real tree nests sub-zones inside their package too
                if _ZONE.match(sub.name) and sub.is_dir():
                    found.setdefault(sub.name, sub)
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
        _read_int(path / "energy_uj", root)
        zones.append(Zone(path, device, _read_int(path / "max_energy_range_uj", root)))
    if not zones:
        raise RaplUnavailable(f"RAPL: no package zones (intel-rapl:N with name package-N) under {root}")
    return zones


class Unwrapper:
    """Cumulative joules per zone that keep counting across the counters' wrap-around to 0."""

    def __init__(self, zones: list[Zone], root: Path) -> None:
        self.zones, self.root = zones, root
        self._last: dict[str, int] = {}
        self._offset: dict[str, int] = {}
        self.wraps = 0

    def __call__(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for z in self.zones:
            raw = _read_int(z.path / "energy_uj", self.root)
            last = self._last.get(z.device)
            if last is not None and raw < last:
                self._offset[z.device] = self._offset.get(z.device, 0) + z.max_range_uj
                self.wraps += 1
            self._last[z.device] = raw
            out[z.device] = (raw + self._offset.get(z.device, 0)) / 1e6
        return out


class RaplMeter(CounterMeter):
    """RAPL's CPU package and DRAM counters, read at the window's edges; one device per zone."""

    name = "rapl"
    method = "counter"

    def __init__(self, root: Path | str | None = None, trace_period_s: float = DEFAULT_PERIOD_S) -> None:
        super().__init__(trace_period_s)
        self.root = Path(root) if root is not None else powercap_root()
        self.zones = discover(self.root)
        self.devices = [z.device for z in self.zones]
        self._edge = Unwrapper(self.zones, self.root)

    def _read(self) -> dict[str, float]:
        return self._edge()  # a wrap inside the window is corrected by the unwrapper

    def _sampler(self) -> PowerTrace:
        """The sampler's thread gets its own unwrapper: one shared across threads could count a wrap twice."""
        return PowerTrace(energy=Unwrapper(self.zones, self.root), period_s=self.trace_period_s)

    def _flags(self, joules: dict[str, float], seconds: float) -> list[str]:
        flags: list[str] = []
        for z in self.zones:
            if seconds > z.max_range_uj / 1e6 / MAX_PLAUSIBLE_W:
                flags.append(f"{z.device}: window of {seconds:.0f} s may exceed one RAPL counter range; "
                             "energy could be undercounted")
            if joules[z.device] <= 0:
                flags.append(f"{z.device}: RAPL counter did not advance (zero-joule reading)")
        return flags

    def _versions(self) -> dict[str, Any]:
        return {"powercap_root": str(self.root), "kernel": os.uname().release}
