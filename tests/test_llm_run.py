"""LLM-layer runs (issue 13): per-token figures of an MoE layer and its matched dense FFNs, the routing modes
and their counted load, memory refusals before allocating, the layer API and the --arch command functions.

Tiny custom shapes (d=32, I=16, E=8, k=2) and short windows; values and counts are asserted, never times."""

from __future__ import annotations

import argparse
import gc
import json
import weakref
from dataclasses import replace

import pytest
import torch
from conftest import TINY_LAYER

import moe_energy as me
from moe_energy import memory
from moe_energy.cli import build_parser
from moe_energy.commands.options import resolve_layer
from moe_energy.config import RunOptions
from moe_energy.device import llm_default_dtype
from moe_energy.energy.select import make_meter
from moe_energy.errors import ConfigError
from moe_energy.models.archs import ROUTER_KINDS, RouterSpec, custom_arch
from moe_energy.models.counting import layer_params, layer_weight_bytes, swiglu_params
from moe_energy.models.dense import DenseMLP, DenseSwiGLU, matched_dense
from moe_energy.models.llm import MoELayer
from moe_energy.models.moe import MoE
from moe_energy.models.plan import ModelPlan as LayerPlan
from moe_energy.models.routing import (
    BenchRouter,
    balanced_assignment,
    parse_routing,
    read_load,
    zipf_assignment,
)
from moe_energy.runner.layer import Layer, fit_alone, run_llm

D, INTER, E, K = 32, 16, 8, 2
ARCH = custom_arch(D, INTER, E, K)
CPU = torch.device("cpu")


def opts(tmp_path, **kw) -> RunOptions:
    base = dict(duration=0.2, warmup=0.0, repeats=2, idle_seconds=0.0, cooldown=0.0, device="cpu", out=str(tmp_path))
    return RunOptions(**{**base, **kw}).validate()


def run(tmp_path, routing="random", tokens=(1, 8), meter=None, save=False, **kw):
    return run_llm(ARCH, opts(tmp_path, **kw), list(tokens), routing, meter or make_meter("none", CPU), save=save,
                   sleep=lambda s: None)


def by_name(doc: dict) -> dict[str, dict]:
    return {m["name"]: m for m in doc["models"]}


# -- runs ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_gives_one_record_per_model_and_token_count_with_per_token_energy(tmp_path, live_rapl):
    doc, path = run(tmp_path, meter=make_meter("rapl", CPU), save=True)
    names = [m["name"] for m in doc["models"]]
    assert names == ["moe[auto]@T=1", "dense_total@T=1", "dense_active@T=1",
                     "moe[auto]@T=8", "dense_total@T=8", "dense_active@T=8"]
    for m in doc["models"]:
        T = m["tokens_per_forward"]
        assert m["status"] == "measured" and m["repeats"] == 2 and m["energy_method"] == "counter"
        assert (m["arch"], m["routing"]) == ("custom", "random")
        for w in m["windows"]:
            assert w["tokens_per_forward"] == T and w["inferences"] == w["batches"] * T  # inferences are tokens
            assert w["inferences_per_joule"] == pytest.approx(w["inferences"] / w["energy_j"])
        assert m["tokens_per_joule"] == m["inferences_per_joule"] and m["tokens_per_joule"] > 0
        assert m["tokens_per_second"] == m["inferences_per_second"]
        assert m["joules_per_1k_tokens"] == pytest.approx(1000 / m["tokens_per_joule"])
        assert m["model_extrapolated"]["label"].startswith("EXTRAPOLATED")
        if m["kind"] == "moe":
            assert K <= m["experts_touched"] <= min(E, T * K)
            assert m["weight_bytes_read_per_forward"] == layer_weight_bytes(ARCH, m["experts_touched"], 4)
            assert m["experts_touched_if_uniform"] == pytest.approx(E * (1 - (1 - K / E) ** T))
            assert all(w["experts_touched"] == m["experts_touched"] for w in m["windows"])
        else:
            assert m["experts_touched"] is None and m["weight_bytes_read_per_forward"] == m["params"] * 4
    assert by_name(doc)["moe[auto]@T=1"]["experts_touched"] == K  # one token: its k distinct experts
    saved = json.loads(path.read_text())
    assert saved["arch"]["d_model"] == D and saved["arch"]["source"] == "custom" and saved["spec"] == saved["arch"]
    assert saved["routing"]["mode"] == "random" and saved["tokens"] == [1, 8] and saved["family"] == "llm_layer"
    assert saved["schema_version"] >= 1 and "epochs" not in saved["options"]
    assert len(saved["models"]) == 6


