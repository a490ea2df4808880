"""A new host's five-minute check: meters, every MoE strategy's answer, energy windows, idle, trace vs counter.

Each check is run on its own: one that raises is a failed check, never the end of the self-check. The
verdict is ``OK`` only if no check failed; an estimate meter is said plainly, and is not a failure on a
host without counters (it is on a GPU run, where the GPU's own counter should be there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from ..api import benchmark, figure_text, meter_facts
from ..config import PRESETS, ModelSpec
from ..device import device_sync
from ..dtypes import dtype_name
from ..energy.idle import IdlePower, measure_idle
from ..energy.meter import Meter, counter_traced, meter_info
from ..energy.select import MeterStatus, auto_meter, survey
from ..errors import ConfigError, described
from ..measure.environment import describe
from ..measure.window import MIN_TRUSTED_SECONDS
from ..models.moe import MoE
from ..models.plan import ModelPlan
from ..models.strategies import STRATEGIES, ExpertStack
from ..storage.fileio import now_utc

SCHEMA = "moe-energy/selfcheck"
SCHEMA_VERSION = 1

# Strategy outputs against a float64 per-token reference (the tests' tolerances): fp32 within 1e-4
# absolute; bf16 keeps 8 mantissa bits, so |y - ref| <= 1e-2 + 1e-2 |ref| (measured ~2e-3 on outputs ~0.3).
FP32_ATOL = 1e-4
BF16_ATOL = BF16_RTOL = 1e-2
# Test-sized MoE: every row stride a multiple of 16 bytes in fp32 and bf16 (grouped_mm's requirement).
CHECK_SHAPE = ModelSpec(experts=4, hidden=32, layers=2, top_k=2, input_dim=32, classes=8)
CHECK_TOKENS = 40
ROUTINGS = ("random", "some_idle", "one_takes_all")
# Trace integral vs the counter, per device. Wider than Measurement.cross_check's 5 % flag: GPU power
# sensors average over up to a second, so a window's ramp at each edge moves the integral by a few %.
TRACE_AGREEMENT = 0.10
WINDOW_BATCH = 128
# The energy windows: (check name, model plan, MoE strategy) on the small preset.
WINDOW_MODELS = (("window dense_total (small)", "dense_total", None), ("window moe[auto] (small)", "moe", "auto"))


@dataclass
class Check:
    group: str  # meters | strategies | energy
    name: str
    status: str  # ok | FAIL | info (reported, not judged) | skip
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass
class SelfCheckReport:
    device: str
    checks: list[Check]
    meter: dict[str, Any]
    meters: list[dict[str, Any]]
    environment: dict[str, Any]
    options: dict[str, Any]
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def verdict(self) -> str:
        bad = [f"{c.name}" for c in self.checks if c.failed]
        return "OK" if not bad else "PROBLEMS: " + "; ".join(bad)

    def as_doc(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "created_utc": now_utc(),
            "environment": self.environment, "options": self.options, "energy_meter": self.meter,
            "meters": self.meters, "checks": [asdict(c) for c in self.checks],
            "passed": self.passed, "verdict": self.verdict, "elapsed_s": self.elapsed_s,
        }


def _guard(group: str, name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run one check; one that raises is a failed check (the others still run), never the self-check's end."""
    try:
        out = fn()
    except Exception as e:
        return [Check(group, name, "FAIL", f"raised {described(e, 200)}")]
    return out if isinstance(out, list) else [out]


# --- meters ---------------------------------------------------------------------------------------


def check_meters(device: torch.device, meter: Meter, statuses: list[MeterStatus]) -> list[Check]:
    """Every meter's availability (info), and whether auto's pick can measure this device (a CUDA run needs
    the GPU's own counter)."""
    rows = []
    for s in statuses:
        how = f"{s.method}, covers {', '.join(s.devices) or '-'}" if s.available else f"no ({s.kind})"
        rows.append(Check("meters", f"meter {s.name}", "info", f"{how}{'; ' + s.reason if s.reason else ''}",
                          asdict(s)))
    notice = getattr(meter, "notice", None)
    devices = list(getattr(meter, "devices", []))
    detail = f"auto picks {meter.name} ({meter.method.upper() if meter.method == 'estimate' else meter.method})" \
             f", covers {', '.join(devices) or 'nothing'}" + (f"; {notice}" if notice else "")
    status = "ok"
    if device.type == "cuda" and not any(d.startswith("gpu:") for d in devices):
        status, detail = "FAIL", f"no GPU energy counter for a CUDA run: {detail}"
    elif meter.method == "none":
        status = "FAIL"
    rows.append(Check("meters", "auto meter", status, detail, meter_info(meter)))
    return rows


