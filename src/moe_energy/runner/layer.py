"""The LLM-layer workload: one MoE FFN layer of a published (or custom) architecture against the dense SwiGLU FFNs
matched to its total and to its active parameters, at several token counts per forward.

T = 1 is a decoding step of one sequence, T = 1024 a prefill chunk. Nothing is trained: the weights are seeded
random values and the inputs fixed-seed normal hidden states [T, d] (what an RMSNorm hands an FFN is of unit
scale), so a window's inferences are its tokens. The routing is ``--routing`` (models/routing.py), counted per
window. Models that fit one at a time but not together are built, measured and released one at a time (their
windows then interleave over the token counts only); a token count whose activations do not fit, or whose one
forward outlasts --max-forward-s at the roofline bound, is skipped for that model with the reason.

On the ranks of an expert-parallel job, ``--tokens T`` is what each rank feeds one forward: rank r's hidden states
are the (r+1)-th [max T, d] block of the fixed-seed stream, so one forward of the job holds W*T tokens; the
experts' load is every rank's pairs summed after the window, and a record's per-token figures are the job's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import memory
from ..config import OPTION_KEYS, RunOptions, foreign
from ..device import free
from ..dtypes import DTYPES
from ..energy.meter import Meter
from ..errors import ConfigError, one_line
from ..measure import roofline
from ..measure.records import WindowRecord
from ..measure.window import latency_budget
from ..memory import OutOfMemory
from ..models import fp8
from ..models.archs import Arch, RouterSpec
from ..models.counting import expected_experts_touched
from ..models.llm import MoELayer, quantize_weights
from ..models.plan import ModelPlan, plans
from ..models.routing import BenchRouter, RoutingMode, parse_routing, read_load
from ..models.strategies import AUTO_CANDIDATES
from ..storage.store import TIME_LIMIT_MARK
from .core import (
    STRATEGY_PROBE_BYTES,
    UI,
    Built,
    Point,
    Run,
    Team,
    Variant,
    check_fits,
    check_named_strategies,
)
from .core import run as run_workload

DEFAULT_TOKENS = (1, 16, 128, 1024)
ERROR_ROWS = 64  # int8 weights: the inputs (the first of the fixed stream) their output error is measured on
MAX_TOKENS = 2**20  # tokens per forward: far past any prefill chunk
INPUTS = "fixed-seed normal hidden states [T, d] (torch.randn on the CPU from --seed, then cast)"
# The seed's run options (training): a layer's documents and sweep keys leave them out (config.WORKLOAD_KEYS).
SEED_ONLY_OPTIONS = tuple(k for k in foreign("llm_layer") if k in OPTION_KEYS)


def extrapolation_note(arch: Arch) -> str:
    """What a whole-model figure leaves out: everything but the MoE FFN layers."""
    dense = f", the {arch.dense_layers} dense FFN layers" if arch.dense_layers else ""
    return (f"EXTRAPOLATED: one layer's figure x {arch.moe_layers} MoE layers; attention, the KV cache, "
            f"embeddings, norms{dense} and the LM head are left out")


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


def check_weights(arch: Arch, weights: str | None, device: torch.device) -> None:
    """Refuse, before any work, a weights format this device has no fast kernel for (fp8 off an fp8 GPU)."""
    why = fp8.problem(device, arch.d_model, arch.ffn_dim) if weights == "fp8" else None  # the routed experts'
    # widths: the shared experts' and dense FFNs' Linears are padded to the kernels' widths (quant.QLinear)
    if why:
        raise ConfigError(f"--weights fp8: {why}")


def check_layer_inputs(arch: Arch, tokens: list[int], device: torch.device, dtype: str,
                       weights: str | None = None) -> None:
    """Refuse, before allocating, hidden states that cannot fit (made in fp32 on the host, then cast), and a
    weights format the device cannot run fast."""
    check_weights(arch, weights, device)
    rows = max(tokens)
    for nbytes, where in ((4, torch.device("cpu")), (memory.BYTES[dtype], device)):
        check_fits(rows * arch.d_model * nbytes, [where], f"the hidden states ({rows:,} x {arch.d_model})",
                   "give fewer --tokens")


def check_layer_strategies(arch: Arch, strategies: tuple[str, ...], device: torch.device, dtype: str) -> None:
    """Refuse a named strategy that cannot run this layer's widths: one forward of a k-expert layer of the
    same d, I, biases and activation (a probe over 1 GiB is not tried)."""
    router = RouterSpec("topk_softmax" if arch.router_bias else "softmax_topk")
    probe = Arch(name="probe", d_model=arch.d_model, ffn_dim=arch.ffn_dim, experts=arch.top_k, top_k=arch.top_k,
                 router=router, expert_bias=arch.expert_bias, act=arch.act)
    if ModelPlan.of("moe", probe).weight_bytes(dtype) > STRATEGY_PROBE_BYTES:
        return
    x = torch.zeros(4, arch.d_model, device=device, dtype=DTYPES[dtype])  # [4, d]
    check_named_strategies(strategies, lambda s: MoELayer.from_arch(probe, dtype=dtype, device=device, strategy=s),
                           x, f"{arch.name}'s layer")


def named(strategies: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for s in strategies if s != "auto")


def params_text(n: int) -> str:
    """'11.32 B params', '402.8 M params', '12,544 params': a size that reads at a glance."""
    for div, unit in ((1e9, "B"), (1e6, "M")):
        if n >= div:
            return f"{n / div:.4g} {unit} params"
    return f"{n:,} params"


def fit_alone(plan: ModelPlan, opts: RunOptions, tokens: list[int], device: torch.device) -> str | None:
    """Why ``plan`` cannot be built here even alone (at the smallest token count), or None."""
    need = plan.memory_bytes(min(tokens), opts.dtype, strategies=named(opts.strategies) if plan.kind == "moe" else ())
    return memory.fit_problem(need, device, f"building {plan.name} of {params_text(plan.params)}")


def forward_bound_s(roof: roofline.Roofline | None, plan: ModelPlan, tokens: int, dtype: str) -> float | None:
    """Least seconds one forward of ``plan`` at ``tokens`` takes here: its roofline bound (uniform routing's
    expected experts touched), or None without a calibrated roofline."""
    if roof is None:
        return None
    a = plan.shape
    assert isinstance(a, Arch)
    touched = expected_experts_touched(a.experts, a.top_k, tokens) if plan.kind == "moe" else None
    return roof.bound_s(plan.flops_per_inference * tokens, plan.weight_bytes_read(dtype, touched) or 0.0,
                        plan.rate_key(dtype))


def forward_too_long(roof: roofline.Roofline | None, plan: ModelPlan, tokens: int, opts: RunOptions) -> str | None:
    """Why a (model, token count) is skipped under --max-forward-s, or None. The bound is the least time a
    forward can take here, so nothing skipped could have come in under the limit."""
    limit = opts.max_forward_s
    bound = forward_bound_s(roof, plan, tokens, opts.dtype) if limit is not None else None
    if limit is None or bound is None or bound <= limit:
        return None
    return (f"one forward takes at least {bound:.3g} s here (roofline bound), {TIME_LIMIT_MARK} {limit:g}; "
            "raise --max-forward-s to measure it")


def layer_stem(name: str) -> str | None:
    """The arch's name in a results file's name when it is a plain one (letters, digits, '-', '.')."""
    return name if name.replace("-", "").replace(".", "").isalnum() else None


def rank_inputs(seed: int, rows: int, d_model: int, rank: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rank ``rank``'s hidden states [rows, d]: the (rank+1)-th block of the fixed-seed normal stream, drawn on the
    host one block at a time (rank 0's are a single process's inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_model, generator=g)
    for _ in range(rank):
        x = torch.randn(rows, d_model, generator=g)
    return x.to(device=device, dtype=dtype)  # [rows, d]


def bench_router(model: nn.Module) -> BenchRouter | None:
    """The routing's counter of a built layer (inside an expert-parallel wrapper too), or None (a dense FFN)."""
    router = getattr(getattr(model, "moe", model), "router", None)
    return router if isinstance(router, BenchRouter) else None


