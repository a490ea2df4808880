"""`moe-energy archs`: the LLM MoE layer presets with their exact per-layer and whole-model counts."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from ..models.archs import PRESETS, Arch
from ..models.counting import layer_active_params, layer_params
from . import command, console


def _shared(a: Arch) -> str:
    if not a.shared_experts:
        return "-"
    return f"{a.shared_experts} x {a.shared_width:,}{' gated' if a.shared_gate else ''}"


def archs_table() -> Table:
    """One row per preset; the sources below it, so the figures stay on one line each at 160 columns."""
    t = Table(title="moe-energy archs: one MoE FFN layer (router + E SwiGLU experts + shared), exact counts",
              caption="params: the router, all E experts and the shared experts of one layer; active: the router, "
                      "k experts and the shared ones; model MoE params: MoE layers x params (dense FFN layers apart)")
    for col in ("arch", "E", "k", "d", "I", "shared", "router", "params/layer", "active/layer", "MoE layers",
                "model MoE params"):
        t.add_column(col, justify="left" if col in ("arch", "shared", "router") else "right",
                     no_wrap=col != "router")
    for a in PRESETS.values():
        layers = f"{a.moe_layers}" + (f" (+{a.dense_layers} dense)" if a.dense_layers else "")
        t.add_row(escape(a.name), str(a.experts), str(a.top_k), f"{a.d_model:,}", f"{a.ffn_dim:,}", _shared(a),
                  escape(a.router.describe()), f"{layer_params(a):,}", f"{layer_active_params(a):,}", layers,
                  f"{a.moe_layers * layer_params(a):,}")
    return t


def sources_table() -> Table:
    t = Table(title="where each preset's shape comes from")
    t.add_column("arch", no_wrap=True)
    t.add_column("source")
    for a in PRESETS.values():
        t.add_row(escape(a.name), escape(a.source))
    return t


@command("archs", "List the LLM MoE layer presets (Mixtral, DBRX, Qwen, OLMoE, DeepSeek, gpt-oss) with exact "
         "parameter counts and their sources.")
def archs(args: argparse.Namespace) -> int:
    console.print(archs_table())
    console.print(sources_table())
    return 0
