"""The run pipeline: every model trained once, measured in shuffled repeated windows, medians and spread kept."""

from __future__ import annotations

import statistics
import time

import pytest

from moe_energy.config import RunOptions
from moe_energy.energy import Measurement
from moe_energy.runner.core import window_schedule
from moe_energy.runner.seed import run


class CountingMeter:
    """Joules = watts x seconds on one device: 5 W for the first (idle) window, 20 W after; counts windows."""

    name, method = "fake", "counter"
    devices = ["gpu:0"]

    def __init__(self) -> None:
        self.windows = 0

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self) -> Measurement:
        watts = 5.0 if self.windows == 0 else 20.0
        self.windows += 1
        s = time.perf_counter() - self._t0
        return Measurement(seconds=s, method="counter", meter="fake", joules_by_device={"gpu:0": watts * s},
                           devices_covered=["gpu:0"], trace={"gpu:0": [[0.0, watts], [s, watts]]},
                           method_by_device={"gpu:0": "counter"})


def test_schedule_interleaves_every_model_each_round():
    labels = ["moe[grouped]", "dense_total", "dense_active"]
    sched = window_schedule(labels, 4, seed=0)
    assert len(sched) == 12
    for r in range(4):
        assert sorted(lab for rep, lab in sched if rep == r) == sorted(labels)
    assert sched == window_schedule(labels, 4, seed=0)  # reproducible from the seed
    orders = {tuple(lab for rep, lab in window_schedule(labels, 4, s) if rep == r) for s in range(5) for r in range(4)}
    assert len(orders) > 1  # shuffled, not a fixed order


@pytest.mark.slow
def test_run_records_windows_medians_spread_and_idle(tiny_spec, tmp_path):
    opts = RunOptions(epochs=1, samples=300, duration=0.15, warmup=0.0, device="cpu", out=str(tmp_path),
                      repeats=3, cooldown=0.0, idle_seconds=0.1,
                      strategies=("grouped", "masked_loop")).validate()
    meter = CountingMeter()
    slept: list[float] = []
    doc, path = run(tiny_spec, opts, meter, save=True, sleep=slept.append)
    assert path is not None and path.exists()
    names = [m["name"] for m in doc["models"]]
    assert names == ["moe[grouped]", "moe[masked_loop]", "dense_total", "dense_active"]
    assert meter.windows == 1 + 4 * 3  # idle + every variant x repeats
    assert doc["idle"]["power_by_device_w"]["gpu:0"] == pytest.approx(5.0)
    assert doc["energy_meter"]["name"] == "fake"
    orders = sorted(w["order"] for m in doc["models"] for w in m["windows"])
    assert orders == list(range(12))
    for m in doc["models"]:
        ws = m["windows"]
        assert [w["repeat"] for w in ws] == [0, 1, 2]
        assert m["repeats"] == 3
        assert m["inferences_per_second"] == statistics.median(w["inferences_per_second"] for w in ws)
        assert m["inferences_per_joule"] == statistics.median(w["inferences_per_joule"] for w in ws)
        assert m["inferences_per_joule_min"] == min(w["inferences_per_joule"] for w in ws)
        assert m["inferences_per_joule_max"] == max(w["inferences_per_joule"] for w in ws)
        assert m["idle_power_w"] == pytest.approx(5.0)
        for w in ws:
            # exact over the meter's own seconds; window_s (the loop's clock) may differ by a preemption's ms
            assert w["average_power_w"] == pytest.approx(20.0, rel=1e-9)
            assert w["dynamic_average_power_w"] * w["window_s"] == pytest.approx(w["dynamic_energy_j"])
            assert w["energy_j"] == pytest.approx(20.0 * w["window_s"], rel=0.1)
            assert w["dynamic_energy_j"] == pytest.approx(15.0 * w["energy_j"] / 20.0, rel=1e-9)
            assert w["dynamic_inferences_per_joule"] == pytest.approx(w["inferences"] / w["dynamic_energy_j"])
            assert w["trace"]["gpu:0"][0] == [0.0, 20.0]
        assert m["energy_is_estimate"] is False and m["energy_method"] == "counter"
    # the MoE was trained once and serves both strategies
    assert doc["models"][0]["accuracy"] == doc["models"][1]["accuracy"]
    assert slept == [0.0] * 12  # a rest before idle and between consecutive windows
