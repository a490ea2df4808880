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
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor, nn

from . import roofline
from .config import ModelSpec
from .device import device_sync, dtype_name, dtype_of
from .environment import describe
from .measure.timing import time_interleaved, time_one
from .models.counting import moe_weight_params_read
from .models.moe import LAYOUTS, MoE
from .models.plan import ModelPlan, plans
from .models.strategies import AUTO_CANDIDATES, STRATEGIES
from .optimize import choose_layout, compile_candidates, prepare
from .roofline import Roofline

SCHEMA = "moe-energy/strategy-bench"
SCHEMA_VERSION = 1
BASELINE = "active_loop"  # the seed's optimized MoE: speed-ups are over it
SLOW = ("masked_loop", "active_loop")  # host syncs by design: never compiled


class Variant:
    """One thing to time: a callable on the batch, plus the MoE strategy/layout it needs set first.

    ``plan`` is the model's ``ModelPlan``: its FLOPs and weight bytes are the row's (None in unit tests
    that time bare callables).
    """

    def __init__(self, name: str, kind: str, fn: Callable[[Tensor], Tensor], moe: MoE | None = None,
                 strategy: str | None = None, layout: str | None = None, info: dict | None = None,
                 plan: ModelPlan | None = None) -> None:
        self.name, self.kind, self.fn, self.moe = name, kind, fn, moe
        self.strategy, self.layout, self.info, self.plan = strategy, layout, info or {}, plan
        self.ms: list[float] = []
        self.iterations = 0
        self.inner = 1

    def select(self) -> None:
        """Set this variant's strategy on the shared MoE (host-side: the variants of a group share one MoE)."""
        if self.moe is not None and self.strategy is not None:
            self.moe.strategy = self.strategy

    def group(self, x: Tensor) -> Callable[[], None]:
        """One timed call: ``inner`` back-to-back forwards (this variant's strategy set first, host-side)."""

        def run() -> None:
            self.select()
            for _ in range(self.inner):
                self.fn(x)

        return run

    @property
    def median_ms(self) -> float:
        """Its figure: the median over its rounds (background load only ever adds time to some rounds)."""
        return statistics.median(self.ms)


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


def reached(plan: ModelPlan, touched: int) -> ModelPlan:
    """The MoE's plan for a batch that reached only ``touched`` experts: a small batch reads only their weights
    (the plan's own figure assumes every expert gets a token)."""
    return replace(plan, weight_params_read=moe_weight_params_read(plan.spec, touched))


@dataclass
class _Bench:
    """What every step of one benchmark shares: the models (built from their plans), the batch, the options."""

    moe: MoE
    moe_plan: ModelPlan
    x: Tensor
    device: torch.device
    dt: torch.dtype
    strategies: list[str]
    compile: bool
    on_phase: Callable[[str], None]
    dense: list[Variant]  # one per dense baseline: prepared once, timed in every group (its rounds pooled)

    def prepare(self, model: nn.Module, compile: bool) -> tuple[Callable[[Tensor], Tensor], dict]:
        """``optimize.prepare`` on this bench's batch, dtype and device (an MoE keeps its current layout)."""
        keep = {"layout": "keep"} if isinstance(model, MoE) else {}
        return prepare(model, dtype=self.dt, compile=compile, device=self.device, example=self.x, **keep)

    def moe_variant(self, asked: str, fn: Callable[[Tensor], Tensor], layout: str, info: dict) -> Variant:
        """The MoE run as strategy ``asked`` (its row's name); ``self.moe.strategy`` is the one that runs."""
        return Variant(f"moe[{asked}]", "moe", fn, self.moe, self.moe.strategy, layout, info, plan=self.moe_plan)


