"""The Python API: measure any model from a script or notebook with the CLI's own window and statistics.

``benchmark`` runs ``measure.window.measure`` (warm-up, one time-bound window with energy read at its edges, a
latency pass apart) once per repeat and reduces the windows with ``measure.records.summarize``, exactly as
``moe-energy run`` does, so a figure from here and one from the CLI mean the same thing. ``benchmark_generate``
runs the same loop over a whole LLM's prefill and decode steps (``models.generate``, as `run --model` does).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Generic, TypeVar, cast

import torch
from torch import nn

from .config import ConfigError, resolve_carbon
from .device import device_sync
from .dtypes import device_arg, device_here
from .energy import select
from .energy.idle import IdlePower, measure_idle
from .energy.meter import Meter, MeterBase, meter_info
from .errors import kind_of
from .measure.records import summarize, window_record
from .measure.window import batch_tensors, caller, infer_batch_size, measure, warm_up_for
from .models import fp8, whole
from .models.counting import dense_flops, layer_flops, swiglu_params
from .models.dense import DenseMLP, DenseSwiGLU
from .models.generate import decode_step, prefill_step
from .models.llm import MoELayer
from .models.moe import MoE, StrategyHost
from .models.plan import ModelPlan
from .models.whole import WholeModel
from .power.carbon import ESTIMATED, carbon_fields
from .runner import prepare as _prepare  # noqa: F401 - installs auto's timing probe for the models measured here
from .runner.model import PHASES, phase_figures
from .storage.fileio import now_utc

SCHEMA = "moe-energy/benchmark"
GENERATE_SCHEMA = "moe-energy/generate"
SCHEMA_VERSION = 1
GENERATE_FLOPS = "not counted: a whole model's step (attention over the cache and the LM head included)"
T = TypeVar("T")
ESTIMATE_NOTE = "energy figures are an ESTIMATE (CPU TDP x process CPU utilisation), not a measurement"


def _warn_at(stacklevel: int) -> Callable[[str], None]:
    """A notice that warns at the user's line (1 = this lambda, 2 = select.auto_meter, 3 = its caller...)."""
    return lambda msg: warnings.warn(msg, stacklevel=stacklevel)


_WARN_CALLER = _warn_at(4)  # lambda < select.auto_meter < auto_meter < the user's line


def _check_meter_args(where: str, device: Any, cpu_tdp_watts: Any) -> torch.device | None:
    """The device as a torch.device and the TDP checked, before the meter classes see them: they would take
    inf or nan watts as a number and 'cuda:x' as a device of kind 'cuda:x'."""
    if cpu_tdp_watts is not None:
        if isinstance(cpu_tdp_watts, bool) or not isinstance(cpu_tdp_watts, Real):
            raise TypeError(f"{where}: cpu_tdp_watts={cpu_tdp_watts!r} is {kind_of(cpu_tdp_watts)}; "
                            "give a number of watts > 0 (or None for 5 W per logical CPU)")
        if not math.isfinite(cpu_tdp_watts) or cpu_tdp_watts <= 0:
            raise ConfigError(f"{where}: cpu_tdp_watts={cpu_tdp_watts!r} must be a finite number of watts > 0")
    return device_arg(where, device)


def auto_meter(device: Any = None, cpu_tdp_watts: float | None = None,
               notice: Callable[[str], None] | None = _WARN_CALLER) -> MeterBase:
    """The meter ``--meter auto`` picks for ``device`` (default: the best visible one).

    Every real counter covering the run (GPU counter, RAPL, Apple SoC), summed; the labelled estimate only
    when none exists, with a warning saying so (``notice=None`` silences it; it stays in ``meter.notice``).
    Use it as ``with meter.window("name") as w: ...`` then ``w.result.joules``.
    """
    device = _check_meter_args("auto_meter", device, cpu_tdp_watts)
    if notice is not None and not callable(notice):
        raise TypeError(f"auto_meter: notice={notice!r} is {kind_of(notice)}; give a function of one "
                        "message (str), or None to keep the notice only in meter.notice")
    return cast(MeterBase, select.auto_meter(device, cpu_tdp_watts=cpu_tdp_watts, notice=notice))


