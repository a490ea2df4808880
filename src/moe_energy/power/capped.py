"""A run under power caps, with carbon and cost: the body (one whole run) once per GPU cap, all of it inside
the CPU cap, merged into one results document, then carbon and cost added and the document saved.

How several caps appear in one run's results: each GPU cap is a complete run under that cap (training or
building, idle power, every window), so every model is measured at every cap, each cap's windows and idle
reading are its own, and the limits change only between runs, never inside one. The seed's models are
trained again at each cap from the same seed (the same weights: their held-out accuracy per cap shows it);
training under a low cap is slower, and that time is not measured. The caps run in the order given
(``sweep``: the maximum first). Rows are named ``<model>@<cap>W`` (``moe[auto]@250W``, ``dense_total@T=16@250W``
for an LLM layer); each record carries ``power_limit_requested_w`` (the cap asked) and ``power_limit_w`` (the
median of the limits its windows read back), and ``doc["power_limits"]`` keeps each cap's read-back, the
limits it replaced, what they read once restored, and that cap's idle reading. Without caps the body's
document is kept as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import CarbonPrice, PowerCaps
from ..energy.meter import Meter
from ..errors import ConfigError, Unavailable
from ..storage.results import save_or_rescue
from .carbon import add_carbon
from .limits import (
    READ_BACK_TOLERANCE_W,
    Applied,
    PowerLimit,
    ReadBack,
    applied,
    check,
    cpu_limits,
    gpu_limits,
    run_under,
    sweep_caps,
)


def _say_nothing(msg: str) -> None:
    pass


@dataclass
class CapPlan:
    """The checked caps of one command: which devices, which caps; empty when none was asked."""

    gpu: list[PowerLimit] = field(default_factory=list)
    gpu_caps: list[float] = field(default_factory=list)
    cpu: list[PowerLimit] = field(default_factory=list)
    cpu_caps: list[float] = field(default_factory=list)  # one for a run (over all of it); a sweep's axis
    announce: Callable[[str], None] = _say_nothing
    restore_failed: list[str] = field(default_factory=list)
    rename: bool = True  # rows named MODEL@CAPW (a run's several caps); a sweep point's cap is in its key instead

    def at(self, gpu_cap: float | None, cpu_cap: float | None) -> CapPlan:
        """This plan's checked devices under one sweep point's caps; its restore failures gathered in this plan's."""
        if (gpu_cap is not None and not self.gpu) or (cpu_cap is not None and not self.cpu):
            raise ConfigError("a power cap was asked for a device that was not checked (plan_caps): nothing is set")
        return replace(self, gpu_caps=[] if gpu_cap is None else [gpu_cap],
                       cpu_caps=[] if cpu_cap is None else [cpu_cap], rename=False,
                       restore_failed=self.restore_failed)

    def wrap(self, meter: Meter) -> Meter:
        """The run's meter, reading back every capped device's limit after each window."""
        limits = self.gpu + self.cpu
        return ReadBack(meter, limits) if limits and (self.gpu_caps or self.cpu_caps) else meter

    def _told(self, state: Applied) -> None:
        back = ", ".join(f"{d} {'unreadable' if w is None else f'{w:g} W'}" for d, w in state.read_back_w.items())
        self.announce(f"power cap {state.requested_w:g} W set; read back: {back}")

    def run(self, body: Callable[[], dict]) -> dict:
        """``body()`` (a whole run, returning its document) under each cap; one document, limits restored."""
        if len(self.cpu_caps) > 1:
            raise ConfigError(f"--cpu-power-limit: a run holds one CPU cap over all of it, not "
                              f"{len(self.cpu_caps)}; give one, or sweep them as an axis (moe-energy sweep "
                              f"--cpu-power-limit {','.join(f'{c:g}' for c in self.cpu_caps)} ...)")
        cpu_cm = applied(self.cpu, self.cpu_caps[0]) if self.cpu_caps else nullcontext(None)
        with cpu_cm as cpu_state:
            if cpu_state is not None:
                self._told(cpu_state)
            runs: list[tuple[Applied | None, dict]] = \
                list(run_under(self.gpu, self.gpu_caps, body, self._told)) if self.gpu_caps else [(None, body())]
        for state in [s for s, _ in runs] + [cpu_state]:
            if state is not None:
                self.restore_failed += state.restore_failed
        return merge(runs, cpu_state, self.rename)


