"""Grams of CO2e and money per million inferences (tokens, for LLM layers): the run's energy times two figures
the user gives, their grid's carbon intensity and their electricity price.

Neither figure is measured here and nothing is looked up on a network, so every result is an estimate built
on them and says so: ``carbon_basis`` is "estimate from measured energy" where the joules were read from a
counter (or sampled power), "estimate of an estimate" where the joules themselves are the CPU-TDP estimate.
The figures use raw energy per inference (inferences/J), not dynamic: the grid supplies the idle draw too.
"""

from __future__ import annotations

from typing import Any

from ..config import CarbonPrice

JOULES_PER_KWH = 3.6e6
MEASURED = "estimate from measured energy"
ESTIMATED = "estimate of an estimate"


def per_million(inferences_per_joule: float | None, per_kwh: float | None) -> float | None:
    """``per_kwh`` (g CO2e or money) over a million inferences at ``inferences_per_joule``; None if either is."""
    if inferences_per_joule is None or per_kwh is None or inferences_per_joule <= 0:
        return None
    return 1e6 / inferences_per_joule / JOULES_PER_KWH * per_kwh


def basis(rec: dict[str, Any]) -> str:
    """What a record's carbon and cost figures are built on: measured energy, or the energy estimate."""
    estimated = rec.get("energy_is_estimate") or rec.get("energy_method") == "estimate"
    return ESTIMATED if estimated else MEASURED


def carbon_fields(rec: dict[str, Any], cp: CarbonPrice) -> dict[str, Any]:
    """The record's carbon and cost fields: the two figures used, the results (None where no energy was
    measured or no figure given) and their basis."""
    ipj = rec.get("inferences_per_joule")
    co2e = per_million(ipj, cp.carbon_intensity_g_per_kwh)
    cost = per_million(ipj, cp.price_per_kwh)
    return {"carbon_intensity_g_per_kwh": cp.carbon_intensity_g_per_kwh, "price_per_kwh": cp.price_per_kwh,
            "co2e_g_per_million": co2e, "cost_per_million": cost,
            "carbon_basis": basis(rec) if co2e is not None or cost is not None else None}


def unit(doc: dict[str, Any]) -> str:
    """What a million of is: inferences, or tokens for LLM layers and whole models (whose inferences are tokens)."""
    return "tokens" if doc.get("family") in ("llm_layer", "whole_model") else "inferences"


def _extrapolated(x: dict[str, Any], cp: CarbonPrice) -> None:
    """The whole-model figure of an LLM layer (J per 1k tokens x its MoE layers) gains its own carbon and cost."""
    j1k = x.get("joules_per_1k_tokens")
    tpj = 1000.0 / j1k if j1k else None
    x["co2e_g_per_million"] = per_million(tpj, cp.carbon_intensity_g_per_kwh)
    x["cost_per_million"] = per_million(tpj, cp.price_per_kwh)


def add_carbon(doc: dict[str, Any], cp: CarbonPrice) -> dict[str, Any]:
    """Every model record of ``doc`` gains its carbon and cost fields, and ``doc["carbon"]`` says what they are
    built on; a ``cp`` with neither figure leaves ``doc`` as it is. Returns ``doc``."""
    if not cp.given:
        return doc
    what = unit(doc)
    for rec in doc.get("models", []):
        rec.update(carbon_fields(rec, cp))
        if isinstance(rec.get("model_extrapolated"), dict):
            _extrapolated(rec["model_extrapolated"], cp)
    doc["carbon"] = {
        "carbon_intensity_g_per_kwh": cp.carbon_intensity_g_per_kwh, "price_per_kwh": cp.price_per_kwh,
        "per": f"million {what}",
        "label": (f"ESTIMATES, not measurements: energy per {what[:-1]} (raw, idle included) x the carbon intensity "
                  "and price given; 'estimate of an estimate' where the energy itself is estimated"),
    }
    return doc
