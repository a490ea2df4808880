"""Power caps: a GPU's power limit through NVML (Zeus's device layer, the one the GPU meter reads) and a CPU
package's long-term RAPL limit through the powercap tree; set around a run, read back after every window,
and restored on every way out (normal end, an error, Ctrl-C, SIGTERM, SIGHUP).

Setting either needs privileges: NVML's ``nvmlDeviceSetPowerManagementLimit`` needs root, or the Zeus daemon
(zeusd, which holds them; Zeus talks to it when ``ZEUSD_SOCK_PATH`` is set); powercap's
``constraint_N_power_limit_uw`` files are written by root only. ``check`` proves permission before any work
by writing the limit in force back unchanged: a no-op that the driver or kernel refuses without permission.

``sweep_caps`` gives the caps Zeus's power-limit optimiser profiles: the maximum down to the minimum in 25 W
steps. A window's cap is read back from the device (the GPU meter reads it at both edges; ``ReadBack`` adds
it for any capped device the meter does not read): the figure recorded is the cap the device enforced, not
the one asked for.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..energy.meter import Measurement, Meter, MeterBase, meter_info
from ..energy.rapl import PACKAGE_MAX_W, _read_text, _zone_dirs, powercap_root
from ..errors import ConfigError, Unavailable, one_line
from ..interrupts import signals_held, signals_raise

SWEEP_STEP_W = 25.0  # Zeus's GlobalPowerLimitOptimizer default pl_step
ZEUS_PRIVILEGES = "https://ml.energy/zeus/getting_started/#system-privileges"
# A cap read back further than this from the one set is flagged (drivers round to their own step).
READ_BACK_TOLERANCE_W = 0.5


class PowerLimit(Protocol):
    """One device's power limit: its allowed range, the limit in force, and a setter."""

    device: str  # "gpu:0", "cpu:package-0"
    key: str  # the window state's field: "power_limit_w" (GPU) or "cpu_power_limit_w" (CPU)
    flag: str  # the option that sets it, for messages

    def range_w(self) -> tuple[float, float]: ...

    def read_w(self) -> float: ...

    def set_w(self, watts: float) -> None: ...

    def probe(self) -> None:
        """Raise Unavailable (kind "no permission", "read-only", "not supported") if setting would fail."""

    def describe(self) -> str:
        """What the limit is and where its range comes from, for messages."""

    def permission_hint(self) -> str: ...

    def restore_hint(self, watts: float) -> str:
        """The shell command that puts ``watts`` back by hand."""


# ---------------------------------------------------------------------------------------------------------
# NVIDIA GPUs


def _nvml_kind(e: BaseException) -> str:
    """'no permission', 'not supported' or 'failed' for an NVML error or Zeus's wrapper of one."""
    import pynvml

    value = getattr(e, "value", None)
    name = type(e).__name__
    if value == pynvml.NVML_ERROR_NO_PERMISSION or "NoPermission" in name:
        return "no permission"
    if value == pynvml.NVML_ERROR_NOT_SUPPORTED or "NotSupported" in name:
        return "not supported"
    return "failed"


