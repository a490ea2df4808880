"""bench-strategies and calibrate: every strategy and both dense baselines timed, derived figures consistent."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import one_line_error

from moe_energy.bench.strategies import bench_strategies
from moe_energy.cli import main
from moe_energy.config import ModelSpec
from moe_energy.measure import roofline
from moe_energy.measure.roofline import Roofline
from moe_energy.models.strategies import STRATEGIES

SPEC = ModelSpec(experts=4, hidden=16, layers=2, top_k=2, input_dim=12, classes=4)
TINY = ["--experts", "4", "--hidden", "16", "--layers", "2", "--top-k", "2", "--input-dim", "12",
        "--classes", "4", "--device", "cpu", "--batch-size", "16", "--seconds", "0.05"]


def fake_roof(name: str = "cpu:test") -> Roofline:
    return Roofline(name, {"float32": 1e11, "bfloat16": 4e11, "float16": 1e11}, 1e10, 64, 2**20,
                    "2026-01-01T00:00:00+00:00")


@pytest.fixture
def cached_roof(tmp_path, monkeypatch):
    """A roofline already in the cache for this CPU, so the CLI does not spend seconds calibrating."""
    import torch

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "cache"))
    r = fake_roof(roofline.device_name(torch.device("cpu")))
    roofline._store(r)
    return r


@pytest.mark.slow
def test_every_strategy_and_both_dense_models_get_a_row():
    doc = bench_strategies(SPEC, batch_size=16, seconds=0.05, warmup_s=0, roof=fake_roof())
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"dense_total", "dense_active"} | {f"moe[{s}]" for s in STRATEGIES}
    base, ideal = rows["moe[active_loop]"], rows["dense_active"]
    assert base["speedup_vs_active_loop"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["ms_per_batch"] > 0 and r["rounds"] >= 5
        assert r["inferences_per_second"] == pytest.approx(16 / (r["ms_per_batch"] / 1e3))
        assert r["speedup_vs_active_loop"] == pytest.approx(base["ms_per_batch"] / r["ms_per_batch"])
        bound_s = max(r["flops_per_batch"] / 1e11, r["weight_bytes_per_batch"] / 1e10)
        assert r["roofline_bound_ms"] == pytest.approx(bound_s * 1e3)
        assert r["fraction_of_roofline"] == pytest.approx(bound_s / (r["ms_per_batch"] / 1e3))
        if r["kind"] == "moe":
            assert r["efficiency_vs_ideal"] == pytest.approx(ideal["ms_per_batch"] / r["ms_per_batch"])
            assert set(r["ms_per_batch_by_layout"]) == {"out_in", "in_out"}
            assert r["ms_per_batch"] == min(r["ms_per_batch_by_layout"].values())
        else:
            assert r["efficiency_vs_ideal"] is None
    # FLOPs per batch: the MoE's active work; weights read: gate + the experts the batch reached
    assert rows["moe[grouped]"]["flops_per_batch"] == 16 * 2 * (12 * 4 + 2 * (12 * 16 + 16 * 16 + 16 * 4))
    assert rows["moe[auto]"]["resolved_strategy"] in rows["moe[auto]"]["auto_probe_ms"]
    cap = rows["moe[padded_capacity]"]
    assert cap["routed_pairs_per_batch"] == 32 and 0 <= cap["dropped_pairs_per_batch"] <= 32


def test_without_roofline_fractions_are_withheld_not_zero():
    doc = bench_strategies(SPEC, batch_size=8, seconds=0.02, warmup_s=0, strategies=["active_loop", "padded"],
                           roof=None)
    assert len(doc["rows"]) == 4
    assert all(r["fraction_of_roofline"] is None and r["roofline_bound_ms"] is None for r in doc["rows"])


@pytest.mark.slow
def test_cli_prints_table_and_writes_json(tmp_path, cached_roof, capsys):
    out = tmp_path / "res"
    assert main(["bench-strategies", *TINY, "--moe-strategy", "active_loop,grouped", "--out", str(out)]) == 0
    files = list(out.glob("strategies-custom-float32-b16-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == "moe-energy/strategy-bench" and doc["options"]["strategies"] == ["active_loop", "grouped"]
    assert doc["roofline"]["device_name"] == cached_roof.device_name
    text = capsys.readouterr().out
    assert "moe[grouped]" in text and "dense_active" in text and "results written to" in text


@pytest.mark.parametrize(("args", "msg"), [(["--moe-strategy", "fastest"], "fastest"),
                                           (["--seconds", "0"], "--seconds"), (["--dtype", "int8"], "dtype"),
                                           # an empty list was every strategy, timed for minutes
                                           (["--moe-strategy", ","], "--moe-strategy ',': give at least one of"),
                                           # 1e12 is positive: the message said it must be
                                           (["--seconds", "1e12"], "must be a number of seconds > 0 and < 1e+06")])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, cached_roof, capsys, args, msg):
    assert main(["bench-strategies", *TINY, *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_calibrate_uses_the_cache_unless_forced(cached_roof, capsys):
    assert main(["calibrate", "--device", "cpu"]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["calibrate", "--device", "cpu", "--dtype", "int4"]) == 2


@pytest.mark.parametrize(("args", "msg"), [(["--dtype", ","], "--dtype ',': give at least one of float32"),
                                           (["--seconds", "1e12"], "must be a number of seconds > 0 and < 10000")])
def test_calibrate_bad_input_is_one_line_and_exit_2_before_measuring(monkeypatch, capsys, args, msg):
    """An empty --dtype list was every dtype, measured; nothing is calibrated on the way to the error."""
    monkeypatch.setattr(roofline, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    one_line_error(main(["calibrate", "--device", "cpu", "--force", *args]), capsys.readouterr().err, msg)


def test_a_strategy_named_twice_is_timed_once(tmp_path, cached_roof, capsys):
    assert main(["bench-strategies", *TINY, "--moe-strategy", "padded,padded", "--out", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["name"] for r in doc["rows"] if r["name"].startswith("moe")] == ["moe[padded]"]


def test_time_rounds_records_per_batch_ms_and_iterations_per_variant():
    import torch

    from moe_energy.bench.strategies import Variant, time_rounds

    calls = {"a": 0, "b": 0}

    def counting(name):
        def fn(x):
            calls[name] += 1
            return x

        return fn

    vs = [Variant("a", "dense", counting("a")), Variant("b", "dense", counting("b"))]
    time_rounds(vs, torch.zeros(2, 2), seconds=0.0, warmup_s=0.0, min_rounds=4)
    for v in vs:
        assert len(v.ms) == 4 and all(ms >= 0 for ms in v.ms)
        assert 1 <= v.inner <= 200 and v.iterations == 4 * v.inner
        assert calls[v.name] == 1 + 3 + v.iterations  # warm-up call, 3 sizing calls, then the timed groups


B16 = ModelSpec(experts=4, hidden=16, layers=2, top_k=2, input_dim=16, classes=8)  # grouped_mm-aligned in bf16


@pytest.mark.parametrize(("spec", "batch", "dtype"), [(SPEC, 16, "float32"), (B16, 1, "bfloat16")])
def test_rows_figures_are_the_model_plans(spec, batch, dtype):
    """Every row's FLOPs, weight bytes and width are its ModelPlan's, as `plan` and `run` show them; a batch of
    one token reaches only top_k experts, so the MoE reads the plan's weights less the experts it missed."""
    from moe_energy.models.counting import expert_params
    from moe_energy.models.plan import ModelPlan

    doc = bench_strategies(spec, batch_size=batch, dtype=dtype, seconds=0.01, warmup_s=0, roof=fake_roof(),
                           strategies=["active_loop", "padded"])
    rows = {r["name"]: r for r in doc["rows"]}
    bpp = {"float32": 4, "bfloat16": 2}[dtype]
    for name in ("dense_total", "dense_active"):
        plan = ModelPlan.of(name, spec)
        r = rows[name]
        assert r["width"] == plan.width and r["flops_per_batch"] == batch * plan.flops_per_inference
        assert r["weight_bytes_per_batch"] == plan.weight_bytes(dtype) == plan.params * bpp
    moe = ModelPlan.of("moe", spec)
    missed = spec.experts - doc["experts_touched"]
    assert missed == (0 if batch >= spec.experts else spec.experts - spec.top_k)
    for name in ("moe[active_loop]", "moe[padded]"):
        r = rows[name]
        assert r["flops_per_batch"] == batch * moe.flops_per_inference
        assert r["weight_bytes_per_batch"] == moe.weight_bytes(dtype) - missed * expert_params(spec) * bpp


