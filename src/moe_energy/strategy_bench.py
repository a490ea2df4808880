"""How fast each MoE strategy runs next to the two dense baselines, and how close each gets to the roofline.

Untrained random weights are enough: speed does not depend on what the weights learned, only on shapes
and routing (random routing of random inputs spreads tokens over the experts as a trained gate roughly
does). Every variant is timed in interleaved rounds (each round runs every variant once, in rotated
order: ``measure.timing``), so background load lands on all of them alike; a variant's figure is the
median over rounds of its ms per batch.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone

import torch
from torch import Tensor

from . import roofline
from .config import ModelSpec
from .device import device_sync, dtype_name, dtype_of
from .environment import describe
from .measure.timing import time_interleaved, time_one
from .models.counting import dense_flops, mlp_params, moe_flops, moe_weight_params_read
from .models.dense import DenseMLP, dense_width
from .models.moe import LAYOUTS, MoE
from .models.strategies import AUTO_CANDIDATES, STRATEGIES
from .optimize import choose_layout, compile_candidates, prepare
from .roofline import Roofline

SCHEMA = "moe-energy/strategy-bench"
SCHEMA_VERSION = 1
BASELINE = "active_loop"  # the seed's optimized MoE: speed-ups are over it
SLOW = ("masked_loop", "active_loop")  # host syncs by design: never compiled


class Variant:
    """One thing to time: a callable on the batch, plus the MoE strategy/layout it needs set first."""

    def __init__(self, name: str, kind: str, fn: Callable[[Tensor], Tensor], moe: MoE | None = None,
                 strategy: str | None = None, layout: str | None = None, info: dict | None = None) -> None:
        self.name, self.kind, self.fn, self.moe = name, kind, fn, moe
        self.strategy, self.layout, self.info = strategy, layout, info or {}
        self.ms: list[float] = []
        self.iterations = 0
        self.inner = 1

    def select(self) -> None:
        if self.moe is not None and self.strategy is not None:
            self.moe.strategy = self.strategy

    def group(self, x: Tensor) -> Callable[[], None]:
        """One timed call: ``inner`` back-to-back forwards (this variant's strategy set first, host-side)."""

        def run() -> None:
            self.select()
            for _ in range(self.inner):
                self.fn(x)

        return run


@torch.inference_mode()
def time_rounds(variants: Sequence[Variant], x: Tensor, seconds: float, warmup_s: float = 0.2,
                min_rounds: int = 5, group_s: float = 0.02) -> None:
    """Warm up each variant, size its group of back-to-back calls to ~``group_s``, then run rounds until
    ``seconds`` have passed (at least ``min_rounds``); each round appends one ms-per-batch to each.

    A group, not one call, per timed sample: a fast variant's single call would be mostly sync and timer."""
    sync = device_sync(x.device)
    for v in variants:  # warm-up: one untimed call, then single calls for ``warmup_s`` (at least 3)
        v.inner = 1
        per_call_s = time_one(v.group(x), sync=sync, min_rounds=3, budget_s=warmup_s).median_ms / 1e3
        v.inner = max(1, min(200, round(group_s / max(per_call_s, 1e-6))))
    timed = time_interleaved({v: v.group(x) for v in variants}, sync=sync, min_rounds=min_rounds,
                             budget_s=seconds, warmup=0)
    for v, t in timed.items():
        v.ms.extend(ms / v.inner for ms in t.samples_ms)
        v.iterations += len(t.samples_ms) * v.inner


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def experts_touched(moe: MoE, x: Tensor) -> int:
    """Experts that get at least one token of this batch (their weights must be read)."""
    with torch.inference_mode():
        idx, _ = moe.route(x)
    return int((torch.bincount(idx.flatten(), minlength=moe.experts) > 0).sum())


def bench_strategies(
    spec: ModelSpec,
    *,
    batch_size: int = 128,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    strategies: Sequence[str] | None = None,
    compile: bool = False,
    seconds: float = 3.0,
    seed: int = 0,
    warmup_s: float = 0.2,
    roof: Roofline | None = None,
    on_phase: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Time every MoE strategy (in each weight layout) and both dense baselines on one random batch.

    ``seconds`` is the timed budget per group of interleaved variants (one group per weight layout, plus
    one for compiled variants), after ``warmup_s`` (and at least 3 calls) of untimed warm-up per variant.
    Returns the results document (see ``rows``).
    """
    device = torch.device(device)
    dt = dtype_of(dtype)
    strategies = list(strategies or STRATEGIES)
    load_before = _load_average()
    torch.manual_seed(seed)
    moe = MoE.from_spec(spec)
    dense = {m: DenseMLP(spec.input_dim, dense_width(spec, m), spec.layers, spec.classes) for m in ("total", "active")}
    x = torch.randn(batch_size, spec.input_dim).to(device=device, dtype=dt)

    variants: list[Variant] = []
    for match, model in dense.items():
        fast, info = prepare(model, dtype=dt, compile=compile, device=device, example=x)
        variants.append(Variant(f"dense_{match}", "dense", fast, info=info))
    moe.to(device=device, dtype=dt).eval()
    touched = experts_touched(moe, x)

    moe_variants: list[Variant] = []
    groups: list[list[Variant]] = []
    for layout in LAYOUTS:  # eager: every strategy in every layout, the dense pair timed alongside each
        group = list(variants)
        for s in strategies:
            if compile and s not in SLOW:
                continue
            moe.set_layout(layout)
            moe.strategy = s
            on_phase(f"preparing moe[{s}] ({layout})")
            _, info = prepare(moe, dtype=dt, compile=False, device=device, example=x, layout="keep")
            v = Variant(f"moe[{s}]", "moe", moe, moe, s, moe.layout, info)
            group.append(v)
            moe_variants.append(v)
        groups.append(group)
    if compile:  # one layout for every graph (auto's eager favourite among what compiles), then compile each
        moe.strategy, moe.auto_candidates = "auto", compile_candidates(dt)
        layout, _ = choose_layout(moe, x)
        group = list(variants)
        for s in strategies:
            if s in SLOW:
                continue
            moe.strategy = s
            on_phase(f"compiling moe[{s}]")
            fast, info = prepare(moe, dtype=dt, compile=True, device=device, example=x, layout="keep")
            v = Variant(f"moe[{s}]", "moe", fast, moe, moe.strategy, layout, info)  # auto: now resolved
            group.append(v)
            moe_variants.append(v)
        moe.auto_candidates = AUTO_CANDIDATES
        groups.append(group)

    for i, group in enumerate(groups):
        # a group's variants must share the layout they were prepared in
        layouts = {v.layout for v in group if v.layout is not None}
        if len(layouts) == 1:
            moe.set_layout(layouts.pop())
        on_phase(f"timing group {i + 1}/{len(groups)}")
        time_rounds(group, x, seconds, warmup_s)

    # dropped pairs of the capacity strategy: one forward's worth, read here, far from any timing
    dropped = None
    if "padded_capacity" in strategies:
        moe.strategy = "padded_capacity"
        moe.reset_pair_counts()
        with torch.inference_mode():
            moe(x)
        dropped = moe.strategy_info()
    rows = _rows(spec, variants, moe_variants, batch_size, dt, touched, roof, dropped)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": asdict(spec),
        "options": {"batch_size": batch_size, "dtype": dtype, "device": str(device), "compile": compile,
                    "seconds_per_group": seconds, "warmup_s": warmup_s, "seed": seed, "strategies": strategies},
        "environment": describe(device),
        "method": "median over interleaved rounds (rotated order) of ms per batch (each round: back-to-back "
                  "calls, synced at both ends); random untrained weights and a random normal batch",
        "experts_touched": touched,
        # other work on the host slows every variant alike (interleaved rounds) but makes all figures noisier
        "host_load_average_1m": {"before": load_before, "after": _load_average()},
        "roofline": roof.as_dict() if roof else None,
        "rows": rows,
    }


def _rows(spec: ModelSpec, dense: list[Variant], moe_vs: list[Variant], batch: int, dt: torch.dtype,
          touched: int, roof: Roofline | None, dropped: dict | None) -> list[dict]:
    bpp = torch.empty((), dtype=dt).element_size()
    dname = dtype_name(dt)

    def med(v: Variant) -> float:
        return statistics.median(v.ms)

    # dense models ran in every group: pool their rounds
    dense_ms: dict[str, list[float]] = {}
    for v in dense:
        dense_ms.setdefault(v.name, []).extend(v.ms)
    best: dict[str, Variant] = {}
    for v in moe_vs:  # per strategy (and compiled or not), its fastest layout
        key = v.name + (" compiled" if v.info.get("compile") else "")
        if key not in best or med(v) < med(best[key]):
            best[key] = v
    base = best.get(f"moe[{BASELINE}]")
    base_ms = med(base) if base else None
    ideal_ms = statistics.median(dense_ms["dense_active"]) if "dense_active" in dense_ms else None

    rows: list[dict] = []
    for v in dense:
        if any(r["name"] == v.name for r in rows):
            continue
        w = dense_width(spec, v.name.split("_")[1])  # type: ignore[arg-type]
        params = mlp_params(spec.input_dim, w, spec.layers, spec.classes)
        rows.append(_row(v.name, "dense", statistics.median(dense_ms[v.name]), dense_ms[v.name], batch,
                         batch * dense_flops(spec.input_dim, w, spec.layers, spec.classes), params * bpp,
                         roof, dname, base_ms, None, {"width": w, **v.info}))
    for key, v in best.items():
        layouts = {u.layout: med(u) for u in moe_vs if u.name == v.name and
                   bool(u.info.get("compile")) == bool(v.info.get("compile"))}
        extra = {"strategy": v.strategy, "weight_layout": v.layout, "ms_per_batch_by_layout": layouts, **v.info}
        if v.strategy == "padded_capacity" and dropped is not None:
            extra.update(capacity_factor=dropped["capacity_factor"], routed_pairs_per_batch=dropped["routed_pairs"],
                         dropped_pairs_per_batch=dropped["dropped_pairs"])
        rows.append(_row(key, "moe", med(v), v.ms, batch, batch * moe_flops(spec),
                         moe_weight_params_read(spec, touched) * bpp, roof, dname, base_ms, ideal_ms, extra,
                         iterations=v.iterations))
    return rows


def _row(name: str, kind: str, ms: float, samples: list[float], batch: int, flops: int, weight_bytes: int,
         roof: Roofline | None, dtype: str, base_ms: float | None, ideal_ms: float | None, extra: dict,
         iterations: int | None = None) -> dict:
    return {
        "name": name,
        "kind": kind,
        "ms_per_batch": ms,
        "ms_per_batch_min": min(samples),
        "rounds": len(samples),
        "iterations": iterations,
        "inferences_per_second": batch / (ms / 1e3),
        "speedup_vs_active_loop": base_ms / ms if base_ms else None,
        "efficiency_vs_ideal": ideal_ms / ms if (ideal_ms and kind == "moe") else None,
        "achieved_gflops": flops / (ms / 1e3) / 1e9,
        **roofline.figures(roof, ms / 1e3, flops, weight_bytes, dtype),
        **extra,
    }
