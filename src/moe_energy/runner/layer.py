"""One LLM-layer run: plan -> idle -> for each group of models that fit together: build -> windows -> release
-> records, one per (model, token count).

The family of issue 13: one MoE FFN layer of a published (or custom) architecture against the dense SwiGLU
FFNs matched to its total and to its active parameters, at several token counts per forward (T = 1 is a
decoding step of one sequence, T = 1024 a prefill chunk). Nothing is trained: the weights are seeded random
values and the inputs fixed-seed normal hidden states [T, d] (what an RMSNorm hands an FFN is of unit scale),
so a window's inferences are its tokens. The routing is ``--routing`` (models/routing.py), counted per window.

Memory is checked before anything is allocated: a model that cannot fit alone is skipped with the reason;
models that fit one at a time but not together are built, measured and released one at a time (their
windows then interleave over the token counts only); a token count whose activations do not fit is skipped
for that model. The seed pipeline's pieces serve here unchanged (idle phase, the window loop over its
``Variant``s, measured and skipped records, dtype check, atomic save); what is this family's own is which
models are built, their inputs per token count, and the routing's load read after each window.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import memory, roofline
from .config import RunOptions
from .device import DTYPES, free, resolve_device
from .energy.idle import IdlePower
from .energy.meter import Meter, meter_info
from .environment import describe
from .errors import ConfigError, one_line
from .measure.guard import GuardedMeter
from .measure.records import ModelRecord, WindowRecord, measured_record, skipped_record
from .memory import OutOfMemory
from .models.archs import Arch, RouterSpec
from .models.counting import (
    expected_experts_touched,
    layer_active_params,
    layer_flops,
    layer_params,
    layer_weight_bytes,
    router_params,
    swiglu_params,
)
from .models.dense import DenseSwiGLU, Match, swiglu_width
from .models.llm import MoELayer, building
from .models.plan import MODEL_NAMES
from .models.routing import BenchRouter, RoutingMode, parse_routing, read_load
from .models.strategies import AUTO_CANDIDATES
from .pipeline import (
    STRATEGY_PROBE_BYTES,
    UI,
    Measured,
    Refused,
    SilentUI,
    Variant,
    check_dtype,
    idle_phase,
    labels,
    measure_all,
)
from .results import new_document, run_stem, save_or_rescue

DEFAULT_TOKENS = (1, 16, 128, 1024)
MAX_TOKENS = 2**20  # tokens per forward: far past any prefill chunk
INPUTS = "fixed-seed normal hidden states [T, d] (torch.randn on the CPU from --seed, then cast)"
FP32_ROUTERS = ("deepseek_v2", "sigmoid_group")  # held in fp32 whatever the layer's dtype (routers.py)
SEED_ONLY_OPTIONS = ("epochs", "lr", "batch_size", "samples", "test_fraction", "data")


def extrapolation_note(arch: Arch) -> str:
    """What a whole-model figure leaves out: everything but the MoE FFN layers."""
    dense = f", the {arch.dense_layers} dense FFN layers" if arch.dense_layers else ""
    return (f"EXTRAPOLATED: one layer's figure x {arch.moe_layers} MoE layers; attention, the KV cache, "
            f"embeddings, norms{dense} and the LM head are left out")


# ---------------------------------------------------------------------------------------------------------
# What a run builds, before it exists


@dataclass(frozen=True)
class LayerPlan:
    """One model of an LLM-layer run: "moe", or "dense_total"/"dense_active" (the SwiGLU FFN matched to the
    layer's total/active params); sizes and FLOPs per token from the arch alone."""

    name: str
    kind: str  # "moe" | "dense"
    match: Match | None
    width: int  # I of each routed expert, or the dense FFN's width
    params: int
    active_params: int
    flops_per_token: int
    arch: Arch

    @classmethod
    def of(cls, name: str, arch: Arch) -> LayerPlan:
        if name == "moe":
            return cls("moe", "moe", None, arch.ffn_dim, layer_params(arch), layer_active_params(arch),
                       layer_flops(arch), arch)
        if name not in MODEL_NAMES:
            raise ValueError(f"model {name!r} is unknown; choose from {', '.join(MODEL_NAMES)}")
        match: Match = "total" if name == "dense_total" else "active"
        w = swiglu_width(arch, match)
        p = swiglu_params(arch.d_model, w)
        return cls(name, "dense", match, w, p, p, 2 * p, arch)  # 2 FLOPs per MAC, one MAC per weight

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of the weights held (DeepSeek's router at 4 bytes a parameter: it stays fp32)."""
        b = memory.BYTES[dtype]
        if self.kind == "moe" and self.arch.router.kind in FP32_ROUTERS:
            r = router_params(self.arch)
            return (self.params - r) * b + 4 * r
        return self.params * b

    def activation_bytes(self, tokens: int, strategies: tuple[str, ...] = ()) -> int:
        """Generous bytes of one forward's intermediates: fp32 worst case, twice for temporaries."""
        a = self.arch
        if self.kind == "dense":
            per_token = 2 * a.d_model + 3 * self.width
        else:  # x, out, router scores; per pair a gathered row, gate/up/h, its output; the shared experts
            per_token = 2 * a.d_model + a.experts + a.top_k * (2 * a.d_model + 3 * a.ffn_dim) \
                + a.shared_experts * 3 * a.shared_width
            if "dense_experts" in strategies:  # every expert on every token
                per_token = max(per_token, a.experts * (3 * a.ffn_dim + a.d_model))
        return 2 * 4 * tokens * per_token

    def memory_bytes(self, tokens: int, dtype: str, strategies: tuple[str, ...] = ()) -> int:
        return self.weight_bytes(dtype) + self.activation_bytes(tokens, strategies) + memory.OVERHEAD_BYTES

    def weight_bytes_read(self, experts_touched: float | None, dtype: str) -> float | None:
        """Weight bytes one forward reads at least: all of a dense FFN; the MoE's router (DeepSeek's at 4 bytes a
        parameter: it stays fp32), the experts that got a token, and the shared experts."""
        b = memory.BYTES[dtype]
        if self.kind == "dense":
            return float(self.params * b)
        if experts_touched is None:
            return None
        fp32_router = router_params(self.arch) * (4 - b) if self.arch.router.kind in FP32_ROUTERS else 0
        return layer_weight_bytes(self.arch, experts_touched, b) + fp32_router

    def build(self, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
        """The model with seeded random weights, allocated on ``device`` in ``dtype`` (one copy)."""
        if self.kind == "moe":
            return MoELayer.from_arch(self.arch, dtype=dtype, device=device, strategy="auto", seed=seed)
        with building(device, dtype, seed):
            return DenseSwiGLU(self.arch.d_model, self.width)

    def fields(self) -> dict[str, Any]:
        """The record's shape fields (the seed's names: flops_per_inference is per token here)."""
        out: dict[str, Any] = {"kind": self.kind, "params": self.params, "active_params": self.active_params,
                               "flops_per_inference": self.flops_per_token, "width": self.width}
        if self.match is not None:
            out["match"] = self.match
        return out


def layer_plans(arch: Arch, models: tuple[str, ...] = MODEL_NAMES) -> list[LayerPlan]:
    return [LayerPlan.of(name, arch) for name in models]


# ---------------------------------------------------------------------------------------------------------
# Checks before any work


def check_tokens(tokens: Any, where: str = "tokens") -> list[int]:
    """Token counts per forward: whole numbers 1..MAX_TOKENS, duplicates dropped, order kept."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise ConfigError(f"{where}={tokens!r} must be a list of token counts, e.g. [1, 16, 128, 1024]")
    out: list[int] = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_TOKENS:
            raise ConfigError(f"{where}: {t!r} must be a whole number from 1 to {MAX_TOKENS:,} (tokens per forward)")
        if t not in out:
            out.append(t)
    if not out:
        raise ConfigError(f"{where}: give at least one token count, e.g. 1,16,128,1024")
    return out


def check_layer_inputs(arch: Arch, tokens: list[int], device: torch.device, dtype: str) -> None:
    """Refuse, before allocating, hidden states that cannot fit (made in fp32 on the host, then cast)."""
    rows = max(tokens)
    for where, per in dict.fromkeys(((torch.device("cpu"), 4), (device, memory.BYTES[dtype]))):
        problem = memory.fit_problem(rows * arch.d_model * per, where, f"the hidden states ({rows:,} x {arch.d_model})")
        if problem is not None:
            raise Refused(f"{problem}; give fewer --tokens")


def check_layer_strategies(arch: Arch, strategies: tuple[str, ...], device: torch.device, dtype: str) -> None:
    """Refuse a named strategy that cannot run this layer's widths: one forward of a k-expert layer of the
    same d, I, biases and activation (``auto`` copes by itself; a probe over 1 GiB is not tried)."""
    named = [s for s in strategies if s != "auto"]
    router = RouterSpec("topk_softmax" if arch.router_bias else "softmax_topk")
    probe = Arch(name="probe", d_model=arch.d_model, ffn_dim=arch.ffn_dim, experts=arch.top_k, top_k=arch.top_k,
                 router=router, expert_bias=arch.expert_bias, act=arch.act)
    if not named or LayerPlan.of("moe", probe).weight_bytes(dtype) > STRATEGY_PROBE_BYTES:
        return
    x = torch.zeros(4, arch.d_model, device=device, dtype=DTYPES[dtype])  # [4, d]
    for s in named:
        try:
            with torch.inference_mode():
                MoELayer.from_arch(probe, dtype=dtype, device=device, strategy=s)(x)
        except Exception as e:  # noqa: BLE001 - any failure here means: this strategy cannot run this shape
            raise Refused(f"--moe-strategy {s} cannot run {arch.name}'s layer on {device} in {dtype} "
                          f"({one_line(e, 120)}); use --moe-strategy auto or another strategy") from None


# ---------------------------------------------------------------------------------------------------------
# Typed values the phases pass on


@dataclass
class LayerRun:
    """What every phase reads: pipeline's ``Bench`` fields (so its idle phase and window loop serve both
    families) plus the arch, the routing, the token counts and the inputs."""

    arch: Arch
    routing: RoutingMode
    tokens: list[int]
    opts: RunOptions
    device: torch.device
    dtype: torch.dtype
    inputs: Tensor  # [max T, d] on the device in dtype; the batch of T tokens is its first T rows
    meter: GuardedMeter
    ui: UI
    sleep: Callable[[float], None]
    oom: str = "skip"  # a variant out of memory stops with its reason, the others go on
    roof: roofline.Roofline | None = None  # the host's roofline (layer_roofline), for bounds and --max-forward-s

    def batch(self, tokens: int) -> Tensor:
        return self.inputs[:tokens]  # [T, d], contiguous


def variant_labels(plan: LayerPlan, strategies: tuple[str, ...], tokens: int) -> list[tuple[str, str | None]]:
    """pipeline.labels' rows with the token count: ``moe[auto]@T=16``, ``dense_active@T=16``."""
    return [(f"{label}@T={tokens}", s) for label, s in labels(plan, strategies)]


def start_layer_run(arch: Arch, opts: RunOptions, tokens: Any, routing: str | RoutingMode, meter: Meter, ui: UI,
                    sleep: Callable[[float], None]) -> tuple[LayerRun, dict]:
    """Validate what only the device can tell, make the inputs, and open the results document."""
    if not isinstance(arch, Arch):
        raise TypeError(f"run_llm: arch={arch!r} must be an Arch (models.archs.get_arch or custom_arch)")
    tokens = check_tokens(tokens)
    mode = routing if isinstance(routing, RoutingMode) else parse_routing(routing)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype)
    check_layer_inputs(arch, tokens, device, opts.dtype)
    if "moe" in opts.models:
        check_layer_strategies(arch, opts.strategies, device, opts.dtype)
    dtype = DTYPES[opts.dtype]
    g = torch.Generator().manual_seed(opts.seed)
    inputs = torch.randn(max(tokens), arch.d_model, generator=g).to(device=device, dtype=dtype)  # [max T, d]
    options = {k: v for k, v in opts.as_dict().items() if k not in SEED_ONLY_OPTIONS}
    doc = new_document(spec=asdict(arch), options=options, environment=describe(device),
                       dataset={"source": INPUTS, "tokens": tokens, "d_model": arch.d_model, "seed": opts.seed})
    doc.update(family="llm_layer", arch=asdict(arch), routing=mode.as_dict(), tokens=tokens,
               extrapolation=extrapolation_note(arch))
    doc["energy_meter"] = {**meter_info(meter), "notice": getattr(meter, "notice", None)}
    return LayerRun(arch, mode, tokens, opts, device, dtype, inputs, GuardedMeter(meter), ui, sleep), doc


# ---------------------------------------------------------------------------------------------------------
# Phase 1: which models fit, and which together


def named(strategies: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for s in strategies if s != "auto")


def params_text(n: int) -> str:
    """'11.32 B params', '402.8 M params', '12,544 params': a size that reads at a glance."""
    for div, unit in ((1e9, "B"), (1e6, "M")):
        if n >= div:
            return f"{n / div:.4g} {unit} params"
    return f"{n:,} params"


def fit_alone(plan: LayerPlan, opts: RunOptions, tokens: list[int], device: torch.device) -> str | None:
    """Why ``plan`` cannot be built here even alone (at the smallest token count), or None."""
    need = plan.memory_bytes(min(tokens), opts.dtype, named(opts.strategies) if plan.kind == "moe" else ())
    return memory.fit_problem(need, device, f"building {plan.name} of {params_text(plan.params)}")


def unwrapped(problem: str) -> str:
    """'out of memory (X needs ~A GiB, B GiB free on D)' -> 'X needs ~A GiB, B GiB free on D'."""
    return problem.removeprefix("out of memory (").removesuffix(")")


def together_problem(plans: list[LayerPlan], opts: RunOptions, tokens: list[int], device: torch.device) -> str | None:
    """Why ``plans`` cannot all be held at once (weights of all, activations of the largest), or None."""
    if len(plans) < 2:
        return None
    need = sum(p.weight_bytes(opts.dtype) for p in plans) + memory.OVERHEAD_BYTES \
        + max(p.activation_bytes(max(tokens), named(opts.strategies)) for p in plans)
    return memory.fit_problem(need, device, f"holding {', '.join(p.name for p in plans)} together")


def arrange(r: LayerRun, todo: list[LayerPlan]) -> tuple[list[list[LayerPlan]], dict[str, str], list[str]]:
    """(groups built and measured together, skipped name -> reason, notices): checked, nothing allocated."""
    skipped = {p.name: why for p in todo if (why := fit_alone(p, r.opts, r.tokens, r.device)) is not None}
    for name, why in skipped.items():
        r.ui.info(f"{name}: skipped, {why}")
    fits = [p for p in todo if p.name not in skipped]
    problem = together_problem(fits, r.opts, r.tokens, r.device)
    if problem is None:
        return ([fits] if fits else []), skipped, []
    note = (f"measured one at a time: {unwrapped(problem)}; each model's windows interleave over its token "
            "counts only")
    r.ui.info(note)
    return [[p] for p in fits], skipped, [note]


# ---------------------------------------------------------------------------------------------------------
# Phase 2: build a group and its variants


def build_one(r: LayerRun, plan: LayerPlan) -> nn.Module:
    """``plan``'s model on the device (memory checked again first); OutOfMemory, released, if it cannot fit."""
    problem = fit_alone(plan, r.opts, r.tokens, r.device)
    if problem is not None:
        raise OutOfMemory(problem)  # nothing was allocated
    failure: str | None = None
    try:
        r.ui.info(f"building {plan.name} of {params_text(plan.params)}")
        model = plan.build(r.device, r.dtype, r.opts.seed).eval()
        if isinstance(model, MoELayer):
            model.router = BenchRouter(model.router, plan.arch.experts, plan.arch.top_k, r.routing,
                                       r.opts.seed).to(r.device)
        return model
    except Exception as e:
        if not memory.is_oom(e):
            raise
        failure = one_line(e, 120)
    model = None  # outside the except block: the traceback's tensors are gone
    free(r.device)
    need = plan.memory_bytes(min(r.tokens), r.opts.dtype)
    raise OutOfMemory(f"{memory.describe_need(need, r.device, f'building {plan.name}')}: {failure}")


def group_variants(r: LayerRun, group: list[LayerPlan], skipped: dict[str, str],
                   out: Measured) -> dict[str, Variant]:
    """Build each model of ``group`` and its variants; a token count whose activations cannot fit now is
    stopped before its first window (a skipped record), a model that cannot be built joins ``skipped``."""
    variants: dict[str, Variant] = {}
    for plan in group:
        try:
            model = build_one(r, plan)
        except OutOfMemory as e:
            skipped[plan.name] = e.reason
            r.ui.info(f"{plan.name}: skipped, {e.reason}")
            continue
        for tokens in r.tokens:
            for label, strategy in variant_labels(plan, r.opts.strategies, tokens):
                out.windows[label] = []
                v = layer_variant(r, plan, label, strategy, tokens, model)
                problem = memory.fit_problem(v.need_bytes, r.device, f"measuring {label}") \
                    or forward_too_long(r.roof, plan, tokens, r.opts)
                if problem is not None:
                    out.stopped[label] = problem
                    continue
                variants[label] = v
    return variants


def layer_variant(r: LayerRun, plan: LayerPlan, label: str, strategy: str | None, tokens: int,
                  model: nn.Module) -> Variant:
    """One row at ``tokens`` per forward (inferences = tokens): the model stays on the device, auto picks from
    what fits at this T, and the routing's load is zeroed before each window and read after it."""
    router = bench_router(model)
    return Variant(label, model, strategy, r.batch(tokens), plan.flops_per_token,
                   plan.activation_bytes(tokens, named((strategy,)) if strategy else ()), parked=False,
                   head={"tokens_per_forward": tokens},
                   auto_candidates=auto_candidates(r, plan, tokens) if plan.kind == "moe" else None,
                   before_window=router.reset_load if router is not None else None,
                   after_window=partial(load_fields, router, plan, r.opts.dtype, tokens) if router is not None
                   else None)


def forward_bound_s(roof: roofline.Roofline | None, plan: LayerPlan, tokens: int, dtype: str) -> float | None:
    """Least seconds one forward of ``plan`` at ``tokens`` takes here: its roofline bound (uniform routing's
    expected experts touched), or None without a calibrated roofline."""
    if roof is None:
        return None
    touched = expected_experts_touched(plan.arch.experts, plan.arch.top_k, tokens) if plan.kind == "moe" else None
    return roof.bound_s(plan.flops_per_token * tokens, plan.weight_bytes_read(touched, dtype) or 0.0, dtype)


def forward_too_long(roof: roofline.Roofline | None, plan: LayerPlan, tokens: int, opts: RunOptions) -> str | None:
    """Why a (model, token count) is skipped under --max-forward-s, or None. The bound is the least time a
    forward can take here, so nothing skipped could have come in under the limit."""
    limit = opts.max_forward_s
    bound = forward_bound_s(roof, plan, tokens, opts.dtype) if limit is not None else None
    if limit is None or bound is None or bound <= limit:
        return None
    return (f"one forward takes at least {bound:.3g} s here (roofline bound), over --max-forward-s {limit:g}; "
            "raise --max-forward-s to measure it")


def auto_candidates(r: LayerRun, plan: LayerPlan, tokens: int) -> tuple[str, ...]:
    """auto's candidates at this token count: dense_experts only if its activations fit (prepare keeps, under
    --compile, only those torch.compile can trace)."""
    dense = plan.activation_bytes(tokens, ("dense_experts",))
    if memory.fit_problem(dense, r.device, "dense_experts") is not None:
        return tuple(c for c in AUTO_CANDIDATES if c != "dense_experts")
    return AUTO_CANDIDATES


# ---------------------------------------------------------------------------------------------------------
# Phase 3: windows


def bench_router(model: nn.Module) -> BenchRouter | None:
    router = getattr(model, "router", None)
    return router if isinstance(router, BenchRouter) else None


def load_fields(router: BenchRouter, plan: LayerPlan, dtype: str, tokens: int) -> dict[str, Any]:
    """The window's routing load, counted on the device (one sync: read it after the window), and the weight
    bytes each of its forwards read: the fixed inputs route every forward of a window alike."""
    load = read_load(router, tokens)
    if load is None:
        return {"experts_touched": None, "weight_bytes_read_per_forward": None}
    return {**load.as_dict(), "weight_bytes_read_per_forward": plan.weight_bytes_read(load.experts_touched, dtype)}


def measure_groups(r: LayerRun, groups: list[list[LayerPlan]], idle: IdlePower | None,
                   skipped: dict[str, str]) -> Measured:
    """Each group built, measured and released in turn: at most one group's models are held at a time."""
    out = Measured({})
    order = 0
    for group in groups:
        variants = group_variants(r, group, skipped, out)
        measure_all(r, variants, idle, out, first_order=order)
        order += r.opts.repeats * len(variants)  # the next group's windows count on
        del variants  # the group's models go with their variants
        free(r.device)
    return out


# ---------------------------------------------------------------------------------------------------------
# Phase 4: records


class LayerRecord(ModelRecord, total=False):
    """A model record of the LLM-layer family: inferences are tokens, plus the routing it measured."""

    tokens_per_forward: int
    arch: str
    routing: str
    tokens_per_second: float | None
    tokens_per_joule: float | None
    joules_per_1k_tokens: float | None
    experts_touched: float | None
    experts_touched_if_uniform: float | None
    expert_load_max_over_mean: float | None
    weight_bytes_read_per_forward: float | None
    # the roofline split (roofline.figures): the bytes above at the copy bandwidth, the FLOPs at the GEMM rate
    model_extrapolated: dict[str, Any] | None


def _median_of(windows: list[WindowRecord], key: str) -> float | None:
    vals = [w[key] for w in windows if not w.get("failed") and w.get(key) is not None]  # type: ignore[literal-required]
    return statistics.median(vals) if vals else None


def token_figures(r: LayerRun, plan: LayerPlan, tokens: int, rec: dict[str, Any]) -> dict[str, Any]:
    """The per-token fields of a record (None where not measured) and the labelled whole-model figure."""
    a, windows = r.arch, rec.get("windows") or []
    tps, tpj = rec.get("inferences_per_second"), rec.get("inferences_per_joule")
    touched = _median_of(windows, "experts_touched") if plan.kind == "moe" else None
    out: dict[str, Any] = {
        "tokens_per_forward": tokens, "arch": a.name, "routing": r.routing.text, "tokens_per_second": tps,
        "tokens_per_joule": tpj, "joules_per_1k_tokens": 1000 / tpj if tpj else None, "experts_touched": touched,
        "experts_touched_if_uniform": expected_experts_touched(a.experts, a.top_k, tokens)
        if plan.kind == "moe" else None,
        "expert_load_max_over_mean": _median_of(windows, "expert_load_max_over_mean") if plan.kind == "moe" else None,
        "weight_bytes_read_per_forward": plan.weight_bytes_read(touched, r.opts.dtype) if rec["status"] == "measured"
        else None,
        "model_extrapolated": None,
    }
    if tps:
        out["model_extrapolated"] = {"moe_layers": a.moe_layers, "tokens_per_second": tps / a.moe_layers,
                                     "joules_per_1k_tokens": out["joules_per_1k_tokens"] * a.moe_layers
                                     if tpj else None, "label": extrapolation_note(a)}
    return out


def layer_record(r: LayerRun, plan: LayerPlan, label: str, strategy: str | None, tokens: int, m: Measured,
                 idle: IdlePower | None, roof: roofline.Roofline | None) -> LayerRecord:
    """A variant's record: skipped or failed before any window, measured otherwise (with the roofline)."""
    fields, dtype = plan.fields(), r.opts.dtype
    windows = m.windows.get(label, [])
    if not windows:
        reason = m.stopped[label]
        rec: dict[str, Any] = dict(skipped_record(label, fields, strategy, dtype, reason,
                                                  status="failed" if reason.startswith("failed:") else "skipped"))
        rec.update(token_figures(r, plan, tokens, rec))
        return rec  # type: ignore[return-value]
    rec = dict(measured_record(label, fields, strategy, dtype, None, None, idle, windows, m.prepared.get(label)))
    rec.update(token_figures(r, plan, tokens, rec))
    if rec["tokens_per_second"]:
        rec.update(roofline.figures(roof, tokens / rec["tokens_per_second"], plan.flops_per_token * tokens,
                                    rec["weight_bytes_read_per_forward"] or 0.0, dtype))
    if label in m.stopped:
        rec["flags"] = [f"stopped after {len(windows)} of {r.opts.repeats} windows: {m.stopped[label]}"] + rec["flags"]
    return rec  # type: ignore[return-value]


def layer_records(r: LayerRun, todo: list[LayerPlan], skipped: dict[str, str], m: Measured,
                  idle: IdlePower | None) -> list[LayerRecord]:
    """Every row, token count by token count, models in plan order: the skipped with their reason."""
    roof = r.roof
    out: list[LayerRecord] = []
    for tokens in r.tokens:
        for plan in todo:
            for label, strategy in variant_labels(plan, r.opts.strategies, tokens):
                if plan.name in skipped:
                    rec: dict[str, Any] = dict(skipped_record(label, plan.fields(), strategy, r.opts.dtype,
                                                              skipped[plan.name]))
                    rec.update(token_figures(r, plan, tokens, rec))
                    out.append(rec)  # type: ignore[arg-type]
                else:
                    out.append(layer_record(r, plan, label, strategy, tokens, m, idle, roof))
    return out


# ---------------------------------------------------------------------------------------------------------
# The run


def layer_stem(name: str) -> str | None:
    """The arch's name in a results file's name when it is a plain one (letters, digits, '-', '.')."""
    return name if name.replace("-", "").replace(".", "").isalnum() else None


def layer_roofline(r: LayerRun, notices: list[str]) -> roofline.Roofline | None:
    """The roofline the records' bounds use; calibrated first when --max-forward-s needs it to skip."""
    if r.opts.max_forward_s is None:
        return roofline.load(r.device, notice=notices.append)
    return roofline.load_or_calibrate(r.device, r.opts.dtype, notices.append, say=r.ui.info)


def run_llm(arch: Arch, opts: RunOptions, tokens: list[int], routing: str | RoutingMode, meter: Meter,
            ui: UI | None = None, save: bool = True, sleep: Callable[[float], None] = time.sleep
            ) -> tuple[dict, Path | None]:
    """Measure ``arch``'s MoE layer and its matched dense FFNs at each token count, in shuffled, repeated
    windows; one record per (model, token count). With ``save``, a failed final write raises
    results.NotSaved after rescuing the document elsewhere."""
    r, doc = start_layer_run(arch, opts, tokens, routing, meter, ui or SilentUI(), sleep)
    todo = layer_plans(arch, opts.models)
    groups, skipped, doc["notices"] = arrange(r, todo)
    r.roof = layer_roofline(r, doc["notices"])
    idle, doc["idle"] = idle_phase(r) if groups else (None, None)
    measured = measure_groups(r, groups, idle, skipped)
    doc["models"] = layer_records(r, todo, skipped, measured, idle)
    stem = run_stem(doc, layer_stem(arch.name))
    path = save_or_rescue(doc, opts.out, stem) if save else None
    return doc, path