def job_bytes_read(plan: ModelPlan, dtype: str, touched: float | None, world: int) -> float | None:
    """Weight bytes one forward of the job reads (``ModelPlan.weight_bytes_read`` in one process): on W ranks each
    reads its own copy of what it holds whole (a dense FFN; the MoE's router and shared experts), each routed
    expert is read once, by the rank that owns it. None where the one-process figure is None."""
    one = plan.weight_bytes_read(dtype, touched)
    if one is None or world == 1:
        return one
    whole = one if plan.kind == "dense" else plan.weight_bytes_read(dtype, 0)  # router + shared experts
    assert whole is not None
    return one + (world - 1) * whole


def load_fields(router: BenchRouter, plan: ModelPlan, dtype: str, tokens: int, team: Team) -> dict[str, Any]:
    """The window's routing load, counted on the device (one sync: read it after the window; every rank's pairs
    summed on a job's), and the weight bytes each of its forwards read: the fixed inputs route every forward of
    a window alike."""
    team.sum_(router.expert_pairs)  # [E] in place: reset before the next window
    load = read_load(router, tokens)
    if load is None:
        return {"experts_touched": None, "weight_bytes_read_per_forward": None}
    return {**load.as_dict(),
            "weight_bytes_read_per_forward": job_bytes_read(plan, dtype, load.experts_touched, team.world)}


