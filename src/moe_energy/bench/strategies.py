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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelSpec
from ..device import device_sync
from ..dtypes import dtype_name, dtype_of
from ..errors import described
from ..measure import roofline
from ..measure.environment import describe
from ..measure.roofline import Roofline
from ..measure.timing import time_interleaved, time_one
from ..memory import BYTES, fit_problem
from ..models.archs import Arch, get_arch
from ..models.counting import layer_flops, swiglu_params
from ..models.dense import MATCHES, matched_dense
from ..models.llm import MoELayer, building
from ..models.moe import LAYOUTS, MoE, StrategyHost
from ..models.plan import ModelPlan, plans
from ..models.strategies import AUTO_CANDIDATES, STRATEGIES, SYNCING
from ..runner.layer import ERROR_ROWS, quantize_measured
from ..runner.prepare import choose_layout, compile_candidates, prepare
from ..storage.fileio import now_utc
from .peers import Peers, build_peers

SCHEMA = "moe-energy/strategy-bench"
SCHEMA_VERSION = 1
BASELINE = "active_loop"  # the seed's optimized MoE: speed-ups are over it


class Variant:
    """One thing to time: a callable on the batch, plus the MoE strategy/layout it needs set first.

    ``plan`` is the model's ``ModelPlan``: its FLOPs and weight bytes are the row's (None in unit tests
    that time bare callables).
    """

    def __init__(self, name: str, kind: str, fn: Callable[[Tensor], Tensor], moe: StrategyHost | None = None,
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
    failed: dict[str, str] = field(default_factory=dict)  # row name -> why it could not run here (first reason)

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

    With ``compile`` only the strategies that are never compiled (``SYNCING``) run eager."""
    groups: list[list[Variant]] = []
    for layout in LAYOUTS:
        group = list(b.dense)
        for s in b.strategies:
            if b.compile and s not in SYNCING:
                continue
            b.moe.set_layout(layout)
            b.moe.strategy = s
            b.on_phase(f"preparing moe[{s}] ({layout})")
            prepared = _tried(b, f"moe[{s}]", lambda: b.prepare(b.moe, compile=False))
            if prepared is not None:
                group.append(b.moe_variant(s, b.moe, b.moe.layout, prepared[1]))
        groups.append(group)
    return groups


def _tried(b: _Bench, name: str, step: Callable[[], Any]) -> Any:
    """``step()``, or None with ``b.failed[name]`` saying why: a strategy that cannot run this shape (a kernel's
    alignment rule, a compile failure) is a row that says so, never the end of the whole table."""
    try:
        return step()
    except Exception as e:  # noqa: BLE001 - any failure here means: this strategy cannot run this shape
        b.failed.setdefault(name, described(e, 160))
        return None


def _compiled_group(b: _Bench) -> list[Variant]:
    """One layout for every graph (auto's eager favourite among what compiles), then each strategy compiled."""
    moe = b.moe
    moe.strategy, moe.auto_candidates = "auto", compile_candidates(b.dt)
    layout, _ = choose_layout(moe, b.x)
    group = list(b.dense)
    for s in b.strategies:
        if s in SYNCING:
            continue
        moe.strategy = s
        b.on_phase(f"compiling moe[{s}]")
        prepared = _tried(b, f"moe[{s}] compiled", lambda: b.prepare(moe, compile=True))
        if prepared is not None:  # auto: moe.strategy is now the resolved one
            group.append(b.moe_variant(s, prepared[0], layout, prepared[1]))
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
        "created_utc": now_utc(),
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
                         p.weight_bytes_read(dname) or 0, roof, dname, base_ms, None, {"width": p.width, **v.info}))
    moe = b.moe_plan  # a small batch reads only the experts it reached (the plan's default: every expert)
    for key, v in best.items():
        rows.append(_row(key, moe.kind, v.median_ms, v.ms, batch, batch * moe.flops_per_inference,
                         moe.weight_bytes_read(dname, touched) or 0, roof, dname, base_ms, ideal_ms,
                         _moe_extra(v, moe_vs, dropped),
                         iterations=v.iterations))
    return rows + [_failed_row(name, why) for name, why in b.failed.items() if name not in best]