# --- strategy equivalence -------------------------------------------------------------------------


def reference(x: torch.Tensor, idx: torch.Tensor, gate_w: torch.Tensor, ex: ExpertStack) -> torch.Tensor:
    """The MoE's definition, one token and one chosen expert at a time, in float64 on the CPU."""
    ex64 = ExpertStack(tuple(w.detach().double().cpu() for w in ex.weights),
                       tuple(b.detach().double().cpu() for b in ex.biases))
    x, idx, gate_w = x.double().cpu(), idx.cpu(), gate_w.double().cpu()
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(ex64.out_dim, dtype=torch.float64)
        for j in range(idx.shape[1]):
            y += gate_w[t, j] * ex64.run_one(int(idx[t, j]), x[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows)  # [T, out]


def routing(kind: str, T: int, E: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_idx [T, k] (distinct experts per token) and gate weights [T, k] for a named pattern."""
    if kind == "random":
        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    elif kind == "some_idle":  # only experts 0..k get tokens
        idx = torch.stack([torch.randperm(k + 1, generator=gen)[:k] for _ in range(T)])
    elif kind == "one_takes_all":  # the last expert is every token's first choice
        rest = torch.stack([torch.randperm(E - 1, generator=gen)[: k - 1] for _ in range(T)])
        idx = torch.cat([torch.full((T, 1), E - 1), rest], dim=1)
    else:
        raise ValueError(kind)
    return idx, torch.randn(T, k, generator=gen).softmax(-1)


def bf16_supported(device: torch.device) -> tuple[bool, str]:
    """(True, "") if a bf16 matmul runs here; else (False, why): bf16 checks are then skipped, not failed."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return False, "this GPU has no bf16"
    try:
        a = torch.ones(4, 4, device=device, dtype=torch.bfloat16)
        (a @ a).sum().item()
    except Exception as e:
        return False, f"bf16 matmul fails here ({described(e, 200)})"
    return True, ""


def check_strategy(name: str, device: torch.device, dtypes: list[torch.dtype]) -> Check:
    """``name`` on the device, every dtype and routing, against the float64 reference."""
    s = CHECK_SHAPE
    torch.manual_seed(0)
    moe = ModelPlan.of("moe", s).build(strategy=name).eval()
    assert isinstance(moe, MoE)
    E, k = s.experts, s.top_k
    gen = torch.Generator().manual_seed(1)
    cases = []
    for kind in ROUTINGS:
        x = torch.randn(CHECK_TOKENS, s.input_dim, generator=gen)
        idx, gate_w = routing(kind, CHECK_TOKENS, E, k, gen)
        cases.append((kind, x, idx, gate_w, reference(x, idx, gate_w, moe.stack())))
    worst: dict[str, float] = {}
    problems: list[str] = []
    for dt in dtypes:
        dname = dtype_name(dt)
        m = moe.to(device=device, dtype=dt)
        # capacity E/k: no expert can overflow, so padded_capacity must be exact too
        ex = m.stack()._replace(capacity_factor=E / k)
        worst[dname] = 0.0
        for kind, x, idx, gate_w, ref in cases:
            with torch.inference_mode():
                y = STRATEGIES[name](x.to(device, dt), idx.to(device), gate_w.to(device, dt), ex)
            if tuple(y.shape) != tuple(ref.shape) or y.dtype != dt:
                problems.append(f"{dname} {kind}: got {tuple(y.shape)} {y.dtype}, want {tuple(ref.shape)} {dt}")
                continue
            err = (y.double().cpu() - ref).abs()
            if not bool(torch.isfinite(err).all()):
                problems.append(f"{dname} {kind}: non-finite output")
                continue
            worst[dname] = max(worst[dname], float(err.max()))
            bound = FP32_ATOL if dt == torch.float32 else BF16_ATOL + BF16_RTOL * ref.abs()
            if bool((err > bound).any()):
                problems.append(f"{dname} {kind}: max error {float(err.max()):.2e} over tolerance")
    detail = ", ".join(f"{d} max err {e:.1e}" for d, e in worst.items()) + f" over {len(ROUTINGS)} routings"
    return Check("strategies", f"strategy {name}", "FAIL" if problems else "ok", "; ".join(problems) or detail,
                 {"max_abs_error": worst})


def _shape() -> str:
    s = CHECK_SHAPE
    return f"E={s.experts} H={s.hidden} L={s.layers} k={s.top_k} in={s.input_dim} out={s.classes}"


def check_strategies(device: torch.device) -> list[Check]:
    """Every registered strategy against the reference, in fp32 and (where it runs) bf16."""
    dtypes = [torch.float32]
    ok, why = bf16_supported(device)
    out = []
    if ok:
        dtypes.append(torch.bfloat16)
    else:
        out.append(Check("strategies", "bf16", "skip", why))
    tol = f"fp32 |err| <= {FP32_ATOL:g}" + (f", bf16 |err| <= {BF16_ATOL:g} + {BF16_RTOL:g}|ref|" if ok else "")
    out.append(Check("strategies", "tolerance", "info",
                     f"{tol} vs a float64 per-token reference; MoE {_shape()}, {CHECK_TOKENS} tokens"))
    for name in STRATEGIES:
        out += _guard("strategies", f"strategy {name}", lambda name=name: check_strategy(name, device, dtypes))
    return out


# --- energy ---------------------------------------------------------------------------------------


def check_idle(meter: Meter, seconds: float, sync: Callable[[], None]) -> tuple[Check, IdlePower | None]:
    """The idle window: power must be measured and possible (finite, not negative) on every device."""
    idle = measure_idle(meter, seconds, sync)
    if idle is None:
        return Check("energy", "idle window", "skip", "--idle-seconds 0"), None
    label = " (ESTIMATE)" if idle.method == "estimate" else f" ({idle.method})"
    pw = idle.power_by_device_w
    if pw is None:
        return Check("energy", "idle window", "FAIL", f"{idle.seconds:.1f} s: idle power not measured",
                     idle.as_dict()), idle
    bad = {d: w for d, w in pw.items() if not (math.isfinite(w) and w >= 0)}
    detail = f"{idle.seconds:.1f} s, {figure_text(idle.power_w, 'W')}{label}"
    if bad:
        return Check("energy", "idle window", "FAIL", f"{detail}; impossible power {bad}", idle.as_dict()), idle
    return Check("energy", "idle window", "ok", detail, idle.as_dict()), idle


def check_window(label: str, model: torch.nn.Module, x: torch.Tensor, meter: Meter, seconds: float,
                 sync: Callable[[], None]) -> Check:
    """One busy window through the API (``measure.window.measure``, ``measure.records.summarize``): it must
    count energy on every device and give inferences/J."""
    res = benchmark(model, x, duration=seconds, repeats=1, meter=meter, warmup=min(2.0, seconds / 5), sync=sync)
    w = res.windows[0]
    d = res.to_dict()
    if isinstance(model, MoE):
        d["strategy_info"] = model.strategy_info()
    problems = []
    by_dev = w["energy_by_device_j"]
    if by_dev is None:
        problems.append("energy not measured")
    else:
        bad = {dev: j for dev, j in by_dev.items() if not (math.isfinite(j) and j > 0)}
        if bad:
            problems.append(f"no energy counted on {', '.join(bad)}")
    if res.inferences_per_joule is None:
        problems.append(f"no inferences/J ({w['inferences_per_joule_reason']})")
    method = "ESTIMATE" if res.is_estimate else res.method
    detail = (f"{w['window_s']:.1f} s, {w['inferences']:,} inferences, {figure_text(w['energy_j'], 'J')}, "
              f"{figure_text(w['average_power_w'], 'W')}, {figure_text(res.inferences_per_joule, 'inferences/J')}, "
              f"{figure_text(res.inferences_per_second, 'inferences/s')} ({method})")
    if isinstance(model, MoE) and d["strategy_info"]["resolved_strategy"] != model.strategy:
        detail += f"; auto chose {d['strategy_info']['resolved_strategy']}"
    if problems:
        return Check("energy", label, "FAIL", "; ".join(problems) + f" [{detail}]", d)
    return Check("energy", label, "ok", detail, d)


def check_trace(windows: list[Check], from_counter: Collection[str] = ()) -> Check:
    """Each busy window's power trace, integrated, against its counter's joules, per device.

    Only a power sensor (a GPU's) makes this a check of the counter. The devices ``from_counter`` have none (RAPL,
    Apple's SoC, the estimate: ``counter_traced``): their trace is the counter's own reads, whose integral meets the
    edges' difference by construction unless the sampler lost reads or ran unevenly while power changed. The check
    says so there, and still fails when the two disagree: the stored trace then misdraws the window."""
    diffs: dict[str, float] = {}
    own: set[str] = set()
    methods = set()
    for c in windows:
        w = (c.data.get("windows") or [{}])[0]
        te, ce = w.get("trace_energy_j"), w.get("energy_by_device_j")
        if not te or not ce:
            continue
        for dev, tj in te.items():
            cj, method = ce.get(dev), w["method_by_device"].get(dev, w["energy_method"])
            if cj is None or cj <= 0 or method == "sampled":  # sampled: the energy is the trace's own integral
                continue
            methods.add(method)
            diffs[f"{c.name} {dev}"] = (tj - cj) / cj
            if dev in from_counter:
                own.add(dev)
    if not diffs:
        return Check("energy", "trace vs counter", "skip", "no window has both a power trace and a counter reading "
                     "(a GPU without an energy counter has only its sampled power)")
    worst = max(diffs, key=lambda k: abs(diffs[k]))
    detail = f"worst {worst} {diffs[worst]:+.1%} (tolerance {TRACE_AGREEMENT:.0%}) over {len(diffs)} device-window(s)"
    if own:
        detail += (f"; {'ESTIMATE: ' if 'estimate' in methods else ''}{', '.join(sorted(own))}: no power sensor, the "
                   "trace is the counter's own reads: this checks the sampler's reads against the window's edges, "
                   "not the counter")
    status = "ok" if abs(diffs[worst]) <= TRACE_AGREEMENT else "FAIL"
    return Check("energy", "trace vs counter", status, detail,
                 {"relative_difference": diffs, "counter_traced": sorted(own)})


def _window(label: str, plan: ModelPlan, strategy: str | None, x: torch.Tensor, meter: Meter, seconds: float,
            sync: Callable[[], None]) -> Check:
    """Build ``plan``'s model (an MoE running ``strategy``) on the batch's device, then check one window of it."""
    model = plan.build(strategy=strategy)
    return check_window(label, model.to(x.device), x, meter, seconds, sync)


def check_energy(device: torch.device, meter: Meter, seconds: float, idle_seconds: float,
                 on_phase: Callable[[str], None]) -> list[Check]:
    """The idle window, a dense and an MoE window on the small preset, then their traces against the counter."""
    sync = device_sync(device)
    on_phase(f"idle window ({idle_seconds:g} s)")
    out: list[Check] = []
    out += _guard("energy", "idle window", lambda: check_idle(meter, idle_seconds, sync)[0])
    torch.manual_seed(0)
    spec = PRESETS["small"]
    x = torch.randn(WINDOW_BATCH, spec.input_dim, device=device)
    windows: list[Check] = []
    for label, name, strategy in WINDOW_MODELS:
        on_phase(f"{label}: {seconds:g} s")
        plan = ModelPlan.of(name, spec)
        windows += _guard("energy", label, partial(_window, label, plan, strategy, x, meter, seconds, sync))
    out += windows
    out += _guard("energy", "trace vs counter",
                  lambda: check_trace([c for c in windows if not c.failed], counter_traced(meter)))
    return out


def run_selfcheck(device: torch.device, seconds: float = 10.0, idle_seconds: float = 3.0,
                  on_phase: Callable[[str], None] = lambda msg: None) -> SelfCheckReport:
    """Every check on ``device``; about 2 x (``seconds`` + 3 s) + ``idle_seconds`` + the strategy checks.

    Windows shorter than ``MIN_TRUSTED_SECONDS`` are refused: a counter's coarse updates would make the
    verdict a coin toss (PROBLEMS on one run, OK on the next), and a verdict must be stable.
    """
    if not seconds >= MIN_TRUSTED_SECONDS or not (idle_seconds == 0 or idle_seconds >= MIN_TRUSTED_SECONDS):
        flag, v = ("--seconds", seconds) if not seconds >= MIN_TRUSTED_SECONDS else ("--idle-seconds", idle_seconds)
        raise ConfigError(f"{flag} {v:g} is too short for an energy window: give at least {MIN_TRUSTED_SECONDS:g} s"
                          f"{' (or 0 to skip it)' if flag == '--idle-seconds' else ''}; energy counters update too "
                          "coarsely below that")
    t0 = time.perf_counter()
    meter = auto_meter(device)
    info = meter_facts(meter)
    checks: list[Check] = []
    on_phase("meters")
    statuses = survey(device)
    checks += _guard("meters", "auto meter", lambda: check_meters(device, meter, statuses))
    on_phase("strategy equivalence")
    checks += check_strategies(device)
    checks += check_energy(device, meter, seconds, idle_seconds, on_phase)
    return SelfCheckReport(
        device=str(device), checks=checks, meter=info,
        meters=[asdict(s) for s in statuses], environment=describe(device),
        options={"device": str(device), "seconds": seconds, "idle_seconds": idle_seconds,
                 "window_batch_size": WINDOW_BATCH, "trace_agreement": TRACE_AGREEMENT,
                 "fp32_atol": FP32_ATOL, "bf16_atol": BF16_ATOL, "bf16_rtol": BF16_RTOL},
        elapsed_s=time.perf_counter() - t0,
    )