def _median_of(windows: list[WindowRecord], key: str) -> float | None:
    vals = [w[key] for w in windows if not w.get("failed") and w.get(key) is not None]  # type: ignore[literal-required]
    return statistics.median(vals) if vals else None


@dataclass
class Layer:
    """The LLM-layer workload (``core.Workload``): one MoE layer and its dense FFNs at each token count."""

    arch: Arch
    tokens: list[int]
    routing: RoutingMode
    weights: str | None = None  # every model's weights stored as "int8" (--weights); None, in the dtype
    family = "llm_layer"
    trains = False
    inputs: Tensor | None = field(default=None, repr=False)  # [max T, d] on the device in the bench dtype
    output_error: dict[str, float] = field(default_factory=dict, repr=False)  # int8 weights: per model

    @classmethod
    def of(cls, arch: Arch, tokens: Any, routing: str | RoutingMode, weights: str | None = None) -> Layer:
        """The workload, its token counts and routing checked (one-line ConfigErrors)."""
        if not isinstance(arch, Arch):
            raise TypeError(f"run_llm: arch={arch!r} must be an Arch (models.archs.get_arch or custom_arch)")
        mode = routing if isinstance(routing, RoutingMode) else parse_routing(routing)
        return cls(arch, check_tokens(tokens), mode, weights)

    @property
    def experts(self) -> int:
        return self.arch.experts

    def check(self, opts: RunOptions, device: torch.device, strategies: tuple[str, ...]) -> None:
        check_layer_inputs(self.arch, self.tokens, device, opts.dtype, opts.weights)
        if "moe" in opts.models:
            check_layer_strategies(self.arch, strategies, device, opts.dtype)

    def load(self, opts: RunOptions, device: torch.device, dtype: torch.dtype, rank: int) -> None:
        self.inputs = rank_inputs(opts.seed, max(self.tokens), self.arch.d_model, rank, device, dtype)

    def identity(self) -> tuple[dict[str, Any], str]:
        return {"arch": asdict(self.arch), "tokens": self.tokens, "routing": self.routing.text}, "-"

    def document(self, opts: RunOptions) -> dict[str, Any]:
        a = self.arch
        return {"spec": asdict(a), "options": self.options(opts),
                "dataset": {"source": INPUTS, "tokens": self.tokens, "d_model": a.d_model, "seed": opts.seed},
                "family": self.family, "arch": asdict(a), "routing": self.routing.as_dict(), "tokens": self.tokens,
                "extrapolation": extrapolation_note(a)}

    def plans(self, models: Sequence[str]) -> list[ModelPlan]:
        return plans(self.arch, models, self.weights)

    def row_strategies(self, plan: ModelPlan, strategies: tuple[str, ...]) -> tuple[str | None, ...]:
        return strategies if plan.kind == "moe" else (None,)

    def points(self) -> list[Point]:
        return [Point(t, f"@T={t}", {"tokens_per_forward": t}) for t in self.tokens]

    def fit_problem(self, plan: ModelPlan, opts: RunOptions, device: torch.device) -> str | None:
        return fit_alone(plan, opts, self.tokens, device)

    def together_problem(self, plans: list[ModelPlan], opts: RunOptions, device: torch.device) -> str | None:
        """Why ``plans`` cannot all be held at once (weights of all, activations of the largest), or None."""
        if len(plans) < 2:
            return None
        need = sum(p.weight_bytes(opts.dtype) for p in plans) + memory.OVERHEAD_BYTES \
            + max(p.activation_bytes(max(self.tokens), named(opts.strategies)) for p in plans)
        return memory.fit_problem(need, device, f"holding {', '.join(p.name for p in plans)} together")

    def build(self, r: Run, plan: ModelPlan) -> Built:
        """``plan``'s model on the device (memory checked again first), its router counting the routing's load;
        OutOfMemory, released, if it cannot fit."""
        problem = fit_alone(plan, r.opts, self.tokens, r.device)
        if problem is not None:
            raise OutOfMemory(problem)  # nothing was allocated
        failure: str | None = None
        try:
            r.ui.info(f"building {plan.name} of {params_text(plan.params)}")
            model = plan.quantized(None).build(r.device, r.dtype, r.opts.seed).eval()
            if plan.weights is not None:
                assert self.inputs is not None
                self.output_error[plan.name] = quantize_measured(model, plan.weights, self.inputs[:ERROR_ROWS])
            if isinstance(model, MoELayer):
                model.router = BenchRouter(model.router, self.arch.experts, self.arch.top_k, self.routing,
                                           r.opts.seed, r.team.rank, r.team.world).to(r.device)
            return Built(plan, model)
        except Exception as e:
            if not memory.is_oom(e):
                raise
            failure = one_line(e, 120)
        model = None  # outside the except block: the traceback's tensors are gone
        free(r.device)
        need = plan.memory_bytes(min(self.tokens), r.opts.dtype)
        raise OutOfMemory(f"{memory.describe_need(need, r.device, f'building {plan.name}')}: {failure}")

    def variant(self, r: Run, built: Built, point: Point, label: str, strategy: str | None
                ) -> tuple[Variant, str | None]:
        """The row at ``point.rows`` tokens per forward (inferences = tokens): the model stays on the device, auto
        picks from what fits at this T, the routing's load is zeroed before each window and read after it."""
        assert self.inputs is not None
        plan, T, W = built.plan, point.rows, r.team.world
        router = bench_router(built.model)
        need = plan.activation_bytes(W * T if router is not None else T, named((strategy,)) if strategy else ())
        v = Variant(label, built.model, strategy, self.inputs[:T], plan.flops_per_inference, need, parked=False,
                    head=dict(point.head), auto_candidates=self._candidates(r, plan, T) if plan.kind == "moe" else None,
                    before_window=router.reset_load if router is not None else None,
                    after_window=partial(load_fields, router, plan, r.opts.dtype, W * T, r.team)
                    if router is not None else None)
        why = memory.fit_problem(need, r.device, f"measuring {label}") or forward_too_long(r.roof, plan, T, r.opts)
        return v, why

    def _candidates(self, r: Run, plan: ModelPlan, tokens: int) -> tuple[str, ...]:
        """auto's candidates at this token count: dense_experts only if its activations fit (prepare keeps, under
        --compile, only those torch.compile can trace)."""
        dense = plan.activation_bytes(tokens, ("dense_experts",))
        if memory.fit_problem(dense, r.device, "dense_experts") is not None:
            return tuple(c for c in AUTO_CANDIDATES if c != "dense_experts")
        return AUTO_CANDIDATES

    def record(self, r: Run, plan: ModelPlan, point: Point, rec: dict[str, Any]) -> dict[str, Any]:
        """The per-token fields (None where not measured) of the job's forward (W*T tokens; ``tokens_per_forward``
        each rank's T) and the labelled whole-model extrapolation."""
        a, windows, T, W = self.arch, rec.get("windows") or [], point.rows, r.team.world
        tokens = W * T
        tps, tpj = rec.get("inferences_per_second"), rec.get("inferences_per_joule")
        moe = plan.kind == "moe"
        touched = _median_of(windows, "experts_touched") if moe else None
        out: dict[str, Any] = {
            "tokens_per_forward": T, "arch": a.name, "routing": self.routing.text, "tokens_per_second": tps,
            "tokens_per_joule": tpj, "joules_per_1k_tokens": 1000 / tpj if tpj else None, "experts_touched": touched,
            "experts_touched_if_uniform": expected_experts_touched(a.experts, a.top_k, tokens) if moe else None,
            "expert_load_max_over_mean": _median_of(windows, "expert_load_max_over_mean") if moe else None,
            "weight_bytes_read_per_forward": job_bytes_read(plan, r.opts.dtype, touched, W)
            if rec["status"] == "measured" else None,
            "weights": plan.weights, "weights_output_error": self.output_error.get(plan.name),
            "model_extrapolated": None,
        }
        if tps:
            out["model_extrapolated"] = {"moe_layers": a.moe_layers, "tokens_per_second": tps / a.moe_layers,
                                         "joules_per_1k_tokens": out["joules_per_1k_tokens"] * a.moe_layers
                                         if tpj else None, "label": extrapolation_note(a)}
        if "parallel" in rec:
            rec["parallel"]["tokens_per_forward_job"] = tokens
        return out

    def bytes_read(self, plan: ModelPlan, point: Point, rec: dict[str, Any], dtype: str) -> float:
        return rec["weight_bytes_read_per_forward"] or 0.0

    def stem(self) -> str | None:
        return layer_stem(self.arch.name)

    # -- what a sweep reads of a point of this workload, before it runs --------------------------------------
    sweep_oom = "skip"  # a model that cannot fit is a skipped record inside the point; the others are measured

    def options(self, opts: RunOptions) -> dict[str, Any]:
        """The options a layer's record and sweep key hold: not the seed's training ones (nothing is trained)."""
        return {k: v for k, v in opts.as_dict().items() if k not in SEED_ONLY_OPTIONS}

    def key_fields(self) -> dict[str, Any]:
        return {"family": self.family, "tokens": list(self.tokens), "routing": self.routing.text}

    def work_flops(self, opts: RunOptions) -> float:
        """FLOPs of the forwards that can outlast a window (a prefill chunk of a big layer takes seconds on a CPU):
        warm-up, probe and one per window, at every token count."""
        per_token = sum(pl.flops_per_inference * (len(opts.strategies) if pl.kind == "moe" else 1)
                        for pl in self.plans(opts.models))
        return float(per_token * sum(self.tokens) * (opts.repeats + 2))

    def seconds_floor(self, opts: RunOptions, roof: roofline.Roofline | None) -> float | None:
        """Least seconds the point can take here (None when not calibrated): per window of each (model, token
        count) not skipped by --max-forward-s, its warm-up, window and latency pass, each at least one forward at
        the roofline bound, and the rest before it; plus the idle reading."""
        if roof is None:
            return None
        total = opts.idle_seconds + opts.cooldown if opts.idle_seconds > 0 else 0.0  # the idle reading, rest first
        for pl in self.plans(opts.models):
            n = len(opts.strategies) if pl.kind == "moe" else 1
            for t in self.tokens:
                b = forward_bound_s(roof, pl, t, opts.dtype)
                if b is None:
                    return None
                if forward_too_long(roof, pl, t, opts) is None:
                    total += n * opts.repeats * (max(opts.warmup, b) + max(opts.duration, b)
                                                 + max(latency_budget(opts.duration), b) + opts.cooldown)
        return total

    def point_problem(self, opts: RunOptions, device: torch.device) -> str | None:
        """Why the point cannot run here: its MoE layer (or every model) cannot fit alone. A dense FFN that alone
        cannot fit is skipped by the run itself, with its reason, and the rest measured."""
        problems = {pl.name: why for pl in self.plans(opts.models)
                    if (why := fit_alone(pl, opts, self.tokens, device)) is not None}
        if "moe" in problems or (problems and len(problems) == len(opts.models)):
            return problems.get("moe") or next(iter(problems.values()))
        return None

    def need_bytes(self, opts: RunOptions) -> int:
        return max(pl.memory_bytes(max(self.tokens), opts.dtype) for pl in self.plans(opts.models))