def make_meter(name: str, device: Any = None, cpu_tdp_watts: float | None = None) -> MeterBase:
    """One meter by name (``nvidia``, ``amd``, ``rapl``, ``apple``, ``estimate``, ``none`` or ``auto``)."""
    if not isinstance(name, str):
        raise TypeError(f"make_meter: name={name!r} is {kind_of(name)}; give one of "
                        f"{', '.join(select.METER_NAMES)}")
    if name not in select.METER_NAMES:
        raise ConfigError(f"make_meter: name={name!r} is unknown; choose one of {', '.join(select.METER_NAMES)}")
    device = _check_meter_args("make_meter", device, cpu_tdp_watts)
    return cast(MeterBase, select.make_meter(name, device, cpu_tdp_watts))


def figure_text(v: float | None, unit: str) -> str:
    """3 significant figures, thousands separated; 'not measured' for None."""
    if v is None:
        return "not measured"
    return f"{v:,.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"


class _Figure(Generic[T]):
    """A field of ``BenchmarkResult.summary`` read as an attribute; ``optional``: None where the summary lacks it."""

    def __init__(self, key: str, optional: bool = False) -> None:
        self.key, self.optional = key, optional

    def __get__(self, result: BenchmarkResult | None, owner: type) -> T:
        if result is None:  # looked up on the class: the descriptor itself
            return self  # type: ignore[return-value]
        return result.summary.get(self.key) if self.optional else result.summary[self.key]


