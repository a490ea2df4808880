"""The SQLite store: schema and migrations, one transaction per point, traces, export and merge."""

import csv
import hashlib
import io
import json
import sqlite3

import pytest

from moe_energy.config import ConfigError
from moe_energy.storage import store as store_mod
from moe_energy.storage.store import Store, merge, normalize_trace


def model_record(name="moe[grouped]", kind="moe", ipj=10.0, windows=2, trace=True):
    wins = []
    for r in range(windows):
        w = {"window_s": 1.0, "inferences": 100 + r, "energy_j": 10.0, "average_power_w": 10.0 + r,
             "inferences_per_second": 100.0, "inferences_per_joule": ipj, "energy_method": "counter", "repeat": r}
        if trace:
            w["trace"] = {"cpu:0": [[0.0, 10.0], [0.5, 11.0], [1.0, 12.0 + r]], "dram": [[0.0, 1.0], [0.5, 1.0],
                                                                                         [1.0, 1.0]]}
        wins.append(w)
    return {"name": name, "kind": kind, "match": None if kind == "moe" else "total", "strategy": "grouped",
            "params": 1000, "active_params": 500, "width": 16, "flops_per_inference": 2000, "dtype": "float32",
            "batch_size": 64, "accuracy": 0.5, "diverged": False, "inferences_per_second": 100.0,
            "inferences_per_joule": ipj, "inferences_per_joule_min": ipj * 0.9, "inferences_per_joule_max": ipj * 1.1,
            "energy_j": 10.0, "average_power_w": float("nan"), "energy_method": "counter", "windows": wins,
            "new_field_from_the_future": {"kept": True}}


def doc(*models):
    return {"schema": "moe-energy/run", "environment": {"device": "cpu"}, "models": list(models)}


CONFIG = {"label": "tiny", "spec": {"experts": 4, "hidden": 16, "layers": 2, "top_k": 2, "input_dim": 40,
                                    "classes": 4}, "options": {"batch_size": 64, "dtype": "float32"},
          "total_params": 1000}


@pytest.fixture
def db(tmp_path):
    s = Store(tmp_path / "sub" / "r.db")
    s.new_run("run1", {"grid": "custom"}, {"device": "cpu"}, {"name": "rapl"}, grid_hash="h")
    yield s
    s.close()


def test_new_database_has_schema_wal_and_tables(db):
    assert db.version() == store_mod.schema_version() == len(store_mod.MIGRATIONS)
    assert db.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.con.execute("PRAGMA busy_timeout").fetchone()[0] == store_mod.BUSY_TIMEOUT_MS
    tables = {r[0] for r in db.con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "runs", "points", "models", "windows", "traces"} <= tables


def test_point_with_models_windows_traces_and_full_json(db):
    pid = db.add_point("run1", "k1", CONFIG, "done", document=doc(model_record(), model_record("dense_total", "dense")))
    assert db.con.execute("SELECT COUNT(*) FROM models WHERE point_id=?", (pid,)).fetchone()[0] == 2
    assert db.con.execute("SELECT COUNT(*) FROM windows").fetchone()[0] == 4
    assert db.con.execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 8  # 4 windows x 2 devices
    row = db.model_rows()[0]
    assert row["inferences_per_joule_min"] == pytest.approx(9.0) and row["average_power_w"] is None  # NaN -> NULL
    assert row["point_label"] == "tiny" and row["point_experts"] == 4
    full = json.loads(row["record_json"])
    assert full["new_field_from_the_future"] == {"kept": True}  # nothing is lost
    assert "trace" not in full["windows"][0]  # traces live in their table
    traces = db.traces()
    first = traces[min(traces)]
    assert first[0] == ("cpu:0", [0.0, 0.5, 1.0], [10.0, 11.0, 12.0])
    assert db.completed_keys() == {store_mod.point_key(CONFIG)}  # identity from the stored config
    point = db.points()[0]
    assert json.loads(point["document_json"])["environment"] == {"device": "cpu"}
    assert json.loads(point["config_json"]) == CONFIG