def test_balanced_routing_counts_exactly(tmp_path):
    doc, _ = run(tmp_path, "balanced", tokens=(1, 8, 12), models=("moe",), repeats=1)
    for m in doc["models"]:
        T = m["tokens_per_forward"]
        assert m["experts_touched"] == min(E, T * K)
        assert m["weight_bytes_read_per_forward"] == layer_weight_bytes(ARCH, min(E, T * K), 4)
    assert by_name(doc)["moe[auto]@T=8"]["expert_load_max_over_mean"] == 1.0  # 16 pairs, 2 per expert
    assert by_name(doc)["moe[auto]@T=12"]["expert_load_max_over_mean"] == pytest.approx(3 / 3)  # 24 pairs: 3 each
    assert doc["routing"] == {"mode": "balanced", "kind": "balanced", "zipf_alpha": None}


def test_skewed_routing_loads_experts_unevenly(tmp_path):
    skewed, _ = run(tmp_path, "skewed:1.2", tokens=(64,), models=("moe",), repeats=1)
    balanced, _ = run(tmp_path, "balanced", tokens=(64,), models=("moe",), repeats=1)
    s, b = skewed["models"][0], balanced["models"][0]
    assert s["expert_load_max_over_mean"] > b["expert_load_max_over_mean"] == 1.0
    assert skewed["routing"]["zipf_alpha"] == 1.2 and s["routing"] == "skewed:1.2"


@pytest.mark.slow
def test_each_record_says_its_bytes_read_its_two_bounds_which_applies_and_the_fraction(tmp_path, monkeypatch):
    """Bytes per forward counted per window (router + touched experts + shared), and with a calibrated roofline
    the memory- and compute-bound times, the bound that applies (the slower) and the achieved fraction of it."""
    from moe_energy.measure import roofline
    from moe_energy.runner import layer as llm_pipeline

    # 1 GB/s and 1 GFLOP/s: a T=1 forward of this layer (13 kB read, ~6 kFLOP) is memory-bound, T=64 compute-bound
    roof = roofline.Roofline("cpu:test", {"float32": 1e9}, 1e9, 64, 2**20, "2026-01-01T00:00:00+00:00")
    monkeypatch.setattr(llm_pipeline.roofline, "load", lambda device, notice=None: roof)
    doc, _ = run(tmp_path, "balanced", tokens=(1, 64), repeats=1)
    for m in doc["models"]:
        T, plan = m["tokens_per_forward"], LayerPlan.of(m["name"].split("@")[0].split("[")[0], ARCH)
        nbytes, flops = m["weight_bytes_read_per_forward"], plan.flops_per_token * T
        if m["kind"] == "moe":
            assert nbytes == layer_weight_bytes(ARCH, min(E, T * K), 4)
            assert [w["weight_bytes_read_per_forward"] for w in m["windows"]] == [nbytes]  # counted per window
        assert m["memory_bound_ms"] == pytest.approx(nbytes / 1e9 * 1e3)
        assert m["compute_bound_ms"] == pytest.approx(flops / 1e9 * 1e3)
        assert m["bound"] == ("memory" if m["memory_bound_ms"] >= m["compute_bound_ms"] else "compute")
        assert m["roofline_bound_ms"] == max(m["memory_bound_ms"], m["compute_bound_ms"])
        assert m["fraction_of_roofline"] == pytest.approx(m["roofline_bound_ms"] / 1e3 / (T / m["tokens_per_second"]))
    bounds = {m["name"]: m["bound"] for m in doc["models"]}
    assert bounds["moe[auto]@T=1"] == "memory" and bounds["moe[auto]@T=64"] == "compute"


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False])
def test_max_forward_s_skips_with_the_reason_what_the_roofline_says_outlasts_it(tmp_path, monkeypatch, cached):
    """At 1 GFLOP/s a T=64 forward of the total-matched FFN (~1.6 MFLOP) takes >= 1.6 ms: over a 1 ms limit, so
    skipped with the reason; the MoE and the active-matched FFN (~0.42 ms) and every T=1 forward are measured.
    Without a cached roofline the run calibrates one first (once), since the limit needs it."""
    from moe_energy.measure import roofline
    from moe_energy.runner import layer as llm_pipeline

    roof = roofline.Roofline("cpu:test", {"float32": 1e9}, 1e9, 64, 2**20, "2026-01-01T00:00:00+00:00")
    calibrated: list[str] = []
    monkeypatch.setattr(roofline, "load", lambda device, notice=None: roof if cached else None)
    monkeypatch.setattr(roofline, "calibrate",
                        lambda device, dtypes=(), save=True: calibrated.append((str(device), dtypes)) or roof)
    monkeypatch.setattr(roofline, "_store", lambda r: None)
    doc, _ = run(tmp_path, "balanced", tokens=(1, 64), repeats=1, max_forward_s=1e-3)
    status = {m["name"]: m["status"] for m in doc["models"]}
    assert status == {"moe[auto]@T=1": "measured", "dense_total@T=1": "measured", "dense_active@T=1": "measured",
                      "moe[auto]@T=64": "measured", "dense_total@T=64": "skipped", "dense_active@T=64": "measured"}
    skipped = by_name(doc)["dense_total@T=64"]
    bound = LayerPlan.of("dense_total", ARCH).flops_per_token * 64 / 1e9
    assert skipped["skipped"] == (f"one forward takes at least {bound:.3g} s here (roofline bound), over "
                                  "--max-forward-s 0.001; raise --max-forward-s to measure it")
    assert skipped["windows"] == [] and skipped["tokens_per_joule"] is None
    assert calibrated == ([] if cached else [("cpu", ("float32",))])  # the dtype in use only
    assert doc["options"]["max_forward_s"] == 1e-3
    assert llm_pipeline.forward_too_long(roof, LayerPlan.of("dense_total", ARCH), 64, opts(tmp_path)) is None


