"""The Python API: measure any model from a script or notebook with the CLI's own window and statistics.

``benchmark`` runs ``measure.window.measure`` (warm-up, one time-bound window with energy read at its edges, a
latency pass apart) once per repeat and reduces the windows with ``measure.records.summarize``, exactly as
``moe-energy run`` does, so a figure from here and one from the CLI mean the same thing.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast

import torch
from torch import nn

from .config import ConfigError
from .device import device_sync
from .energy import select
from .energy.idle import IdlePower, measure_idle
from .energy.meter import Meter, MeterBase, meter_info
from .measure.records import summarize
from .measure.window import batch_tensors, caller, infer_batch_size, measure
from .models.counting import dense_flops
from .models.dense import DenseMLP
from .models.moe import MoE
from .models.plan import ModelPlan

SCHEMA = "moe-energy/benchmark"
SCHEMA_VERSION = 1
ESTIMATE_NOTE = "energy figures are an ESTIMATE (CPU TDP x process CPU utilisation), not a measurement"


def _warn_at(stacklevel: int) -> Callable[[str], None]:
    """A notice that warns at the user's line (1 = this lambda, 2 = select.auto_meter, 3 = its caller...)."""
    return lambda msg: warnings.warn(msg, stacklevel=stacklevel)


_WARN_CALLER = _warn_at(4)  # lambda < select.auto_meter < auto_meter < the user's line


def auto_meter(device: Any = None, cpu_tdp_watts: float | None = None,
               notice: Callable[[str], None] | None = _WARN_CALLER) -> MeterBase:
    """The meter ``--meter auto`` picks for ``device`` (default: the best visible one).

    Every real counter covering the run (GPU counter, RAPL, Apple SoC), summed; the labelled estimate only
    when none exists, with a warning saying so (``notice=None`` silences it; it stays in ``meter.notice``).
    Use it as ``with meter.window("name") as w: ...`` then ``w.result.joules``.
    """
    return cast(MeterBase, select.auto_meter(device, cpu_tdp_watts=cpu_tdp_watts, notice=notice))


def make_meter(name: str, device: Any = None, cpu_tdp_watts: float | None = None) -> MeterBase:
    """One meter by name (``nvidia``, ``amd``, ``rapl``, ``apple``, ``estimate``, ``none`` or ``auto``)."""
    return cast(MeterBase, select.make_meter(name, device, cpu_tdp_watts))


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

    @property
    def inferences_per_joule(self) -> float | None:
        """Median over the windows; None (never inf or 0) when energy was not measured."""
        return self.summary["inferences_per_joule"]

    @property
    def inferences_per_second(self) -> float | None:
        return self.summary["inferences_per_second"]

    @property
    def energy_j(self) -> float | None:
        return self.summary["energy_j"]

    @property
    def average_power_w(self) -> float | None:
        return self.summary["average_power_w"]

    @property
    def latency_p50_ms(self) -> float | None:
        return self.summary["latency_p50_ms"]

    @property
    def method(self) -> str:
        """counter | sampled | estimate | none: the weakest method among the windows' devices."""
        return self.summary["energy_method"]

    @property
    def is_estimate(self) -> bool:
        return bool(self.summary["energy_is_estimate"])

    @property
    def batch_size(self) -> int:
        return self.summary["batch_size"]

    @property
    def repeats(self) -> int:
        return self.summary["repeats"]

    @property
    def windows(self) -> list[dict[str, Any]]:
        return self.summary["windows"]

    @property
    def flags(self) -> list[str]:
        return self.summary["flags"]

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
            "idle": self.idle.as_dict() if self.idle is not None else None,
            "idle_power_w": self.idle.power_w if self.idle is not None else None,
            **self.summary,
        }

    def __repr__(self) -> str:
        def f(v: float | None, unit: str) -> str:
            if v is None:
                return "not measured"
            return f"{v:,.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"

        method = "ESTIMATE" if self.is_estimate else self.method
        return (f"BenchmarkResult({self.model} on {self.device}: {f(self.inferences_per_second, 'inferences/s')}, "
                f"{f(self.inferences_per_joule, 'inferences/J')} ({method}), "
                f"median of {self.repeats} window(s))")