def test_failed_point_is_not_complete_and_a_failed_write_leaves_nothing(db):
    db.add_point("run1", "k2", CONFIG, "failed", reason="RuntimeError: boom")
    assert db.completed_keys() == set()
    bad = model_record()
    bad["windows"][1]["inferences"] = object()  # sqlite cannot bind this: the whole point must roll back
    with pytest.raises(sqlite3.Error):
        db.add_point("run1", "k3", CONFIG, "done", document=doc(model_record(), bad))
    assert [p["point_key"] for p in db.points()] == ["k2"]
    assert db.con.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 0
    assert db.integrity() == "ok"


def test_newer_schema_is_refused_in_one_line(tmp_path):
    p = tmp_path / "new.db"
    Store(p).close()
    con = sqlite3.connect(p)
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(ConfigError) as e:
        Store(p)
    msg = str(e.value)
    assert "schema version 99 is newer" in msg and "\n" not in msg


def test_migrations_apply_in_order_and_atomically(tmp_path, monkeypatch):
    p = tmp_path / "old.db"
    Store(p).close()  # the shipped version
    v = len(store_mod.MIGRATIONS)
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, "ALTER TABLE runs ADD COLUMN note TEXT"])
    s = Store(p)
    assert s.version() == v + 1
    assert "note" in [r[1] for r in s.con.execute("PRAGMA table_info(runs)")]
    s.close()
    # a migration that fails half way leaves the version and the schema untouched
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, "CREATE TABLE extra (x INT); SELECT nope"])
    with pytest.raises(ConfigError, match=f"from version {v + 1} to {v + 2} failed"):
        Store(p)
    con = sqlite3.connect(p)
    assert con.execute("SELECT version FROM schema_version").fetchone()[0] == v + 1
    assert con.execute("SELECT COUNT(*) FROM sqlite_master WHERE name='extra'").fetchone()[0] == 0


def test_missing_or_garbage_database_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such database"):
        Store(tmp_path / "absent.db", create=False)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite database"):
        Store(junk)
    with pytest.raises(ConfigError, match="is a directory"):
        Store(tmp_path)


@pytest.mark.parametrize("table, column", [("models", "inferences_per_joule"), ("windows", "model_name"),
                                           ("points", "point_key")])
