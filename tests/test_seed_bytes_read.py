"""The seed's MoE row reads the weights of the experts its bench batch reaches, not of every expert."""

from __future__ import annotations

import time

import pytest
import torch

from moe_energy.config import ModelSpec, RunOptions
from moe_energy.energy import Measurement
from moe_energy.measure import roofline
from moe_energy.models.counting import expert_params, gate_params
from moe_energy.models.plan import ModelPlan
from moe_energy.runner.seed import run

SPEC = ModelSpec(experts=8, hidden=16, layers=2, top_k=2, input_dim=40, classes=4)


class FlatMeter:
    """10 W on one device, by the clock."""

    name, method = "fake", "counter"
    devices = ["gpu:0"]

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self) -> Measurement:
        s = time.perf_counter() - self._t0
        return Measurement(seconds=s, method="counter", meter="fake", joules_by_device={"gpu:0": 10.0 * s},
                           devices_covered=["gpu:0"], trace={"gpu:0": [[0.0, 10.0], [s, 10.0]]},
                           method_by_device={"gpu:0": "counter"})


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 64])
def test_moe_weight_bytes_are_the_experts_the_batch_reaches(batch, tmp_path, monkeypatch):
    """Before the fix a batch of 1 (top_k=2 of 8 experts) was said to read all 8 experts: 4 x (328 + 8 x 996)
    = 33,184 bytes instead of 4 x (328 + 2 x 996) = 9,280."""
    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "cache"))
    roofline._store(roofline.Roofline(roofline.device_name(torch.device("cpu")), {"float32": 1e11}, 1e10, 64, 2**20,
                                      "2026-01-01T00:00:00+00:00"))
    opts = RunOptions(epochs=1, samples=200, batch_size=batch, duration=0.05, warmup=0.0, device="cpu",
                      out=str(tmp_path), repeats=1, cooldown=0.0, idle_seconds=0.0, strategies=("grouped",),
                      models=("moe", "dense_active")).validate()
    doc, _ = run(SPEC, opts, FlatMeter(), save=False, sleep=lambda s: None)
    moe, dense = doc["models"]
    assert moe["name"] == "moe[grouped]" and dense["name"] == "dense_active"
    if batch == 1:  # one sample reaches exactly its top_k experts
        assert moe["weight_bytes_per_batch"] == 4 * (gate_params(SPEC) + SPEC.top_k * expert_params(SPEC)) == 9_280
    touched = moe["experts_touched"]
    assert SPEC.top_k <= touched <= min(SPEC.experts, batch * SPEC.top_k)
    assert moe["weight_bytes_per_batch"] == 4 * (gate_params(SPEC) + touched * expert_params(SPEC))
    assert dense["weight_bytes_per_batch"] == 4 * ModelPlan.of("dense_active", SPEC).params
    assert "experts_touched" not in dense