def test_a_deepseek_routers_bytes_read_count_it_at_fp32_in_a_half_layer():
    arch = custom_arch(D, INTER, E, K, shared_experts=1, router=RouterSpec("deepseek_v2"))
    moe = LayerPlan.of("moe", arch)
    router = E * D
    assert moe.weight_bytes_read("bfloat16", 3) == layer_weight_bytes(arch, 3, 2) + 2 * router  # held in fp32
    assert moe.weight_bytes_read("float32", 3) == layer_weight_bytes(arch, 3, 4)


@pytest.mark.parametrize("tokens, experts, k", [(8, 8, 2), (12, 8, 2), (5, 8, 3), (64, 16, 4), (3, 4, 4)])
def test_balanced_assignment_deals_pairs_evenly_and_distinct(tokens, experts, k):
    a = balanced_assignment(tokens, experts, k, seed=3)
    assert a.shape == (tokens, k) and a.dtype == torch.long
    counts = torch.bincount(a.flatten(), minlength=experts)
    assert counts.max() - counts.min() <= 1 and counts.sum() == tokens * k
    if tokens * k % experts == 0:
        assert (counts == tokens * k // experts).all()
    assert all(len(set(row.tolist())) == k for row in a)


def test_zipf_assignment_is_seeded_distinct_and_skewed():
    a = zipf_assignment(256, 16, 4, alpha=1.2, seed=0)
    assert torch.equal(a, zipf_assignment(256, 16, 4, alpha=1.2, seed=0))
    assert not torch.equal(a, zipf_assignment(256, 16, 4, alpha=1.2, seed=1))
    assert all(len(set(row.tolist())) == 4 for row in a)
    counts = torch.bincount(a.flatten(), minlength=16).double()
    assert counts.max() / counts.mean() > 1.5
    steep = zipf_assignment(256, 16, 4, alpha=50.0, seed=0)  # no underflow: still k distinct, the top 4 ranks
    assert all(len(set(row.tolist())) == 4 for row in steep) and steep.unique().numel() == 4


def test_bench_router_counts_on_the_device_and_keeps_the_routers_weights():
    layer = MoELayer.from_arch(ARCH, strategy="grouped")
    inner = layer.router
    layer.router = BenchRouter(inner, E, K, parse_routing("balanced"))
    x = torch.randn(8, D)
    with torch.inference_mode():
        idx, w = layer.router(x)
        _, w_inner = inner(x)
        layer(x)
    torch.testing.assert_close(w, w_inner)  # the router ran; only its choice of experts was replaced
    assert torch.equal(idx, balanced_assignment(8, E, K))
    load = read_load(layer.router, 8)
    assert load is not None and load.forwards == 2 and load.experts_touched == E and load.max_over_mean == 1.0
    layer.router.reset_load()
    assert read_load(layer.router, 8) is None


@pytest.mark.parametrize("text", ["", "zipf", "skewed", "skewed:", "skewed:x", "skewed:0", "skewed:-1", "skewed:nan",
                                  "skewed:inf", "skewed:1000", "balanced:2", "random:1", "Random", 3])
def test_invalid_routing_is_a_one_line_config_error(text):
    with pytest.raises(ConfigError) as e:
        parse_routing(text)
    assert "\n" not in str(e.value) and "--routing" in str(e.value)


def test_routing_text_round_trips():
    assert parse_routing("skewed:1.20").text == "skewed:1.2" and parse_routing(" balanced ").kind == "balanced"


# -- memory ----------------------------------------------------------------------------------------------------
def test_a_layer_too_big_is_skipped_with_the_reason_before_allocating(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.OVERHEAD_BYTES + 30_000)

    def never(*a, **k):
        raise AssertionError("the MoE layer was allocated")

    monkeypatch.setattr(MoELayer, "from_arch", never)
    doc, _ = run(tmp_path, repeats=1)
    for m in doc["models"]:
        if m["name"].startswith(("moe", "dense_total")):
            assert m["status"] == "skipped" and m["tokens_per_joule"] is None and m["windows"] == []
            assert m["skipped"].startswith("out of memory (building ") and "GiB free on cpu" in m["skipped"]
        else:
            assert m["status"] == "measured" and m["repeats"] == 1


@pytest.mark.slow
def test_models_that_fit_alone_but_not_together_are_measured_one_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.OVERHEAD_BYTES + 80_000)
    plans = [LayerPlan.of(n, ARCH) for n in ("moe", "dense_total", "dense_active")]
    o = opts(tmp_path)
    assert all(fit_alone(p, o, [1, 8], CPU) is None for p in plans)
    held: list[weakref.ref] = []
    real_build = Layer.build

    def build(self, r, plan):  # every model built before this one must be gone: its memory is this one's
        gc.collect()
        assert [ref() for ref in held if ref() is not None] == [], f"building {plan.name} with another held"
        b = real_build(self, r, plan)
        held.append(weakref.ref(b.model))
        return b

    monkeypatch.setattr(Layer, "build", build)
    doc, _ = run(tmp_path, repeats=2)
    assert len(held) == 3
    assert any(n.startswith("measured one at a time") for n in doc["notices"])
    assert all(m["status"] == "measured" for m in doc["models"])
    orders = {}
    for m in doc["models"]:
        orders.setdefault(m["name"].split("@")[0], []).extend(w["order"] for w in m["windows"])
    spans = sorted((min(o), max(o)) for o in orders.values())
    assert all(len(o) == 4 for o in orders.values())  # 2 token counts x 2 repeats
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # each model's windows in one block


