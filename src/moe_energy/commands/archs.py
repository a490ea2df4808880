"""`moe-energy archs` (the LLM MoE layer presets) and `moe-energy models` (the whole LLMs), with exact counts."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from rich.markup import escape
from rich.table import Table

from ..models.archs import PRESETS, Arch
from ..models.counting import layer_active_params, layer_params
from ..models.whole import WholeModel, models, param_counts
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


def sources_table(title: str, head: str, presets: Iterable[Arch | WholeModel]) -> Table:
    """Each preset's name beside where its shape comes from."""
    t = Table(title=title)
    t.add_column(head, no_wrap=True)
    t.add_column("source")
    for a in presets:
        t.add_row(escape(a.name), escape(a.source))
    return t


@command("archs", "List the LLM MoE layer presets (Mixtral, DBRX, Qwen, OLMoE, DeepSeek, gpt-oss) with exact "
         "parameter counts and their sources.")
def archs(args: argparse.Namespace) -> int:
    console.print(archs_table())
    console.print(sources_table("where each preset's shape comes from", "arch", PRESETS.values()))
    return 0


def models_table() -> Table:
    """One row per whole-model preset: its shape, exact parameter counts (meta device) beside the published ones."""
    t = Table(title="moe-energy models: whole LLMs (transformers' own classes, seeded random weights; nothing "
                    "downloaded), exact counts beside the publisher's",
              caption="active: the total less the routed experts a token does not use (embeddings included); *: the "
                      "publisher's active figure leaves the input embedding out; below it, ours counted so")
    for col in ("model", "kind", "layers", "d", "heads (KV)", "vocab", "max positions", "MoE layer", "params",
                "active", "published", "compare with"):
        t.add_column(col, justify="left" if col in ("model", "kind", "MoE layer", "published", "compare with")
                     else "right")
    for m in models().values():
        total, active = param_counts(m)
        a = m.arch
        moe = f"{a.name}: E {a.experts}, k {a.top_k}" + (f", {len(m.dense_layers)} dense" if m.dense_layers else "") \
            if a else "-"
        pub = f"{m.published.total} / {m.published.active}" if m.published else "-"
        if m.published and m.published.active_counts == "output":  # theirs leaves the input embedding out: ours too
            pub += f"\nours {(active - m.vocab * m.d_model) / 1e9:.3f} B*"
        t.add_row(escape(m.name), "MoE" if a else "dense", str(m.layers), f"{m.d_model:,}",
                  f"{m.heads} ({m.kv_heads})", f"{m.vocab:,}", f"{m.max_positions:,}", escape(moe),
                  f"{total / 1e9:.3f} B", f"{active / 1e9:.3f} B", escape(pub), escape(", ".join(m.siblings) or "-"))
    return t


@command("models", "List the whole-model presets (MoE LLMs and their dense siblings) for `run --model`, with exact "
         "parameter counts beside the published ones.")
def models_command(args: argparse.Namespace) -> int:
    console.print(models_table())
    console.print(sources_table("where each model's shape comes from", "model", models().values()))
    return 0