def test_every_model_is_built_by_its_plan(monkeypatch):
    from moe_energy.models.plan import ModelPlan

    built: list[str] = []
    real = ModelPlan.build

    def build(self, *a, **k):
        built.append(self.name)
        return real(self, *a, **k)

    monkeypatch.setattr(ModelPlan, "build", build)
    bench_strategies(SPEC, batch_size=8, seconds=0.01, warmup_s=0, strategies=["padded"], roof=None)
    assert built == ["moe", "dense_total", "dense_active"]


# --- bench-strategies --arch: one LLM layer, its dense FFNs and transformers' own block --------------------

LAYER_ARGS = ["--arch", "custom", "--d-model", "64", "--ffn-dim", "32", "--experts", "8", "--top-k", "2",
              "--device", "cpu", "--seconds", "0.01", "--dtype", "float32"]  # any host: not its native bf16


def tiny_arch():
    from moe_energy.models.archs import custom_arch

    return custom_arch(64, 32, 8, 2)


def check_versus(doc: dict) -> None:
    """Speed-ups are the recorded medians' ratios: fastest transformers median / this median."""
    for s in doc["summary"]:
        rows = [r for r in doc["rows"] if r["tokens"] == s["tokens"]]
        tf = [r for r in rows if r["kind"] == "transformers"]
        best = min(r["ms_per_forward"] for r in tf)
        assert s["fastest_transformers_ms"] == best
        auto = next(r for r in rows if r["name"] == "moe[auto]")
        assert s["auto_ms"] == auto["ms_per_forward"]
        assert s["auto_speedup_vs_transformers"] == pytest.approx(best / auto["ms_per_forward"])
        dense = next(r for r in rows if r["name"] == "dense_active")
        assert s["dense_active_fraction_of_roofline"] == dense["fraction_of_roofline"]
        for r in rows:
            assert r["speedup_vs_transformers"] == pytest.approx(best / r["ms_per_forward"])