def quantize_measured(model: nn.Module, weights: str, x: Tensor) -> float:
    """``model`` (an MoE layer or a dense FFN in the dtype) stored as ``weights``, in place, and what that costs in
    accuracy: ||y_q - y|| / ||y|| on ``x`` [n, d] (an MoE layer through grouped: int8's own kernels on a CPU)."""
    strategy = getattr(model, "strategy", None)
    if isinstance(model, MoELayer):
        model.strategy = "grouped"
    with torch.no_grad():
        ref = model(x).float()  # [n, d]
        quantize_weights(model, weights)
        err = (model(x).float() - ref).norm() / ref.norm().clamp_min(1e-30)
    if strategy is not None:
        model.strategy = strategy
    return float(err)


def run_llm(arch: Arch, opts: RunOptions, tokens: list[int], routing: str | RoutingMode, meter: Meter,
            ui: UI | None = None, save: bool = True, sleep: Callable[[float], None] = time.sleep
            ) -> tuple[dict, Path | None]:
    """Measure ``arch``'s MoE layer and its matched dense FFNs at each token count, in shuffled, repeated
    windows; one record per (model, token count) (``core.run`` on the layer's workload, in this process)."""
    doc, path = run_workload(Layer.of(arch, tokens, routing, opts.weights), opts, Team(meter), ui, save, sleep)
    assert doc is not None
    return doc, path