@dataclass(frozen=True)
class BenchmarkResult:
    """A model's figures over its repeated windows: medians, spread, every window, and how they were got."""

    summary: dict[str, Any]  # measure.records.summarize(): the same fields as a `moe-energy run` model record
    model: str
    device: str
    duration_s: float
    warmup_s: float
    flops_method: str
    meter: dict[str, Any] = field(default_factory=dict)
    idle: IdlePower | None = None

    # the summary's figures as attributes (measure.records.summarize names them)
    inferences_per_joule = _Figure[float | None]("inferences_per_joule")  # median; None (never inf or 0): no energy
    inferences_per_second = _Figure[float | None]("inferences_per_second")
    energy_j = _Figure[float | None]("energy_j")
    average_power_w = _Figure[float | None]("average_power_w")
    latency_p50_ms = _Figure[float | None]("latency_p50_ms")
    method = _Figure[str]("energy_method")  # counter | sampled | estimate | none: the weakest among the devices
    # estimated g CO2e and cost per million inferences at carbon_intensity and price_per_kwh (None: not given)
    co2e_g_per_million = _Figure[float | None]("co2e_g_per_million", optional=True)
    cost_per_million = _Figure[float | None]("cost_per_million", optional=True)
    batch_size = _Figure[int]("batch_size")
    repeats = _Figure[int]("repeats")
    windows = _Figure[list[dict[str, Any]]]("windows")
    flags = _Figure[list[str]]("flags")

    @property
    def is_estimate(self) -> bool:
        return bool(self.summary["energy_is_estimate"])

    def to_dict(self) -> dict[str, Any]:
        """Every figure named with its unit, the method stated, an estimate labelled (JSON-ready)."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "device": self.device,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "flops_method": self.flops_method,
            "energy_meter_info": self.meter,  # name, method, devices, versions, notice
            "energy_note": ESTIMATE_NOTE if self.is_estimate else None,
            "carbon_note": self._carbon_note(),
            "idle": self.idle.as_dict() if self.idle is not None else None,
            "idle_power_w": self.idle.power_w if self.idle is not None else None,
            **self.summary,
        }

    def _carbon_note(self) -> str | None:
        """What the carbon and cost figures are: estimates on the figures given (of an estimate, at times)."""
        basis = self.summary.get("carbon_basis")
        if basis is None:
            return None
        return (f"carbon and cost per million inferences are ESTIMATES ({basis}): energy per inference x "
                f"{self.summary.get('carbon_intensity_g_per_kwh')} g CO2e/kWh and price "
                f"{self.summary.get('price_per_kwh')} per kWh as given" +
                (", the energy itself an estimate" if basis == ESTIMATED else ""))

    def __repr__(self) -> str:
        method = "ESTIMATE" if self.is_estimate else self.method
        return (f"BenchmarkResult({self.model} on {self.device}: "
                f"{figure_text(self.inferences_per_second, 'inferences/s')}, "
                f"{figure_text(self.inferences_per_joule, 'inferences/J')} ({method}), "
                f"median of {self.repeats} window(s))")


def count_flops(model: Callable[..., Any], batch: Any, batch_size: int,
                given: int | None = None) -> tuple[int | None, str]:
    """FLOPs per inference and how they were got: given; the CLI's arithmetic for this package's models (``MoE``,
    ``DenseMLP``, an LLM ``MoELayer`` and its matched ``DenseSwiGLU``: per token); else torch's FlopCounterMode over
    one forward of a module (matrix products it can see; fused kernels it cannot), but not of a module holding an
    MoE layer (it cannot see grouped GEMMs, and auto's probe would add every candidate's). A plain callable's are
    not counted: it may do anything besides tensor work, so a count would be a guess."""
    if given is not None:
        return given, "given (flops_per_inference=)"
    if not isinstance(model, nn.Module):
        return None, "not known: a plain callable, not an nn.Module; pass flops_per_inference="
    if isinstance(model, MoE):
        return ModelPlan.of("moe", model).flops_per_inference, \
            "arithmetic: gate + top_k experts' matrix products (as the CLI)"
    if isinstance(model, DenseMLP):
        return (dense_flops(model.input_dim, model.width, model.layers, model.classes),
                "arithmetic: the MLP's matrix products (as the CLI)")
    if isinstance(model, MoELayer):  # FlopCounterMode would count what the strategy runs, not the layer's work
        dims = model.dims()
        if dims.top_k < 1:
            return None, "not known: the layer's router has no top_k; pass flops_per_inference="
        return layer_flops(dims), "arithmetic: router + top_k experts + shared experts' matrix products (as the CLI)"
    if isinstance(model, DenseSwiGLU):
        return (2 * swiglu_params(model.d_model, model.width),
                "arithmetic: the dense SwiGLU FFN's matrix products (as the CLI)")
    if any(isinstance(m, StrategyHost) for m in model.modules()):
        return None, ("not known: the model holds an MoE layer, whose expert products FlopCounterMode counts wrong "
                      "(grouped kernels are invisible to it, strategy auto's probe runs every candidate); "
                      "pass flops_per_inference=")
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            caller(model, batch)()
        total = int(counter.get_total_flops())
    except Exception as e:  # a model the counter cannot trace: FLOPs simply stay unknown
        return None, f"not known: FlopCounterMode failed ({type(e).__name__}); pass flops_per_inference="
    if total <= 0:
        return None, ("not known: FlopCounterMode saw no matrix products (fused kernels are invisible to it); "
                      "pass flops_per_inference=")
    return round(total / batch_size), "FlopCounterMode over one forward: matrix products executed"


def _positive(name: str, v: Any, integer: bool = False, zero_ok: bool = False) -> None:
    """A TypeError for a wrong kind of value (a str, a bool, 1.5 repeats), a ConfigError for a wrong number."""
    what = "a whole number" if integer else "a finite number"
    bound = ">= 0" if zero_ok else "> 0"
    if isinstance(v, bool) or not isinstance(v, int if integer else Real):
        raise TypeError(f"benchmark: {name}={v!r} is {kind_of(v)}; give {what} {bound}")
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise ConfigError(f"benchmark: {name}={v!r} must be {what} {bound}")


def _check_times(duration: Any, repeats: Any, warmup: Any, idle_seconds: Any, cooldown: Any) -> None:
    """benchmark's windows, repeats and pauses: each a number of the right kind and sign."""
    _positive("duration", duration)
    _positive("repeats", repeats, integer=True)
    for name, v in (("warmup", warmup), ("idle_seconds", idle_seconds), ("cooldown", cooldown)):
        _positive(name, v, zero_ok=True)


def _device_of(model: Callable[..., Any], batch: Any) -> torch.device:
    """Where the work runs: the first accelerator tensor of the input, else of a module's weights, else the
    CPU (a plain callable's weights, if any, are out of sight: its device is its batch's)."""
    weights = [*model.parameters(), *model.buffers()] if isinstance(model, nn.Module) else []
    for t in [*batch_tensors(batch), *weights]:
        if t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


