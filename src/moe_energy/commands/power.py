"""What `run` and `run --arch` show of power caps, carbon and cost: the extra table columns and the lines under
the table. Both read only the results document (capped.py and carbon.py wrote it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..config import PowerCaps
from ..energy.meter import Meter
from ..errors import ConfigError
from ..power.capped import CapPlan, plan_caps
from ..power.carbon import ESTIMATED
from . import fmt, notice

Column = tuple[str, Callable[[dict], str]]


def _marked(rec: dict, key: str) -> str:
    """A carbon or cost figure with its basis: every one is an estimate, some of an estimate."""
    v = rec.get(key)
    if v is None:
        return "not measured"
    return f"{v:.3g} " + ("(est. of est.)" if rec.get("carbon_basis") == ESTIMATED else "(est.)")


def power_columns(doc: dict) -> list[Column]:
    """(header, cell) of the columns a run with caps or carbon figures adds to its table; none otherwise."""
    cols: list[Column] = []
    if (doc.get("power_limits") or {}).get("gpu"):
        cols.append(("cap W (read back)", lambda m: fmt(m.get("power_limit_w"), "g")))
    carbon = doc.get("carbon") or {}
    per = "1M tok" if carbon.get("per") == "million tokens" else "1M inf"
    if carbon.get("carbon_intensity_g_per_kwh") is not None:
        cols.append((f"g CO2e/{per} (estimate at {carbon['carbon_intensity_g_per_kwh']:g} g/kWh)",
                     lambda m: _marked(m, "co2e_g_per_million")))
    if carbon.get("price_per_kwh") is not None:
        cols.append((f"cost/{per} (estimate at {carbon['price_per_kwh']:g}/kWh)",
                     lambda m: _marked(m, "cost_per_million")))
    return cols


def _caps_line(what: str, states: list[dict[str, Any]]) -> str:
    caps = "; ".join(f"{s['requested_w']:g} W (read back " + ", ".join(
        f"{d} {'unreadable' if w is None else f'{w:g} W'}" for d, w in s["read_back_w"].items()) + ")"
        for s in states)
    restored = ", ".join(f"{d} {'unreadable' if w is None else f'{w:g} W'}"
                         for d, w in states[-1]["restored_w"].items())
    return f"{what}: {caps}; restored to {restored or 'nothing'}"


def power_lines(doc: dict) -> list[str]:
    """Lines under the table: the caps set and restored, any limit left unrestored, what carbon and cost are."""
    limits = doc.get("power_limits") or {}
    lines: list[str] = []
    if limits.get("gpu"):
        lines.append(_caps_line("GPU power caps, each a whole run", limits["gpu"]))
    if limits.get("cpu"):
        lines.append(_caps_line("CPU power cap (long-term RAPL limit) over the whole run", [limits["cpu"]]))
    for s in (limits.get("gpu") or []) + ([limits["cpu"]] if limits.get("cpu") else []):
        lines += [f"POWER LIMIT NOT RESTORED: {msg}" for msg in s.get("restore_failed") or []]
    carbon = doc.get("carbon")
    if carbon:
        given = [f"{carbon['carbon_intensity_g_per_kwh']:g} g CO2e/kWh"] if carbon.get(
            "carbon_intensity_g_per_kwh") is not None else []
        given += [f"price {carbon['price_per_kwh']:g} per kWh"] if carbon.get("price_per_kwh") is not None else []
        of_estimates = any(m.get("carbon_basis") == ESTIMATED for m in doc.get("models", []))
        lines.append(f"carbon and cost per {carbon['per']}: ESTIMATES from the energy per inference x "
                     f"{' and '.join(given)} (the figures given, not measured)"
                     + ("; '(est. of est.)': the energy itself is an estimate, so these are estimates of an "
                        "estimate" if of_estimates else "; the energy is measured"))
    return lines


def check_power(caps: PowerCaps, meter: Meter, device: Any) -> CapPlan:
    """The caps checked against the hardware (exit 2 before anything runs), announcing each cap as it is set."""
    plan = plan_caps(caps, meter, device)
    plan.announce = notice
    return plan


def refuse_for_parallel(caps: PowerCaps) -> None:
    """--parallel expert takes no caps (refused, saying why); its carbon and cost are added by run_parallel."""
    if caps.given:
        raise ConfigError("--power-limit and --cpu-power-limit do not work with --parallel expert: a cap is set, read "
                          "back and restored by the one process that runs every model, and an expert-parallel job "
                          "runs on every rank's own devices, which no rank sets or restores for the others; drop "
                          "them, or measure caps with a single-process run or sweep")


def restore_status(plan: CapPlan) -> int:
    """1 (with the error line) when a power limit could not be put back; 0 otherwise."""
    if plan.restore_failed:
        print(f"error: {len(plan.restore_failed)} power limit(s) NOT restored (see above); restore them by hand",
              file=sys.stderr)
        return 1
    return 0