FIGURES = ("ms_per_batch", "ms_per_batch_min", "inferences_per_second", "speedup_vs_active_loop",
           "efficiency_vs_ideal", "achieved_gflops", "roofline_bound_ms", "fraction_of_roofline")


def _failed_row(name: str, why: str) -> dict:
    """A strategy that could not run this shape here: its row says why, every figure None (never 0)."""
    return {"name": name, "kind": "moe", "status": "failed", "not_timed": why, "rounds": 0, "iterations": 0,
            **dict.fromkeys(FIGURES)}


def _row(name: str, kind: str, ms: float, samples: list[float], batch: int, flops: int, weight_bytes: float,
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


# --- one LLM MoE layer (--arch) against its dense FFNs and transformers' own block ---------------------------

LAYER_SCHEMA = "moe-energy/strategy-bench-layer"
LAYER_SCHEMA_VERSION = 1
NO_ROOFLINE = "not calibrated: run `moe-energy calibrate` for the roofline bound and fractions"


@dataclass
class _Layer:
    """What every token count shares: the layer, its two dense FFNs, transformers' peers, the options."""

    arch: Arch
    layer: MoELayer
    dense: dict[str, nn.Module]  # dense_total, dense_active: matched_dense(layer, match)
    peers: Peers
    dt: torch.dtype
    strategies: list[str]
    weights: str | None = None  # the layer's and both dense FFNs' weights stored as "int8"; None: in the dtype
    output_error: dict[str, float] = field(default_factory=dict)  # int8: per model, against its dtype weights

    def weights_of(self, kind: str) -> str:
        """A row's weights format: int8 for the layer and the dense FFNs when asked; transformers' blocks always
        hold the dtype's (they are the reference a user serves today)."""
        return self.weights if self.weights and kind != "transformers" else dtype_name(self.dt)


def _build_layer(arch: Arch, device: torch.device, dt: torch.dtype, seed: int, strategies: list[str],
                 on_phase: Callable[[str], None], weights: str | None = None) -> _Layer:
    """The layer (seeded random weights, made where it runs), both dense FFNs, and transformers' blocks holding
    a copy of the layer's weights (one copy shared by every experts implementation), taken before ``weights``
    (int8) stores the layer's and the dense FFNs' weights, as a run does, each model's output error measured."""
    on_phase(f"building the {arch.name} layer and its dense FFNs")
    layer = MoELayer.from_arch(arch, dtype=dt, device=device, strategy="auto", seed=seed).eval()
    dense: dict[str, nn.Module] = {}
    for i, match in enumerate(MATCHES):
        with building(device, dt, seed + 1 + i):
            dense[f"dense_{match}"] = matched_dense(layer, match).eval()
    on_phase("building transformers' MoE blocks")
    b = _Layer(arch, layer, dense, build_peers(layer), dt, strategies, weights)
    if weights is not None:
        on_phase(f"storing the layer's and the dense FFNs' weights as {weights}")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + ERROR_ROWS)
        x = torch.randn(ERROR_ROWS, arch.d_model, generator=gen).to(device=device, dtype=dt)
        for name, model in (("moe", layer), *dense.items()):
            b.output_error[name] = quantize_measured(model, weights, x)
    return b


def _layer_variants(b: _Layer) -> list[Variant]:
    """Both dense FFNs, the layer under every strategy (set host-side before each call), each transformers peer."""
    vs = [Variant(name, "dense", m, info={"width": m.width}) for name, m in b.dense.items()]
    vs += [Variant(f"moe[{s}]", "moe", b.layer, b.layer, s) for s in b.strategies]
    vs += [Variant(p.name, "transformers", p, info={"implementation": p.implementation}) for p in b.peers.available]
    return vs