class GpuPowerLimit:
    """An NVIDIA GPU's power management limit through Zeus's ``GPUs`` (NVML, or zeusd when it runs)."""

    key = "power_limit_w"
    flag = "--power-limit"

    def __init__(self, gpus: Any, index: int) -> None:
        self.gpus, self.index = gpus, index
        self.device = f"gpu:{index}"

    def range_w(self) -> tuple[float, float]:
        lo, hi = self.gpus.get_power_management_limit_constraints(self.index)
        return lo / 1000.0, hi / 1000.0

    def read_w(self) -> float:
        return self.gpus.get_power_management_limit(self.index) / 1000.0

    def set_w(self, watts: float) -> None:
        self.gpus.set_power_management_limit(self.index, round(watts * 1000), block=True)

    def _zeusd(self) -> bool:
        """Zeus opened this GPU through zeusd, which checked on opening that it may set limits."""
        return type(self.gpus.gpus[self.index]).__name__.startswith("Zeusd")

    def probe(self) -> None:
        if self._zeusd():
            return
        import pynvml

        try:
            pynvml.nvmlDeviceSetPowerManagementLimit(self.gpus.gpus[self.index].handle,
                                                     self.gpus.get_power_management_limit(self.index))
        except Exception as e:  # noqa: BLE001 - every refusal becomes one line
            kind = _nvml_kind(e)
            what = "no permission to set" if kind == "no permission" else "NVML refused to set"
            raise Unavailable(f"{what} {self.device}'s power limit (NVML: {one_line(e)})", kind=kind) from None

    def describe(self) -> str:
        try:
            name = self.gpus.get_name(self.index)
        except Exception:  # noqa: BLE001 - the name is decoration
            name = "GPU"
        return f"{self.device} ({name}), range from NVML"

    def permission_hint(self) -> str:
        return (f"run as root, or run the Zeus daemon (zeusd) and set ZEUSD_SOCK_PATH to its socket; see "
                f"{ZEUS_PRIVILEGES}")

    def restore_hint(self, watts: float) -> str:
        try:
            import pynvml

            uuid = pynvml.nvmlDeviceGetUUID(self.gpus.gpus[self.index].handle)
            which = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        except Exception:  # noqa: BLE001 - the index is the next best name
            which = str(self.index)
        return f"sudo nvidia-smi -i {which} -pl {watts:g}"


def gpu_limits(meter: Meter, device: Any = None) -> list[GpuPowerLimit]:
    """The limits of the GPUs the run's meter reads (it opened them already); else the run's own CUDA GPU.

    Raises Unavailable when there is none: a cap on a GPU nobody measures would change nothing recorded."""
    from ..energy.gpu import GpuMeter, open_gpus

    meters = [m for m in _parts(meter) if isinstance(m, GpuMeter)]
    if meters:
        if any(m.vendor != "nvidia" for m in meters):
            raise Unavailable("power caps are set through NVML: NVIDIA GPUs only", kind="not supported")
        return [GpuPowerLimit(m.gpus, m.index) for m in meters]
    kind = getattr(device, "type", None)
    if kind == "cuda":
        index = device.index or 0
        return [GpuPowerLimit(open_gpus("nvidia"), index)]
    raise Unavailable(f"no GPU to cap: the run is on {device} and meter {meter.name} reads no GPU "
                      "(run on --device cuda, or measure one with --meter nvidia)")


def _parts(meter: Any) -> list[Any]:
    """The meter and every meter inside it (a CompositeMeter's, a wrapper's), depth first."""
    return [meter] + [p for m in getattr(meter, "meters", None) or [] for p in _parts(m)]


def sweep_caps(limits: list[PowerLimit], step_w: float = SWEEP_STEP_W) -> list[float]:
    """The caps Zeus profiles: from the maximum down to the minimum in ``step_w`` steps (the range every
    capped device allows, when there are several)."""
    ranges = [lim.range_w() for lim in limits]
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    out: list[float] = []
    w = hi
    while w >= lo - 1e-9:
        out.append(round(w, 3))
        w -= step_w
    return out


# ---------------------------------------------------------------------------------------------------------
# CPU packages (RAPL powercap)


def _constraint(zone: Path) -> int | None:
    """The zone's long-term constraint (PL1): the one named long_term, else constraint 0; None if none."""
    named: dict[str, int] = {}
    for f in zone.glob("constraint_*_name"):
        try:
            named[f.read_text().strip()] = int(f.name.split("_")[1])
        except (OSError, ValueError, UnicodeDecodeError):
            continue
    n = named.get("long_term", 0)
    return n if (zone / f"constraint_{n}_power_limit_uw").is_file() else None