def test_an_empty_table_exports_its_header(db, table, column, tmp_path, capsys):
    """Not a lone 'id': a CSV reader gets the columns a filled table has (and the command says it is empty)."""
    header = db.export_csv(table).splitlines()
    assert len(header) == 1 and column in header[0].split(",")
    db.add_point("run1", "k1", CONFIG, "done", document=doc(model_record(), model_record("dense_total", "dense")))
    assert header[0] == db.export_csv(table).splitlines()[0]
    assert "record_json" not in header[0] and "config_json" not in header[0]
    from moe_energy.cli import main
    empty = tmp_path / "empty.db"
    Store(empty).close()
    assert main(["export", "--db", str(empty), "--table", table]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == header and err.startswith(f"warning: --db {empty} holds no sweep points yet")


def test_export_csv_and_json(db):
    db.add_point("run1", "k1", CONFIG, "done", document=doc(model_record(), model_record("dense_total", "dense")))
    rows = list(csv.DictReader(io.StringIO(db.export_csv("models"))))
    assert len(rows) == 2 and rows[0]["name"] == "moe[grouped]" and float(rows[0]["inferences_per_joule"]) == 10.0
    assert "record_json" not in rows[0]
    assert len(list(csv.DictReader(io.StringIO(db.export_csv("windows"))))) == 4
    d = db.export_document()
    assert d["schema"] == "moe-energy/export" and d["runs"][0]["meter"] == {"name": "rapl"}
    w = d["points"][0]["models"][0]["windows"][1]
    assert w["trace"]["cpu:0"] == [[0.0, 10.0], [0.5, 11.0], [1.0, 13.0]]
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("trace, expected", [
    ({"gpu0": [[0, 1], [1, 2]]}, [("gpu0", [0.0, 1.0], [1.0, 2.0])]),
    ([[0, 5], [1, 6]], [("all", [0.0, 1.0], [5.0, 6.0])]),
    ({"t_s": [0, 1], "power_w": [3, 4]}, [("all", [0.0, 1.0], [3.0, 4.0])]),
    ([{"t_s": 0, "power_w": 7}], [("all", [0.0], [7.0])]),
    (None, []), ([], []), ({"gpu0": "garbage"}, []),
])
def test_normalize_trace(trace, expected):
    assert normalize_trace(trace) == expected


def test_merge_keeps_each_point_once_and_never_overwrites(tmp_path):
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    for s, keys in ((a, ["k1", "k2"]), (b, ["k2", "k3"])):
        s.new_run("run1", {}, {}, None)
        for k in keys:
            s.add_point("run1", k, CONFIG, "done", document=doc(model_record()))
        s.close()
    counts = merge([tmp_path / "a.db", tmp_path / "b.db"], tmp_path / "c.db")
    assert counts["points"] == 3 and counts["duplicate_points"] == 1 and counts["windows"] == 6
    with Store(tmp_path / "c.db", create=False) as c:
        assert sorted(p["point_key"] for p in c.points()) == ["k1", "k2", "k3"]
        assert c.con.execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 12
        assert c.integrity() == "ok"
    with pytest.raises(ConfigError, match="already exists"):
        merge([tmp_path / "a.db"], tmp_path / "c.db")
    assert not list(tmp_path.glob(".c.db-*"))  # no temporary left behind


def test_a_failed_point_retried_in_the_same_run_is_replaced(db):
    db.add_point("run1", "k1", CONFIG, "failed", reason="RuntimeError: flaky")
    db.add_point("run1", "k1", CONFIG, "done", document=doc(model_record()))
    assert [(p["point_key"], p["status"]) for p in db.points()] == [("k1", "done")]
    with pytest.raises(sqlite3.IntegrityError):  # a completed point is never silently replaced
        db.add_point("run1", "k1", CONFIG, "done", document=doc(model_record()))


@pytest.mark.parametrize("raw, want, expected", [
    ('{"a": 1}', dict, {"a": 1}), ("[1, 2.5]", list, [1, 2.5]), (b'{"b": null}', dict, {"b": None}),
    ('{"a": ', dict, None), ("[1]", dict, None), ('{"a": NaN}', dict, None), ("[1e999]", list, None),
    ("Infinity", dict, None), (None, dict, None), (42, dict, None), (b"\xff\xfe", dict, None),
    ("[" * 100_000, list, None),
])
def test_stored_json_is_strict_and_never_raises(raw, want, expected):
    assert store_mod.stored_json(raw, want) == expected


# -- schema version 2: the LLM-layer, roofline-split and issue 15 columns, by a migration of their own ---------
def layer_record(tokens=8, kind="moe"):
    rec = model_record("moe[auto]" if kind == "moe" else "dense_total", kind, ipj=5.0, windows=1, trace=False)
    rec["name"] += f"@T={tokens}"
    rec["windows"][0].update(power_limit_w=250.0, cpu_power_limit_w=95.0, experts_touched=6, tokens_per_forward=tokens)
    rec.update(arch="olmoe-1b-7b", tokens_per_forward=tokens, routing="skewed:1.2", tokens_per_second=100.0,
               tokens_per_joule=5.0, joules_per_1k_tokens=200.0, experts_touched=6.0 if kind == "moe" else None,
               weight_bytes_read_per_forward=3e6, memory_bound_ms=0.2, compute_bound_ms=0.05, bound="memory",
               roofline_bound_ms=0.2, fraction_of_roofline=0.5, power_limit_w=250.0, co2e_g_per_million=1.5,
               carbon_basis="estimate from measured energy")
    return rec


LAYER_CONFIG = {"label": "olmoe-1b-7b skewed:1.2", "family": "llm_layer", "routing": "skewed:1.2", "tokens": [8],
                "spec": {"name": "olmoe-1b-7b", "d_model": 2048, "experts": 64, "top_k": 8},
                "options": {"dtype": "float32", "batch_size": 128}, "total_params": 402784256}


def v1_store(path):
    """A store exactly as schema version 1 shipped it, with one seed point."""
    mp = pytest.MonkeyPatch()
    mp.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    try:
        with Store(path) as s:
            assert s.version() == 1
            s.new_run("old", {"grid": "seed"}, {"device": "cpu"}, None)
            # version 1's add_point wrote these columns: the new ones do not exist yet
            s.con.execute("BEGIN IMMEDIATE")
            s.con.execute("INSERT INTO points (run_id, point_key, status, label, experts, batch_size, dtype, "
                          "total_params, config_json) VALUES ('old', 'seed1', 'done', 'small', 4, 64, 'float32', "
                          "1000, ?)", (json.dumps(CONFIG),))
            s.con.execute("INSERT INTO models (point_id, ordinal, name, kind, params, active_params, "
                          "inferences_per_joule, record_json) VALUES (1, 0, 'moe[grouped]', 'moe', 1000, 500, 10.0, "
                          "?)", (json.dumps(model_record(windows=0)),))
            s.con.execute("COMMIT")
    finally:
        mp.undo()
    return path


def test_the_v1_schema_is_frozen_and_v2_adds_only_columns():
    assert store_mod._V1.count("CREATE TABLE") == 5 and "tokens_per_forward" not in store_mod._V1
    assert "power_limit_w" not in store_mod._V1 and "family" not in store_mod._V1
    v2 = store_mod.MIGRATIONS[1]
    assert "CREATE TABLE" not in v2 and "DROP" not in v2 and v2.count("ALTER TABLE") == (
        len(store_mod.LAYER_MODEL_COLUMNS) + len(store_mod.CARBON_MODEL_COLUMNS) + 2 + 3)


def test_a_v1_file_migrates_in_place_keeps_its_rows_and_takes_llm_points(tmp_path):
    p = v1_store(tmp_path / "v1.db")
    with Store(p) as s:
        assert s.version() == len(store_mod.MIGRATIONS)
        cols = {r[1] for r in s.con.execute("PRAGMA table_info(models)")}
        assert set(store_mod.MODEL_COLUMNS) <= cols
        assert {"family", "arch", "routing"} <= {r[1] for r in s.con.execute("PRAGMA table_info(points)")}
        assert "power_limit_w" in {r[1] for r in s.con.execute("PRAGMA table_info(windows)")}
        old = s.model_rows()[0]
        assert old["inferences_per_joule"] == 10.0 and old["point_family"] is None and old["arch"] is None
        s.new_run("new", {"grid": "custom"}, {"device": "cpu"}, None)
        s.add_point("new", "llm1", LAYER_CONFIG, "done", document=doc(layer_record(), layer_record(kind="dense")))
        rows = {r["name"]: r for r in s.model_rows()}
        moe = rows["moe[auto]@T=8"]
        assert (moe["arch"], moe["tokens_per_forward"], moe["routing"], moe["experts_touched"]) == (
            "olmoe-1b-7b", 8, "skewed:1.2", 6.0)
        assert (moe["bound"], moe["memory_bound_ms"], moe["compute_bound_ms"], moe["fraction_of_roofline"]) == (
            "memory", 0.2, 0.05, 0.5)
        assert (moe["power_limit_w"], moe["co2e_g_per_million"], moe["carbon_basis"]) == (
            250.0, 1.5, "estimate from measured energy")
        assert moe["point_family"] == "llm_layer" and rows["dense_total@T=8"]["experts_touched"] is None
        point = next(p for p in s.points() if p["point_key"] == "llm1")
        assert (point["family"], point["arch"], point["routing"], point["batch_size"], point["experts"]) == (
            "llm_layer", "olmoe-1b-7b", "skewed:1.2", None, 64)
        assert [(w["power_limit_w"], w["cpu_power_limit_w"]) for w in s.window_rows()] == [(250.0, 95.0)] * 2


def test_an_old_and_a_new_store_merge_and_export_with_the_new_columns(tmp_path):
    old = v1_store(tmp_path / "v1.db")
    before = old.read_bytes()
    with Store(tmp_path / "v2.db") as s:
        s.new_run("new", {"grid": "custom"}, {"device": "cpu"}, None)
        s.add_point("new", "llm1", LAYER_CONFIG, "done", document=doc(layer_record(1), layer_record(1, "dense")))
    counts = merge([old, tmp_path / "v2.db"], tmp_path / "m.db")
    assert old.read_bytes() == before  # an input is only read (migrated in memory)
    assert counts["points"] == 2 and counts["models"] == 3
    with Store(tmp_path / "m.db", create=False) as m:
        assert m.version() == len(store_mod.MIGRATIONS)
        table = list(csv.DictReader(io.StringIO(m.export_csv("models"))))
        assert [(r["name"], r["tokens_per_forward"], r["bound"]) for r in table] == [
            ("moe[grouped]", "", ""), ("moe[auto]@T=1", "1", "memory"), ("dense_total@T=1", "1", "memory")]
        points = list(csv.DictReader(io.StringIO(m.export_csv("points"))))
        assert [(r["family"], r["arch"]) for r in points] == [("", ""), ("llm_layer", "olmoe-1b-7b")]


def test_a_point_key_compares_numbers_by_value_and_ignores_the_label():
    as_flags = {**CONFIG, "options": {**CONFIG["options"], "warmup": 0.0, "duration": 2.0}}
    as_toml = {**CONFIG, "label": "other grid", "options": {**CONFIG["options"], "warmup": 0, "duration": 2}}
    assert store_mod.point_key(as_flags) == store_mod.point_key(as_toml)
    longer = {**as_flags, "options": {**as_flags["options"], "duration": 2.5}}
    assert store_mod.point_key(longer) != store_mod.point_key(as_flags)
    assert store_mod.point_key({**as_flags, "meter": "rapl"}) != store_mod.point_key(as_flags)


def test_a_point_stored_under_an_older_key_is_still_complete_and_reported_once(db):
    from moe_energy.report.analysis import load

    legacy = {**CONFIG, "options": {**CONFIG["options"], "warmup": 0.0}}  # a flag's float, keyed raw before
    db.add_point("run1", "an-older-raw-key", legacy, "done", document=doc(model_record(ipj=5.0)))
    same = {**legacy, "options": {**legacy["options"], "warmup": 0}}  # the same point from a TOML
    assert db.completed_keys() == {store_mod.point_key(same)}
    db.add_point("run1", store_mod.point_key(same), same, "done", document=doc(model_record(ipj=7.0)))
    frame = load(db)
    assert len(frame.points) == 1 and frame.points[0]["point_key"] == store_mod.point_key(same)  # the latest wins
    assert [m["inferences_per_joule"] for m in frame.models] == [7.0]


def test_max_forward_s_is_not_part_of_a_points_identity_in_old_stores_too(db):
    """--max-forward-s decides which rows run (and a whole model's N), not what a measured row measures: a point
    stored under a key that held it (every store before) is complete at any limit and reported once, the latest."""
    from moe_energy.report.analysis import load

    capped = {**CONFIG, "options": {**CONFIG["options"], "max_forward_s": 2.0}}
    other = {**CONFIG, "options": {**CONFIG["options"], "max_forward_s": 60}}
    assert store_mod.point_key(capped) == store_mod.point_key(other) == store_mod.point_key(CONFIG)
    assert store_mod.point_key({**capped, "options": {**capped["options"], "duration": 99}}) != \
        store_mod.point_key(capped)  # the other options still are
    old_key = hashlib.sha256(store_mod.dumps({k: v for k, v in capped.items() if k != "label"}).encode()).hexdigest()
    db.add_point("run1", old_key[:20], capped, "done", document=doc(model_record(ipj=5.0)))
    assert db.completed_keys() == {store_mod.point_key(other)}
    db.add_point("run1", store_mod.point_key(other), other, "done", document=doc(model_record(ipj=7.0)))
    frame = load(db)
    assert len(frame.points) == 1 and [m["inferences_per_joule"] for m in frame.models] == [7.0]
    assert json.loads(frame.points[0]["config_json"])["options"]["max_forward_s"] == 60  # kept: what was asked


def test_a_stored_config_that_no_longer_parses_keeps_its_stored_key(db):
    db.add_point("run1", "k-damaged", CONFIG, "done", document=doc(model_record()))
    db.con.execute("UPDATE points SET config_json = '{not json' WHERE point_key = 'k-damaged'")
    assert db.completed_keys() == {"k-damaged"}


def v3_store(path):
    """A store as schema version 3 shipped it, holding an int8 layer point (its format in its JSON only), a point
    in the dtype, and a model row whose JSON is damaged."""
    mp = pytest.MonkeyPatch()
    mp.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:3])
    int8 = {**LAYER_CONFIG, "options": {**LAYER_CONFIG["options"], "weights": "int8"}}
    try:
        with Store(path) as s:
            assert s.version() == 3
            s.new_run("old", {"grid": "custom"}, {"device": "cpu"}, None)
            s.con.execute("BEGIN IMMEDIATE")
            for pid, cfg in ((1, int8), (2, LAYER_CONFIG)):
                s.con.execute("INSERT INTO points (run_id, point_key, status, label, family, arch, config_json) "
                              "VALUES ('old', ?, 'done', 'l', 'llm_layer', 'olmoe-1b-7b', ?)",
                              (f"k{pid}", store_mod.dumps(cfg)))
                rec = {**layer_record(), "weights": cfg["options"].get("weights"),
                       "weights_output_error": 0.0125 if pid == 1 else None}
                s.con.execute("INSERT INTO models (point_id, ordinal, name, kind, params, active_params, "
                              "record_json) VALUES (?, 0, 'moe[auto]@T=8', 'moe', 1000, 500, ?)",
                              (pid, store_mod.dumps(rec)))
            s.con.execute("INSERT INTO models (point_id, ordinal, name, record_json) VALUES (1, 1, 'x', '{bad')")
            s.con.execute("COMMIT")
    finally:
        mp.undo()
    return path