def _strategy_facts(layer: MoELayer, strategy: str, x: Tensor) -> dict[str, Any]:
    """What auto chose (and measured) and what padded_capacity dropped, from one forward far from the timing."""
    if strategy not in ("auto", "padded_capacity"):
        return {"strategy": strategy}
    layer.strategy = strategy
    layer.reset_pair_counts()
    with torch.inference_mode():
        layer(x)
    info = layer.strategy_info()
    keep = ("resolved_strategy", "auto_probe_ms", "auto_unavailable") if strategy == "auto" else \
        ("capacity_factor", "routed_pairs", "dropped_pairs")
    return {"strategy": strategy, **{k: info[k] for k in keep}}


def _layer_row(b: _Layer, v: Variant, tokens: int, touched: int, roof: Roofline | None, extra: dict) -> dict:
    """One row: ms per forward (median, best), tokens/s and the roofline columns. The MoE and transformers' block
    compute one function: the same FLOPs and the same least bytes (router, the experts reached, shared)."""
    dname = dtype_name(b.dt)
    bpp, rate = BYTES[dname], dname  # rate: the roofline GEMM rate the row's FLOPs run at
    if v.kind == "dense":
        params = swiglu_params(b.arch.d_model, v.info["width"])
        flops, nbytes = tokens * 2 * params, params * bpp
    else:  # the plan's bytes: DeepSeek's router stays fp32 in a bf16 layer (and in transformers' block)
        flops, nbytes = tokens * layer_flops(b.arch), ModelPlan.of("moe", b.arch).weight_bytes_read(dname, touched)
    if b.weights is not None and v.kind != "transformers":  # the stored format's bytes, as a run counts them
        plan = ModelPlan.of("moe" if v.kind == "moe" else v.name, b.arch).quantized(b.weights)
        nbytes, rate = plan.weight_bytes_read(dname, touched) or nbytes, plan.rate_key(dname)
    ms = v.median_ms
    return {"name": v.name, "kind": v.kind, "tokens": tokens, "ms_per_forward": ms, "ms_per_forward_min": min(v.ms),
            "rounds": len(v.ms), "iterations": v.iterations, "tokens_per_second": tokens / (ms / 1e3),
            "speedup_vs_transformers": None, "achieved_gflops": flops / (ms / 1e3) / 1e9,
            "weights": b.weights_of(v.kind), **roofline.figures(roof, ms / 1e3, flops, nbytes, rate), **v.info,
            **extra}


def versus_transformers(rows: list[dict]) -> dict[str, Any]:
    """Fill each row's speed-up over the fastest transformers row (its median / this median) and say how auto
    fares; every figure None when no transformers row was timed. The active-matched dense FFN's roofline
    fraction goes beside auto's: the same arithmetic in one dense FFN shows what this host's kernels reach at
    these rows, so a low fraction reads as the kernels' or the routing's."""
    tf = [r for r in rows if r["kind"] == "transformers"]
    best = min(tf, key=lambda r: r["ms_per_forward"]) if tf else None
    for r in rows:
        r["speedup_vs_transformers"] = best["ms_per_forward"] / r["ms_per_forward"] if best else None
    auto = next((r for r in rows if r["name"] == "moe[auto]"), None)
    return {"fastest_transformers": best["name"] if best else None,
            "fastest_transformers_ms": best["ms_per_forward"] if best else None,
            "auto_ms": auto["ms_per_forward"] if auto else None,
            "auto_speedup_vs_transformers": auto["speedup_vs_transformers"] if auto else None,
            "auto_fraction_of_roofline": auto["fraction_of_roofline"] if auto else None,
            "dense_active_fraction_of_roofline": next(
                (r["fraction_of_roofline"] for r in rows if r["name"] == "dense_active"), None)}


