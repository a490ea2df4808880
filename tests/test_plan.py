"""The typed model plan: one description of each model, the same figures for `plan`, `run` and `sweep`."""

from __future__ import annotations

import pytest
import torch

from moe_energy import memory
from moe_energy.cli import main
from moe_energy.config import PRESETS, ModelSpec, RunOptions
from moe_energy.models.counting import moe_active_params, moe_params
from moe_energy.models.dense import DenseMLP
from moe_energy.models.moe import MoE
from moe_energy.models.plan import MODEL_NAMES, ModelPlan, plans

SHAPE = ["--experts", "8", "--hidden", "64", "--layers", "2", "--top-k", "4", "--input-dim", "40", "--classes", "4"]


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("preset", ["small", "large"])
def test_plans_match_the_seed_sizes_and_the_models_they_build(preset):
    spec = PRESETS[preset]
    moe, total, active = plans(spec)
    assert (moe.name, total.name, active.name) == MODEL_NAMES
    assert moe.params == moe_params(spec) and moe.active_params == moe_active_params(spec)
    assert total.params >= moe.params > total.params - 2 * total.width * spec.layers  # smallest width that reaches
    assert active.params >= moe.active_params
    if preset == "small":  # building is cheap here: the plan's counts are the built module's
        for p in (moe, total, active):
            m = p.build()
            assert _n_params(m) == p.params
            assert isinstance(m, MoE if p.kind == "moe" else DenseMLP)


def test_fields_are_the_record_format():
    spec = ModelSpec(experts=4, hidden=16, layers=2, top_k=2, input_dim=40, classes=4)
    moe, total, _ = plans(spec)
    assert moe.fields() == {"kind": "moe", "params": moe.params, "active_params": moe.active_params,
                            "flops_per_inference": moe.flops_per_inference, "width": 16}
    assert total.fields()["match"] == "total" and total.fields()["kind"] == "dense"
    with pytest.raises(ValueError, match="unknown"):
        ModelPlan.of("sparse", spec)


def test_moe_memory_counts_top_k_activation_rows():
    spec = ModelSpec(experts=8, hidden=64, layers=2, top_k=4, input_dim=40, classes=4)
    moe = ModelPlan.of("moe", spec)
    assert moe.widest == 64 * 4
    assert moe.memory_bytes(1000, "float32", training=True) == memory.training_bytes(moe.params, 256, 1000, 2)
    assert moe.memory_bytes(1000, "bfloat16", training=False) == memory.inference_bytes(moe.params, 256, 1000,
                                                                                           "bfloat16")


def test_plan_shows_the_memory_that_run_checks(tmp_path, monkeypatch, capsys):
    """`plan`'s figures and `run`'s check before allocating are one computation (they once differed by x top_k)."""
    asked: dict[str, list[tuple[int, str]]] = {"plan": [], "run": []}
    phase = ["plan"]

    def refuse(needed: int, device: torch.device, what: str) -> str | None:
        if not what.startswith(("training", "building", "parking")):
            return None  # the data and the bench batch fit: this test is about the models
        asked[phase[0]].append((needed, what))
        return f"out of memory (test: {what})"

    monkeypatch.setattr(memory, "fit_problem", refuse)
    args = [*SHAPE, "--batch-size", "512", "--device", "cpu", "--epochs", "1", "--samples", "200"]
    assert main(["plan", *args]) == 0
    phase[0] = "run"
    main(["run", *args, "--out", str(tmp_path), "--meter", "none", "--idle-seconds", "0"])
    assert "no model was measured" in capsys.readouterr().err  # every model refused by the same check
    assert asked["plan"] and asked["plan"] == asked["run"]
    opts = RunOptions(batch_size=512, epochs=1)
    spec = ModelSpec(experts=8, hidden=64, layers=2, top_k=4, input_dim=40, classes=4)
    want = [(p.memory_bytes(512, "float32", training=True), f"training {p.name}") for p in plans(spec, opts.models)]
    assert asked["run"] == want
    assert want[0][0] == memory.training_bytes(moe_params(spec), 64 * 4, 512, 2)  # the MoE's x top_k rows