@pytest.mark.slow
def test_layer_rows_hold_every_strategy_both_dense_ffns_and_transformers():
    pytest.importorskip("transformers", reason="transformers not installed: its rows need it")
    from moe_energy.bench.strategies import LAYER_SCHEMA, bench_layer
    from moe_energy.models.counting import layer_flops, layer_weight_bytes, swiglu_params

    arch = tiny_arch()
    doc = bench_layer(arch, (1, 8), seconds=0.01, warmup_s=0, roof=fake_roof())
    assert doc["schema"] == LAYER_SCHEMA and doc["arch"]["d_model"] == 64 and doc["routing"]["mode"] == "random"
    impls = [i for i, why in doc["transformers"]["implementations"].items() if why is None]
    assert {"eager", "batched_mm", "grouped_mm"} <= set(impls)
    for t in (1, 8):
        rows = {r["name"]: r for r in doc["rows"] if r["tokens"] == t}
        assert set(rows) == ({"dense_total", "dense_active"} | {f"moe[{s}]" for s in STRATEGIES}
                             | {f"transformers[{i}]" for i in impls})
        touched = next(s["experts_touched"] for s in doc["summary"] if s["tokens"] == t)
        for r in rows.values():
            assert r["rounds"] >= 5 and r["ms_per_forward_min"] <= r["ms_per_forward"]
            assert r["tokens_per_second"] == pytest.approx(t / (r["ms_per_forward"] / 1e3))
            bound_s = max(r["flops_per_batch"] / 1e11, r["weight_bytes_per_batch"] / 1e10)
            assert r["fraction_of_roofline"] == pytest.approx(bound_s / (r["ms_per_forward"] / 1e3))
            if r["kind"] == "dense":
                assert r["flops_per_batch"] == t * 2 * swiglu_params(64, r["width"])
            else:  # the MoE and transformers' block: one function, the same least bytes read
                assert r["flops_per_batch"] == t * layer_flops(arch)
                assert r["weight_bytes_per_batch"] == layer_weight_bytes(arch, touched, 4)
        assert rows["moe[auto]"]["resolved_strategy"] in rows["moe[auto]"]["auto_probe_ms"]
    check_versus(doc)