def _check_callables(model: Any, meter: Any, sync: Any) -> None:
    """Wrong kinds of model, meter or sync, said up front rather than as an AttributeError mid-window."""
    if not callable(model):
        raise TypeError(f"benchmark: model is {kind_of(model)}; give an nn.Module or any callable "
                        "(a function or lambda) that takes the batch")
    if meter is not None and not isinstance(meter, Meter):
        hint = f" (me.make_meter({meter!r}))" if isinstance(meter, str) else ""
        raise TypeError(f"benchmark: meter={meter!r} is {kind_of(meter)}, not a meter; give "
                        f"me.make_meter(...) or me.auto_meter(){hint}, or None for the automatic one")
    if sync is not None and not callable(sync):
        raise TypeError(f"benchmark: sync={sync!r} is {kind_of(sync)}; give a function of no "
                        "arguments, or None for the batch's device sync")


def _checked_batch(batch: Any) -> Any:
    """The batch as ``measure`` calls it (a Mapping as a dict); any other kind is a TypeError saying which."""
    if not isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
        raise TypeError(f"benchmark: example_batch is {kind_of(batch)}; give a tensor, tuple, list or dict")
    if isinstance(batch, Mapping):
        batch = dict(batch)
        if not all(isinstance(k, str) for k in batch):
            raise TypeError("benchmark: example_batch is a dict with non-str keys; its keys are the model's "
                            "keyword arguments, so give names (str)")
    return batch


def _fp8_problem(model: nn.Module, device: torch.device) -> str | None:
    """Why fp8 weights (``quantize_weights(m, "fp8")``) cannot be measured on ``device``, as `run --weights fp8`
    refuses them: off an fp8 GPU they run an emulation (rounded, then dequantized), whose time and energy answer
    nothing about fp8. None when the model holds none, or the device runs them."""
    if not any(b.dtype == fp8.FP8 for b in model.buffers()):
        return None
    widths = [w for m in model.modules() if isinstance(m, MoELayer) for w in (m.hidden, m.intermediate)]
    return fp8.problem(device, *widths, fix="quantize it as 'int8' or 'w8a8' instead")


def _model_name(model: Callable[..., Any]) -> str:
    """A module's class name (as the CLI records it); a function's own name (``<lambda>`` for a lambda)."""
    if isinstance(model, nn.Module):
        return type(model).__name__
    return str(getattr(model, "__name__", type(model).__name__))


def benchmark(
    model: nn.Module | Callable[..., Any],
    example_batch: Any,
    duration: float = 10.0,
    repeats: int = 3,
    *,
    meter: Meter | None = None,
    batch_size: int | None = None,
    warmup: float = 2.0,
    idle_seconds: float = 0.0,
    cooldown: float = 0.0,
    flops_per_inference: int | None = None,
    sync: Callable[[], None] | None = None,
    carbon_intensity: float | None = None,
    price_per_kwh: float | None = None,
) -> BenchmarkResult:
    """Measure ``model`` on ``example_batch`` in ``repeats`` windows of ``duration`` seconds each.

    ``model`` is an ``nn.Module`` or any callable (a plain function's FLOPs are not known unless given, and
    its device is its batch's). ``example_batch`` is a tensor (``model(x)``), a tuple/list
    (``model(*batch)``) or a dict (``model(**batch)``), already on the model's device; ``batch_size``
    (inferences per call) defaults to the leading dimension of its first tensor. ``meter`` defaults to
    ``auto_meter`` for that device. ``idle_seconds`` > 0 first reads idle power, so each window also gets
    dynamic (raw minus idle) energy. A module is put in eval mode; every call runs under
    ``torch.inference_mode``. ``carbon_intensity`` (g CO2e/kWh) and ``price_per_kwh`` add estimated g CO2e and
    cost per million inferences, as `run --carbon-intensity/--price-per-kwh` does (never looked up, never read
    from the environment here: a script's figures are the ones it passes).
    """
    _check_callables(model, meter, sync)
    carbon = resolve_carbon({"carbon_intensity": carbon_intensity, "price_per_kwh": price_per_kwh}, environ={})
    _check_times(duration, repeats, warmup, idle_seconds, cooldown)
    example_batch = _checked_batch(example_batch)
    batch_size = infer_batch_size(example_batch) if batch_size is None else batch_size
    _positive("batch_size", batch_size, integer=True)
    if flops_per_inference is not None:
        _positive("flops_per_inference", flops_per_inference, integer=True)
    device = _device_of(model, example_batch)
    meter = meter if meter is not None else auto_meter(device, notice=_warn_at(5))  # ... < benchmark < the user
    sync = sync if sync is not None else device_sync(device)

    if isinstance(model, nn.Module):
        if (why := _fp8_problem(model, device)) is not None:
            raise ConfigError(f"benchmark: the model holds fp8 weights, and {why}")
        model.eval()
    flops, flops_method = count_flops(model, example_batch, batch_size, flops_per_inference)
    idle = measure_idle(meter, idle_seconds, sync)
    windows = _windows(model, example_batch, WindowPlan(duration, repeats, warmup, cooldown, meter, sync, idle),
                       flops, batch_size)
    result = result_from_windows(windows, model=_model_name(model), device=str(device), duration_s=duration,
                                 warmup_s=warmup, flops_method=flops_method, meter=meter_facts(meter), idle=idle)
    if carbon.given:
        result.summary.update(carbon_fields(result.summary, carbon))
    return result