class RaplPowerLimit:
    """A CPU package's long-term power limit (PL1): ``constraint_N_power_limit_uw`` in its powercap zone."""

    key = "cpu_power_limit_w"
    flag = "--cpu-power-limit"

    def __init__(self, zone: Path, device: str, constraint: int, root: Path) -> None:
        self.zone, self.device, self.root = zone, device, root
        self.file = zone / f"constraint_{constraint}_power_limit_uw"
        self._max = zone / f"constraint_{constraint}_max_power_uw"
        self._min = zone / f"constraint_{constraint}_min_power_uw"

    def _uw(self, path: Path) -> int | None:
        try:
            return int(_read_text(path, self.root))
        except (Unavailable, ValueError):
            return None

    def range_w(self) -> tuple[float, float]:
        lo, hi = self._uw(self._min), self._uw(self._max)
        return (lo / 1e6 if lo and lo > 0 else 0.0), (hi / 1e6 if hi and hi > 0 else PACKAGE_MAX_W)

    def read_w(self) -> float:
        return int(_read_text(self.file, self.root)) / 1e6

    def _write(self, text: str) -> None:
        fd = os.open(self.file, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def set_w(self, watts: float) -> None:
        self._write(f"{round(watts * 1e6)}\n")

    def probe(self) -> None:
        try:
            self._write(_read_text(self.file, self.root) + "\n")
        except PermissionError:
            raise Unavailable(f"no permission to write {self.file}", kind="no permission") from None
        except OSError as e:
            kind = "read-only" if e.errno == errno.EROFS else "failed"
            raise Unavailable(f"cannot write {self.file} ({e.strerror or e})", kind=kind) from None

    def describe(self) -> str:
        src = "constraint max_power_uw" if self._uw(self._max) else "no stated maximum: a CPU package's ceiling"
        return f"{self.device} long-term limit {self.file.name}, range from {src}"

    def permission_hint(self) -> str:
        return "powercap limits are written by root only: run as root (a container needs the host's /sys writable)"

    def restore_hint(self, watts: float) -> str:
        return f"echo {round(watts * 1e6)} | sudo tee {self.file}"


def cpu_limits(root: Path | None = None) -> list[RaplPowerLimit]:
    """Each CPU package zone's long-term limit; Unavailable (one line) where the tree has none."""
    root = root or powercap_root()
    if not root.is_dir():
        raise Unavailable(f"no powercap tree at {root} (no RAPL on this CPU or VM)", kind="absent")
    out: list[RaplPowerLimit] = []
    for zid, path in sorted(_zone_dirs(root).items()):
        if zid.count(":") != 1:
            continue
        name = _read_text(path / "name", root)
        n = _constraint(path) if name.startswith("package") else None
        if n is not None:
            out.append(RaplPowerLimit(path, f"cpu:{name}", n, root))
    if not out:
        raise Unavailable(f"no CPU package zone under {root} states a power limit (constraint_*_power_limit_uw)",
                          kind="absent")
    return out


# ---------------------------------------------------------------------------------------------------------
# Checking, setting, restoring


def check(limits: list[PowerLimit], caps: list[float]) -> None:
    """Every cap within every device's range, and permission to set it; else one-line ConfigError."""
    for lim in limits:
        try:
            lo, hi = lim.range_w()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{lim.flag}: cannot read {lim.device}'s allowed range ({one_line(e)})") from None
        bad = [c for c in caps if not lo <= c <= hi]
        if bad:
            raise ConfigError(f"{lim.flag} {bad[0]:g} W is outside the allowed range {lo:g}-{hi:g} W of "
                              f"{lim.describe()}; give caps within it")
        try:
            lim.probe()
        except Unavailable as e:
            hint = lim.permission_hint() if e.kind in ("no permission", "read-only") else \
                "this device does not let its power limit be set"
            raise ConfigError(f"{lim.flag}: {e} (allowed range {lo:g}-{hi:g} W); {hint}") from None


@dataclass
class Applied:
    """One cap's life: asked, read back once set, the limits it replaced and what they read after restoring."""

    requested_w: float
    read_back_w: dict[str, float | None] = field(default_factory=dict)
    original_w: dict[str, float] = field(default_factory=dict)
    restored_w: dict[str, float | None] = field(default_factory=dict)
    restore_failed: list[str] = field(default_factory=list)

    @property
    def in_force_w(self) -> float | None:
        """The cap the devices enforced (the lowest, when several differ)."""
        vals = [w for w in self.read_back_w.values() if w is not None]
        return min(vals) if vals else None


def read_back(lim: PowerLimit) -> float | None:
    """The limit in force now; None when the device will not say."""
    try:
        return lim.read_w()
    except Exception:  # noqa: BLE001 - a limit that cannot be read is recorded as unknown, not a failure
        return None


def _warn(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _restore(state: Applied, limits: list[PowerLimit], warn: Callable[[str], None]) -> None:
    """Each limit set back to what it was, read back; a failure is told at once, with the command that fixes it."""
    for lim in reversed(limits):
        if lim.device not in state.original_w:
            continue
        w = state.original_w[lim.device]
        try:
            lim.set_w(w)
            back = state.restored_w[lim.device] = read_back(lim)
            if back is None or abs(back - w) > READ_BACK_TOLERANCE_W:
                raise RuntimeError(f"it reads {back} W")
        except Exception as e:  # noqa: BLE001 - every device is tried, every failure told
            msg = (f"could not restore {lim.device}'s power limit to {w:g} W ({one_line(e)}); restore it by hand: "
                   f"{lim.restore_hint(w)}")
            state.restore_failed.append(msg)
            warn(msg)


def _set(lim: PowerLimit, watts: float) -> None:
    """Set one limit; a refusal ``check`` did not foresee (a driver that lets a no-op write pass) is one line."""
    try:
        lim.set_w(watts)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{lim.flag}: could not set {lim.device}'s power limit to {watts:g} W ({one_line(e)}); "
                          f"{lim.permission_hint()}") from None


@contextmanager
def applied(limits: list[PowerLimit], watts: float,
            warn: Callable[[str], None] = _warn) -> Iterator[Applied]:
    """Set every limit to ``watts`` for the block, then put each back, whatever ends the block.

    SIGTERM and SIGHUP raise like Ctrl-C inside (``signals_raise``), so they unwind through the restore; the
    restore itself runs with those signals held, so a signal arriving then waits until the limits are back.
    A limit that cannot be restored is told (``warn``) with the command that restores it by hand, and kept in
    ``Applied.restore_failed``; it does not hide the block's own outcome."""
    state = Applied(watts)
    with signals_raise():
        try:
            for lim in limits:
                state.original_w[lim.device] = lim.read_w()  # before the set: a partial set is restored too
                _set(lim, watts)
            state.read_back_w = {lim.device: read_back(lim) for lim in limits}
            yield state
        finally:
            with signals_held():
                _restore(state, limits, warn)


def run_under(limits: list[PowerLimit], caps: list[float], body: Callable[[], Any],
              announce: Callable[[Applied], None] | None = None,
              warn: Callable[[str], None] = _warn) -> list[tuple[Applied, Any]]:
    """``body()`` once under each cap in turn, the limits restored after each: [(the cap's record, result)]."""
    out: list[tuple[Applied, Any]] = []
    for cap in caps:
        with applied(limits, cap, warn) as state:
            if announce is not None:
                announce(state)
            result = body()
        out.append((state, result))
    return out


class ReadBack(MeterBase):
    """The run's meter, plus each capped device's limit read after the window's counters (its ``state_end``
    gains ``power_limit_w`` / ``cpu_power_limit_w`` where the meter itself did not read it)."""

    def __init__(self, meter: Meter, limits: list[PowerLimit]) -> None:
        self.meter, self.limits = meter, limits
        self.meters = [meter]  # energy.meter.abort() closes the real meter through this
        self.name, self.method = meter.name, meter.method
        self.devices = list(getattr(meter, "devices", []))

    @property
    def notice(self) -> str | None:
        return getattr(self.meter, "notice", None)

    def begin(self) -> None:
        self.meter.begin()

    def end(self) -> Measurement:
        m = self.meter.end()
        for lim in self.limits:
            state = m.state_end.setdefault(lim.device, {})
            if state.get(lim.key) is None:
                state[lim.key] = read_back(lim)
        return m

    def info(self) -> dict[str, Any]:
        return meter_info(self.meter)