def test_layer_without_transformers_says_why_and_keeps_the_rest(monkeypatch):
    import sys

    from moe_energy.bench.strategies import bench_layer

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    doc = bench_layer(tiny_arch(), (1,), seconds=0.01, warmup_s=0, strategies=["grouped", "auto"], roof=None)
    assert "transformers is not installed" in doc["transformers"]["unavailable"]
    assert {r["name"] for r in doc["rows"]} == {"dense_total", "dense_active", "moe[grouped]", "moe[auto]"}
    assert all(r["speedup_vs_transformers"] is None and r["fraction_of_roofline"] is None for r in doc["rows"])
    assert doc["summary"][0]["auto_speedup_vs_transformers"] is None and doc["roofline_note"]


@pytest.mark.slow
def test_cli_arch_saves_json_then_prints_table(tmp_path, cached_roof, capsys):
    pytest.importorskip("transformers", reason="transformers not installed: its rows need it")
    out = tmp_path / "res"
    assert main(["bench-strategies", *LAYER_ARGS, "--tokens", "1,8", "--moe-strategy", "grouped,auto",
                 "--out", str(out)]) == 0
    [path] = out.glob("strategies-custom-float32-t1-8-*.json")
    doc = json.loads(path.read_text())
    assert doc["schema"] == "moe-energy/strategy-bench-layer" and doc["options"]["tokens"] == [1, 8]
    assert doc["roofline"]["device_name"] == cached_roof.device_name and doc["roofline_note"] is None
    check_versus(doc)
    text = capsys.readouterr().out
    assert "transformers[grouped_mm]" in text and "moe[auto]" in text and "T=8: moe[auto]" in text
    dense = doc["summary"][1]["dense_active_fraction_of_roofline"]
    assert f"(dense_active, the same FLOPs in one dense FFN: {dense:.0%})" in " ".join(text.split())


@pytest.mark.slow
def test_cli_arch_calibrates_the_dtype_in_use_on_first_use_and_says_so(tmp_path, monkeypatch, capsys):
    """Issue 24: no manual `calibrate` step: the first run that needs its dtype's roofline takes it (a few
    seconds, said), caches it, and fills the fractions; the next run reads the cache."""
    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "empty-cache"))
    assert main(["bench-strategies", *LAYER_ARGS, "--tokens", "1", "--moe-strategy", "auto",
                 "--out", str(tmp_path / "res")]) == 0
    [path] = (tmp_path / "res").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["roofline"]["gemm_flops_per_s"]["float32"] > 0 and doc["roofline_note"] is None
    assert all(r["fraction_of_roofline"] > 0 for r in doc["rows"])
    assert "calibrating it (once" in capsys.readouterr().out
    assert (tmp_path / "empty-cache" / "roofline.json").is_file()
    assert main(["bench-strategies", *LAYER_ARGS, "--tokens", "1", "--moe-strategy", "grouped",
                 "--out", str(tmp_path / "res2")]) == 0
    assert "calibrating" not in capsys.readouterr().out  # cached now


@pytest.mark.parametrize(("args", "msg"), [(["--tokens", "4"], "--tokens"),
                                           ([*LAYER_ARGS, "--routing", "balanced"], "--routing"),
                                           ([*LAYER_ARGS, "--batch-size", "4"], "--batch-size"),
                                           ([*LAYER_ARGS, "--compile"], "--compile"),
                                           ([*LAYER_ARGS, "--moe-strategy", "fastest"], "fastest"),
                                           ([*LAYER_ARGS, "--weights", "fp8"], "--weights fp8: fp8 weights run"),
                                           ([*TINY, "--weights", "int8"], "--weights: only with --arch")])