def _setup(spec: ModelSpec, batch_size: int, device: torch.device, dt: torch.dtype, strategies: list[str],
           compile: bool, seed: int, on_phase: Callable[[str], None]) -> _Bench:
    """Build every model from its plan (in plan order, the MoE first: one seed, the same weights as ever),
    then the batch; prepare the dense baselines and move the MoE to the device."""
    torch.manual_seed(seed)
    built = [(p, p.build(strategy=strategies[0])) for p in plans(spec)]
    x = torch.randn(batch_size, spec.input_dim).to(device=device, dtype=dt)
    [(moe_plan, moe)] = [(p, m) for p, m in built if p.kind == "moe"]
    assert isinstance(moe, MoE)
    b = _Bench(moe, moe_plan, x, device, dt, strategies, compile, on_phase, dense=[])
    for p, model in built:
        if p.kind == "dense":
            fast, info = b.prepare(model, compile)
            b.dense.append(Variant(p.name, p.kind, fast, info=info, plan=p))
    moe.to(device=device, dtype=dt).eval()
    return b


def _eager_groups(b: _Bench) -> list[list[Variant]]:
    """One group per weight layout: every eager strategy in that layout, the dense pair alongside.

    With ``compile`` only the strategies that are never compiled (``SLOW``) run eager."""
    groups: list[list[Variant]] = []
    for layout in LAYOUTS:
        group = list(b.dense)
        for s in b.strategies:
            if b.compile and s not in SLOW:
                continue
            b.moe.set_layout(layout)
            b.moe.strategy = s
            b.on_phase(f"preparing moe[{s}] ({layout})")
            _, info = b.prepare(b.moe, compile=False)
            group.append(b.moe_variant(s, b.moe, b.moe.layout, info))
        groups.append(group)
    return groups


def _compiled_group(b: _Bench) -> list[Variant]:
    """One layout for every graph (auto's eager favourite among what compiles), then each strategy compiled."""
    moe = b.moe
    moe.strategy, moe.auto_candidates = "auto", compile_candidates(b.dt)
    layout, _ = choose_layout(moe, b.x)
    group = list(b.dense)
    for s in b.strategies:
        if s in SLOW:
            continue
        moe.strategy = s
        b.on_phase(f"compiling moe[{s}]")
        fast, info = b.prepare(moe, compile=True)
        group.append(b.moe_variant(s, fast, layout, info))  # auto: moe.strategy is now the resolved one
    moe.auto_candidates = AUTO_CANDIDATES
    return group


def _time_groups(b: _Bench, groups: list[list[Variant]], seconds: float, warmup_s: float) -> None:
    """Each group in turn, in interleaved rounds; the MoE is set to the layout the group was prepared in."""
    for i, group in enumerate(groups):
        layouts = {v.layout for v in group if v.layout is not None}
        if len(layouts) == 1:
            b.moe.set_layout(layouts.pop())
        b.on_phase(f"timing group {i + 1}/{len(groups)}")
        time_rounds(group, b.x, seconds, warmup_s)


def _dropped_pairs(b: _Bench) -> dict | None:
    """The capacity strategy's routed and dropped pairs: one forward's worth, read far from any timing."""
    if "padded_capacity" not in b.strategies:
        return None
    b.moe.strategy = "padded_capacity"
    b.moe.reset_pair_counts()
    with torch.inference_mode():
        b.moe(b.x)
    return b.moe.strategy_info()


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
    Returns the results document (see ``_rows``); every model's size, FLOPs and weight bytes are its
    ``ModelPlan``'s, as in `plan` and `run`.
    """
    device = torch.device(device)
    strategies = list(strategies or STRATEGIES)
    load_before = _load_average()
    b = _setup(spec, batch_size, device, dtype_of(dtype), strategies, compile, seed, on_phase)
    touched = experts_touched(b.moe, b.x)
    groups = _eager_groups(b) + ([_compiled_group(b)] if compile else [])
    _time_groups(b, groups, seconds, warmup_s)
    moe_vs = [v for group in groups for v in group if v.kind == "moe"]
    rows = _rows(b, moe_vs, touched, roof, _dropped_pairs(b))
    options = {"batch_size": batch_size, "dtype": dtype, "device": str(device), "compile": compile,
               "seconds_per_group": seconds, "warmup_s": warmup_s, "seed": seed, "strategies": strategies}
    return _document(spec, device, options, touched, load_before, roof, rows)


def _document(spec: ModelSpec, device: torch.device, options: dict, touched: int, load_before: float | None,
              roof: Roofline | None, rows: list[dict]) -> dict[str, Any]:
    """The results document: the rows with all a reader needs to judge them (shape, options, host, load)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": asdict(spec),
        "options": options,
        "environment": describe(device),
        "method": "median over interleaved rounds (rotated order) of ms per batch (each round: back-to-back "
                  "calls, synced at both ends); random untrained weights and a random normal batch",
        "experts_touched": touched,
        # other work on the host slows every variant alike (interleaved rounds) but makes all figures noisier
        "host_load_average_1m": {"before": load_before, "after": _load_average()},
        "roofline": roof.as_dict() if roof else None,
        "rows": rows,
    }


