"""Sweeps of whole models (issue 23): the grid (--model/--vs/--batch/--context/--layers/--moe-impl/--tiny, or a
TOML), keys (the seed's and the LLM layer's unchanged), the layers a point builds, --shard auto from a Slurm array
or a Kubernetes Indexed Job, bad input in one line, and end to end through the CLI: rows with the whole-model
columns, resume, Slurm-array shards + merge equal to the unsharded sweep, export. Tiny copies of the presets."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from conftest import in_process, one_line_error
from test_sweep import rows  # tests/ is on sys.path (rootdir import mode)

from moe_energy import memory
from moe_energy.cli import main
from moe_energy.config import ConfigError
from moe_energy.models.whole import param_counts, tiny
from moe_energy.runner import sweep as sw
from moe_energy.runner.model import Whole, inputs_bytes
from moe_energy.storage.store import WHOLE_FAMILY, Store

CPU = torch.device("cpu")
FAST = ["--duration", "0.1", "--warmup", "0", "--repeats", "1", "--idle-seconds", "0", "--cooldown", "0",
        "--device", "cpu", "--meter", "estimate"]
GRID = ["--model", "olmoe-1b-7b", "--tiny", "--batch", "1,2", "--context", "4", "--layers", "1",
        "--moe-impl", "transformers,moe-energy", *FAST]
NAMES = ("olmoe-1b-7b-tiny", "olmo-2-7b-tiny", "olmo-2-1b-tiny")
TINY = {"model": "olmoe-1b-7b", "tiny": True, "batch": "1,2", "context": "4,8"}


cli = in_process  # with ``env`` added for the call (a scheduler's variables)


# -- the grid (no model runs) ---------------------------------------------------------------------------------
def test_a_point_is_one_model_set_x_impl_x_dtype_x_repeats_measuring_every_batch_and_context():
    g = sw.build_grid({**TINY, "model": "olmoe-1b-7b,qwen3-30b-a3b", "vs": "qwen3-4b,qwen3-4b",
                       "moe_impl": "transformers,moe-energy", "dtype": "float32,bfloat16", "repeats": "2"})
    assert g.name == "models" and len(g.points) == 2 * 2 * 2
    assert all(p.is_whole and not p.is_layer and p.batches == (1, 2) and p.contexts == (4, 8) for p in g.points)
    assert {(p.spec.name, p.moe_impl, p.opts.dtype) for p in g.points} == {
        (m, i, d) for m in ("olmoe-1b-7b-tiny", "qwen3-30b-a3b-tiny") for i in ("transformers", "moe-energy")
        for d in ("float32", "bfloat16")}
    assert all([s.name for s in p.siblings] == ["qwen3-4b-tiny"] for p in g.points)  # --vs once, for every --model
    assert all(p.opts.repeats == 2 and p.layers is None for p in g.points)
    assert len({p.key("none") for p in g.points}) == 8
    p = g.points[0]
    assert p.label == "olmoe-1b-7b-tiny transformers" and p.total_params == param_counts(p.spec)[0]
    assert sw.measured_models(p) == 2 * 2 * 2 * 2  # two models x two phases x two batches x two contexts
    c = p.config("none")
    assert c["family"] == WHOLE_FAMILY and c["models"] == ["olmoe-1b-7b-tiny", "qwen3-4b-tiny"]
    assert (c["batches"], c["contexts"], c["layers"], c["moe_impl"]) == ([1, 2], [4, 8], None, "transformers")
    assert "batch_size" not in c["options"] and "epochs" not in c["options"]  # nothing trained: not in the key
    w = p.workload
    assert isinstance(w, Whole) and [m.name for m in w.models] == c["models"] and w.moe_impl == "transformers"
    assert g.source["family"] == WHOLE_FAMILY and g.source["models"] == [["olmoe-1b-7b-tiny", "qwen3-4b-tiny"],
                                                                        ["qwen3-30b-a3b-tiny", "qwen3-4b-tiny"]]


def test_defaults_are_each_models_dense_siblings_at_batch_1_8_and_context_512():
    [p] = sw.build_grid({"model": "qwen3-30b-a3b"}).points
    assert [s.name for s in p.siblings] == ["qwen3-32b", "qwen3-14b", "qwen3-4b"]
    assert (p.batches, p.contexts, p.moe_impl, p.layers) == ((1, 8), (512,), "transformers", None)


def test_seed_and_llm_layer_keys_are_the_ones_stores_already_hold():
    """Computed by the tool before whole-model sweeps existed (issue 23's first part): --resume and merge of
    existing stores depend on these never changing."""
    o = {"dtype": "float32", "device": "cpu", "duration": 0.1}
    seed = sw.build_grid({"experts": "4", "hidden": "16", "layers": "2", "top_k": "2", "batch_size": "32", **o})
    blog = sw.build_grid({"grid": "seed", **o}).points
    layer = sw.build_grid({"arch": "custom", "d_model": "32", "ffn_dim": "16", "experts": "8", "top_k": "2",
                           "tokens": "1,8", "routing": "skewed:1.2", **o})
    llm = sw.build_grid({"arch": "olmoe-1b-7b", "tokens": "1,16", **o})
    assert [seed.points[0].key("estimate"), blog[3].key("rapl"), layer.points[0].key("estimate"),
            llm.points[0].key("none")] == ["528312476739f865502e", "b863e81a7252ef07acf0", "072bbf8a812d69f414c8",
                                           "7bd07de42163ec559cc9"]
    assert not seed.points[0].is_whole and not layer.points[0].is_whole


def test_toml_model_grid(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('[sweep]\nmodel = ["olmoe-1b-7b"]\nvs = ["olmo-2-1b"]\ntiny = true\nbatch = [1, 4]\n'
                 'context = [16]\nlayers = 1\nmoe_impl = ["moe-energy"]\nduration = 0.5\n')
    [pt] = sw.build_grid(sw.load_grid_toml(p)).points
    assert (pt.spec.name, [s.name for s in pt.siblings]) == ("olmoe-1b-7b-tiny", ["olmo-2-1b-tiny"])
    assert (pt.batches, pt.contexts, pt.layers, pt.moe_impl, pt.opts.duration) == ((1, 4), (16,), 1, "moe-energy", 0.5)


def test_a_point_builds_the_largest_layer_count_that_fits_and_is_skipped_only_when_one_layer_does_not(monkeypatch):
    [p] = sw.build_grid({**TINY, "context": "8"}).points
    w = p.workload
    ms, pts = w.models, w.points()
    need = {m.name: [inputs_bytes(m, n, "float32", pts) for n in (1, 2)] for m in ms}  # bytes at 1 and 2 layers
    free = sum(need[NAMES[0]]) // 2  # the MoE fits one layer, not two
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    assert w.point_problem(p.opts, CPU) is None and w.chosen[NAMES[0]] == 1
    assert w.chosen == {n: 2 if two <= free else 1 for n, (_, two) in need.items()}
    monkeypatch.setattr(memory, "available_bytes", lambda device: max(two for _, two in need.values()))
    assert w.point_problem(p.opts, CPU) is None and w.chosen == dict.fromkeys(NAMES, 2)
    monkeypatch.setattr(memory, "available_bytes", lambda device: min(one for one, _ in need.values()) - 1)
    reason = w.point_problem(p.opts, CPU)
    assert reason is not None and reason.startswith("out of memory (building ") and "(1 of 2 layers)" in reason


@pytest.mark.parametrize("cfg, needle", [
    ({"model": "qwen4-1t"}, "model 'qwen4-1t' is unknown; choose from olmoe-1b-7b"),
    ({"model": "olmoe-1b-7b", "vs": "mixtral-8x7b"}, "--vs mixtral-8x7b: an MoE model"),
    ({"model": "olmoe-1b-7b", "context": "4096"}, "context=4096 must be a whole number from 1 to 4095"),
    ({"model": "olmoe-1b-7b", "batch": "0"}, "batch=0 must be a whole number >= 1"),
    ({"model": "olmoe-1b-7b", "batch": "1,x"}, "--batch: 'x' is not a whole number"),
    ({"model": "olmoe-1b-7b", "layers": "1,2"}, "--layers '1,2': give one whole number >= 1"),
    ({"model": "olmoe-1b-7b", "layers": "0"}, "--layers '0': give one whole number >= 1"),
    ({"model": "olmoe-1b-7b", "moe_impl": "fast"}, "--moe-impl 'fast' is unknown"),
    ({"model": "olmoe-1b-7b", "batch_size": "8"}, "--batch-size: no meaning with --model"),
    ({"model": "olmoe-1b-7b", "arch": "olmoe-1b-7b", "tokens": "1"}, "--arch, --tokens: no meaning with --model"),
    ({"model": "olmoe-1b-7b", "grid": "seed"}, "--grid: no meaning with --model"),
    ({"batch": "1", "context": "8"}, "--batch, --context: whole-model settings; give --model"),
    ({"model": "olmoe-1b-7b", "dtype": "float64"}, "dtype='float64' is unknown"),
    ({"model": "olmoe-1b-7b", "moe_impl": "moe-energy", "strategies": "grouped,active_loop"},
     "--moe-strategy grouped,active_loop: whole models run one strategy"),
    ({"model": "olmoe-1b-7b", "strategies": "grouped"}, "--moe-strategy: no meaning with --moe-impl transformers"),
])
def test_model_grid_mistakes_are_one_line_config_errors(cfg, needle):
    with pytest.raises(ConfigError) as e:
        sw.build_grid(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_one_moe_strategy_for_the_moe_energy_points_of_a_model_grid():
    grid = sw.build_grid({"model": "olmoe-1b-7b", "moe_impl": "transformers,moe-energy", "strategies": "grouped"})
    assert [(p.moe_impl, p.opts.strategies) for p in grid.points] == [("transformers", ("grouped",)),
                                                                      ("moe-energy", ("grouped",))]


def test_bad_input_to_the_sweep_command_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys):
    db = tmp_path / "x.db"
    for args, needle in ((["--model", "olmoe-1b-7b", "--vs", "qwen3-30b-a3b"], "--vs qwen3-30b-a3b: an MoE model"),
                         (["--model", "olmoe-1b-7b", "--context", "99999"], "context=99999"),
                         (["--model", "nope"], "model 'nope' is unknown")):
        code = main(["sweep", *args, "--device", "cpu", "--db", str(db)])
        one_line_error(code, capsys.readouterr().err, needle)
    assert not db.exists()


# -- --shard auto -----------------------------------------------------------------------------------------------
def slurm(task: int, low: int, count: int, step: int | None = None, high: int | None = None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_COUNT": str(count)}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    if high is not None:
        env["SLURM_ARRAY_TASK_MAX"] = str(high)
    return env


@pytest.mark.parametrize("text, env, want", [
    ("auto", slurm(0, 0, 4, high=3), (1, 4)),
    ("auto", slurm(3, 0, 4, high=3), (4, 4)),
    ("auto", slurm(1, 1, 3), (1, 3)),  # sbatch --array=1-3
    ("auto", slurm(7, 5, 4, high=8), (3, 4)),  # sbatch --array=5-8: ids start at SLURM_ARRAY_TASK_MIN, not 0 or 1
    ("auto", slurm(8, 0, 4, step=4, high=12), (3, 4)),  # sbatch --array=0-12:4
    ("auto/3", {"JOB_COMPLETION_INDEX": "0"}, (1, 3)),
    ("auto/3", {"JOB_COMPLETION_INDEX": "2", **slurm(0, 0, 9)}, (3, 3)),  # auto/N: the Indexed Job's index
])
def test_shard_auto_takes_its_index_and_count_from_the_scheduler(text, env, want):
    assert sw.parse_shard(text, env) == want


@pytest.mark.parametrize("text, env, needle", [
    ("auto", {}, "--shard auto: SLURM_ARRAY_TASK_ID is not set"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0"}, "SLURM_ARRAY_TASK_COUNT is not set"),
    ("auto", {"JOB_COMPLETION_INDEX": "1"}, "in a Kubernetes Indexed Job give --shard auto/N"),
    ("auto", slurm(4, 0, 4, high=3), "SLURM_ARRAY_TASK_ID=4 is not one of the array's ids (0 to 3, step 1)"),
    ("auto", slurm(2, 0, 4, step=4, high=12), "SLURM_ARRAY_TASK_ID=2 is not one of the array's ids"),
    ("auto", slurm(3, 1, 3, high=7), "not an evenly spaced range (ids 1 to 7, step 1, 3 tasks)"),  # --array=1,3,7
    ("auto", {**slurm(1, 1, 3), "SLURM_ARRAY_TASK_ID": "one"}, "SLURM_ARRAY_TASK_ID='one' is not a whole number"),
    ("auto/4", {}, "--shard auto: JOB_COMPLETION_INDEX is not set"),
    ("auto/4", {"JOB_COMPLETION_INDEX": "4"}, "JOB_COMPLETION_INDEX=4 is not between 0 and 3"),
    ("auto/0", {"JOB_COMPLETION_INDEX": "0"}, "--shard 'auto/0': N must be a whole number >= 1"),
    ("auto/x", {}, "--shard 'auto/x': N must be a whole number >= 1"),
])
def test_shard_auto_without_a_consistent_environment_is_one_line(text, env, needle):
    with pytest.raises(ConfigError) as e:
        sw.parse_shard(text, env)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_shard_auto_outside_a_scheduler_is_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    code = main(["sweep", "--model", "olmoe-1b-7b", "--tiny", "--shard", "auto", "--device", "cpu", "--db",
                 str(tmp_path / "x.db")])
    one_line_error(code, capsys.readouterr().err, "--shard auto: SLURM_ARRAY_TASK_ID is not set")
    assert not (tmp_path / "x.db").exists()


# -- end to end through the CLI ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("whole") / "whole.db"
    r = cli("sweep", *GRID, "--db", str(db))
    assert r.returncode == 0, r.stderr
    return db, r


@pytest.mark.slow
def test_a_whole_model_sweep_stores_a_row_per_model_phase_batch_and_context(model_db):
    db, r = model_db
    assert "measured 2, skipped 0, failed 0" in r.stdout
    assert rows(db, "SELECT family, model, moe_impl, status, batch_size, experts, layers FROM points ORDER BY id") \
        == [(WHOLE_FAMILY, NAMES[0], impl, "done", None, None, None) for impl in ("transformers", "moe-energy")]
    assert rows(db, "SELECT COUNT(*) FROM models") == [(2 * 3 * 2 * 2,)]  # 2 points x 3 models x 2 phases x 2 batches
    got = rows(db, "SELECT model, phase, batch, context, tokens_per_call, layers_measured, layers_total, moe_impl "
                   "FROM models WHERE point_id = 1 ORDER BY id")
    assert got == [(n, ph, b, 4, b * 4 if ph == "prefill" else b, 1, 2, "transformers" if n == NAMES[0] else None)
                   for ph in ("prefill", "decode") for b in (1, 2) for n in NAMES]
    assert rows(db, "SELECT COUNT(*) FROM models WHERE joules_per_token > 0 AND tokens_per_joule > 0 AND "
                    "ABS(joules_per_token * tokens_per_joule - 1) < 1e-9") == [(24,)]
    assert rows(db, "SELECT phase, COUNT(ttft_ms), COUNT(itl_p50_ms), COUNT(itl_p90_ms) FROM models GROUP BY phase "
                    "ORDER BY phase") == [("decode", 0, 12, 12), ("prefill", 12, 0, 0)]
    for (x,) in rows(db, "SELECT whole_model_extrapolated FROM models"):  # --layers 1 of 2: every figure scaled
        assert json.loads(x)["label"].startswith("EXTRAPOLATED from the first 1 of 2 layers")
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
def test_a_whole_model_sweep_resumes_and_slurm_array_shards_merge_to_the_same_points(model_db, tmp_path):
    db, _ = model_db
    again = cli("sweep", *GRID, "--db", str(db), "--resume")
    assert again.returncode == 0 and "measured 0" in again.stdout and "already complete 2" in again.stdout
    # --max-forward-s picks N only when --layers does not (here it changes nothing): the same points, complete
    again = cli("sweep", *GRID, "--max-forward-s", "99", "--db", str(db), "--resume")
    assert again.returncode == 0 and "measured 0" in again.stdout and "already complete 2" in again.stdout
    parts = []
    for task in (7, 8):  # sbatch --array=7-8: tasks 7 and 8 of 2 are shards 1/2 and 2/2
        part = tmp_path / f"task-{task}.db"
        env = slurm(task, 7, 2, high=8)
        r = cli("sweep", *GRID, "--shard", "auto", "--db", str(part), env=env)
        assert r.returncode == 0, r.stderr
        assert f"(shard {task - 6}/2 of a 2-point grid)" in r.stdout
        assert rows(part, "SELECT shard FROM runs") == [(f"{task - 6}/2",)]
        parts.append(part)
    out = tmp_path / "merged.db"
    assert cli("merge", *map(str, parts), "--out", str(out)).returncode == 0
    key = "SELECT point_key FROM points WHERE status = 'done' ORDER BY point_key"
    assert rows(out, key) == rows(db, key) and len(rows(out, key)) == 2
    assert rows(out, "SELECT COUNT(*), COUNT(DISTINCT model), COUNT(DISTINCT phase) FROM models") == [(24, 3, 2)]


@pytest.mark.slow
def test_export_carries_the_whole_model_columns(model_db):
    db, _ = model_db
    e = cli("export", "--db", str(db), "--format", "csv")
    assert e.returncode == 0, e.stderr
    table = list(csv.DictReader(io.StringIO(e.stdout)))
    assert len(table) == 24
    for col in ("model", "phase", "batch", "context", "tokens_per_call", "layers_measured", "layers_total", "moe_impl",
                "joules_per_token", "ttft_ms", "itl_p50_ms", "itl_p90_ms", "whole_model_extrapolated", "point_family"):
        assert col in table[0], col
    decode = [t for t in table if t["phase"] == "decode" and t["model"] == NAMES[0]]
    assert len(decode) == 4 and all(float(t["itl_p90_ms"]) >= float(t["itl_p50_ms"]) > 0 for t in decode)
    assert {t["moe_impl"] for t in decode} == {"transformers", "moe-energy"}
    points = list(csv.DictReader(io.StringIO(cli("export", "--db", str(db), "--table", "points").stdout)))
    assert [(p["family"], p["model"]) for p in points] == [(WHOLE_FAMILY, NAMES[0])] * 2
    with Store(db, create=False) as st:
        doc = json.loads(json.dumps(st.export_document(), allow_nan=False))
    recs = [m for p in doc["points"] for m in p["models"]]
    assert len(recs) == 24 and all(isinstance(m["whole_model_extrapolated"], dict) for m in recs)
    assert all(p["document"]["family"] == WHOLE_FAMILY for p in doc["points"])


def test_tiny_shrinks_every_model_of_the_set():
    [p] = sw.build_grid(TINY).points
    assert p.spec == tiny("olmoe-1b-7b") and [s.name for s in p.siblings] == list(NAMES[1:])


def test_a_sweep_measures_in_runs_protocol_unless_told(tmp_path):
    """`sweep --model` took the seed's protocol (3 windows of 30 s, 2 s warm-ups and rests) where `run --model` took
    2 of 10 s, 0.5 s warm-up, no rest: undocumented, 4.5x the window time per row, and, the duration being the
    default --max-forward-s, possibly another N of layers than `run` builds. One protocol; flags still win."""
    from moe_energy.cli import build_parser
    from moe_energy.commands.options import resolve_whole
    from moe_energy.commands.sweep import _grid
    from moe_energy.runner.model import WHOLE_PROTOCOL

    def protocol(o) -> tuple:
        return o.duration, o.repeats, o.warmup, o.cooldown

    flags = ["--model", "olmoe-1b-7b", "--tiny", "--device", "cpu"]
    _w, run_opts = resolve_whole(build_parser().parse_args(["run", *flags]))
    [p] = _grid(build_parser().parse_args(["sweep", *flags, "--db", str(tmp_path / "s.db")]))[0].points
    assert protocol(p.opts) == protocol(run_opts) == tuple(WHOLE_PROTOCOL.values()) == (10.0, 2, 0.5, 0.0)
    toml = tmp_path / "g.toml"
    toml.write_text("warmup = 1.5\n")
    told = _grid(build_parser().parse_args(["sweep", *flags, "--repeats", "1,3", "--duration", "4", "--config",
                                            str(toml), "--db", str(tmp_path / "s.db")]))[0].points
    assert [protocol(q.opts) for q in told] == [(4.0, 1, 1.5, 0.0), (4.0, 3, 1.5, 0.0)]