def count_flops(model: nn.Module, batch: Any, batch_size: int,
                given: int | None = None) -> tuple[int | None, str]:
    """FLOPs per inference and how they were got: given; the CLI's arithmetic for this package's models;
    else torch's FlopCounterMode over one forward (matrix products it can see; fused kernels it cannot)."""
    if given is not None:
        return given, "given (flops_per_inference=)"
    if isinstance(model, MoE):
        return ModelPlan.of("moe", model).flops_per_inference, \
            "arithmetic: gate + top_k experts' matrix products (as the CLI)"
    if isinstance(model, DenseMLP):
        return (dense_flops(model.input_dim, model.width, model.layers, model.classes),
                "arithmetic: the MLP's matrix products (as the CLI)")
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
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    if not ok or not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        what = "a whole number" if integer else "a finite number"
        raise ConfigError(f"{name}={v!r} must be {what} {'>= 0' if zero_ok else '> 0'}")


def _device_of(model: nn.Module, batch: Any) -> torch.device:
    """Where the work runs: the first accelerator tensor of the input, else of the model, else the CPU."""
    for t in [*batch_tensors(batch), *model.parameters(), *model.buffers()]:
        if t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


def benchmark(
    model: nn.Module,
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
) -> BenchmarkResult:
    """Measure ``model`` on ``example_batch`` in ``repeats`` windows of ``duration`` seconds each.

    ``example_batch`` is a tensor (``model(x)``), a tuple/list (``model(*batch)``) or a dict
    (``model(**batch)``), already on the model's device; ``batch_size`` (inferences per call) defaults to
    the leading dimension of its first tensor. ``meter`` defaults to ``auto_meter`` for that device.
    ``idle_seconds`` > 0 first reads idle power, so each window also gets dynamic (raw minus idle) energy.
    The model is put in eval mode and run under ``torch.inference_mode``.
    """
    _positive("duration", duration)
    _positive("repeats", repeats, integer=True)
    for name, v in (("warmup", warmup), ("idle_seconds", idle_seconds), ("cooldown", cooldown)):
        _positive(name, v, zero_ok=True)
    if not isinstance(example_batch, (torch.Tensor, tuple, list, Mapping)):
        raise ConfigError(f"example_batch is a {type(example_batch).__name__}; give a tensor, tuple, list or dict")
    if isinstance(example_batch, Mapping) and not isinstance(example_batch, dict):
        example_batch = dict(example_batch)
    if batch_size is None:
        batch_size = infer_batch_size(example_batch)
    _positive("batch_size", batch_size, integer=True)
    if flops_per_inference is not None:
        _positive("flops_per_inference", flops_per_inference, integer=True)
    device = _device_of(model, example_batch)
    meter = meter if meter is not None else auto_meter(device, notice=_warn_at(5))  # ... < benchmark < the user
    sync = sync if sync is not None else device_sync(device)

    model.eval()
    flops, flops_method = count_flops(model, example_batch, batch_size, flops_per_inference)
    idle = measure_idle(meter, idle_seconds, sync)
    windows: list[dict[str, Any]] = []
    for r in range(repeats):
        if r > 0 and cooldown > 0:
            time.sleep(cooldown)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        res = measure(model, example_batch, duration, meter, flops, warmup, idle=idle, sync=sync,
                      batch_size=batch_size)
        windows.append({"repeat": r, "order": r, "started_utc": started, **res.metrics()})
    info = meter_info(meter)
    info["notice"] = getattr(meter, "notice", None)
    return result_from_windows(windows, model=type(model).__name__, device=str(device), duration_s=duration,
                               warmup_s=warmup, flops_method=flops_method, meter=info, idle=idle)


def result_from_windows(windows: list[dict[str, Any]], **context: Any) -> BenchmarkResult:
    """The result of ``BenchResult.metrics()`` windows, reduced by the CLI's own ``measure.records.summarize``."""
    return BenchmarkResult(summary=summarize(windows), **context)