def _fastest(moe_vs: list[Variant]) -> dict[str, Variant]:
    """Per strategy (and compiled or not: "moe[s] compiled"), its fastest layout's variant."""
    best: dict[str, Variant] = {}
    for v in moe_vs:
        key = v.name + (" compiled" if v.info.get("compile") else "")
        if key not in best or v.median_ms < best[key].median_ms:
            best[key] = v
    return best


def _moe_extra(v: Variant, moe_vs: list[Variant], dropped: dict | None) -> dict[str, Any]:
    """An MoE row's own fields: its strategy and layout, every layout's ms, the prepare facts, dropped pairs."""
    layouts = {u.layout: u.median_ms for u in moe_vs if u.name == v.name and
               bool(u.info.get("compile")) == bool(v.info.get("compile"))}
    extra = {"strategy": v.strategy, "weight_layout": v.layout, "ms_per_batch_by_layout": layouts, **v.info}
    if v.strategy == "padded_capacity" and dropped is not None:
        extra.update(capacity_factor=dropped["capacity_factor"], routed_pairs_per_batch=dropped["routed_pairs"],
                     dropped_pairs_per_batch=dropped["dropped_pairs"])
    return extra


def _rows(b: _Bench, moe_vs: list[Variant], touched: int, roof: Roofline | None,
          dropped: dict | None) -> list[dict]:
    """The dense baselines (their rounds pooled over every group), then each strategy's fastest layout.

    FLOPs and weight bytes per batch come from each model's plan; an MoE batch reads only the experts it
    reached (``reached``)."""
    dname, batch = dtype_name(b.dt), b.x.shape[0]
    best = _fastest(moe_vs)
    base = best.get(f"moe[{BASELINE}]")
    base_ms = base.median_ms if base else None
    ideal_ms = next((v.median_ms for v in b.dense if v.name == "dense_active"), None)
    rows: list[dict] = []
    for v in b.dense:
        p = v.plan
        assert p is not None
        rows.append(_row(v.name, p.kind, v.median_ms, v.ms, batch, batch * p.flops_per_inference,
                         p.weight_bytes(dname), roof, dname, base_ms, None, {"width": p.width, **v.info}))
    moe = reached(b.moe_plan, touched)
    for key, v in best.items():
        rows.append(_row(key, moe.kind, v.median_ms, v.ms, batch, batch * moe.flops_per_inference,
                         moe.weight_bytes(dname), roof, dname, base_ms, ideal_ms, _moe_extra(v, moe_vs, dropped),
                         iterations=v.iterations))
    return rows


def _row(name: str, kind: str, ms: float, samples: list[float], batch: int, flops: int, weight_bytes: int,
         roof: Roofline | None, dtype: str, base_ms: float | None, ideal_ms: float | None, extra: dict,
         iterations: int | None = None) -> dict:
    """One row: speed, speed-up over the baseline, efficiency against the ideal, and the roofline columns."""
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