def test_cli_arch_bad_input_is_one_line_and_exit_2(tmp_path, cached_roof, capsys, args, msg):
    assert main(["bench-strategies", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_strategy_that_cannot_run_the_shape_is_a_row_that_says_so(tmp_path, cached_roof, capsys):
    """Issue 25: --hidden 18 (not a multiple of 4 in fp32) crashed the whole table with grouped_mm's stride rule."""
    odd = [*TINY[:2], "--hidden", "18", *TINY[4:]]
    out = tmp_path / "res"
    assert main(["bench-strategies", *odd, "--moe-strategy", "grouped,grouped_fm,padded", "--out", str(out)]) == 0
    [path] = out.glob("strategies-custom-*.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"dense_total", "dense_active", "moe[grouped]", "moe[grouped_fm]", "moe[padded]"}
    fm = rows["moe[grouped_fm]"]
    assert fm["status"] == "failed" and "16 bytes" in fm["not_timed"]
    assert fm["ms_per_batch"] is None and fm["fraction_of_roofline"] is None and fm["rounds"] == 0
    assert rows["moe[grouped]"]["ms_per_batch"] > 0 and rows["moe[padded]"]["ms_per_batch"] > 0  # grouped: any shape
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "moe[grouped_fm]" in ln)  # its row, folded over lines
    assert "not timed:" in line and "results written to" in text


@pytest.mark.slow
def test_layer_int8_rows_beside_transformers_blocks_in_the_dtype():
    """Issue 24: --weights int8 times the layer and both dense FFNs holding int8 weights beside transformers' blocks
    in the dtype; each row says its format, the int8 rows count the stored format's bytes, each model's output
    error is in the document, and the speed-ups are over the dtype's transformers rows."""
    pytest.importorskip("transformers", reason="transformers not installed: its rows need it")
    from moe_energy.bench.strategies import bench_layer
    from moe_energy.models.counting import layer_weight_bytes
    from moe_energy.models.plan import ModelPlan

    arch = tiny_arch()
    doc = bench_layer(arch, (1,), seconds=0.01, warmup_s=0, strategies=["grouped"], roof=fake_roof(),
                      weights="int8")
    rows = {r["name"]: r for r in doc["rows"]}
    touched = doc["summary"][0]["experts_touched"]
    tf = [r for r in rows.values() if r["kind"] == "transformers"]
    assert tf and all(r["weights"] == "float32" for r in tf)
    assert {n: r["weights"] for n, r in rows.items() if r["kind"] != "transformers"} == {
        "moe[grouped]": "int8", "dense_total": "int8", "dense_active": "int8"}
    for name in ("moe", "dense_total", "dense_active"):
        row = rows["moe[grouped]" if name == "moe" else name]
        want = ModelPlan.of(name, arch).quantized("int8").weight_bytes_read("float32", touched)
        assert row["weight_bytes_per_batch"] == pytest.approx(want)
    assert rows["moe[grouped]"]["weight_bytes_per_batch"] < layer_weight_bytes(arch, touched, 4) / 3
    assert tf[0]["weight_bytes_per_batch"] == layer_weight_bytes(arch, touched, 4)  # theirs: the dtype's bytes
    errs = doc["weights_output_error"]
    assert set(errs) == {"moe", "dense_total", "dense_active"} and all(0 < e < 0.05 for e in errs.values())
    assert doc["options"]["weights"] == "int8"
    best = min(r["ms_per_forward"] for r in tf)  # the dtype's fastest transformers row is what int8 is measured by
    moe = rows["moe[grouped]"]
    assert moe["speedup_vs_transformers"] == pytest.approx(best / moe["ms_per_forward"])


@pytest.mark.slow
def test_cli_arch_weights_int8_labels_the_formats_and_states_the_error(tmp_path, cached_roof, capsys):
    pytest.importorskip("transformers", reason="transformers not installed: its rows need it")
    out = tmp_path / "res"
    assert main(["bench-strategies", *LAYER_ARGS, "--tokens", "1", "--moe-strategy", "auto", "--weights", "int8",
                 "--out", str(out)]) == 0
    [path] = out.glob("strategies-custom-float32-int8-t1-*.json")
    doc = json.loads(path.read_text())
    assert {r["weights"] for r in doc["rows"]} == {"int8", "float32"}
    text = " ".join(capsys.readouterr().out.split())
    assert "weights: int8 weight-only" in text and f"moe {doc['weights_output_error']['moe']:.2%}" in text
    assert "transformers' blocks hold the weights in float32" in text


@pytest.mark.parametrize("kind", ["moe", "transformers"])
def test_layer_rows_read_deepseeks_router_at_its_fp32_bytes(kind):
    """A bf16 DeepSeek layer keeps its router fp32 (as transformers does): 4 bytes a router weight, as `plan` and
    `run` count them, not the dtype's 2 (a V3 row at 1 token read 0.46% too few bytes)."""
    from moe_energy.bench.peers import Peers
    from moe_energy.bench.strategies import Variant, _Layer, _layer_row
    from moe_energy.models.archs import RouterSpec, custom_arch

    arch = custom_arch(64, 32, 16, 4, shared_experts=1, router=RouterSpec("sigmoid_group", normalize=True,
                                                                             n_group=4, topk_group=2))
    v = Variant(f"{kind}[grouped]", kind, lambda x: x)
    v.ms = [1.0]
    row = _layer_row(_Layer(arch, None, {}, Peers(), torch.bfloat16, []), v, 8, 5, None, {})
    # router 16 x 64 fp32, 5 routed experts and 1 shared expert of 3 x 64 x 32 in bf16
    assert row["weight_bytes_per_batch"] == 16 * 64 * 4 + (5 + 1) * 3 * 64 * 32 * 2


@pytest.mark.slow
def test_fractions_from_a_busy_or_too_slow_calibration_are_called_so(tmp_path, monkeypatch, capsys):
    """A calibration taken while other work shared the CPUs judges every later run: under the layer table a line
    says so, and a row faster than its bound (1 MFLOP/s and 1 MB/s here: every row) says the calibration is wrong."""
    import torch

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "cache"))
    slow = Roofline(roofline.device_name(torch.device("cpu")), {"float32": 1e6}, 1e6, 64, 2**20,
                    "2026-01-01T00:00:00+00:00", busy="1-minute load 3.5 on 2 CPUs")
    roofline._store(slow)
    assert main(["bench-strategies", *LAYER_ARGS, "--tokens", "1", "--moe-strategy", "grouped",
                 "--out", str(tmp_path / "res")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    doc = json.loads(next((tmp_path / "res").glob("*.json")).read_text())
    timed = [r for r in doc["rows"] if r.get("fraction_of_roofline")]
    assert len(timed) >= 3 and all(r["fraction_of_roofline"] > 1.05 for r in timed)
    from rich.console import Console

    from moe_energy.commands.strategies import layer_table
    wide = Console(width=400, record=True, file=io.StringIO())
    wide.print(layer_table(doc))
    assert wide.export_text().count("above roofline: run calibrate --force when the host is idle") == len(timed)
    assert ("roofline: calibrated while busy (1-minute load 3.5 on 2 CPUs, 2026-01-01T00:00:00+00:00): its bounds "
            "may be short and every fraction high; run `moe-energy calibrate --force` when the host is idle") in text


def test_a_run_says_under_its_table_when_its_roofline_was_calibrated_busy():
    """run's table shows no fractions, but its JSON and the report do: the lines under it say when the calibration
    judging them was taken on a busy host, and say nothing when it was idle."""
    from moe_energy.commands.tables import energy_summary

    doc = {"energy_meter": {"name": "estimate", "method": "estimate"}, "idle": None, "models": [],
           "roofline": {"busy": "1-minute load 1.5 on 2 CPUs", "measured_utc": "2026-12-07T18:01:48+00:00"}}
    busy = [line for line in energy_summary(doc) if line.startswith("roofline:")]
    assert busy == ["roofline: calibrated while busy (1-minute load 1.5 on 2 CPUs, 2026-12-07T18:01:48+00:00): its "
                    "bounds may be short and every fraction high; run `moe-energy calibrate --force` when the host "
                    "is idle"]
    doc["roofline"]["busy"] = None
    assert not [line for line in energy_summary(doc) if line.startswith("roofline:")]