@dataclass(frozen=True)
class WindowPlan:
    """How every window of one call is measured: its seconds, repeats, warm-up, rest, meter, sync and idle power."""

    duration: float
    repeats: int
    warmup: float
    cooldown: float
    meter: Meter
    sync: Callable[[], None]
    idle: IdlePower | None


def _windows(model: Callable[..., Any], batch: Any, how: WindowPlan, flops: int | None,
             batch_size: int) -> list[dict[str, Any]]:
    """The one window loop of the API (``benchmark``, ``benchmark_generate``): ``how.repeats`` windows of
    ``measure.window.measure``, a rest between them, each made a record by ``window_record`` as the CLI makes it."""
    windows: list[dict[str, Any]] = []
    call_s = None
    for r in range(how.repeats):
        if r > 0 and how.cooldown > 0:
            time.sleep(how.cooldown)
        started = now_utc()
        res = measure(model, batch, how.duration, how.meter, flops, warm_up_for(how.warmup, call_s), idle=how.idle,
                      sync=how.sync, batch_size=batch_size)
        call_s = res.seconds / res.batches
        windows.append({"repeat": r, "order": r, "started_utc": started, **window_record(res)})
    return windows


def meter_facts(meter: Meter) -> dict[str, Any]:
    """``meter_info`` with the meter's notice (auto's fallback or partial coverage), as results record it."""
    return {**meter_info(meter), "notice": getattr(meter, "notice", None)}


def result_from_windows(windows: list[dict[str, Any]], **context: Any) -> BenchmarkResult:
    """The result of windows (``window_record``), reduced by the CLI's own ``measure.records.summarize``."""
    return BenchmarkResult(summary=summarize(windows), **context)


# -- whole LLMs (issue 23): a model built from a preset (``me.models()``), its prefill and decode figures -----------
def build_model(name: str | WholeModel, layers: int | None = None, dtype: str | torch.dtype = "float32",
                device: str | torch.device = "cpu", seed: int = 0, tiny: bool = False) -> nn.Module:
    """The preset ``name`` as transformers' own ``*ForCausalLM`` with seeded random weights, on ``device`` in
    ``dtype``: its first ``layers`` layers (None: all), or with ``tiny`` a few-KB copy of its shape (router,
    shared experts and layer pattern kept) that runs in milliseconds. In eval mode, ready for
    ``benchmark_generate``."""
    if not isinstance(tiny, bool):
        raise TypeError(f"build_model: tiny={tiny!r} is {kind_of(tiny)}; give True or False")
    dev = device_here("build_model", device)
    if dev is None:
        raise TypeError("build_model: device=None; give a torch.device or a name such as 'cpu' or 'cuda:0'")
    m = whole.tiny(name) if tiny else whole.get_model(name)
    return whole.build_model(m, layers, dtype, dev, seed)


