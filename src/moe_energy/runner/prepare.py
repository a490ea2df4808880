"""Whole-forward preparation for a benchmark window, applied alike to dense and MoE models.

``prepare`` casts (bf16/fp16), picks an MoE's strategy (and, where the module can re-store them, its
weight layout) by measuring them, and optionally compiles (``torch.compile``; CUDA graphs via
mode="reduce-overhead" on a GPU). Everything slow (probes, compilation, graph capture) happens here,
so it is timed and reported apart from the measured window and never inside it.

``auto``'s timing probe lives here too (``probe``), installed into ``models.strategies`` on import: the models
choose from the cached timings, they never time anything themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..device import device_sync, sync
from ..dtypes import dtype_name, dtype_of
from ..errors import ConfigError, described
from ..measure.timing import time_interleaved, time_one
from ..models.experts import ExpertFamily
from ..models.moe import LAYOUTS, MoE, StrategyHost
from ..models.strategies import AUTO_CANDIDATES, GROUPED_MM, STRATEGIES, SYNCING, AutoChoice, auto_key, set_probe

PROBE_PRUNE = 3.0  # a candidate whose best call is over 3x the fastest's is not called again
PROBE_MAX_S = 5.0  # rounds of calls that take seconds each (a prefill chunk on a CPU) end after this
HOPELESS_FLOPS = 1e11  # every expert on every token past this: not tried when it is 4x (or more) the work
HOPELESS_RATIO = 4


def hopeless(x: Tensor, expert_idx: Tensor, ex: ExpertFamily, candidates: Sequence[str]) -> dict[str, str]:
    """Candidates not worth one call, with the reason: dense_experts when it computes every expert on every
    token at E/k >= 4 times the routed work and that work is large enough (>= 1e11 FLOPs: ~0.5 s on a CPU,
    far past any launch overhead it saves). One call of it at a prefill chunk took minutes."""
    t, k, e = x.shape[0], expert_idx.shape[1], ex.weights[0].shape[0]
    flops = 2 * t * e * sum(w[0].numel() for w in ex.weights)
    if "dense_experts" in candidates and e >= HOPELESS_RATIO * k and flops >= HOPELESS_FLOPS:
        return {"dense_experts": f"not tried: every expert on every token is {e / k:g}x the routed work "
                                 f"({flops:.3g} FLOPs)"}
    return {}


def probe(
    x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily, candidates: Sequence[str],
    budget_s: float = 0.5, min_rounds: int = 5, max_rounds: int = 40,
) -> AutoChoice:
    """Time each candidate on this very batch, interleaved round by round so that background load hits all
    of them alike; the fastest round of each decides (noise from other work only ever adds time)."""

    def call(name: str) -> Callable[[], Tensor]:
        return lambda: STRATEGIES[name](x, expert_idx, gate_w, ex)  # an unknown name fails as a candidate

    errors = hopeless(x, expert_idx, ex, candidates)  # and e.g. grouped_mm without a kernel for this device
    times = time_interleaved({n: call(n) for n in candidates if n not in errors}, sync=device_sync(x.device),
                             min_rounds=min_rounds, max_rounds=max_rounds, budget_s=budget_s, errors=errors,
                             max_s=PROBE_MAX_S, prune=PROBE_PRUNE)
    if not times:
        raise RuntimeError(f"no MoE strategy runs here: {errors}")
    probe_ms = {n: t.median_ms for n, t in times.items()}
    best_ms = {n: t.best_ms for n, t in times.items()}
    name = min(best_ms, key=best_ms.__getitem__)
    return AutoChoice(name, probe_ms, best_ms, errors, auto_key(x, expert_idx, ex, candidates))


set_probe(probe)


def compile_candidates(dtype: torch.dtype) -> tuple[str, ...]:
    """Strategies torch.compile can capture: grouped_mm's meta kernel accepts bf16 only (torch 2.13); the loops
    that read device values on the host (active_loop) break any graph."""
    return tuple(s for s in AUTO_CANDIDATES if (s not in GROUPED_MM or dtype == torch.bfloat16) and s not in SYNCING)


@torch.inference_mode()
def best_ms(model: nn.Module, x: Tensor, reps: int = 7) -> float:
    """Fastest of ``reps`` synced forwards, in ms, after one untimed call (other work only adds time)."""
    return time_one(lambda: model(x), sync=device_sync(x.device), min_rounds=reps, max_rounds=reps).best_ms


@torch.inference_mode()
def choose_layout(moe: MoE, example: Tensor) -> tuple[str, dict[str, float]]:
    """Try each weight layout with the MoE's strategy (auto: its best candidate); keep the fastest.

    Returns (layout, fastest ms per layout). The MoE is left in the winning layout.
    """
    ms: dict[str, float] = {}
    for layout in LAYOUTS:
        moe.set_layout(layout)
        if moe.strategy == "auto":
            moe(example)  # probes (or finds cached) the candidates for this layout
            assert moe.auto_choice is not None
            ms[layout] = min(moe.auto_choice.best_ms.values())
        else:
            ms[layout] = best_ms(moe, example)
    best = min(ms, key=ms.__getitem__)
    moe.set_layout(best)
    if moe.strategy == "auto":
        moe(example)  # auto_choice now describes the kept layout (a cache hit)
    return best, ms


def prepare(
    model: nn.Module,
    *,
    dtype: str | torch.dtype,
    compile: bool,
    device: str | torch.device,
    example: Tensor | None = None,
    layout: str = "auto",
) -> tuple[nn.Module, dict]:
    """Make ``model`` ready for a benchmark window; returns (module to call, facts for the results).

    ``example`` is a batch like the window's (default: 128 random rows); probes and compilation run on it.
    ``layout`` (the seed's MoE only): "auto" measures both weight layouts, "keep" leaves them, or one of LAYOUTS.
    The facts: dtype, compile (bool, mode, seconds), and for an MoE the strategy asked for, the one
    that runs, auto's probe timings, the weight layout and its probe timings (the seed's MoE), the seconds
    all of it took.
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    dt = dtype_of(dtype)
    model.to(device=device, dtype=dt).eval()
    if example is None:
        in_dim = getattr(model, "input_dim", None)
        if in_dim is None:
            raise ValueError("prepare needs an example batch for a model without .input_dim")
        example = torch.randn(128, in_dim)
    example = example.to(device=device, dtype=dt)
    info: dict = {"dtype": dtype_name(dt), "device": str(device), "compile": bool(compile), "compile_mode": None,
                  "compile_s": None}
    if isinstance(model, StrategyHost):
        info.update(_prepare_host(model, example, dt, compile, layout))
    info["prepare_s"] = time.perf_counter() - t_start
    return _compiled(model, example, device, info) if compile else (model, info)