def test_v4_takes_the_weights_format_and_error_from_a_v3_stores_json_read_or_written(tmp_path):
    """Issue 24: int8 records written before the columns existed get them filled from their JSON, whether the store
    is read (migrated in memory: the file untouched) or opened to write (migrated in place)."""
    p = v3_store(tmp_path / "v3.db")
    before = p.read_bytes()
    want_models = [("moe[auto]@T=8", "int8", 0.0125), ("x", None, None), ("moe[auto]@T=8", None, None)]
    with Store(p, create=False) as s:
        assert s.version() == len(store_mod.MIGRATIONS) == 4
        assert [(r["name"], r["weights"], r["weights_output_error"]) for r in s.model_rows()] == want_models
        assert [(r["point_key"], r["weights"]) for r in s.points()] == [("k1", "int8"), ("k2", None)]
    assert p.read_bytes() == before
    with Store(p) as s:
        assert [(r["name"], r["weights"], r["weights_output_error"]) for r in s.model_rows()] == want_models
        table = list(csv.DictReader(io.StringIO(s.export_csv("models"))))
        assert [(r["weights"], r["weights_output_error"]) for r in table] == [("int8", "0.0125"), ("", ""), ("", "")]
        assert [r["weights"] for r in csv.DictReader(io.StringIO(s.export_csv("points")))] == ["int8", ""]


def test_a_new_int8_point_fills_its_weights_columns_and_the_seeds_stay_null(tmp_path):
    with Store(tmp_path / "n.db") as s:
        s.new_run("r", {"grid": "custom"}, {"device": "cpu"}, None)
        int8 = {**LAYER_CONFIG, "options": {**LAYER_CONFIG["options"], "weights": "int8"}}
        rec = {**layer_record(), "weights": "int8", "weights_output_error": 0.02}
        s.add_point("r", "l1", int8, "done", document=doc(rec, {**layer_record(kind="dense"), "weights": "int8",
                                                                "weights_output_error": 0.01}))
        s.add_point("r", "s1", {**CONFIG, "options": {**CONFIG.get("options", {}), "weights": "int8"}}, "done",
                    document=doc(model_record()))
        assert [(r["weights"], r["weights_output_error"]) for r in s.model_rows()] == [
            ("int8", 0.02), ("int8", 0.01), (None, None)]
        assert [p["weights"] for p in s.points()] == ["int8", None]  # the seed's family has no weights format
        exported = [m for p in s.export_document()["points"] for m in p["models"]]
        assert [m.get("weights") for m in exported] == ["int8", "int8", None]
