"""Bad files: --data archives, --db databases (not SQLite, newer schema, truncated, garbage pages) and results
written by another version of the tool. Each bad one: exit 2 and one line, the file left as it was."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import numpy as np
import pytest
from conftest import QUICK, QUICK_FILE, TINY_SHAPE, one_line_error

from moe_energy.cli import main
from moe_energy.config import ConfigError
from moe_energy.data import make_dataset
from moe_energy.storage.results import SCHEMA_VERSION, read
from moe_energy.storage.store import MIGRATIONS, Store

TINY = [*TINY_SHAPE, *QUICK, "--meter", "none"]
TINY_FILE = [*TINY_SHAPE, *QUICK_FILE, "--meter", "none"]  # with --data


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- --data ----------------------------------------------------------------------------------------------
def _npz(tmp_path, name="d.npz", **arrays):
    p = tmp_path / name
    with open(p, "wb") as f:
        np.savez(f, **arrays)
    return p


def _bad_data(tmp_path, kind):
    x, y = np.random.default_rng(0).random((60, 5)), np.arange(60) % 3
    if kind == "npy":
        p = tmp_path / "d.npy"
        np.save(p, x)
        return p, [], "a single .npy array, not an .npz archive"
    if kind == "truncated":
        p = _npz(tmp_path, x=x, y=y)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p, [], "not a readable .npz file (BadZipFile)"
    if kind == "corrupt-compressed":
        p = tmp_path / "c.npz"
        np.savez_compressed(p, x=x, y=y)
        raw = bytearray(p.read_bytes())
        for i in range(200, 400):  # inside the first member's deflate stream
            raw[i] ^= 0x5A
        p.write_bytes(bytes(raw))
        return p, [], "not a readable .npz file (corrupt compressed data)"
    if kind == "pickled":
        return _npz(tmp_path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4) % 2), [], \
            "not a readable .npz file (object arrays need pickle, which is not loaded)"
    if kind == "empty-archive":
        return _npz(tmp_path), [], "needs arrays 'x' and 'y', found none"
    if kind == "zero-bytes":
        p = tmp_path / "z.npz"
        p.write_bytes(b"")
        return p, [], "not a readable .npz file (EOFError)"
    if kind == "directory":
        (tmp_path / "dir.npz").mkdir()
        return tmp_path / "dir.npz", [], "is a directory"
    if kind == "no-features":
        return _npz(tmp_path, x=np.zeros((6, 0)), y=np.arange(6) % 2), [], "x has no feature columns"
    if kind == "float-overflow":
        return _npz(tmp_path, x=np.full((6, 2), 1e300), y=np.arange(6) % 2), [], "beyond float32's range"
    if kind == "mismatched":
        return _npz(tmp_path, x=x, y=y[:-1]), [], "x has 60 rows but y has 59; they must match"
    if kind == "nan":
        x[3, 2] = np.nan
        return _npz(tmp_path, x=x, y=y), [], "x contains NaN or inf"
    if kind == "label-over-classes":
        return _npz(tmp_path, x=x, y=np.arange(60) % 6), ["--classes", "3"], \
            "label 5 is out of range for classes=3; labels must be 0..2"
    if kind == "label-huge":
        y = y.copy()
        y[0] = 10**9
        return _npz(tmp_path, x=x, y=y), [], "label 1000000000 is out of range"
    if kind == "input-dim":
        return _npz(tmp_path, x=x, y=y), ["--input-dim", "7"], "x has 5 features but input_dim=7"
    raise AssertionError(kind)


DATA_KINDS = ["npy", "truncated", "corrupt-compressed", "pickled", "empty-archive", "zero-bytes", "directory",
              "no-features", "float-overflow", "mismatched", "nan", "label-over-classes", "label-huge", "input-dim"]


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_bad_data_file_exits_2_in_one_line(kind, tmp_path, capsys):
    p, extra, needle = _bad_data(tmp_path, kind)
    out = tmp_path / "out"
    code = main(["run", *TINY_FILE, *extra, "--data", str(p), "--out", str(out)])
    err_text = capsys.readouterr().err
    one_line_error(code, err_text, needle)
    assert err_text.startswith(f"error: --data {p}: ")
    assert not list(out.glob("*.json"))


def test_bad_data_stops_a_sweep_before_its_first_point(tmp_path, capsys):
    p, _, needle = _bad_data(tmp_path, "nan")
    db = tmp_path / "s.db"
    one_line_error(main(["sweep", *TINY_FILE, "--data", str(p), "--db", str(db)]), capsys.readouterr().err, needle)
    assert not db.exists()


def test_declared_classes_are_kept_when_the_labels_fit(tmp_path):
    p = _npz(tmp_path, x=np.random.default_rng(0).random((40, 5)), y=np.arange(40) % 3)
    d = make_dataset(0, 784, 10, seed=0, test_fraction=0.25, path=str(p), declared={"classes": 5})
    assert d.classes == 5 and d.input_dim == 5  # 5 output classes, two of them absent from this file
    assert make_dataset(0, 784, 10, seed=0, test_fraction=0.25, path=str(p)).classes == 3  # the file decides


# -- --db ------------------------------------------------------------------------------------------------
def model_record(name: str, ipj: float, kind: str) -> dict:
    trace = {"cpu:package-0": [[i / 100, 20.0 + i % 7] for i in range(300)]}
    return {"name": name, "kind": kind, "match": None if kind == "moe" else "total", "strategy": "grouped",
            "params": 1000, "active_params": 500 if kind == "moe" else 1000, "width": 16,
            "flops_per_inference": 2000, "dtype": "float32", "batch_size": 64, "accuracy": 0.5, "diverged": False,
            "inferences_per_second": 100.0, "inferences_per_joule": ipj, "energy_j": 10.0, "average_power_w": 10.0,
            "energy_method": "counter", "latency_p50_ms": 1.0,
            "windows": [{"window_s": 1.0, "inferences": 100, "energy_j": 10.0, "inferences_per_joule": ipj,
                         "energy_method": "counter", "trace": trace}]}


def make_db(path, points: int = 6, tool_version: str | None = None) -> None:
    with Store(path) as s:
        s.new_run("run1", {"grid": "custom"}, {"device": "cpu"}, {"name": "rapl", "method": "counter"})
        if tool_version:
            s.con.execute("UPDATE runs SET tool_version = ?", (tool_version,))
        for i in range(points):
            hidden = 16 * (i + 1)
            cfg = {"label": f"E4-H{hidden}", "spec": {"experts": 4, "hidden": hidden, "layers": 2, "top_k": 1,
                                                      "input_dim": 40, "classes": 4},
                   "options": {"batch_size": 64, "dtype": "float32"}, "total_params": 1000 * (i + 1)}
            doc = {"models": [model_record("moe[grouped]", 10.0 + i, "moe"),
                              model_record("dense_total", 12.0 - i, "dense")]}
            s.add_point("run1", f"k{i}", cfg, "done", document=doc)
        s.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _damage(path, kind: str) -> None:
    raw = bytearray(path.read_bytes())
    page = int.from_bytes(raw[16:18], "big")
    if kind == "not-sqlite":
        path.write_text("id,name\n1,this is a CSV file, not a database\n" * 50)
    elif kind == "truncated":
        path.write_bytes(bytes(raw[: len(raw) * 6 // 10]))
    elif kind == "garbage-pages":
        rng = np.random.default_rng(1)
        start = 2 * page
        raw[start:] = rng.integers(0, 256, len(raw) - start, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(raw))
    else:
        raise AssertionError(kind)


COMMANDS = {
    "report": lambda db, tmp: ["report", "--db", str(db), "--out", str(tmp / "rep")],
    "export": lambda db, tmp: ["export", "--db", str(db)],
    "sweep": lambda db, tmp: ["sweep", *TINY, "--db", str(db)],
    "sweep --dry-run": lambda db, tmp: ["sweep", *TINY, "--db", str(db), "--dry-run"],
    "merge": lambda db, tmp: ["merge", str(db), "--out", str(tmp / "merged.db")],
}


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("kind", ["not-sqlite", "truncated", "garbage-pages"])
def test_damaged_database_exits_2_in_one_line_and_is_left_alone(kind, cmd, tmp_path, capsys):
    db = tmp_path / "r.db"
    make_db(db)
    _damage(db, kind)
    before = digest(db)
    code = main(COMMANDS[cmd](db, tmp_path))
    needle = "not a usable SQLite database" if kind == "not-sqlite" else "the database is damaged or not SQLite"
    one_line_error(code, capsys.readouterr().err, f"--db {db}: {needle}")
    assert digest(db) == before  # never written to
    assert not (tmp_path / "merged.db").exists() and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_database_from_a_newer_tool_is_refused_never_migrated_down(cmd, tmp_path, capsys):
    db = tmp_path / "new.db"
    make_db(db, points=1)
    con = sqlite3.connect(db)
    con.execute("UPDATE schema_version SET version = 99")
    con.execute("CREATE TABLE from_the_future (x)")
    con.commit()
    con.close()
    code = main(COMMANDS[cmd](db, tmp_path))
    one_line_error(code, capsys.readouterr().err,
                   f"--db {db}: schema version 99 is newer than this tool's {len(MIGRATIONS)}; upgrade moe-energy")
    con = sqlite3.connect(db)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(99,)]
    assert con.execute("SELECT COUNT(*) FROM points").fetchone() == (1,)
    assert con.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'from_the_future'").fetchone() == (1,)
    con.close()


@pytest.mark.slow
def test_database_from_an_older_tool_version_is_read(tmp_path, capsys):
    """Rows written by an earlier version (fewer fields in each record, another tool_version) still report."""
    db = tmp_path / "old.db"
    make_db(db, points=4, tool_version="0.0.1")
    con = sqlite3.connect(db)  # strip fields later versions added; the columns keep what the old one wrote
    for mid, rec in con.execute("SELECT id, record_json FROM models").fetchall():
        old = {k: v for k, v in json.loads(rec).items() if k not in ("latency_p50_ms", "match", "strategy")}
        con.execute("UPDATE models SET record_json = ?, latency_p50_ms = NULL WHERE id = ?", (json.dumps(old), mid))
    con.commit()
    con.close()
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    capsys.readouterr()
    assert main(["export", "--db", str(db), "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert [r["tool_version"] for r in exported["runs"]] == ["0.0.1"]
    assert len(exported["points"]) == 4 and all(len(p["models"]) == 2 for p in exported["points"])


def test_database_that_is_a_directory_or_missing(tmp_path, capsys):
    one_line_error(main(["report", "--db", str(tmp_path)]), capsys.readouterr().err, "is a directory")
    one_line_error(main(["export", "--db", str(tmp_path / "nope.db")]), capsys.readouterr().err,
                   "no such database")
    assert not (tmp_path / "nope.db").exists()


# -- results documents from another version --------------------------------------------------------------
def test_run_document_from_an_older_version_is_read(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"schema": "moe-energy/run", "models": [{"name": "moe[grouped]"}]}))  # no version: 0
    assert read(p)["models"][0]["name"] == "moe[grouped]"
    p.write_text(json.dumps({"schema": "moe-energy/run", "schema_version": SCHEMA_VERSION, "models": [],
                             "field_a_later_minor_version_added": 1}))
    assert read(p)["field_a_later_minor_version_added"] == 1


@pytest.mark.parametrize("text, needle", [
    ('{"schema": "moe-energy/run", "schema_version": 1, "models": [', "not a JSON results document (JSONDecodeError)"),
    ("[1, 2]", "not a moe-energy run document (schema None, expected 'moe-energy/run')"),
    ('{"schema": "moe-energy/export"}', "not a moe-energy run document (schema 'moe-energy/export'"),
    ('{"schema": "moe-energy/run", "schema_version": "2"}', "schema_version='2' is not a version number"),
    ('{"schema": "moe-energy/run", "schema_version": 7}', "schema version 7 is newer than this tool's 1"),
    ('{"schema": "moe-energy/run", "models": {}}', "'models' is not a list"),
])
def test_bad_run_document_is_refused_in_one_line(text, needle, tmp_path):
    p = tmp_path / "r.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        read(p)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read(tmp_path / "absent.json")