def _prepare_host(moe: StrategyHost, example: Tensor, dt: torch.dtype, compile: bool, layout: str) -> dict:
    """Any strategy-switching MoE (the seed's MoE, models/llm.MoELayer): its weight layout where it can
    re-store its weights, then one forward on ``example`` outside any window (auto's probe, and any
    first-use host work such as a fixed routing's assignment); the strategy facts of it."""
    info: dict = {}
    if compile and moe.strategy == "auto":  # only what torch.compile can trace, of the host's own candidates
        allowed = compile_candidates(dt)
        moe.auto_candidates = tuple(c for c in moe.auto_candidates if c in allowed)
    if isinstance(moe, MoE):  # the one host with ``set_layout`` (MoELayer keeps transformers' storage)
        if layout == "auto":
            info["weight_layout"], info["layout_probe_ms"] = choose_layout(moe, example)
        else:
            if layout != "keep":
                moe.set_layout(layout)
            info["weight_layout"], info["layout_probe_ms"] = moe.layout, None
    with torch.inference_mode():
        moe(example)  # type: ignore[operator]  # example [B, in]; auto: a cache hit after choose_layout
    requested = moe.strategy
    facts = moe.strategy_info()  # one sync, outside the windows
    info.update(strategy=requested, resolved_strategy=facts["resolved_strategy"],
                auto_probe_ms=facts["auto_probe_ms"], auto_probe_best_ms=facts["auto_probe_best_ms"],
                auto_unavailable=facts["auto_unavailable"])
    if compile and requested == "auto":
        moe.strategy = facts["resolved_strategy"]  # a graph needs one fixed strategy, not a probe
    return info


def _compiled(model: nn.Module, example: Tensor, device: torch.device, info: dict) -> tuple[nn.Module, dict]:
    """``torch.compile`` (CUDA graphs on a GPU: no per-kernel launch cost), warmed up on ``example``."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    info["compile_mode"] = mode or "default"
    t0 = time.perf_counter()
    try:
        fast = torch.compile(model, mode=mode, dynamic=False)
        with torch.inference_mode():
            for _ in range(3):  # compile, then (reduce-overhead) record the graph, then replay it once
                fast(example)
        sync(device)
    except Exception as e:  # no C++ compiler, no Triton, an op inductor cannot lower...
        raise ConfigError(f"--compile: torch.compile failed here ({described(e, 200)}); "
                          "run without --compile") from None
    info["compile_s"] = time.perf_counter() - t0
    return fast, info
