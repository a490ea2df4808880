"""The Python API checked as a notebook uses it: figures against an independent count, misuse refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import moe_energy as me
from moe_energy.config import ConfigError
from moe_energy.models.archs import custom_arch

ARCH = custom_arch(64, 96, 8, 2, name="audit")
SHARED = custom_arch(64, 96, 8, 2, shared_experts=1, shared_gate=True, name="audit-shared")


def _bench(model: nn.Module, x: torch.Tensor) -> me.BenchmarkResult:
    return me.benchmark(model, x, duration=0.05, repeats=1, warmup=0, meter=me.make_meter("none"))


def _executed_flops_per_token(layer: me.MoELayer, x: torch.Tensor) -> float:
    """2 x the multiply-adds of one forward as active_loop runs it (one F.linear per routed pair), per token."""
    layer.strategy = "active_loop"
    with torch.inference_mode(), FlopCounterMode(display=False) as c:
        layer(x)
    return c.get_total_flops() / x.shape[0]


@pytest.mark.parametrize("arch", [ARCH, SHARED], ids=lambda a: a.name)
@pytest.mark.parametrize("strategy", ["grouped", "dense_experts", "auto"])
def test_an_llm_layers_flops_are_its_work_whatever_the_strategy(arch, strategy):
    layer = me.MoELayer.from_arch(arch)
    x = torch.randn(16, arch.d_model, generator=torch.Generator().manual_seed(0))
    d, i, e, k = arch.d_model, arch.ffn_dim, arch.experts, arch.top_k
    by_hand = 2 * (d * e + k * 3 * d * i + arch.shared_experts * 3 * d * arch.shared_width + d * arch.shared_gate)
    assert _executed_flops_per_token(layer, x) == by_hand
    layer.strategy = strategy  # grouped_mm is invisible to FlopCounterMode; dense_experts and auto's probe run more
    res = _bench(layer, x)
    assert res.summary["flops_per_inference"] == by_hand
    assert res.flops_method.startswith("arithmetic") and res.batch_size == 16  # tokens are the inferences


def test_a_matched_dense_ffns_flops_are_two_per_weight():
    dense = me.matched_dense(me.MoELayer.from_arch(ARCH), match="active")
    res = _bench(dense, torch.randn(8, ARCH.d_model))
    assert res.summary["flops_per_inference"] == 2 * sum(p.numel() for p in dense.parameters())


def test_a_module_holding_an_moe_layer_has_no_flop_count_rather_than_a_wrong_one():
    wrapped = nn.Sequential(me.MoELayer.from_arch(ARCH, strategy="grouped"))
    res = _bench(wrapped, torch.randn(8, ARCH.d_model))
    assert res.summary["flops_per_inference"] is None and res.summary["achieved_gflops"] is None
    assert "MoE layer" in res.flops_method and "flops_per_inference=" in res.flops_method


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("first", ["int8", "w8a8"])
@pytest.mark.parametrize("again", ["int8", "w8a8"])
def test_quantizing_twice_is_refused_not_rounded_again(first, again):
    layer = me.MoELayer.from_arch(SHARED, strategy="grouped")
    x = torch.randn(8, SHARED.d_model, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = layer(x)
        me.quantize_weights(layer, first)
        once = layer(x)
    # the int8 stack quantized again lost its scales: outputs 6e8 x too large; a dense FFN silently stayed int8
    with pytest.raises(ConfigError, match=f"already {first}; quantize a fresh float copy"):
        me.quantize_weights(layer, again)
    dense = me.quantize_weights(me.matched_dense(layer, match="active"), first)
    with pytest.raises(ConfigError, match=f"already {first}"):
        me.quantize_weights(dense, again)
    with torch.inference_mode():
        assert torch.equal(layer(x), once) and _rel(once, ref) < 0.06


def test_quantizing_what_holds_no_linear_or_no_module_is_refused():
    with pytest.raises(TypeError, match="quantize_weights: model is a str; give an nn.Module"):
        me.quantize_weights("layer", "int8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ReLU holds no nn.Linear and no MoELayer"):
        me.quantize_weights(nn.ReLU(), "int8")
    moe = me.MoE(experts=4, hidden=8, layers=1, top_k=2)  # only its gate is a Linear: experts would stay fp32
    with pytest.raises(ConfigError, match="experts are no Linears"):
        me.quantize_weights(moe, "int8")
    assert isinstance(moe.gate, nn.Linear)


def test_a_layer_inside_a_module_is_quantized_as_a_layer_router_kept():
    wrapped = nn.Sequential(me.MoELayer.from_arch(ARCH), nn.Linear(ARCH.d_model, 4))
    me.quantize_weights(wrapped, "int8")
    layer = wrapped[0]
    assert layer.experts.gate_up_proj.dtype == torch.int8 and isinstance(layer.router.weight, nn.Parameter)
    assert layer.router.weight.dtype == torch.float32 and type(wrapped[1]).__name__ == "QLinear"


@pytest.mark.parametrize("fmt, most", [("int8", 0.01), ("w8a8", 0.06)])
def test_quantized_outputs_stay_close_to_the_float_ones(fmt, most):
    layer = me.MoELayer.from_arch(custom_arch(256, 512, 8, 2, name="q"), strategy="grouped")
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = layer(x)
        y = me.quantize_weights(layer, fmt)(x)
    assert 0 < _rel(y, ref) < most  # measured: int8 0.0069, w8a8 0.041 (7-bit rows on a CPU without VNNI)


@pytest.mark.parametrize("name", ["none", "estimate"])
def test_a_second_window_on_an_open_meter_is_refused_and_leaves_no_thread(name):
    import threading

    meter = me.make_meter(name)
    threads = threading.active_count()
    with pytest.raises(ConfigError, match="a window is already open on it"), meter.window("outer") as outer:
        with meter.window("inner"):  # used to restart the clock under the outer window, whose end() then failed
            pass
    assert outer.result is None and threading.active_count() == threads  # the outer sampler stopped too
    with pytest.raises(ConfigError, match="a window is already open on it"), meter.window("outer"):
        me.benchmark(nn.Linear(4, 2), torch.randn(2, 4), duration=0.05, repeats=1, warmup=0, meter=meter)
    with meter.window("after") as w:  # the meter is usable again
        pass
    assert w.result is not None and w.result.seconds >= 0


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_a_gpu_this_host_lacks_is_a_config_error_before_anything_is_built(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # torch's own AssertionError came from here
    with pytest.raises(ConfigError, match="no CUDA GPU is visible to PyTorch here; use device='cpu'"):
        me.MoELayer.from_arch(ARCH, device=device)
    with pytest.raises(ConfigError, match="build_model: device=.*no CUDA GPU is visible"):
        me.build_model("qwen3-30b-a3b", tiny=True, device=device)


def test_a_gpu_index_past_the_last_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="PyTorch sees 1 GPU"):
        me.MoELayer.from_arch(ARCH, device="cuda:3")


@pytest.mark.parametrize("dense", [False, True])
def test_fp8_weights_off_an_fp8_gpu_are_refused_as_run_refuses_them(dense):
    layer = me.MoELayer.from_arch(ARCH)
    model = me.quantize_weights(me.matched_dense(layer) if dense else layer, "fp8")  # numerics on a CPU: allowed
    with pytest.raises(ConfigError, match="the model holds fp8 weights, and fp8 weights run on CUDA GPUs.*"
                                          "quantize it as 'int8' or 'w8a8' instead"):
        _bench(model, torch.randn(4, ARCH.d_model))  # it timed the emulation: rounded rows, dequantized weights