def _at_tokens(b: _Layer, tokens: int, seed: int, seconds: float, warmup_s: float, roof: Roofline | None,
               on_phase: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Every variant on one seeded batch of ``tokens`` hidden states, in interleaved rounds: its rows and summary."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
    p = b.layer.experts.gate_up_proj
    x = torch.randn(tokens, b.arch.d_model, generator=gen).to(device=p.device, dtype=b.dt)
    with torch.inference_mode():
        touched = int(b.layer.router(x)[0].unique().numel())
    failed: dict[str, str] = {}
    vs = [v for v in _layer_variants(b) if v.kind != "transformers" or _runs_at(b, v, x, failed)]
    on_phase(f"timing {len(vs)} variants at {tokens} token(s)")
    time_rounds(vs, x, seconds, warmup_s)
    rows = [_layer_row(b, v, tokens, touched, roof, _strategy_facts(b.layer, v.strategy, x) if v.strategy else {})
            for v in vs]
    return rows, {"tokens": tokens, "experts_touched": touched, "transformers_not_timed": failed,
                  **versus_transformers(rows)}


def _runs_at(b: _Layer, v: Variant, x: Tensor, failed: dict[str, str]) -> bool:
    """Whether a transformers peer runs this batch; else ``failed[name]`` says why. batched_mm gathers a copy of
    every pair's expert weights (T k of them): refused before it could exhaust the host, not after."""
    a, bpp = b.arch, BYTES[dtype_name(b.dt)]
    if v.info.get("implementation") == "batched_mm":
        need = x.shape[0] * a.top_k * 3 * a.d_model * a.ffn_dim * bpp
        problem = fit_problem(need, x.device, f"batched_mm's gathered expert weights ({x.shape[0]} x {a.top_k})")
        if problem is not None:
            failed[v.name] = problem
            return False
    try:
        with torch.inference_mode():
            v.fn(x)
    except Exception as e:  # e.g. an allocation this host cannot make: that row is not timed, the rest are
        failed[v.name] = described(e, 160)
        return False
    return True


def bench_layer(
    arch: Arch | str,
    tokens: Sequence[int] = (1, 32, 512),
    *,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    strategies: Sequence[str] | None = None,
    seconds: float = 3.0,
    seed: int = 0,
    warmup_s: float = 0.2,
    roof: Roofline | None = None,
    on_phase: Callable[[str], None] = lambda msg: None,
    weights: str | None = None,
) -> dict:
    """Time one LLM MoE layer under every strategy, both dense SwiGLU FFNs (total- and active-matched) and
    transformers' own block under each experts implementation it offers, all in one process, interleaved;
    ``seconds`` of timed rounds per token count. Routing: the router's own choice (random router weights).
    ``weights`` "int8": the layer and the dense FFNs hold int8 weights, transformers' blocks the dtype's (each row
    says its format), so the speed-ups read int8 against what transformers serves."""
    a = get_arch(arch) if isinstance(arch, str) else arch
    device = torch.device(device)
    strategies = list(strategies or STRATEGIES)
    load_before = _load_average()
    b = _build_layer(a, device, dtype_of(dtype), seed, strategies, on_phase, weights)
    done = [_at_tokens(b, t, seed, seconds, warmup_s, roof, on_phase) for t in tokens]
    rows, summary = [r for rs, _ in done for r in rs], [s for _, s in done]
    options = {"tokens": list(tokens), "dtype": dtype, "device": str(device), "seconds_per_token_count": seconds,
               "warmup_s": warmup_s, "seed": seed, "strategies": strategies, "weights": weights}
    return _layer_document(b, device, options, load_before, roof, rows, summary)


def _layer_document(b: _Layer, device: torch.device, options: dict, load_before: float | None,
                    roof: Roofline | None, rows: list[dict], summary: list[dict]) -> dict[str, Any]:
    """The --arch results document: the arch, options, routing, transformers' peers, roofline, rows, summary."""
    return {
        "schema": LAYER_SCHEMA,
        "schema_version": LAYER_SCHEMA_VERSION,
        "created_utc": now_utc(),
        "arch": asdict(b.arch),
        "options": options,
        "routing": {"mode": "random", "how": "each router's own top-k: random router weights, seeded normal "
                                            "hidden states (transformers' block routes with the same weights)"},
        "environment": describe(device),
        "method": "median (and best) over interleaved rounds (rotated order) of ms per forward; every variant of "
                  "a token count timed in the same rounds, in one process",
        "transformers": b.peers.as_dict(),
        "host_load_average_1m": {"before": load_before, "after": _load_average()},
        "roofline": roof.as_dict() if roof else None,
        "roofline_note": None if roof else NO_ROOFLINE,
        "weights_output_error": b.output_error or None,
        "summary": summary,
        "rows": rows,
    }
