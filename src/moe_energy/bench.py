"""The measurement window: warm-up, one time-bound loop over one batch, energy at the edges, latency apart.

The counted window has no per-batch device sync (the seed synced every batch, which throttles a GPU);
batch latency comes from a separate, shorter pass so that measuring it cannot slow the counted window.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .energy.meter import Measurement, Meter, window

# Windows shorter than this are flagged: energy counters update too coarsely to trust them.
MIN_TRUSTED_SECONDS = 1.0


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for all queued work on ``device``."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


@dataclass
class BenchResult:
    batch_size: int
    batches: int
    seconds: float
    flops_per_inference: int
    latency_ms: list[float]
    energy: Measurement
    flags: list[str] = field(default_factory=list)

    @property
    def inferences(self) -> int:
        return self.batches * self.batch_size

    @property
    def inferences_per_second(self) -> float:
        return self.inferences / self.seconds

    @property
    def achieved_gflops(self) -> float:
        return self.inferences * self.flops_per_inference / self.seconds / 1e9

    @property
    def inferences_per_joule(self) -> float | None:
        """None (never inf) when energy was not measured or reads as zero."""
        j = self.energy.joules
        if j is None or not math.isfinite(j) or j <= 0:
            return None
        return self.inferences / j

    def latency_pct(self, q: float) -> float | None:
        if not self.latency_ms:
            return None
        xs = sorted(self.latency_ms)
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]

    def metrics(self) -> dict:
        """Flat figures, each named with its unit."""
        j = self.energy.joules
        return {
            "batch_size": self.batch_size,
            "batches": self.batches,
            "inferences": self.inferences,
            "window_s": self.seconds,
            "inferences_per_second": self.inferences_per_second,
            "latency_p50_ms": self.latency_pct(50),
            "latency_p95_ms": self.latency_pct(95),
            "latency_mean_ms": statistics.fmean(self.latency_ms) if self.latency_ms else None,
            "flops_per_inference": self.flops_per_inference,
            "achieved_gflops": self.achieved_gflops,
            "energy_j": j,
            "average_power_w": self.energy.average_power_w,
            "inferences_per_joule": self.inferences_per_joule,
            "energy_method": self.energy.method,
            "energy_meter": self.energy.meter,
            "energy_devices": list(self.energy.devices_covered),
            "flags": self.flags + self.energy.flags,
        }


@torch.inference_mode()
def measure(
    model: nn.Module,
    batch: Tensor,
    duration: float,
    meter: Meter,
    flops_per_inference: int,
    warmup: float = 2.0,
    latency_seconds: float | None = None,
    on_tick: Callable[[float], None] | None = None,
) -> BenchResult:
    """Run ``model(batch)`` for ``duration`` seconds inside one energy window."""
    model.eval()
    sync = device_sync(batch.device)
    # Untimed warm-up: allocator, kernels' first launch, caches, clocks ramping up.
    t0 = time.perf_counter()
    n = 0
    while n < 3 or time.perf_counter() - t0 < warmup:
        model(batch)
        n += 1
    sync()

    batches = 0
    last_tick = 0.0
    with window(meter, "bench", sync) as w:
        start = time.perf_counter()
        while True:
            model(batch)
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= duration:
                break
            if on_tick is not None and elapsed - last_tick >= 0.2:
                on_tick(elapsed)
                last_tick = elapsed
        # the window's context manager syncs before reading the meter, so queued batches count
    seconds = time.perf_counter() - start
    assert w.result is not None
    flags: list[str] = []
    if seconds < MIN_TRUSTED_SECONDS:
        flags.append(f"window of {seconds:.2f} s is shorter than {MIN_TRUSTED_SECONDS} s: energy unreliable")
    if w.result.joules is not None and w.result.joules <= 0:
        flags.append("zero-joule reading: inferences_per_joule withheld")

    # Latency pass, outside the counted window: each batch timed with a sync on both sides.
    lat: list[float] = []
    budget = latency_seconds if latency_seconds is not None else min(2.0, 0.1 * duration)
    t_lat = time.perf_counter()
    while len(lat) < 10 or (time.perf_counter() - t_lat < budget and len(lat) < 200):
        sync()
        a = time.perf_counter()
        model(batch)
        sync()
        lat.append((time.perf_counter() - a) * 1e3)
    return BenchResult(batch.shape[0], batches, seconds, flops_per_inference, lat, w.result, flags)
