"""--weights int8 (issue 24): every model of an LLM-layer run held int8 weight-only, its output error against the
dtype's own weights recorded, its bytes counted at about one a parameter; refused where it is not built."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, TINY_LAYER, error_line, in_process

from moe_energy.config import PRESETS, RunOptions
from moe_energy.energy.select import make_meter
from moe_energy.errors import ConfigError
from moe_energy.measure import roofline
from moe_energy.models import quant
from moe_energy.models.archs import custom_arch
from moe_energy.models.counting import expected_experts_touched, layer_weight_bytes, router_params
from moe_energy.models.llm import MoELayer, quantize_weights
from moe_energy.models.plan import ModelPlan, plans
from moe_energy.models.quant import QLinear, QWeight
from moe_energy.runner.layer import forward_bound_s, run_llm

ARCH = custom_arch(64, 32, 8, 2)  # widths a multiple of 16: the int8pack kernel's rows on a bf16 CPU too
SHARED = custom_arch(64, 32, 8, 2, shared_experts=1, shared_gate=True)  # Qwen's gated shared expert
CPU = torch.device("cpu")


def test_a_quantized_layer_holds_int8_experts_and_its_router_in_the_dtype():
    layer = MoELayer.from_arch(SHARED, dtype="float32", seed=0)
    x = torch.randn(16, layer.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = layer(x)
        quantize_weights(layer, "int8")
        y = layer(x)
    assert layer.experts.gate_up_proj.dtype == torch.int8 and layer.experts.down_proj.dtype == torch.int8
    assert layer.experts.gate_up_scale.shape == layer.experts.gate_up_proj.shape[:2]
    assert not any(isinstance(m, QLinear) for m in layer.router.modules())
    assert all(p.dtype == torch.float32 for p in layer.router.parameters())
    assert isinstance(layer.shared.down_proj, QLinear)  # shared experts int8 too
    assert 0 < float((y - ref).norm() / ref.norm()) < 0.02  # int8's rounding, no more
    with pytest.raises(ConfigError, match="weights='fp4' is unknown"):
        quantize_weights(layer, "fp4")


def test_every_strategy_agrees_on_int8_weights():
    layer = MoELayer.from_arch(ARCH, dtype="bfloat16", seed=0)
    quantize_weights(layer, "int8")
    x = torch.randn(12, ARCH.d_model, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    outs = {}
    with torch.no_grad():
        for s in ("grouped", "padded", "active_loop", "dense_experts"):
            layer.strategy = s
            outs[s] = layer(x).float()
    for s, y in outs.items():
        assert float((y - outs["grouped"]).norm() / outs["grouped"].norm()) < 0.02, s


def test_int8_plans_count_about_a_byte_a_parameter_and_the_router_in_the_dtype():
    moe, dense = plans(ARCH, ("moe", "dense_total"), "int8")
    fp = ModelPlan.of("moe", ARCH)
    r = router_params(ARCH)
    d, w = ARCH.d_model, ARCH.ffn_dim
    per = 1 + 4 * (2 * w + d) / (3 * d * w)  # int8 and its share of the per-row fp32 scale
    assert moe.weights == "int8" and fp.weights is None
    assert moe.weight_bytes("bfloat16") == round((moe.params - r) * per + 2 * r)
    assert moe.weight_bytes_read("bfloat16", 3) == pytest.approx(layer_weight_bytes(ARCH, 3, per) - r * per + 2 * r)
    assert dense.weight_bytes("float32") < dense.quantized(None).weight_bytes("float32") / 3.5
    # built in the dtype, then quantized: the float copy is the peak a run must fit
    assert moe.memory_bytes(1, "float32") == fp.memory_bytes(1, "float32")
    with pytest.raises(ValueError, match="LLM layers only"):
        ModelPlan.of("moe", PRESETS["small"]).quantized("int8")


@pytest.mark.slow
def test_run_weights_int8_records_the_format_and_each_models_output_error(tmp_path):
    opts = RunOptions(duration=0.2, warmup=0.0, repeats=1, idle_seconds=0.0, cooldown=0.0, device="cpu",
                      out=str(tmp_path), dtype="bfloat16", weights="int8").validate()
    doc, _ = run_llm(ARCH, opts, [1, 8], "random", make_meter("none", CPU), save=False, sleep=lambda s: None)
    assert doc["options"]["weights"] == "int8"
    ms = doc["models"]
    assert len(ms) == 6 and all(m["status"] == "measured" for m in ms)
    errs = {m["name"].split("@")[0]: m["weights_output_error"] for m in ms}
    assert all(0 < e < 0.03 for e in errs.values()) and len(set(errs)) == 3
    moe = next(m for m in ms if m["kind"] == "moe" and m["tokens_per_forward"] == 8)
    plan = ModelPlan.of("moe", ARCH).quantized("int8")
    assert moe["weights"] == "int8"
    assert moe["weight_bytes_read_per_forward"] == pytest.approx(plan.weight_bytes_read("bfloat16",
                                                                                        moe["experts_touched"]))


@pytest.mark.slow
def test_cli_weights_int8_runs_and_says_so_under_the_table(tmp_path):
    r = in_process("run", *TINY_LAYER, "--d-model", "64", "--ffn-dim", "32", "--tokens", "1,4", "--weights", "int8",
                   "--dtype", "bfloat16", "--meter", "none", *QUICK[QUICK.index("--duration"):], "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "weights: int8 weight-only" in r.stdout and "output error" in r.stdout
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["options"]["weights"] == "int8" and len(doc["models"]) == 6


@pytest.mark.parametrize("argv, needle", [
    (["--weights", "fp8"], "--weights fp8: fp8 weights run on CUDA GPUs with fp8 arithmetic"),  # not on a CPU
    (["--weights", "float8"], "fp8 weights are spelled fp8"),
    (["--weights", "int4"], "weights='int4' is unknown"),
])
def test_unknown_or_unbuilt_weight_formats_are_one_line_errors(argv, needle, capsys):
    from moe_energy.cli import main
    assert main(["run", *TINY_LAYER, *argv, *QUICK[QUICK.index("--duration"):]]) == 2
    err = capsys.readouterr().err
    line = error_line(err)
    assert needle in line
    assert err.strip() == line  # refused before the meter is chosen: no notice of it comes first


def test_weights_are_refused_for_the_seed_and_whole_models(capsys):
    from moe_energy.cli import main
    assert main(["run", "--preset", "small", "--weights", "int8", *QUICK]) == 2
    assert "--weights" in error_line(capsys.readouterr().err)
    assert main(["run", "--model", "olmoe-1b-7b", "--tiny", "--weights", "int8", *QUICK[QUICK.index("--duration"):]]) \
        == 2
    assert "--weights" in error_line(capsys.readouterr().err)


# -- w8a8: int8 weights and int8 activations, each row on its own scale ------------------------------------------
def _weight(out: int = 48, k: int = 64) -> QWeight:
    return quant.quantize(torch.randn(out, k, generator=torch.Generator().manual_seed(3)) * 0.1)


def _rows(n: int) -> torch.Tensor:
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(n))
    x[0] *= 40  # rows of very different ranges: a per-call scale would crush the small ones
    return x


@pytest.mark.parametrize("n", [1, 3, 17])
def test_w8a8_fbgemm_reproduces_each_rows_rounding(n):
    q = quant.with_acts(_weight())
    assert q.packed is not None  # this torch has fbgemm: the kernel under test runs
    x = _rows(n)
    y = quant.linear(x, q)
    s = x.abs().amax(-1, keepdim=True) / quant.act_levels()
    xq = (x / s).round()
    assert xq.abs().max() == quant.act_levels()
    ref = F.linear(xq * s, quant.dequantize(q))  # the rounding spelled out, no kernel of ours
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    reference = quant.linear(x, q._replace(packed=None))  # the path a GPU, autograd or compile takes
    assert torch.allclose(y, reference, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    alone = torch.cat([quant.linear(x[i:i + 1], q) for i in range(n)])  # a row's numbers depend on it alone
    assert torch.allclose(y, alone, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    err = float((y - F.linear(x, quant.dequantize(q))).norm(dim=1).div(F.linear(x, quant.dequantize(q)).norm(dim=1))
                .max())
    assert 0 < err < 0.03  # 7-bit rows: about 1-2 % per row, the large row's and the small rows' alike


def test_w8a8_rows_are_8_bit_exactly_where_fbgemm_multiplies_8_bit_rows_without_overflow():
    """act_levels' probe against the kernel itself: full-range integer rows through a full-range weight, exact (int32
    sums) or not; 7-bit rows where not (x86 without VNNI), and then 7-bit rows are exact."""
    g = torch.Generator().manual_seed(0)
    qd = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=g)
    q = QWeight(qd, torch.ones(64))
    packed = quant.pack(q)
    for n in (127, 63):
        xq = torch.randint(-n, n + 1, (4, 256), generator=g).float()
        exact = torch.equal(quant.int8_gemm(xq, packed, n), xq @ qd.float().t())
        if n == 127:
            assert exact == (quant.act_levels() == 127)
        else:
            assert exact
    assert quant.act_levels() in quant.ACT_LEVELS and f"[-{quant.act_levels()}, " in quant.describe("w8a8")


def test_w8a8_zero_rows_stay_zero_and_bf16_rows_come_back_bf16():
    q = quant.with_acts(_weight())
    x = torch.zeros(2, 64)
    x[1] = 1.0
    y = quant.linear(x, q, b=torch.ones(48))
    assert torch.equal(y[0], torch.ones(48)) and torch.isfinite(y).all()
    yb = quant.linear(_rows(4).bfloat16(), q)
    assert yb.dtype == torch.bfloat16
    assert float((yb.float() - quant.linear(_rows(4), q)).norm() / yb.float().norm()) < 0.01


def test_w8a8_layers_agree_across_strategies_and_hold_packed_copies():
    layer = MoELayer.from_arch(SHARED, dtype="float32", seed=0, strategy="grouped")
    x = torch.randn(12, SHARED.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = layer(x)
        quantize_weights(layer, "w8a8")
        outs = {}
        for s in ("grouped", "padded", "active_loop", "masked_loop", "dense_experts", "grouped_fm"):
            layer.strategy = s
            outs[s] = layer(x)
    assert layer.experts.acts and len(layer.experts.packs) == 2 and len(layer.experts.packs[0]) == SHARED.experts
    assert layer.shared.down_proj.acts and layer.shared.down_proj.packed is not None
    assert not any(isinstance(m, QLinear) for m in layer.router.modules())
    for s, y in outs.items():  # per-row rounding: the padded rows, every-token experts and sorted groups agree
        assert float((y - outs["grouped"]).norm() / outs["grouped"].norm()) < 1e-5, s
    assert 0.005 < float((outs["grouped"] - ref).norm() / ref.norm()) < 0.05


def test_w8a8_plans_read_a_byte_a_weight_and_hold_the_packed_copy_too():
    moe8, dense8 = plans(ARCH, ("moe", "dense_total"), "int8")
    moe, dense = plans(ARCH, ("moe", "dense_total"), "w8a8")
    assert moe.weight_bytes_read("float32", 3) == moe8.weight_bytes_read("float32", 3)
    assert moe.weight_bytes("float32") == moe8.weight_bytes("float32") + moe.params - router_params(ARCH)
    assert dense.weight_bytes("float32") == dense8.weight_bytes("float32") + dense.params


@pytest.mark.slow
def test_cli_weights_w8a8_runs_and_states_both_roundings(tmp_path):
    r = in_process("run", *TINY_LAYER, "--d-model", "64", "--ffn-dim", "32", "--tokens", "1,4", "--weights", "w8a8",
                   "--meter", "none", *QUICK[QUICK.index("--duration"):], "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "int8 activations (each row rounded" in r.stdout and "output error" in r.stdout
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["options"]["weights"] == "w8a8" and len(doc["models"]) == 6
    assert all(m["weights"] == "w8a8" and 0 < m["weights_output_error"] < 0.05 for m in doc["models"])


def test_w8a8_bounds_use_the_int8_kernels_rate_calibrated_on_first_use(tmp_path, monkeypatch):
    """A w8a8 model's FLOPs run on int8 arithmetic: its compute bound is that kernel's rate, measured the first
    time a run needs it (beside the cached dtype's), not the dtype's GEMM rate."""
    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path))
    roofline.calibrate(CPU, ("float32",), seconds=0.01, gemm_size=64, copy_bytes=2**20)
    said: list[str] = []
    roof = roofline.load_or_calibrate(CPU, "float32", said.append, weights="w8a8")
    assert len(said) == 1 and said[0].startswith("no w8a8 roofline cached for cpu")
    assert set(roof.gemm_flops_per_s) == {"float32", "w8a8"} and roof.gemm_flops_per_s["w8a8"] > 0
    again = roofline.load_or_calibrate(CPU, "float32", said.append, weights="w8a8")  # cached now: nothing said
    assert len(said) == 1 and again.gemm_flops_per_s == roof.gemm_flops_per_s
    plan = ModelPlan.of("moe", ARCH).quantized("w8a8")
    assert plan.rate_key("float32") == "w8a8" and plan.quantized("int8").rate_key("float32") == "float32"
    flops = plan.flops_per_inference * 64
    touched = expected_experts_touched(ARCH.experts, ARCH.top_k, 64)
    want = max(plan.weight_bytes_read("float32", touched) / roof.bandwidth_bytes_per_s,
               flops / roof.gemm_flops_per_s["w8a8"])
    assert forward_bound_s(roof, plan, 64, "float32") == pytest.approx(want)