def plan_caps(caps: PowerCaps, meter: Meter, device: Any) -> CapPlan:
    """The caps checked against the hardware before anything runs: a device that has no limit to set, a cap
    outside its range, or no permission to set it is a one-line ConfigError naming the range and the fix."""
    plan = CapPlan()
    if caps.gpu_w or caps.gpu_sweep:
        try:
            plan.gpu = list(gpu_limits(meter, device))
            plan.gpu_caps = sweep_caps(plan.gpu) if caps.gpu_sweep else list(caps.gpu_w)
        except Unavailable as e:
            raise ConfigError(f"--power-limit: {e}") from None
        except Exception as e:  # noqa: BLE001 - a driver that will not give the range: one line
            raise ConfigError(f"--power-limit: cannot read the GPU's power limit range ({e})") from None
        check(plan.gpu, plan.gpu_caps)
    if caps.cpu_w:
        try:
            plan.cpu = list(cpu_limits())
        except Unavailable as e:
            raise ConfigError(f"--cpu-power-limit: no writable RAPL power limit here: {e}") from None
        plan.cpu_caps = list(caps.cpu_w)
        check(plan.cpu, plan.cpu_caps)
    return plan


def _differs(state: Applied) -> str | None:
    """A flag when a device enforces another cap than the one asked (a driver's rounding, a clamp)."""
    off = {d: w for d, w in state.read_back_w.items()
           if w is None or abs(w - state.requested_w) > READ_BACK_TOLERANCE_W}
    if not off:
        return None
    got = ", ".join(f"{d} {'unreadable' if w is None else f'{w:g} W'}" for d, w in off.items())
    return f"power cap asked {state.requested_w:g} W, read back {got}"


def tagged(rec: dict, gpu: Applied | None, cpu: Applied | None, rename: bool = True) -> dict:
    """A record of the run at ``gpu``'s cap: named for it (``rename``), carrying the caps asked and in force."""
    rec = dict(rec)
    flags = list(rec.get("flags") or [])
    for state, key in ((gpu, "power_limit_w"), (cpu, "cpu_power_limit_w")):
        if state is None:
            continue
        if rec.get(key) is None:  # not measured (skipped), or a meter that reads no limit: the set's read-back
            rec[key] = state.in_force_w
        flag = _differs(state)
        if flag is not None and flag not in flags:
            flags.append(flag)
    if gpu is not None:
        if rename:
            rec["name"] = f"{rec['name']}@{gpu.requested_w:g}W"
        rec["power_limit_requested_w"] = gpu.requested_w
    if cpu is not None:
        rec["cpu_power_limit_requested_w"] = cpu.requested_w
    rec["flags"] = flags
    return rec


def merge(runs: list[tuple[Applied | None, dict]], cpu: Applied | None, rename: bool = True) -> dict:
    """One document of the runs at each cap: the first run's header, every run's records tagged with its cap."""
    first = runs[0][1]
    if len(runs) == 1 and runs[0][0] is None and cpu is None:
        return first
    return {**first, "models": [tagged(rec, state, cpu, rename) for state, d in runs for rec in d["models"]],
            "notices": list(dict.fromkeys(n for _, d in runs for n in d.get("notices", []))),
            "power_limits": {
                "gpu": [{**asdict(state), "idle": d.get("idle")} for state, d in runs if state is not None],
                "cpu": asdict(cpu) if cpu is not None else None,
                "how": "each GPU cap is a whole run (train or build, idle, windows) under that cap; the CPU cap "
                       "holds over all of them; limits read back after every window and restored at the end"}}


def run_capped(plan: CapPlan, carbon: CarbonPrice, body: Callable[[], dict]) -> dict:
    """The run (``run``) or sweep point under ``plan``'s caps, its carbon and cost added: the one way both go."""
    return add_carbon(plan.run(body), carbon)


def run_and_save(plan: CapPlan, carbon: CarbonPrice, body: Callable[[], dict], out: str | Path,
                 stem: Callable[[dict], str]) -> tuple[dict, Path]:
    """The run under ``plan``'s caps, carbon and cost added, saved (results.NotSaved if the write fails)."""
    doc = run_capped(plan, carbon, body)
    return doc, save_or_rescue(doc, out, stem(doc))