# -- the layer API ---------------------------------------------------------------------------------------------
def _tiny(kind: str):
    if kind == "sigmoid_group":
        spec = RouterSpec(kind, normalize=True, scaling=2.5, n_group=4, topk_group=2)
        return custom_arch(D, INTER, E, K, router=spec)
    if kind == "deepseek_v2":
        return custom_arch(D, INTER, E, K, shared_experts=2, router=RouterSpec(kind, n_group=2, topk_group=1))
    if kind == "topk_softmax":
        return replace(custom_arch(D, INTER, E, K, router=kind), expert_bias=True, act="gpt_oss")
    return custom_arch(D, INTER, E, K, router=kind)


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_from_arch_builds_and_runs_every_router(kind):
    arch = _tiny(kind)
    rng, default = torch.random.get_rng_state(), torch.get_default_dtype()
    layer = MoELayer.from_arch(arch, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng) and torch.get_default_dtype() == default
    assert sum(p.numel() for p in layer.parameters()) == layer_params(arch) and layer.arch == arch
    with torch.inference_mode():
        assert layer(torch.randn(5, D)).shape == (5, D)
    again = MoELayer.from_arch(arch, seed=1)
    assert torch.equal(layer.experts.gate_up_proj, again.experts.gate_up_proj)
    half = MoELayer.from_arch(arch, dtype="bfloat16", seed=1)
    assert half.experts.gate_up_proj.dtype == torch.bfloat16
    fp32_router = kind in ("deepseek_v2", "sigmoid_group")
    assert next(half.router.parameters()).dtype == (torch.float32 if fp32_router else torch.bfloat16)
    with torch.inference_mode():
        assert half(torch.randn(3, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_from_arch_by_name_and_its_argument_errors():
    with pytest.raises(ConfigError, match="arch 'nope' is unknown"):
        MoELayer.from_arch("nope")
    with pytest.raises(TypeError, match="arch=5"):
        MoELayer.from_arch(5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dtype='float8'"):
        MoELayer.from_arch(ARCH, dtype="float8")
    with pytest.raises(TypeError, match="seed"):
        MoELayer.from_arch(ARCH, seed=1.5)  # type: ignore[arg-type]
    assert "mixtral-8x7b" in me.archs() and me.archs()["mixtral-8x7b"].experts == 8
    me.archs().clear()
    assert me.archs() and me.MoELayer is MoELayer


@pytest.mark.parametrize("match", ["total", "active"])
def test_matched_dense_of_a_layer_is_the_smallest_swiglu_reaching_it(match):
    arch = _tiny("deepseek_v2")
    layer = MoELayer.from_arch(arch)
    dense = matched_dense(layer, match)
    total = sum(p.numel() for p in layer.parameters())
    target = total if match == "total" else total - (E - K) * 3 * D * INTER
    assert isinstance(dense, DenseSwiGLU) and dense.d_model == D
    assert dense.num_params >= target > swiglu_params(D, dense.width - 1)


def test_matched_dense_reads_a_hand_built_layer_and_keeps_the_seeds_behaviour():
    class NoK(torch.nn.Module):  # a router that does not say its k
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(E, D))

        def forward(self, x):
            return (x @ self.weight.T).topk(K, dim=-1)[::-1]

    layer = MoELayer(D, INTER, E, NoK(), shared_intermediate=24, shared_gate=True)
    total = sum(p.numel() for p in layer.parameters())
    dense = matched_dense(layer, "total")
    assert dense.num_params >= total > swiglu_params(D, dense.width - 1)
    with pytest.raises(ConfigError, match="no top_k"):
        matched_dense(layer, "active")
    seed = MoE(experts=4, hidden=16, layers=2, top_k=2, input_dim=40, classes=4)
    assert isinstance(matched_dense(seed, "total"), DenseMLP)
    with pytest.raises(ConfigError, match="match='both'"):
        matched_dense(layer, "both")  # type: ignore[arg-type]


def test_benchmark_counts_tokens_as_inferences():
    layer = me.MoELayer.from_arch(ARCH, strategy="grouped")
    res = me.benchmark(layer, torch.randn(6, D), duration=0.05, repeats=1, warmup=0, meter=make_meter("none", CPU))
    assert res.summary["batch_size"] == 6 and res.windows[0]["inferences"] == 6 * res.windows[0]["batches"]


# -- the --arch command functions ------------------------------------------------------------------------------
def parser(cmd: str = "run") -> argparse.ArgumentParser:
    """The CLI's own parser, its ``cmd`` chosen: parse_args(argv) gives that command's namespace."""
    p = build_parser()

    class Sub:
        def parse_args(self, argv: list[str]) -> argparse.Namespace:
            return p.parse_args([cmd, *argv])

    return Sub()  # type: ignore[return-value]


def resolve_llm(args: argparse.Namespace):  # noqa: ANN201
    w, o = resolve_layer(args)
    return w.arch, o, w.tokens, w.routing


TINY = TINY_LAYER


@pytest.mark.parametrize("native, dtype", [(True, "bfloat16"), (False, "float32")])
def test_an_llm_layer_runs_bf16_by_default_where_the_cpu_does_natively_and_says_why(monkeypatch, native, dtype):
    """Issue 24: bf16 where the CPU runs it natively (avx512_bf16 or AMX), fp32 where it would be emulated; --dtype
    still decides; the reason travels with the options into the document."""
    from moe_energy import device

    monkeypatch.setattr(device, "cpu_native_bf16", lambda: (native, "AMX bf16 (oneDNN)" if native else "emulated"))
    _arch, o, _t, _r = resolve_llm(parser().parse_args([*TINY, "--device", "cpu"]))
    assert o.dtype == dtype and (("natively" in o.extra["dtype_why"]) is native)
    _arch, o, _t, _r = resolve_llm(parser().parse_args([*TINY, "--device", "cpu", "--dtype", "float32"]))
    assert o.dtype == "float32" and o.extra["dtype_why"] == "given (--dtype)"


def test_resolve_llm_gives_arch_options_tokens_and_routing():
    arch, o, tokens, routing = resolve_llm(parser().parse_args([*TINY, "--tokens", "1,16,16,4", "--routing",
                                                                "skewed:2", "--device", "cpu"]))
    assert (arch.d_model, arch.ffn_dim, arch.experts, arch.top_k) == (D, INTER, E, K)
    assert tokens == [1, 16, 4] and routing.alpha == 2.0
    assert o.dtype == llm_default_dtype(CPU)[0]  # bf16 where this CPU runs it natively, else fp32
    arch, o, tokens, routing = resolve_llm(parser().parse_args(["--arch", "olmoe-1b-7b", "--experts", "16",
                                                                "--dtype", "bfloat16"]))
    assert arch.name == "olmoe-1b-7b-custom" and arch.experts == 16 and arch.d_model == 2048 and "olmoe" in arch.source
    assert o.dtype == "bfloat16" and tokens == [1, 16, 128, 1024] and routing.kind == "random"


@pytest.mark.parametrize("argv, needle", [
    (["--tokens", "1,x"], "'x' is not a whole number"),
    (["--tokens", "0"], "from 1 to"),
    (["--routing", "zipf"], "--routing 'zipf' is unknown"),
    (["--hidden", "64"], "--hidden: no meaning with --arch"),
    (["--epochs", "2", "--batch-size", "8"], "--epochs, --batch-size: no meaning"),
    (["--top-k", "9"], "top_k=9 exceeds experts=8"),
    (["--router", "best"], "router='best' is unknown"),
    (["--duration", "-1"], "duration=-1"),
])
def test_resolve_llm_mistakes_are_one_line_config_errors(argv, needle):
    with pytest.raises(ConfigError) as e:
        resolve_llm(parser().parse_args([*TINY, *argv]))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_resolve_llm_needs_an_arch_and_a_whole_custom_shape():
    with pytest.raises(ConfigError, match="--arch is required"):
        resolve_llm(parser().parse_args([]))
    with pytest.raises(ConfigError, match="--arch custom needs --ffn-dim, --experts, --top-k"):
        resolve_llm(parser().parse_args(["--arch", "custom", "--d-model", "32"]))
    with pytest.raises(ConfigError, match="arch 'mixtral' is unknown"):
        resolve_llm(parser().parse_args(["--arch", "mixtral"]))


@pytest.mark.slow
def test_run_llm_command_prints_the_table_and_saves(tmp_path, capsys):
    args = parser().parse_args([*TINY, "--tokens", "1,8", "--routing", "balanced", "--duration", "0.2", "--warmup",
                                "0", "--repeats", "1", "--idle-seconds", "0", "--cooldown", "0", "--meter", "none",
                                "--device", "cpu", "--out", str(tmp_path)])
    assert args._handler(args) == 0
    out = capsys.readouterr().out
    assert "tokens/J" in out and "J/1k tokens" in out and "2 of 8" in out and "results written to" in out
    assert "dynamic tokens/J needs --idle-seconds > 0" in out and "inferences/J" not in out
    [f] = list(tmp_path.glob("run-*-custom.json"))
    doc = json.loads(f.read_text())
    assert doc["routing"]["mode"] == "balanced" and len(doc["models"]) == 6


def test_plan_llm_command_skips_what_cannot_fit(capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * memory.GIB)
    args = parser("plan").parse_args(["--arch", "deepseek-v3", "--tokens", "1,64", "--routing", "balanced",
                                      "--device", "cpu"])
    assert args._handler(args) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3" in out and "EXTRAPOLATED" in out
    arch, o, tokens, _ = resolve_llm(args)
    moe, active = LayerPlan.of("moe", arch), LayerPlan.of("dense_active", arch)
    assert 11.2e9 < moe.params < 11.4e9
    assert fit_alone(moe, o, tokens, CPU).startswith("out of memory (building moe")
    assert fit_alone(active, o, tokens, CPU) is None
