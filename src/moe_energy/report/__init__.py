"""The report: reads the store (never runs a model), draws the plots and writes HTML and Markdown.

PLOTS are the seed's (drawn once), LAYER_PLOTS the LLM layers' (drawn once per arch in the store), WHOLE_PLOTS the
whole models' (drawn once per model set: an MoE and its dense siblings), CAP_PLOTS the power caps' (drawn once, when
the store holds more than one cap)."""

from __future__ import annotations

from pathlib import Path

from ..storage.store import Store
from .analysis import ITL_DEADLINES_MS, load
from .html import ReportFiles, write_report
from .plots import CAP_PLOTS, LAYER_PLOTS, PLOTS, WHOLE_PLOTS

__all__ = ["CAP_PLOTS", "LAYER_PLOTS", "PLOTS", "WHOLE_PLOTS", "ReportFiles", "build", "write_report"]


def build(db: str | Path, out_dir: str | Path, deadlines: tuple[float, ...] = ITL_DEADLINES_MS) -> ReportFiles:
    """Report on everything in ``db``; files go to ``out_dir`` (report.html, report.md, plots/); ``deadlines``: the
    whole models' inter-token deadlines (ms)."""
    with Store(db, create=False) as store:
        frame = load(store)
    return write_report(frame, out_dir, db, deadlines)