@dataclass(frozen=True)
class GenerateResult:
    """A model's two phases at one batch and context: prefill (B prompts of L tokens, one forward: tokens are prompt
    tokens, latency the time to first token) and decode (one new token for each of B sequences against a KV cache
    of L: tokens are output tokens, latency the inter-token latency). Each phase is a ``BenchmarkResult`` whose
    inferences are tokens."""

    batch: int
    context: int
    prefill: BenchmarkResult
    decode: BenchmarkResult

    def figures(self, phase: str) -> dict[str, Any]:
        """tokens_per_second, tokens_per_joule, joules_per_token, ttft_ms, itl_p50_ms, itl_p90_ms of ``phase``, as
        a `run --model` record holds them (medians of the windows; None where not measured)."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}: one of {', '.join(PHASES)}")
        return phase_figures(phase, getattr(self, phase).summary)

    @property
    def ttft_ms(self) -> float | None:
        return self.figures("prefill")["ttft_ms"]

    @property
    def itl_p50_ms(self) -> float | None:
        return self.figures("decode")["itl_p50_ms"]

    @property
    def itl_p90_ms(self) -> float | None:
        return self.figures("decode")["itl_p90_ms"]

    def to_dict(self) -> dict[str, Any]:
        """Both phases' figures and their full results (every window, the method, an estimate labelled)."""
        return {"schema": GENERATE_SCHEMA, "schema_version": SCHEMA_VERSION, "batch": self.batch,
                "context": self.context, **{p: {**self.figures(p), "result": getattr(self, p).to_dict()}
                                            for p in PHASES}}

    def __repr__(self) -> str:
        def f(v: float | None, spec: str) -> str:
            return "not measured" if v is None else format(v, spec)

        pre, dec = self.figures("prefill"), self.figures("decode")
        method = "ESTIMATE" if self.decode.is_estimate else self.decode.method
        return (f"GenerateResult({self.prefill.model} at B={self.batch}, L={self.context}: prefill "
                f"{f(pre['joules_per_token'], '.3g')} J/token, TTFT {f(pre['ttft_ms'], '.3g')} ms; decode "
                f"{f(dec['joules_per_token'], '.3g')} J/token, ITL p50/p90 {f(dec['itl_p50_ms'], '.3g')}/"
                f"{f(dec['itl_p90_ms'], '.3g')} ms ({method}))")


def _check_generate(model: Any, batch: Any, context: Any, seed: Any) -> None:
    """A transformers causal LM and whole numbers, said up front (the steps check the positions it has)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"benchmark_generate: model is {kind_of(model)}; give a transformers causal LM (an "
                        "nn.Module with a config), e.g. me.build_model('qwen3-30b-a3b', layers=2)")
    for name, v, least in (("batch", batch, 1), ("context", context, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"benchmark_generate: {name}={v!r} is {kind_of(v)}; give a whole number >= {least}")


def benchmark_generate(model: nn.Module, batch: int, context: int, duration: float = 10.0, repeats: int = 3, *,
                       meter: Meter | None = None, warmup: float = 2.0, idle_seconds: float = 0.0,
                       cooldown: float = 0.0, seed: int = 0) -> GenerateResult:
    """Measure a causal LM's prefill and decode at ``batch`` sequences and ``context`` tokens, ``repeats`` windows
    of ``duration`` seconds each, with the steps `run --model` measures (``models.generate``: token ids from
    ``seed``, a static KV cache held at ``context``) and ``benchmark``'s window loop and statistics. ``meter``
    defaults to ``auto_meter`` for the model's device; ``idle_seconds`` > 0 reads idle power once, before both
    phases."""
    _check_generate(model, batch, context, seed)
    _check_callables(model, meter, None)
    _check_times(duration, repeats, warmup, idle_seconds, cooldown)
    model.eval()
    # both steps made before any reading: each checks its positions (a decode step needs one past L), and a decode
    # step fills its cache here, outside the windows
    steps = {"decode": decode_step(model, batch, context, seed), "prefill": prefill_step(model, batch, context, seed)}
    device = next(model.parameters()).device
    meter = meter if meter is not None else auto_meter(device, notice=_warn_at(5))  # ... < benchmark_generate < user
    sync = device_sync(device)
    how = WindowPlan(duration, repeats, warmup, cooldown, meter, sync, measure_idle(meter, idle_seconds, sync))
    phases = {}
    for phase in PHASES:
        step, tokens = steps.pop(phase)
        phases[phase] = result_from_windows(_windows(step, (), how, None, tokens), model=type(model).__name__,
                                            device=str(device), duration_s=duration, warmup_s=warmup,
                                            flops_method=GENERATE_FLOPS, meter=meter_facts(meter), idle=how.idle)
    return GenerateResult(batch, context, phases["prefill"], phases["decode"])
