"""Sweeps: grid expansion, the scale ladder, shards, and end to end through the CLI: rows written, resume
after SIGKILL, and shard 1/2 + 2/2 + merge equal to the unsharded sweep."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import QUICK, TINY_TASK, in_process

from moe_energy.config import PRESETS, ConfigError
from moe_energy.models.counting import moe_params
from moe_energy.runner import sweep as sw

TINY_SHAPE = {"experts": "4", "hidden": "16,32", "layers": "2", "top_k": "1,2", "input_dim": 40, "classes": 4}
RUN = [*TINY_TASK, *QUICK, "--meter", "estimate"]
GRID4 = ["--experts", "4", "--hidden", "16,32", "--layers", "2", "--top-k", "1,2", *RUN]


cli = in_process  # what each command does; the sweep killed mid-way below is a process of its own


def rows(db, sql):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- grid expansion (no models run) ---------------------------------------------------------------------
def test_axes_expand_to_their_product_with_validated_options():
    g = sw.build_grid({**TINY_SHAPE, "batch_size": "32,64", "dtype": "float32,bfloat16", "epochs": 1})
    assert len(g.points) == 2 * 2 * 2 * 2
    assert {(p.spec.hidden, p.spec.top_k, p.opts.batch_size, p.opts.dtype) for p in g.points} == {
        (h, k, b, d) for h in (16, 32) for k in (1, 2) for b in (32, 64) for d in ("float32", "bfloat16")}
    assert all(p.opts.epochs == 1 and p.spec.input_dim == 40 for p in g.points)
    assert len({p.key("estimate") for p in g.points}) == 16  # every point its own key
    assert g.points[0].key("estimate") != g.points[0].key("rapl")  # the meter is part of what was measured


def test_invalid_shape_becomes_a_skipped_point_but_bad_options_stop_the_sweep():
    g = sw.build_grid({"experts": "2,4", "top_k": "3", "hidden": "16", "layers": "2"})
    assert [(p.spec.experts, p.error is not None) for p in g.points] == [(2, True), (4, False)]
    assert "top_k=3 exceeds experts=2" in g.points[0].error
    with pytest.raises(ConfigError, match="dtype='float64' is unknown"):
        sw.build_grid({**TINY_SHAPE, "dtype": "float32,float64"})
    with pytest.raises(ConfigError, match="not a whole number"):
        sw.build_grid({"hidden": "16,abc"})
    with pytest.raises(ConfigError, match="--grid 'huge' is unknown"):
        sw.build_grid({"grid": "huge"})
    with pytest.raises(ConfigError, match="no points at or below --max-params"):
        sw.build_grid({"grid": "seed", "max_params": "10"})


def test_seed_grid_is_the_blogs_four_points():
    g = sw.build_grid({"grid": "seed"})
    assert [p.label for p in g.points] == ["small", "large", "xl", "xxl"]
    assert [p.total_params for p in g.points] == [2_687_192, 63_418_800, 368_287_260, 2_789_237_600]


def test_scale_ladder_is_geometric_at_fixed_ratio_through_the_seed_points():
    shapes = sw.scale_shapes(per_decade=4)
    sizes = [moe_params(s) for s in shapes]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all(s.experts == 4 * s.top_k for s in shapes)  # E/k fixed at the seed's 4
    assert all(s.hidden % 8 == 0 for s in shapes)  # 16-byte aligned rows: grouped GEMM runs on every shape
    for name in ("small", "large", "xl", "xxl"):
        assert PRESETS[name] in shapes
    steps = [b / a for a, b in zip(sizes, sizes[1:])]
    assert all(1.3 < r < 2.5 for r in steps), steps  # ~10**(1/4) = 1.78 per step
    g = sw.build_grid({"grid": "scale", "max_params": "5e7"})
    assert all(p.total_params <= 5e7 for p in g.points) and g.points[0].label == "small"
    assert len(g.points) == sum(1 for s in sizes if s <= 5e7) == 6
    assert len(sw.scale_shapes(per_decade=8)) > len(shapes)


def test_shards_partition_the_grid_deterministically():
    g = sw.build_grid({**TINY_SHAPE, "batch_size": "32,64,128"})
    keys = [p.key("m") for p in g.points]
    parts = [[p.key("m") for p in sw.shard(g.points, (i, 3))] for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(keys) and all(parts)
    assert parts == [[p.key("m") for p in sw.shard(g.points, (i, 3))] for i in (1, 2, 3)]
    assert sw.parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1/0", "x", "1-2"):
        with pytest.raises(ConfigError, match="--shard"):
            sw.parse_shard(bad)


def test_point_that_cannot_fit_in_memory_is_detected_before_building():
    g = sw.build_grid({"experts": "64", "hidden": "30000", "layers": "3", "top_k": "2"})
    reason = g.points[0].workload.point_problem(g.points[0].opts, __import__("torch").device("cpu"))
    assert reason is not None and reason.startswith("out of memory") and "GiB" in reason


def test_toml_grid(tmp_path):
    p = tmp_path / "grid.toml"
    p.write_text('experts = [4]\nhidden = [16, 32]\nlayers = 2\ntop_k = [1]\nbatch_size = [32, 64]\n'
                 'epochs = 1\ninput_dim = 40\nclasses = 4\n')
    g = sw.build_grid(sw.load_grid_toml(p))
    assert len(g.points) == 4 and {p.opts.batch_size for p in g.points} == {32, 64}
    p.write_text("hiden = [16]\n")
    with pytest.raises(ConfigError, match="unknown key"):
        sw.load_grid_toml(p)


def test_eta_uses_the_rate_of_finished_points():
    g = sw.build_grid({**TINY_SHAPE, "epochs": 1, "duration": 1.0, "warmup": 0, "repeats": 1, "cooldown": 0,
                       "idle_seconds": 0})
    eta = sw.Eta()
    assert eta.remaining(g.points) is None
    p = g.points[0]
    eta.record(p, sw.fixed_seconds(p) + 2.0)  # 2 s of training for this point's FLOPs
    expect = sum(sw.fixed_seconds(q) + 2.0 * q.workload.work_flops(q.opts) / p.workload.work_flops(p.opts)
                 for q in g.points)
    assert eta.remaining(g.points) == pytest.approx(expect)


# -- end to end through the CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("full") / "full.db"
    r = cli("sweep", *GRID4, "--db", str(db))
    assert r.returncode == 0, r.stderr
    return db, r


@pytest.mark.slow
def test_tiny_sweep_writes_expected_rows(full_db):
    db, r = full_db
    assert rows(db, "SELECT COUNT(*), COUNT(DISTINCT point_key) FROM points WHERE status='done'") == [(4, 4)]
    assert rows(db, "SELECT COUNT(*) FROM models") == [(4 * 3,)]  # moe[grouped], dense_total, dense_active
    assert rows(db, "SELECT COUNT(*) FROM windows") == [(4 * 3 * 1,)]  # --repeats 1
    assert rows(db, "SELECT COUNT(*) FROM runs") == [(1,)]
    assert rows(db, "SELECT COUNT(*) FROM models WHERE inferences_per_second > 0 AND record_json LIKE '%windows%'") \
        == [(12,)]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert "measured 4, skipped 0, failed 0" in r.stdout
    # export for pandas users
    e = cli("export", "--db", str(db), "--format", "csv")
    assert e.returncode == 0 and len(e.stdout.strip().splitlines()) == 1 + 12


@pytest.mark.slow
def test_resume_after_sigkill_finishes_without_rerunning(tmp_path):
    db = tmp_path / "k.db"
    args = ["sweep", "--experts", "4", "--hidden", "16,24,32", "--layers", "2", "--top-k", "1,2", *RUN,
            "--db", str(db)]
    proc = subprocess.Popen([sys.executable, "-m", "moe_energy", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done_before: list = []
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    done_before = rows(db, "SELECT id, point_key, finished_utc FROM points WHERE status='done'")
                except sqlite3.OperationalError:
                    done_before = []
                if len(done_before) >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = rows(db, "SELECT id, point_key, finished_utc FROM points WHERE status='done'")
    assert 2 <= len(killed_at) < 6
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]

    r = cli("sweep", *args[1:], "--resume")
    assert r.returncode == 0, r.stderr
    assert f"already complete {len(killed_at)}" in r.stdout
    after = rows(db, "SELECT id, point_key, finished_utc FROM points WHERE status='done' ORDER BY id")
    assert len(after) == 6 and len({k for _, k, _ in after}) == 6  # every point once, none re-run
    assert after[: len(killed_at)] == sorted(killed_at)  # the finished ones untouched
    assert rows(db, "SELECT COUNT(*) FROM models") == [(18,)]
    assert rows(db, "SELECT COUNT(*) FROM runs") == [(1,)]  # resume continues the same run
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    again = cli("sweep", *args[1:], "--resume")
    assert again.returncode == 0 and "measured 0" in again.stdout and "already complete 6" in again.stdout


@pytest.mark.slow
def test_shards_merge_to_the_unsharded_point_set(full_db, tmp_path):
    db, _ = full_db
    parts = []
    for i in (1, 2):
        part = tmp_path / f"s{i}.db"
        r = cli("sweep", *GRID4, "--shard", f"{i}/2", "--db", str(part))
        assert r.returncode == 0, r.stderr
        parts.append(part)
        assert rows(part, "SELECT COUNT(*) FROM points") == [(2,)]
    out = tmp_path / "merged.db"
    m = cli("merge", str(parts[0]), str(parts[1]), "--out", str(out))
    assert m.returncode == 0, m.stderr
    merged = rows(out, "SELECT point_key FROM points WHERE status='done'")
    unsharded = rows(db, "SELECT point_key FROM points WHERE status='done'")
    assert sorted(merged) == sorted(unsharded) and len(merged) == 4
    assert rows(out, "SELECT COUNT(*) FROM models") == [(12,)]
    assert rows(out, "PRAGMA integrity_check") == [("ok",)]
    again = cli("merge", str(parts[0]), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_out_of_memory_point_is_recorded_skipped_and_the_sweep_goes_on(tmp_path):
    db = tmp_path / "oom.db"
    r = cli("sweep", "--experts", "4,64", "--hidden", "16,60000", "--layers", "2", "--top-k", "2", *RUN,
            "--db", str(db))
    assert r.returncode == 0, r.stderr
    got = rows(db, "SELECT experts, hidden, status, reason FROM points ORDER BY id")
    assert [(e, h, s) for e, h, s, _ in got] == [(4, 16, "done"), (4, 60000, "skipped"), (64, 16, "done"),
                                                  (64, 60000, "skipped")]
    assert all(reason.startswith("out of memory") for *_, s, reason in got if s == "skipped")


def test_sweep_user_errors_exit_2_in_one_line(tmp_path, capsys):
    from moe_energy.cli import main

    for args, needle in ((["--grid", "nope"], "--grid 'nope' is unknown"),
                         (["--shard", "3/2"], "--shard 3/2"),
                         (["--grid", "seed", "--hidden", "16"], "fixes the shapes"),
                         (["--max-params", "lots"], "--max-params 'lots' is not a number")):
        assert main(["sweep", *args, "--db", str(tmp_path / "e.db"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert main(["report", "--db", str(tmp_path / "absent.db")]) == 2
    assert "no such database" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()  # reading never creates a database


def test_an_axis_value_given_twice_is_one_point():
    g = sw.build_grid({**TINY_SHAPE, "hidden": "16,16,24", "top_k": "1", "batch_size": "32,032"})
    assert sorted(p.spec.hidden for p in g.points) == [16, 24]
    assert {p.opts.batch_size for p in g.points} == {32}
    assert len({p.key("none") for p in g.points}) == len(g.points) == 2


def test_presets_the_axes_override_alike_are_one_point():
    # --preset small,large with every shape field given made two points of one key: the sweep measured the shape,
    # measured it again, then stopped with exit 2 calling the database damaged (UNIQUE constraint failed)
    g = sw.build_grid({**TINY_SHAPE, "hidden": "16", "top_k": "1", "preset": "small,large"})
    assert len(g.points) == 1 and g.points[0].label == "E4-H16-L2-k1"
    # presets the axes leave different stay two shapes
    g2 = sw.build_grid({"experts": "4", "top_k": "1", "input_dim": 40, "classes": 4, "preset": "small,large"})
    assert sorted((p.spec.hidden, p.spec.layers) for p in g2.points) == [(256, 3), (1024, 4)]
    assert len({p.key("none") for p in g2.points}) == 2


@pytest.mark.slow
def test_resume_sees_a_point_whether_its_numbers_came_from_flags_or_a_toml(tmp_path):
    """``--warmup 0`` on the command line is 0.0, ``warmup = 0`` in a TOML is 0: the same point, not a new one."""
    db = tmp_path / "k.db"
    shape = ["--experts", "4", "--hidden", "16", "--layers", "2", "--top-k", "1", "--input-dim", "40",
             "--classes", "4", "--samples", "300", "--epochs", "1", "--device", "cpu", "--meter", "estimate"]
    first = cli("sweep", *shape, "--duration", "1", "--warmup", "0", "--repeats", "1", "--idle-seconds", "0",
                "--cooldown", "0", "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert "measured 1" in first.stdout
    toml = tmp_path / "g.toml"
    toml.write_text("duration = 1\nwarmup = 0\nrepeats = 1\nidle_seconds = 0\ncooldown = 0\n")
    again = cli("sweep", *shape, "--config", str(toml), "--db", str(db), "--resume")
    assert again.returncode == 0, again.stderr
    assert "measured 0" in again.stdout and "already complete 1" in again.stdout
    assert rows(db, "SELECT COUNT(*) FROM points") == [(1,)]
