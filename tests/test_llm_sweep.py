"""Sweeps over LLM layers (issue 14): the grid (--arch / --grid llm x tokens x routing), keys, the fit check, the
ETA's terms, and end to end through the CLI: rows with the per-token fields, resume, shards + merge, skipped points
with their reason, export. Tiny custom shapes (d=32, I=16, E=8, k=2), short windows; counts and values asserted."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_LAYER
from test_sweep import cli, rows  # tests/ is on sys.path (rootdir import mode)

from moe_energy import memory
from moe_energy.config import ConfigError
from moe_energy.energy.select import make_meter
from moe_energy.measure.roofline import Roofline
from moe_energy.models.archs import PRESETS as ARCH_PRESETS
from moe_energy.models.counting import layer_params
from moe_energy.models.plan import ModelPlan as LayerPlan
from moe_energy.runner import sweep as sw
from moe_energy.runner.core import SilentUI
from moe_energy.storage.store import Store, merge

CPU = torch.device("cpu")
TINY = {"arch": "custom", "d_model": "32", "ffn_dim": "16", "experts": "8", "top_k": "2"}
TINY_FLAGS = TINY_LAYER
FAST = ["--duration", "0.1", "--warmup", "0", "--repeats", "2", "--idle-seconds", "0", "--cooldown", "0",
        "--device", "cpu", "--meter", "estimate", "--moe-strategy", "grouped", "--dtype", "float32"]  # any host
FAST_CFG = {"duration": 0.1, "warmup": 0.0, "repeats": 2, "idle_seconds": 0.0, "cooldown": 0.0, "device": "cpu",
            "strategies": "grouped"}  # FAST as the CLI parses it (floats: the key hashes 0.0, not 0)
GRID = [*TINY_FLAGS, "--tokens", "1,8", "--routing", "random,skewed:1.2", *FAST]
NAME = "custom-d32-I16-E8-k2"


# -- the grid (no models run) ---------------------------------------------------------------------------------
def test_arch_grid_is_arch_x_routing_x_option_axes_each_point_all_its_tokens():
    g = sw.build_grid({**TINY, "tokens": "1,8,8", "routing": "random,skewed:1.20,balanced",
                       "dtype": "float32,bfloat16"})
    assert len(g.points) == 3 * 2 and all(p.is_layer for p in g.points)
    assert {(p.routing, p.opts.dtype) for p in g.points} == {(r, d) for r in ("random", "skewed:1.2", "balanced")
                                                              for d in ("float32", "bfloat16")}
    assert all(p.tokens == (1, 8) and p.spec.name == NAME and p.label.startswith(NAME) for p in g.points)
    assert len({p.key("estimate") for p in g.points}) == 6
    p = g.points[0]
    assert p.total_params == layer_params(p.spec) == 8 * 32 + 8 * 3 * 32 * 16
    c = p.config("estimate")
    assert c["family"] == "llm_layer" and c["tokens"] == [1, 8] and c["spec"]["d_model"] == 32
    assert "epochs" not in c["options"] and "batch_size" not in c["options"]  # nothing trained: not in the key
    assert g.source["family"] == "llm_layer" and g.source["tokens"] == [1, 8]


def test_a_seed_points_config_and_key_are_unchanged_by_the_llm_family():
    p = sw.build_grid({"experts": "4", "hidden": "16", "layers": "2", "top_k": "2"}).points[0]
    assert not p.is_layer and p.tokens == () and p.routing is None
    assert set(p.config("x")) == {"label", "spec", "options", "meter", "total_params"}  # as before: old keys resume


def test_grid_llm_is_every_preset_under_max_params_at_tokens_powers_of_4():
    g = sw.build_grid({"grid": "llm", "max_params": "1e9"})
    want = [a.name for a in ARCH_PRESETS.values() if layer_params(a) <= 1e9]
    assert [p.spec.name for p in g.points] == want and "olmoe-1b-7b" in want and "deepseek-v3" not in want
    assert all(p.tokens == (1, 4, 16, 64, 256, 1024, 4096) and p.routing == "random" for p in g.points)
    assert len(sw.build_grid({"grid": "llm"}).points) == len(ARCH_PRESETS)
    two = sw.build_grid({"arch": "olmoe-1b-7b,qwen3-30b-a3b", "tokens": "1,16", "routing": "balanced"})
    assert [(p.spec.name, p.tokens) for p in two.points] == [("olmoe-1b-7b", (1, 16)), ("qwen3-30b-a3b", (1, 16))]


@pytest.mark.parametrize("cfg, needle", [
    ({"grid": "llm", "arch": "olmoe-1b-7b"}, "--grid llm fixes the archs"),
    ({**TINY, "hidden": "16"}, "--hidden: no meaning for LLM layers"),
    ({**TINY, "batch_size": "8", "epochs": "1"}, "--epochs, --batch-size: no meaning"),
    ({"tokens": "1,8"}, "--tokens: LLM-layer settings; give --arch"),
    ({"arch": "olmoe-1b-7b", "d_model": "32"}, "--d-model: shape flags of --arch custom"),
    ({"arch": "custom", "d_model": "32"}, "--arch custom needs --ffn-dim, --experts, --top-k"),
    ({"arch": "mixtral"}, "arch 'mixtral' is unknown"),
    ({**TINY, "top_k": "9"}, "top_k=9 exceeds experts=8"),
    ({**TINY, "routing": "zipf"}, "--routing 'zipf' is unknown"),
    ({**TINY, "tokens": "0"}, "--tokens: 0 must be a whole number from 1"),
    ({**TINY, "tokens": "1,x"}, "--tokens: 'x' is not a whole number"),
    ({"grid": "llm", "max_params": "10"}, "no arch at or below --max-params"),
    ({**TINY, "duration": -1.0}, "duration=-1"),
])
def test_llm_grid_mistakes_are_one_line_config_errors(cfg, needle):
    with pytest.raises(ConfigError) as e:
        sw.build_grid(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_toml_llm_grid(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('[sweep]\narch = ["custom"]\nd_model = 32\nffn_dim = 16\nexperts = [8, 4]\ntop_k = 2\n'
                 'tokens = [1, 4]\nrouting = ["balanced"]\n')
    g = sw.build_grid(sw.load_grid_toml(p))
    assert sorted(p.spec.experts for p in g.points) == [4, 8] and all(p.tokens == (1, 4) for p in g.points)


# -- fit, cost ---------------------------------------------------------------------------------------------------
def test_a_layer_point_whose_moe_cannot_fit_is_skipped_but_a_big_dense_alone_is_left_to_the_run(monkeypatch):
    p = sw.build_grid({**TINY, "tokens": "1,8", "duration": 0.2}).points[0]
    assert p.workload.point_problem(p.opts, CPU) is None
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.OVERHEAD_BYTES + 30_000)
    reason = p.workload.point_problem(p.opts, CPU)
    assert reason is not None and reason.startswith("out of memory (building moe") and "GiB free on cpu" in reason
    moe = LayerPlan.of("moe", p.spec).memory_bytes(1, "float32") - memory.OVERHEAD_BYTES
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.OVERHEAD_BYTES + moe + 1)
    total = LayerPlan.of("dense_total", p.spec).memory_bytes(1, "float32") - memory.OVERHEAD_BYTES
    assert total > moe  # the total-matched FFN alone does not fit: the run skips it with its reason
    assert p.workload.point_problem(p.opts, CPU) is None


def test_a_layer_points_fixed_seconds_work_and_least_time():
    p = sw.build_grid({**TINY, "tokens": "1,8", "duration": 1.0, "warmup": 0.5, "repeats": 2, "cooldown": 0.25,
                       "idle_seconds": 3.0}).points[0]
    assert sw.measured_models(p) == 3 * 2  # three models x two token counts
    assert sw.fixed_seconds(p) == pytest.approx(6 * (0.5 + 2 * 1.0 + 0.1) + 6 * 0.25 + 3.0)
    per_token = sum(LayerPlan.of(n, p.spec).flops_per_token for n in ("moe", "dense_total", "dense_active"))
    assert p.workload.work_flops(p.opts) == pytest.approx(per_token * (1 + 8) * (2 + 2))
    assert not p.workload.trains  # no training: all of its work is forwards
    # a GEMM rate so slow that every forward takes >= 100 s: its warm-up, window and latency pass are one forward
    # each, so the least time is idle (3 s + a 0.25 s rest) + 2 repeats x (3 b + 0.25 s rest), b summing to 9 F / rate
    rate = min(LayerPlan.of(n, p.spec).flops_per_token for n in ("moe", "dense_total", "dense_active")) / 100
    slow = Roofline("cpu:test", {"float32": rate}, 1e30, 64, 2**20, "2026-01-01T00:00:00+00:00")
    assert p.workload.seconds_floor(p.opts, slow) == pytest.approx(3.25 + 2 * 3 * per_token * 9 / rate + 2 * 6 * 0.25)
    assert p.workload.seconds_floor(replace(p.opts, max_forward_s=50.0), slow) == pytest.approx(3.25)
    fast = Roofline("cpu:test", {"float32": 1e30}, 1e30, 64, 2**20, "2026-01-01T00:00:00+00:00")
    assert p.workload.seconds_floor(p.opts, fast) == pytest.approx(3.25 + 2 * 6 * (0.5 + 1.0 + 0.1 + 0.25))
    assert p.workload.seconds_floor(p.opts, None) is None
    eta = sw.Eta()
    eta.record(p, sw.fixed_seconds(p) + 4.0)
    assert eta.remaining([p, p]) == pytest.approx(2 * (sw.fixed_seconds(p) + 4.0))


@pytest.mark.slow
def test_run_points_stores_one_record_per_model_and_token_count_and_skips_what_cannot_fit(tmp_path, monkeypatch):
    g = sw.build_grid({**TINY, "experts": "8,16", "tokens": "1,4", "duration": 0.1, "warmup": 0, "repeats": 1,
                       "idle_seconds": 0, "cooldown": 0, "device": "cpu"})
    small, big = g.points
    # ~78 KiB free: each E=8 model fits alone (measured one at a time), the E=16 MoE layer (~100 KiB) cannot
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.OVERHEAD_BYTES + 80_000)
    assert big.workload.point_problem(big.opts, CPU) is not None
    meter = make_meter("none", CPU)
    with Store(tmp_path / "s.db") as st:
        run_id = st.new_run("r", g.source, {"device": "cpu"}, {"name": meter.name})
        out = sw.run_points(g.points, st, run_id, meter, CPU, run=None, ui=SilentUI())  # type: ignore[arg-type]
        assert (out.done, out.skipped, out.failed) == (1, 1, 0)
        pts = {p["arch"]: p for p in st.points()}
        assert pts[big.spec.name]["status"] == "skipped" and pts[big.spec.name]["reason"].startswith("out of memory")
        assert pts[small.spec.name]["family"] == "llm_layer" and pts[small.spec.name]["batch_size"] is None
        models = st.model_rows()
        assert [(m["name"], m["tokens_per_forward"]) for m in models] == [
            (f"{n}@T={t}", t) for t in (1, 4) for n in ("moe[auto]", "dense_total", "dense_active")]
        assert all(m["arch"] == small.spec.name and m["routing"] == "random" for m in models)
        moe1 = next(m for m in models if m["name"] == "moe[auto]@T=1")
        assert moe1["experts_touched"] == 2 and moe1["weight_bytes_read_per_forward"] == (8 * 32 + 2 * 3 * 32 * 16) * 4


# -- end to end through the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("llm") / "llm.db"
    r = cli("sweep", *GRID, "--db", str(db))
    assert r.returncode == 0, r.stderr
    return db, r


@pytest.mark.slow
def test_llm_sweep_writes_per_token_rows(llm_db):
    db, r = llm_db
    assert "measured 2, skipped 0, failed 0" in r.stdout
    assert rows(db, "SELECT family, arch, routing, status FROM points ORDER BY id") == [
        ("llm_layer", NAME, "random", "done"), ("llm_layer", NAME, "skewed:1.2", "done")]
    assert rows(db, "SELECT COUNT(*) FROM models") == [(2 * 3 * 2,)]  # 2 points x 3 models x 2 token counts
    assert rows(db, "SELECT COUNT(*) FROM windows") == [(12 * 2,)]  # --repeats 2
    got = rows(db, "SELECT tokens_per_forward, COUNT(*), SUM(tokens_per_joule > 0), SUM(joules_per_1k_tokens > 0) "
                   "FROM models GROUP BY tokens_per_forward")
    assert got == [(1, 6, 6, 6), (8, 6, 6, 6)]
    assert rows(db, "SELECT COUNT(*) FROM models WHERE kind = 'moe' AND experts_touched BETWEEN 2 AND 8") == [(4,)]
    assert rows(db, "SELECT COUNT(*) FROM models WHERE kind = 'dense' AND weight_bytes_read_per_forward = params * 4") \
        == [(8,)]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
def test_llm_sweep_resumes_and_shards_merge_to_the_same_points(llm_db, tmp_path):
    db, _ = llm_db
    again = cli("sweep", *GRID, "--db", str(db), "--resume")
    assert again.returncode == 0 and "measured 0" in again.stdout and "already complete 2" in again.stdout
    # the shards through the sweep's own functions (the CLI's shard path is the seed's, tested in test_sweep)
    g = sw.build_grid({**TINY, "tokens": "1,8", "routing": "random,skewed:1.2", **FAST_CFG})
    meter = make_meter("estimate", CPU)
    parts = []
    for i in (1, 2):
        part = tmp_path / f"s{i}.db"
        with Store(part) as st:
            run_id = st.new_run(f"r{i}", g.source, {"device": "cpu"}, {"name": meter.name}, shard=f"{i}/2")
            out = sw.run_points(sw.shard(g.points, (i, 2)), st, run_id, meter, CPU, run=None, ui=SilentUI())  # type: ignore[arg-type]
            assert out.done == 1
        parts.append(part)
    out = tmp_path / "merged.db"
    counts = merge(parts, out)
    assert counts["points"] == 2 and counts["models"] == 12
    key = "SELECT point_key FROM points WHERE status='done' ORDER BY point_key"
    assert rows(out, key) == rows(db, key) and len(rows(out, key)) == 2
    assert rows(out, "SELECT COUNT(*), COUNT(DISTINCT tokens_per_forward) FROM models") == [(12, 2)]


@pytest.mark.slow
def test_llm_export_csv_and_json_carry_the_new_fields(llm_db, tmp_path):
    db, _ = llm_db
    e = cli("export", "--db", str(db), "--format", "csv")
    assert e.returncode == 0, e.stderr
    table = list(csv.DictReader(io.StringIO(e.stdout)))
    assert len(table) == 12
    for col in ("arch", "tokens_per_forward", "routing", "experts_touched", "weight_bytes_read_per_forward", "bound",
                "memory_bound_ms", "compute_bound_ms", "fraction_of_roofline", "tokens_per_joule",
                "joules_per_1k_tokens", "point_family"):
        assert col in table[0], col
    moe = [r for r in table if r["name"] == "moe[grouped]@T=1"]
    assert len(moe) == 2 and {r["routing"] for r in moe} == {"random", "skewed:1.2"}
    assert moe[0]["experts_touched"] == "2.0"
    with Store(db, create=False) as st:
        doc = json.loads(json.dumps(st.export_document(), allow_nan=False))  # what `export --format json` writes
    recs = [m for p in doc["points"] for m in p["models"]]
    assert len(recs) == 12 and all(m["arch"] == NAME and "tokens_per_forward" in m for m in recs)
    assert all("experts_touched" in w for m in recs if m["kind"] == "moe" for w in m["windows"])


def test_llm_sweep_dry_run_lists_the_points_and_bad_input_is_one_line(tmp_path, capsys):
    from moe_energy.cli import main

    assert main(["sweep", *GRID, "--db", str(tmp_path / "d.db"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{NAME} random" in out and "skewed:1.2" in out and "to do" in out
    assert not (tmp_path / "d.db").exists()
    for args, needle in ((["--grid", "llm", "--arch", "olmoe-1b-7b"], "--grid llm fixes the archs"),
                         ([*TINY_FLAGS, "--tokens", "1,x"], "--tokens: 'x' is not a whole number"),
                         ([*TINY_FLAGS, "--routing", "skewed:0"], "--routing 'skewed:0'"),
                         (["--tokens", "1,8"], "give --arch (or --grid llm)")):
        assert main(["sweep", *args, "--db", str(tmp_path / "e.db"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_grid_llm_has_its_quick_protocol_unless_the_user_sets_one():
    g = sw.build_grid({"grid": "llm", "max_params": 1e9, "duration": 2.0})
    o = g.points[0].opts
    assert (o.repeats, o.warmup, o.cooldown, o.max_forward_s) == (2, 0.5, 0.0, 2.0)
    mine = sw.build_grid({"grid": "llm", "max_params": 1e9, "duration": 2.0, "repeats": 3, "cooldown": 2.0,
                          "max_forward_s": 30.0}).points[0].opts
    assert (mine.repeats, mine.warmup, mine.cooldown, mine.max_forward_s) == (3, 0.5, 2.0, 30.0)
    custom = sw.build_grid({**TINY, "tokens": "1"}).points[0]
    assert custom.opts.max_forward_s is None and "max_forward_s" not in custom.config("none")["options"]
    limited = sw.build_grid({**TINY, "tokens": "1", "max_forward_s": 5.0}).points[0]
    # in the config (what the sweep was told), not the key: it only decides which rows run
    assert limited.config("none")["options"]["max_forward_s"] == 5.0 and limited.key("none") == custom.key("none")


def test_max_forward_s_is_refused_for_the_seed_and_out_of_range():
    with pytest.raises(ConfigError, match="--max-forward-s: LLM-layer settings"):
        sw.build_grid({"grid": "seed", "max_forward_s": 5.0})
    with pytest.raises(ConfigError, match="max_forward_s=-1.0 must be a finite number > 0"):
        sw.build_grid({**TINY, "tokens": "1", "max_forward_s": -1.0})


def test_dry_run_counts_the_rows_max_forward_s_will_skip():
    from moe_energy.commands.sweep import _over_limit

    p = sw.build_grid({"grid": "llm", "max_params": 1e9, "duration": 2.0}).points[0]  # mixtral-8x7b is 1.4e9: out
    assert p.spec.name == "qwen1.5-moe-a2.7b" and p.opts.max_forward_s == 2.0
    # 100 GFLOP/s, 10 GB/s: the total-matched FFN (~0.55 B params, 1.1 GFLOP a token) passes 2 s from 256 tokens
    roof = Roofline("cpu:test", {"float32": 1e11}, 1e10, 64, 2**20, "2026-01-01T00:00:00+00:00")
    bounds = {(pl.name, t): pl.flops_per_token * t / 1e11 for pl in p.workload.plans(p.opts.models) for t in p.tokens}
    over = sum(b > 2.0 for b in bounds.values())  # compute-bound there, so the FLOPs alone decide
    assert over >= 2 and _over_limit(p, roof) == f"{over} of 21"
    assert _over_limit(replace(p, opts=replace(p.opts, max_forward_s=None)), roof) == "-"


def test_int8_weights_are_a_points_option_keyed_only_when_set_and_shown_by_dry_run(tmp_path, capsys):
    from moe_energy.cli import main

    plain = sw.build_grid({**TINY, "tokens": "1"}).points[0]
    int8 = sw.build_grid({**TINY, "tokens": "1", "weights": "int8"}).points[0]
    assert "weights" not in plain.config("none")["options"]  # stored keys stay as they were
    assert int8.config("none")["options"]["weights"] == "int8" and int8.key("none") != plain.key("none")
    assert int8.workload.weights == "int8" and all(p.weights == "int8" for p in int8.workload.plans(["moe"]))
    cfg = tmp_path / "w.toml"
    cfg.write_text('weights = "int8"\n')
    assert main(["sweep", *TINY_FLAGS, "--tokens", "1", "--config", str(cfg), "--db", str(tmp_path / "d.db"),
                 "--dry-run"]) == 0
    assert "int8 weights" in capsys.readouterr().out


def test_weights_is_an_axis_each_value_a_point_the_default_keyed_as_before():
    """Issue 24: --weights dtype,int8 gives one point per format per (arch, routing, dtype); 'dtype' is the default
    spelled out, so its point keeps the key a store written before the axis holds (--resume skips it)."""
    before = sw.build_grid({**TINY, "tokens": "1", "dtype": "float32,bfloat16"})
    grid = sw.build_grid({**TINY, "tokens": "1", "dtype": "float32,bfloat16", "weights": "dtype,int8"})
    assert [(p.opts.dtype, p.opts.weights) for p in grid.points] == [
        ("float32", None), ("float32", "int8"), ("bfloat16", None), ("bfloat16", "int8")]
    keys = [p.key("none") for p in grid.points]
    assert len(set(keys)) == 4 and [keys[0], keys[2]] == [p.key("none") for p in before.points]
    assert grid.source["axes"]["weights"] == ["dtype", "int8"]
    assert [p.workload.weights for p in grid.points] == [None, "int8", None, "int8"]
    toml = sw.build_grid({**TINY, "tokens": "1", "weights": ["int8", "dtype", "int8"]})  # a TOML list, deduplicated
    assert [p.opts.weights for p in toml.points] == ["int8", None]


@pytest.mark.parametrize(("args", "needles"), [
    ([*TINY_FLAGS, "--weights", "bf16,int8"], ("weights='bf16' is unknown", "int8, w8a8, fp8 or dtype")),
    ([*TINY_FLAGS, "--weights", "int8,fp8"], ("--weights fp8:", "run on CUDA GPUs with fp8 arithmetic")),
    (["--grid", "seed", "--weights", "int8"], ("--weights: LLM-layer settings",)),
    (["--model", "olmoe-1b-7b", "--tiny", "--weights", "int8"], ("--weights: no meaning with --model",)),
])
def test_sweep_weights_refused_in_one_line(tmp_path, capsys, args, needles):
    from conftest import one_line_error

    from moe_energy.cli import main

    code = main(["sweep", *args, "--db", str(tmp_path / "d.db"), "--dry-run"])
    one_line_error(code, capsys.readouterr().err, *needles)
    assert not (tmp_path / "d.db").exists()


@pytest.mark.slow
def test_sweep_weights_axis_end_to_end_into_the_store_and_export(tmp_path, capsys, monkeypatch):
    """Issue 24: `sweep --weights dtype,int8` measures both formats (float32 here: any host), the store's columns say
    which rows are int8 and their output error, and `export` carries both fields; --resume finds both complete."""
    from moe_energy.cli import main
    from moe_energy.measure import roofline

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "cache"))  # a float32 roofline cached: no calibration
    roofline._store(Roofline(roofline.device_name(CPU), {"float32": 1e11}, 1e10, 64, 2**20, "2026-01-01T00:00:00"))

    db = tmp_path / "w.db"
    args = ["sweep", *TINY_FLAGS, "--tokens", "1", "--weights", "dtype,int8", *FAST, "--db", str(db)]
    assert main(args) == 0
    assert "measured 2, skipped 0, failed 0" in capsys.readouterr().out
    assert rows(db, "SELECT weights, COUNT(*), COUNT(weights_output_error), MIN(weights_output_error) > 0, "
                    "MAX(weights_output_error) < 0.05 FROM models GROUP BY weights ORDER BY weights") == [
        (None, 3, 0, None, None), ("int8", 3, 3, 1, 1)]
    assert rows(db, "SELECT weights FROM points ORDER BY id") == [(None,), ("int8",)]
    out = tmp_path / "m.csv"
    assert main(["export", "--db", str(db), "--out", str(out)]) == 0
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert sorted((r["weights"], r["weights_output_error"] != "") for r in table) == [("", False)] * 3 + [
        ("int8", True)] * 3
    assert main([*args, "--resume"]) == 0
    assert "already complete 2" in capsys.readouterr().out


@pytest.mark.slow
def test_a_point_with_rows_skipped_under_max_forward_s_is_complete_only_up_to_that_limit(tmp_path, monkeypatch):
    """--max-forward-s is not in a point's key, but the rows it skipped say 'raise --max-forward-s to measure it':
    a sweep with a higher limit measures that point again, one with the same or a lower limit skips it, and once
    measured in full the point is complete at any limit."""
    from moe_energy.measure import roofline

    # 1 GFLOP/s: the total-matched FFN's T=8 forward (~0.2 MFLOP) takes >= 0.2 ms, over a 0.1 ms limit
    roof = roofline.Roofline("cpu:test", {"float32": 1e9}, 1e9, 64, 2**20, "2026-01-01T00:00:00+00:00")
    monkeypatch.setattr(roofline, "load", lambda device, notice=None: roof)
    meter = make_meter("none", CPU)

    def point(limit):
        return sw.build_grid({**TINY, "tokens": "1,8", **FAST_CFG, "repeats": 1, "max_forward_s": limit}).points[0]

    low, same, high = point(1e-4), point(1e-4), point(10.0)
    assert low.key(meter.name) == high.key(meter.name)
    with Store(tmp_path / "s.db") as st:
        run_id = st.new_run("r", {"grid": "custom"}, {"device": "cpu"}, {"name": meter.name})
        assert sw.run_points([low], st, run_id, meter, CPU, run=None, ui=SilentUI()).done == 1  # type: ignore[arg-type]
        skipped = [m["name"] for m in st.model_rows() if json.loads(m["record_json"]).get("skipped")]
        assert skipped == ["dense_total@T=8"]
        assert st.time_limited() == {low.key(meter.name): 1e-4}
        assert sw.complete_keys([same], st, meter.name) == {low.key(meter.name)}
        assert sw.complete_keys([point(5e-5)], st, meter.name) == {low.key(meter.name)}
        assert sw.complete_keys([high], st, meter.name) == set()  # a higher limit: measured again
        again = st.new_run("r2", {"grid": "custom"}, {"device": "cpu"}, {"name": meter.name})  # as _open_run does
        out = sw.run_points([high], st, again, meter, CPU, run=None, ui=SilentUI(), resume=True,  # type: ignore[arg-type]
                            skip_keys=sw.complete_keys([high], st, meter.name))
        assert (out.done, out.already) == (1, 0)
        assert st.time_limited() == {}  # the latest measurement of the key skipped nothing
        assert sw.complete_keys([high], st, meter.name) == sw.complete_keys([low], st, meter.name) \
            == {high.key(meter.name)}


@pytest.mark.slow
def test_sweep_resumed_with_a_higher_max_forward_s_measures_the_rows_a_lower_one_skipped(tmp_path, capsys,
                                                                                          monkeypatch):
    """End to end: the skip's reason asks to raise --max-forward-s; doing so with --resume measures that point again
    (as a new run: a run holds a key once) and the report shows the full point once; the same limit again skips it."""
    from moe_energy.cli import main
    from moe_energy.measure import roofline
    from moe_energy.report.analysis import load

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "cache"))  # 1 GFLOP/s cached: T=8's dense_total is over
    roofline._store(Roofline(roofline.device_name(CPU), {"float32": 1e9}, 1e9, 64, 2**20, "2026-01-01T00:00:00"))
    db = tmp_path / "l.db"
    args = ["sweep", *TINY_FLAGS, "--tokens", "1,8", *FAST, "--db", str(db), "--max-forward-s"]
    assert main([*args, "1e-4"]) == 0
    capsys.readouterr()
    assert rows(db, "SELECT name FROM models WHERE tokens_per_second IS NULL") == [("dense_total@T=8",)]
    assert main([*args, "1e-4", "--resume"]) == 0
    assert "already complete 1" in capsys.readouterr().out
    assert main([*args, "10", "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "measured 1" in out and "1 of these points skipped rows under a lower --max-forward-s" in err
    assert rows(db, "SELECT COUNT(DISTINCT run_id), COUNT(*) FROM points WHERE status = 'done'") == [(2, 2)]
    with Store(db, create=False) as st:
        frame = load(st)
    assert len(frame.points) == 1 and len(frame.layers) == 6  # the full point, once
    assert {m["point_id"] for m in frame.layers} == {frame.points[0]["id"]} == {2}
    assert main([*args, "10", "--resume"]) == 0 and "already complete 1" in capsys.readouterr().out
