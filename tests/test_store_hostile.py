"""Hostile inputs to the commands that read the store (report, export, merge): someone else's database, damaged
rows, a disk that fills, signals, paths the OS refuses, markup in names, and output streams that go away.

Each one: one line on stderr and the documented exit code, never a traceback, and no file changed or left half
written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import one_line_error

from moe_energy.cli import main
from moe_energy.config import ConfigError
from moe_energy.interrupts import Interrupted, exit_code, signals_raise
from moe_energy.report.analysis import crossovers, load
from moe_energy.storage import fileio
from moe_energy.storage import store as store_mod
from moe_energy.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]
NAME_MAX = 300 * "n"  # longer than any filesystem's NAME_MAX (255)


def record(name: str, kind: str, ipj: float, samples: int = 3) -> dict:
    trace = {"cpu:0": [[i / 10, 10.0 + i % 5] for i in range(samples)]}
    return {"name": name, "kind": kind, "match": None if kind == "moe" else "total", "strategy": "grouped",
            "params": 1000, "active_params": 500 if kind == "moe" else 1000, "width": 16, "flops_per_inference": 2000,
            "dtype": "float32", "batch_size": 64, "accuracy": 0.5, "diverged": False, "inferences_per_second": 100.0,
            "inferences_per_joule": ipj, "energy_j": 10.0, "average_power_w": 10.0, "energy_method": "counter",
            "windows": [{"window_s": 1.0, "inferences": 100, "energy_j": 10.0, "inferences_per_joule": ipj,
                         "energy_method": "counter", "trace": trace}]}


def make_store(path: Path, points: int = 3, samples: int = 3) -> Path:
    """A small store written straight through Store.add_point: no model is trained."""
    with Store(path) as s:
        s.new_run("run1", {"grid": "custom"}, {"device": "cpu"}, {"name": "rapl", "method": "counter"})
        for i in range(points):
            cfg = {"label": f"p{i}", "spec": {"experts": 4, "hidden": 16 * (i + 1), "layers": 2, "top_k": 1},
                   "options": {"batch_size": 64, "dtype": "float32"}, "total_params": 1000 * (i + 1)}
            doc = {"environment": {"device": "cpu"}, "models": [record("moe[grouped]", "moe", 10.0 + i, samples),
                                                                 record("dense_total", "dense", 12.0 - i, samples)]}
            s.add_point("run1", f"k{i}", cfg, "done", document=doc)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str, stdout: object = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_energy", *args], stdout=stdout, stderr=subprocess.PIPE,
                          timeout=120)


# -- 1. someone else's database: refused, not a byte written ----------------------------------------------
def _foreign(path: Path, kind: str) -> None:
    if kind == "empty file":
        path.write_bytes(b"")
        return
    if kind == "not sqlite":
        path.write_text("id,name\n1,a CSV file\n" * 20)
        return
    con = sqlite3.connect(path)
    if kind == "wal mode":
        con.execute("PRAGMA journal_mode = WAL")
    if kind != "no tables":
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("INSERT INTO customers (name) VALUES ('ada'), ('grace')")
    if kind == "own schema_version":  # a common table name, but not ours
        con.execute("CREATE TABLE schema_version (id INTEGER, applied TEXT)")
    if kind == "no tables":
        con.execute("PRAGMA user_version = 7")  # a real SQLite file, nothing in it
    con.commit()
    con.close()


READS = {
    "export csv": lambda db, d: ["export", "--db", str(db)],
    "export json": lambda db, d: ["export", "--db", str(db), "--format", "json", "--out", str(d / "x.json")],
    "report": lambda db, d: ["report", "--db", str(db), "--out", str(d / "rep")],
    "merge": lambda db, d: ["merge", str(db), "--out", str(d / "merged.db")],
}


@pytest.mark.parametrize("cmd", list(READS))
@pytest.mark.parametrize("kind", ["foreign tables", "wal mode", "own schema_version", "no tables", "empty file",
                                  "not sqlite"])
def test_a_foreign_file_is_refused_and_left_byte_for_byte(kind, cmd, tmp_path, capsys):
    db = tmp_path / "other.sqlite"
    _foreign(db, kind)
    before, listing = digest(db), sorted(os.listdir(tmp_path))
    code = main(READS[cmd](db, tmp_path))
    needle = "not a usable SQLite database" if kind == "not sqlite" else "not a moe-energy store"
    one_line_error(code, capsys.readouterr().err, f"--db {db}: {needle}")
    assert digest(db) == before
    assert sorted(os.listdir(tmp_path)) == listing  # no -wal, -shm, journal or output beside it


@pytest.mark.parametrize("kind", ["foreign tables", "wal mode", "own schema_version"])
def test_a_write_refuses_a_foreign_database_too(kind, tmp_path):
    db = tmp_path / "other.sqlite"
    _foreign(db, kind)
    before = digest(db)
    with pytest.raises(ConfigError, match="not a moe-energy store"):
        Store(db)
    assert digest(db) == before


def test_a_read_of_a_store_writes_nothing_into_it(tmp_path, capsys):
    db = make_store(tmp_path / "r.db")
    before = digest(db)
    assert main(["export", "--db", str(db), "--format", "json"]) == 0
    assert main(["merge", str(db), "--out", str(tmp_path / "m.db")]) == 0
    assert digest(db) == before


def test_a_read_leaves_no_sidecar_files_unless_another_process_has_the_store_open(tmp_path, capsys):
    db = make_store(tmp_path / "r.db")
    before, mtime = digest(db), db.stat().st_mtime_ns
    assert main(["export", "--db", str(db), "--format", "csv"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["r.db"]  # SQLite's empty -wal and -shm removed again
    assert digest(db) == before and db.stat().st_mtime_ns == mtime
    with Store(db) as writer:  # another process's sweep, say: its -wal and -shm are in use and must stay
        assert main(["export", "--db", str(db), "--format", "csv"]) == 0
        assert {"r.db-wal", "r.db-shm"} <= set(os.listdir(tmp_path))
        writer.add_point("run1", "k-late", {"label": "late", "spec": {}, "options": {}}, "skipped", reason="x")
    with Store(db, create=False) as reader:
        assert len(reader.points()) == 4  # the writer's point landed
    assert sorted(os.listdir(tmp_path)) == ["r.db"]


def test_an_older_store_is_migrated_in_memory_only(tmp_path, monkeypatch):
    db = make_store(tmp_path / "old.db", points=1)
    before = digest(db)
    shipped = len(store_mod.MIGRATIONS)
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, "ALTER TABLE runs ADD COLUMN note TEXT"])
    with Store(db, create=False) as s:
        assert s.version() == shipped + 1 and len(s.points()) == 1
    assert digest(db) == before
    con = sqlite3.connect(db)
    assert con.execute("SELECT version FROM schema_version").fetchone() == (shipped,)
    con.close()


# -- 2. damaged rows: skipped and counted, never a traceback ------------------------------------------------
# kind: (the damage, the table export counts it in, the table the report's load counts it in); None: not damaged there
DAMAGE = {
    "record malformed": ("UPDATE models SET record_json = '{\"name\": ' WHERE id = 1", "models", "models"),
    "record not an object": ("UPDATE models SET record_json = '[1, 2]' WHERE id = 1", "models", "models"),
    "record with NaN": ("UPDATE models SET record_json = '{\"params\": NaN}' WHERE id = 1", "models", "models"),
    "record without params": ("UPDATE models SET record_json = '{\"name\": \"x\"}', params = NULL WHERE id = 1",
                              None, "models"),  # exported as it is; the report cannot draw it
    "document not an object": ("UPDATE points SET document_json = '\"text\"' WHERE id = 1", "points", "points"),
    "config malformed": ("UPDATE points SET config_json = 'nope' WHERE id = 1", "points", None),  # report: unread
    "trace not a list": ("UPDATE traces SET t_s_json = '{}' WHERE id = 1", "traces", "traces"),
    "trace of text": ("UPDATE traces SET power_w_json = '[\"a\", \"b\", \"c\"]' WHERE id = 1", "traces", "traces"),
    "environment malformed": ("UPDATE runs SET environment_json = '{'", "runs", "runs"),
    "meter not an object": ("UPDATE runs SET meter_json = '42'", "runs", "runs"),
    "metrics malformed": ("UPDATE windows SET metrics_json = '{{{' WHERE id = 1", None, None),  # read by neither
}


def _damaged_store(tmp_path: Path, *kinds: str) -> Path:
    db = make_store(tmp_path / "d.db")
    con = sqlite3.connect(db)
    for k in kinds:
        con.execute(DAMAGE[k][0])
    con.commit()
    con.close()
    return db


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_rows_are_skipped_and_counted_by_export_and_load(kind, tmp_path, capsys):
    db = _damaged_store(tmp_path, kind)
    _, table, load_table = DAMAGE[kind]
    assert main(["export", "--db", str(db), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    if table is None:
        assert err == ""
    else:
        assert err.startswith("warning: ") and err.count("\n") == 1 and f"({table} 1)" in err, err
    points = doc["points"]
    assert len(doc["runs"]) == (0 if table == "runs" else 1)
    assert len(points) == (2 if table == "points" else 3)
    assert sum(len(p["models"]) for p in points) == {"models": 5, "points": 4}.get(table, 6)
    for fmt in (["--table", "models"], ["--table", "windows"], ["--table", "points"]):
        assert main(["export", "--db", str(db), *fmt]) == 0
    with Store(db, create=False) as s:
        frame = load(s)
    assert frame.damaged == ({load_table: 1} if load_table else {})


@pytest.mark.slow
def test_report_on_damaged_rows_says_how_many_and_draws_the_rest(tmp_path, capsys):
    kinds = ["record malformed", "trace not a list", "environment malformed", "document not an object"]
    db = _damaged_store(tmp_path, *kinds)
    code = main(["report", "--db", str(db), "--out", str(tmp_path / "rep")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.startswith("warning: ") and err.count("\n") == 1 and "4 stored row(s) with damaged JSON" in err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "4 stored row(s) with damaged JSON left out (models 1, points 1, runs 1, traces 1)" in md
    with Store(db, create=False) as s:
        assert all("damaged JSON" in " ".join(c.notes) for c in crossovers(load(s)))


# -- 3. a disk that fills mid-write: nothing left behind, and a rerun works -------------------------------
class _FullDisk:
    """A file whose write stores half of the data, then fails as a full disk does."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self.f = f

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def _fill_the_disk(monkeypatch) -> None:  # noqa: ANN001
    real = os.fdopen
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k)))


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_on_a_full_disk_leaves_nothing_and_a_rerun_works(fmt, tmp_path, monkeypatch, capsys):
    db = make_store(tmp_path / "r.db")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / f"x.{fmt}"
    with monkeypatch.context() as m:
        _fill_the_disk(m)
        code = main(["export", "--db", str(db), "--format", fmt, "--out", str(out)])
    one_line_error(code, capsys.readouterr().err,
                   f"--out {out}: cannot write (No space left on device: the disk (or quota) is full)")
    assert os.listdir(outdir) == []  # neither the file nor its temp
    assert main(["export", "--db", str(db), "--format", fmt, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", "--db", str(db), "--format", fmt]) == 0
    assert out.read_text() == capsys.readouterr().out


@pytest.mark.slow
def test_report_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    db = make_store(tmp_path / "r.db")
    rep = tmp_path / "rep"
    with monkeypatch.context() as m:
        _fill_the_disk(m)
        code = main(["report", "--db", str(db), "--out", str(rep)])
    one_line_error(code, capsys.readouterr().err, f"--out {rep}: cannot write the report there (No space left")
    assert not (rep / "report.html").exists() and not (rep / "report.md").exists()
    assert [p for p in rep.rglob("*") if p.is_file()] == []  # no temp or half-written plot either
    assert main(["report", "--db", str(db), "--out", str(rep)]) == 0
    assert (rep / "report.html").stat().st_size > 0


def test_merge_on_a_full_disk_leaves_nothing_and_a_rerun_works(tmp_path, monkeypatch, capsys):
    db = make_store(tmp_path / "r.db")
    outdir = tmp_path / "out"
    outdir.mkdir()
    real = store_mod._copy_into

    def full(src: Store, dst: Store, counts: dict[str, int]) -> None:
        real(src, dst, counts)
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as m:
        m.setattr(store_mod, "_copy_into", full)
        code = main(["merge", str(db), "--out", str(outdir / "m.db")])
    one_line_error(code, capsys.readouterr().err, f"--out {outdir / 'm.db'}: database or disk is full")
    assert os.listdir(outdir) == []
    assert main(["merge", str(db), "--out", str(outdir / "m.db")]) == 0
    assert sorted(os.listdir(outdir)) == ["m.db"]


# -- 4. SIGTERM, SIGHUP and SIGINT clean up the same way ----------------------------------------------------
DRIVER = textwrap.dedent("""
    import os, sys, time
    from moe_energy import cli
    from moe_energy.storage import store

    def ready():
        print("ready", flush=True)
        time.sleep(120)

    if sys.argv[1] == "merge":
        real = store._copy_into
        def slow(src, dst, counts):
            real(src, dst, counts)  # the temp database, its -wal and -shm now exist
            ready()
        store._copy_into = slow
    else:
        os.fsync = lambda fd: ready()  # fileio's temp file is written, not yet linked into place
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("cmd, sig", [pytest.param(c, s, id=f"{c}-{s.name}") for c, s in (
    ("merge", signal.SIGTERM), ("merge", signal.SIGHUP), ("merge", signal.SIGINT), ("export", signal.SIGTERM))])
def test_a_signal_mid_write_exits_128_plus_n_and_leaves_no_stray_file(cmd, sig, tmp_path):
    db = make_store(tmp_path / "r.db")
    outdir = tmp_path / "out"
    outdir.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = (["merge", str(db), "--out", str(outdir / "m.db")] if cmd == "merge" else
            ["export", "--db", str(db), "--out", str(outdir / "x.csv")])
    proc = subprocess.Popen([sys.executable, str(driver), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    assert os.listdir(outdir)  # the temp files it must clean up
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and err.count("\n") == 1 and f"interrupted ({sig.name})" in err, err
    assert os.listdir(outdir) == []


def test_a_second_signal_cannot_cut_the_cleanup_short():
    with pytest.raises(Interrupted) as e:
        with signals_raise():
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                signal.raise_signal(signal.SIGINT)  # ignored while the first one unwinds
    assert e.value.signum == signal.SIGTERM and exit_code(e.value) == 143
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back


def test_a_signal_the_process_ignores_stays_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with signals_raise():
            signal.raise_signal(signal.SIGHUP)  # nothing raised: nohup meant it
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


# -- 5. paths the OS refuses ----------------------------------------------------------------------------------
def _refused(tmp_path: Path, where: str) -> Path:
    plain = tmp_path / "plain.txt"
    plain.write_text("a regular file")
    return {"too long": tmp_path / NAME_MAX, "under a file": plain / "x", "under /proc": Path("/proc/none/x")}[where]


@pytest.mark.parametrize("where", ["too long", "under a file", "under /proc"])
@pytest.mark.parametrize("cmd", ["report --db", "export --db", "merge DB", "merge --out", "report --out",
                                 "export --out"])
def test_a_path_the_os_refuses_is_one_line(cmd, where, tmp_path, capsys):
    db = make_store(tmp_path / "r.db")
    bad = str(_refused(tmp_path, where))
    args = {"report --db": ["report", "--db", bad, "--out", str(tmp_path / "rep")],
            "export --db": ["export", "--db", bad],
            "merge DB": ["merge", str(db), bad, "--out", str(tmp_path / "m.db")],
            "merge --out": ["merge", str(db), "--out", bad],
            "report --out": ["report", "--db", str(db), "--out", bad],
            "export --out": ["export", "--db", str(db), "--out", bad]}[cmd]
    before = digest(db)
    code = main(args)
    err = capsys.readouterr().err
    one_line_error(code, err, bad)
    flag = "--out" if cmd.endswith("--out") else "--db"
    assert f"{flag} {bad}" in err
    assert digest(db) == before and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("cmd, needle", [
    # an unset variable (--out "$DIR"): report wrote into the current folder, export to standard output, merge said
    # "--out . already exists", selfcheck saved in the current folder, --db fell back to the default store
    (["report", "--db", "{db}", "--out", ""], "--out '' is an empty path; give one such as results/report"),
    (["export", "--db", "{db}", "--out", " "], "--out ' ' is an empty path"),
    (["merge", "{db}", "--out", ""], "--out '' is an empty path"),
    (["merge", "{db}", "", "--out", "{tmp}/m.db"], "--db '' is an empty path"),
    (["report", "--db", "", "--out", "{tmp}/rep"], "--db '' is an empty path; give one such as results/moe-energy.db"),
    (["export", "--db", ""], "--db '' is an empty path"),
    (["sweep", "--db", "", "--dry-run", "--meter", "none"], "--db '' is an empty path"),
    (["selfcheck", "--device", "cpu", "--out", ""], "--out '' is an empty path"),
    # --table picks the csv's table; json nests them all: it was silently ignored
    (["export", "--db", "{db}", "--format", "json", "--table", "windows"], "--table windows: only with --format csv"),
])
def test_an_empty_path_or_a_flag_of_the_other_format_is_one_line(cmd, needle, tmp_path, monkeypatch, capsys):
    db = make_store(tmp_path / "r.db")
    cwd = tmp_path / "cwd"  # where '' would have written
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = digest(db)
    one_line_error(main([a.format(db=db, tmp=tmp_path) for a in cmd]), capsys.readouterr().err, needle)
    assert digest(db) == before and not (tmp_path / "m.db").exists() and not list(cwd.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the mode bits say")
def test_an_unreadable_database_is_one_line(tmp_path, capsys):
    db = make_store(tmp_path / "r.db")
    db.chmod(0)
    one_line_error(main(["export", "--db", str(db)]), capsys.readouterr().err, f"--db {db}: cannot read it")


# -- 6. user text is never markup -------------------------------------------------------------------------------
@pytest.mark.slow
def test_paths_that_look_like_markup_are_printed_as_they_are(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_store(Path("src.db"))
    Path("[").mkdir()
    make_store(Path("[/y].db"))
    assert main(["report", "--db", "[/y].db", "--out", "[/z]"]) == 0
    assert "report: [/z]/report.html" in capsys.readouterr().out
    assert (tmp_path / "[" / "z]" / "report.md").exists()
    assert main(["export", "--db", "[/y].db", "--out", "[bold]x[/bold].csv"]) == 0
    assert "exported csv to [bold]x[/bold].csv" in capsys.readouterr().err
    assert main(["merge", "src.db", "[/y].db", "--out", "[red]m.db"]) == 0
    assert "into [red]m.db:" in capsys.readouterr().out
    one_line_error(main(["export", "--db", "[/nope].db"]), capsys.readouterr().err, "--db [/nope].db: no such")


# -- 7. output streams that go away ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_closed_pipe_ends_export_quietly(tmp_path):
    db = make_store(tmp_path / "big.db", points=2, samples=10_000)  # megabytes of JSON: far past a pipe's buffer
    proc = subprocess.Popen([sys.executable, "-m", "moe_energy", "export", "--db", str(db), "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100)  # type: ignore[union-attr]  # like `| head -c 100`
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    proc.wait(timeout=120)
    assert proc.returncode in (0, 141), err  # 128 + SIGPIPE: as a C tool ends
    assert err == ""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_stdout_is_one_line(tmp_path):
    db = make_store(tmp_path / "r.db")
    with open("/dev/full", "w") as full:
        r = run_cli("export", "--db", str(db), stdout=full)
    err = r.stderr.decode()
    one_line_error(r.returncode, err, "cannot write to standard output (No space left on device)")


def test_a_new_store_opened_while_another_process_writes_it_waits_instead_of_failing(tmp_path):
    """While another process holds a write lock on a new file (the first sweep creating the schema), SQLite
    refuses the switch to WAL at once, without its busy timeout: two sweeps starting together on a new --db
    failed in CI with "locked"."""
    import threading

    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # a reserved lock on the new, empty file
    threading.Timer(0.5, lambda: writer.execute("COMMIT")).start()
    with Store(path) as s:
        assert s.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.version() == len(store_mod.MIGRATIONS)
    writer.close()
