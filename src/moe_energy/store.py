"""The results store: one SQLite file holding every sweep's runs, points, models, windows and power traces.

Why SQLite: a sweep of hours must survive being killed, so each point is written in its own
transaction (WAL journal, synchronous=FULL): a SIGKILL loses at most the point in flight. Several
shards on one host can share a file (busy timeout), and ``merge`` joins files from several hosts.
Every model record is also kept whole as JSON, so fields added later by other modules are never lost.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, one_line
from .fileio import json_safe, now_utc

DEFAULT_DB = "results/moe-energy.db"
EXPORT_SCHEMA = "moe-energy/export"
BUSY_TIMEOUT_MS = 30_000

if TYPE_CHECKING:
    from .measure.records import ModelRecord

# Columns copied out of each model and window record: every one a field of measure.records' ModelRecord or
# WindowRecord (tests/test_records.py holds it), read with .get (absent: NULL); record_json keeps them all.
MODEL_COLUMNS: dict[str, str] = {
    "name": "TEXT", "kind": "TEXT", "match": "TEXT", "strategy": "TEXT", "params": "INTEGER",
    "active_params": "INTEGER", "width": "INTEGER", "flops_per_inference": "INTEGER", "dtype": "TEXT",
    "batch_size": "INTEGER", "accuracy": "REAL", "diverged": "INTEGER",
    "inferences_per_second": "REAL", "inferences_per_second_min": "REAL",
    "inferences_per_second_max": "REAL", "inferences_per_joule": "REAL",
    "inferences_per_joule_min": "REAL", "inferences_per_joule_max": "REAL", "energy_j": "REAL",
    "energy_j_min": "REAL", "energy_j_max": "REAL", "average_power_w": "REAL",
    "average_power_w_min": "REAL", "average_power_w_max": "REAL", "idle_power_w": "REAL",
    "dynamic_energy_j": "REAL", "dynamic_inferences_per_joule": "REAL", "repeats": "INTEGER",
    "energy_is_estimate": "INTEGER", "energy_method": "TEXT", "energy_meter": "TEXT",
    "latency_p50_ms": "REAL", "latency_p95_ms": "REAL", "window_s": "REAL",
}
WINDOW_COLUMNS: dict[str, str] = {
    "window_s": "REAL", "inferences": "INTEGER", "energy_j": "REAL", "average_power_w": "REAL",
    "inferences_per_second": "REAL", "inferences_per_joule": "REAL", "energy_method": "TEXT",
}
POINT_COLUMNS = ("label", "experts", "hidden", "layers", "top_k", "input_dim", "classes", "batch_size",
                 "dtype", "total_params")

_V1 = f"""
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    created_utc TEXT NOT NULL,
    command TEXT,
    grid_name TEXT,
    grid_hash TEXT,
    shard TEXT,
    grid_json TEXT NOT NULL,
    environment_json TEXT NOT NULL,
    meter_json TEXT,
    tool_version TEXT
);
CREATE TABLE points (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    point_key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'skipped', 'failed')),
    reason TEXT,
    label TEXT, experts INTEGER, hidden INTEGER, layers INTEGER, top_k INTEGER, input_dim INTEGER,
    classes INTEGER, batch_size INTEGER, dtype TEXT, total_params INTEGER,
    started_utc TEXT, finished_utc TEXT, seconds REAL,
    config_json TEXT NOT NULL,
    document_json TEXT,
    UNIQUE (run_id, point_key)
);
CREATE INDEX points_key ON points(point_key);
CREATE TABLE models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    point_id INTEGER NOT NULL REFERENCES points(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    {', '.join(f'{c} {t}' for c, t in MODEL_COLUMNS.items())},
    record_json TEXT NOT NULL
);
CREATE INDEX models_point ON models(point_id);
CREATE TABLE windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    {', '.join(f'{c} {t}' for c, t in WINDOW_COLUMNS.items())},
    metrics_json TEXT NOT NULL
);
CREATE INDEX windows_model ON windows(model_id);
CREATE TABLE traces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    window_id INTEGER NOT NULL REFERENCES windows(id) ON DELETE CASCADE,
    device TEXT NOT NULL,
    samples INTEGER NOT NULL,
    t_s_json TEXT NOT NULL,
    power_w_json TEXT NOT NULL,
    UNIQUE (window_id, device)
);
"""

# MIGRATIONS[i] brings a database from schema version i to i + 1. Append, never edit a shipped one.
MIGRATIONS: list[str] = [_V1]


def schema_version() -> int:
    return len(MIGRATIONS)


def _finite(v: Any) -> Any:
    """Store NULL, never inf/NaN, for a figure that has no finite value; bools as 0/1."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (dict, list, tuple)):
        return None  # a structured value lives in the JSON column only
    return v


def dumps(v: Any) -> str:
    return json.dumps(json_safe(v), sort_keys=True, allow_nan=False, default=str)


def _series(trace: Any) -> tuple[list[float], list[float]] | None:
    """(t_s, power_w) from one device's samples: [[t, w], ...], [{"t_s": t, "power_w": w}, ...] or
    {"t_s": [...], "power_w": [...]}; None if it is none of these or empty."""
    t_keys, w_keys = ("t_s", "time_s", "t"), ("power_w", "watts", "w")
    if isinstance(trace, dict):
        t = next((trace[k] for k in t_keys if k in trace), None)
        w = next((trace[k] for k in w_keys if k in trace), None)
        if isinstance(t, list) and isinstance(w, list) and t and len(t) == len(w):
            try:
                return [float(x) for x in t], [float(x) for x in w]
            except (TypeError, ValueError):
                return None
        return None
    if not isinstance(trace, list) or not trace:
        return None
    ts: list[float] = []
    ws: list[float] = []
    try:
        for s in trace:
            if isinstance(s, (list, tuple)) and len(s) >= 2:
                ts.append(float(s[0]))
                ws.append(float(s[1]))
            elif isinstance(s, dict):
                ts.append(float(next(s[k] for k in t_keys if k in s)))
                ws.append(float(next(s[k] for k in w_keys if k in s)))
            else:
                return None
    except (StopIteration, TypeError, ValueError):
        return None
    return ts, ws


def normalize_trace(trace: Any) -> list[tuple[str, list[float], list[float]]]:
    """[(device, t_s [N], power_w [N]), ...] from a window's power trace; [] if it holds no samples.

    The energy meters write {device: [[t_s, power_w], ...]}; a single unnamed series is accepted too.
    """
    one = _series(trace)
    if one is not None:
        return [("all", *one)]
    if isinstance(trace, dict):
        out = []
        for dev, samples in trace.items():
            s = _series(samples)
            if s is not None:
                out.append((str(dev), *s))
        return out
    return []


class Store:
    """An open results database. ``Store(path)`` creates it (and migrates an older one) unless create=False."""

    def __init__(self, path: str | Path, create: bool = True, check: bool = True) -> None:
        """``check``: read every page once (PRAGMA quick_check) and refuse a damaged file before any work."""
        self.path = Path(path)
        self._lock_fd: int | None = None
        if not self.path.exists():
            if not create:
                raise ConfigError(f"--db {self.path}: no such database; run `moe-energy sweep --db {self.path}` "
                                  "first or give the right path")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--db {self.path}: cannot create its directory ({e.strerror})") from None
        elif self.path.is_dir():
            raise ConfigError(f"--db {self.path} is a directory; give a file name such as {self.path}/moe-energy.db")
        elif self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                magic = f.read(16)
            if magic != b"SQLite format 3\x00":
                raise ConfigError(f"--db {self.path}: not a usable SQLite database (it starts with {magic[:12]!r}, "
                                  "not 'SQLite format 3'); give a moe-energy database or a new file name")
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), one per point
            self.con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as e:
            raise ConfigError(f"--db {self.path}: cannot open ({e}); check the path and its permissions") from None
        try:
            self.con.row_factory = sqlite3.Row
            self.con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.con.execute("PRAGMA journal_mode = WAL")
            self.con.execute("PRAGMA synchronous = FULL")
            self.con.execute("PRAGMA foreign_keys = ON")
            if check:
                problem = str(self.con.execute("PRAGMA quick_check(1)").fetchone()[0])
                if problem != "ok":
                    raise sqlite3.DatabaseError(problem)
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.con.close()
            raise ConfigError(damaged(self.path, e)) from None
        except BaseException:
            self.con.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases this process's point claims
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing: a crash inside leaves the database as it was before."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self._rollback()
            raise
        self.con.execute("COMMIT")

    def _rollback(self) -> None:
        """Undo the open transaction. SQLite has already rolled it back itself after some errors (a full disk,
        SQLITE_FULL): then there is nothing to undo, and the original error is the one to report."""
        if self.con.in_transaction:
            try:
                self.con.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def version(self) -> int:
        row = self.con.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        v = self.version()
        if v > len(MIGRATIONS):
            raise ConfigError(f"--db {self.path}: schema version {v} is newer than this tool's {len(MIGRATIONS)}; "
                              "upgrade moe-energy or use another --db")
        for i in range(v, len(MIGRATIONS)):
            # executescript would commit on its own; one explicit transaction per step keeps each atomic
            self.con.execute("BEGIN IMMEDIATE")
            if self.version() > i:  # another process migrated it while this one waited for the lock
                self.con.execute("COMMIT")
                continue
            try:
                for stmt in _statements(MIGRATIONS[i]):
                    self.con.execute(stmt)
                self.con.execute("DELETE FROM schema_version")
                self.con.execute("INSERT INTO schema_version (version) VALUES (?)", (i + 1,))
            except sqlite3.Error as e:
                self._rollback()
                raise ConfigError(f"--db {self.path}: migrating the schema from version {i} to {i + 1} failed "
                                  f"({e}); the database is unchanged") from None
            except BaseException:
                self._rollback()
                raise
            self.con.execute("COMMIT")

    # -- writing ---------------------------------------------------------------------------------------
    def new_run(self, run_id: str, grid: dict, environment: dict, meter: dict | None = None,
                command: str | None = None, grid_name: str | None = None, grid_hash: str | None = None,
                shard: str | None = None) -> str:
        from . import __version__

        with self.transaction() as c:
            c.execute(
                "INSERT INTO runs (run_id, created_utc, command, grid_name, grid_hash, shard, grid_json, "
                "environment_json, meter_json, tool_version) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, now_utc(), command, grid_name, grid_hash, shard, dumps(grid), dumps(environment),
                 dumps(meter) if meter is not None else None, __version__),
            )
        return run_id

    def add_point(self, run_id: str, point_key: str, config: dict, status: str, *, reason: str | None = None,
                  document: dict | None = None, started_utc: str | None = None,
                  seconds: float | None = None) -> int:
        """Write one point with its models, windows and traces in a single transaction; returns its id."""
        spec = config.get("spec", {})
        opts = config.get("options", {})
        models = list((document or {}).get("models", []))
        head = {k: v for k, v in (document or {}).items() if k != "models"}
        with self.transaction() as c:
            # a point that failed before is retried by --resume within the same run: its new outcome replaces it
            c.execute("DELETE FROM points WHERE run_id = ? AND point_key = ? AND status = 'failed'",
                      (run_id, point_key))
            cur = c.execute(
                "INSERT INTO points (run_id, point_key, status, reason, label, experts, hidden, layers, top_k, "
                "input_dim, classes, batch_size, dtype, total_params, started_utc, finished_utc, seconds, "
                "config_json, document_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, point_key, status, reason, config.get("label"), spec.get("experts"), spec.get("hidden"),
                 spec.get("layers"), spec.get("top_k"), spec.get("input_dim"), spec.get("classes"),
                 opts.get("batch_size"), opts.get("dtype"), config.get("total_params"), started_utc, now_utc(),
                 _finite(seconds), dumps(config), dumps(head) if document is not None else None),
            )
            point_id = int(cur.lastrowid)
            for i, rec in enumerate(models):
                self._add_model(c, point_id, i, rec)
        return point_id

    def _add_model(self, c: sqlite3.Connection, point_id: int, ordinal: int, rec: ModelRecord) -> None:
        windows = rec.get("windows") if isinstance(rec.get("windows"), list) else []
        # traces live in their own table; the record keeps everything else
        slim = dict(rec)
        if windows:
            slim["windows"] = [{k: v for k, v in w.items() if k != "trace"} if isinstance(w, dict) else w
                               for w in windows]
        cols = list(MODEL_COLUMNS)
        cur = c.execute(
            f"INSERT INTO models (point_id, ordinal, {', '.join(cols)}, record_json) "
            f"VALUES (?, ?, {', '.join('?' * len(cols))}, ?)",
            (point_id, ordinal, *[_finite(rec.get(k)) for k in cols], dumps(slim)),
        )
        model_id = int(cur.lastrowid)
        for j, w in enumerate(windows):
            if not isinstance(w, dict):
                continue
            wcols = list(WINDOW_COLUMNS)
            vals = [_finite(w.get(k, w.get("seconds") if k == "window_s" else None)) for k in wcols]
            wcur = c.execute(
                f"INSERT INTO windows (model_id, ordinal, {', '.join(wcols)}, metrics_json) "
                f"VALUES (?, ?, {', '.join('?' * len(wcols))}, ?)",
                (model_id, j, *vals, dumps({k: v for k, v in w.items() if k != "trace"})),
            )
            for dev, ts, ws in normalize_trace(w.get("trace")):
                c.execute("INSERT INTO traces (window_id, device, samples, t_s_json, power_w_json) VALUES (?,?,?,?,?)",
                          (int(wcur.lastrowid), dev, len(ts), dumps(ts), dumps(ws)))

    @contextmanager
    def claim(self, point_key: str) -> Iterator[bool]:
        """Hold an advisory lock on one point while it is measured; yields False if another process holds it.

        Several sweeps may share one database (each point is one transaction, WAL, busy timeout); the claim
        keeps two of them from measuring the same point at once. The lock is a POSIX byte-range lock on
        ``<db>.lock``: the kernel drops it when the process ends, even by SIGKILL, so it never goes stale.
        """
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): one sweep per database
            yield True
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        offset = int(hashlib.sha256(point_key.encode()).hexdigest()[:12], 16)
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, offset)

    # -- reading ---------------------------------------------------------------------------------------
    def runs(self) -> list[dict]:
        return [dict(r) for r in self.con.execute("SELECT * FROM runs ORDER BY created_utc, run_id")]

    def latest_run(self, grid_hash: str) -> str | None:
        row = self.con.execute("SELECT run_id FROM runs WHERE grid_hash = ? ORDER BY created_utc DESC, rowid DESC "
                               "LIMIT 1", (grid_hash,)).fetchone()
        return row[0] if row else None

    def completed_keys(self) -> set[str]:
        """Keys of points already finished (measured, or skipped for a reason that will not change)."""
        return {r[0] for r in self.con.execute("SELECT point_key FROM points WHERE status IN ('done', 'skipped')")}

    def points(self) -> list[dict]:
        return [dict(r) for r in self.con.execute("SELECT * FROM points ORDER BY id")]

    def model_rows(self) -> list[dict]:
        """One row per measured model, with its point's shape and options (the table pandas users want)."""
        pcols = ", ".join(f"p.{c} AS point_{c}" for c in ("label", "experts", "hidden", "layers", "top_k",
                                                           "total_params"))
        q = (f"SELECT m.*, p.run_id, p.point_key, p.status AS point_status, {pcols}, "
             "p.batch_size AS point_batch_size, p.dtype AS point_dtype, p.finished_utc "
             "FROM models m JOIN points p ON p.id = m.point_id ORDER BY p.id, m.ordinal")
        return [dict(r) for r in self.con.execute(q)]

    def window_rows(self) -> list[dict]:
        q = ("SELECT w.*, m.point_id, m.name AS model_name, m.kind AS model_kind, m.strategy AS model_strategy, "
             "(SELECT COUNT(*) FROM traces t WHERE t.window_id = w.id) AS trace_devices "
             "FROM windows w JOIN models m ON m.id = w.model_id ORDER BY w.model_id, w.ordinal")
        return [dict(r) for r in self.con.execute(q)]

    def traces(self) -> dict[int, list[tuple[str, list[float], list[float]]]]:
        """{window id: [(device, t_s [N], power_w [N]), ...]}."""
        out: dict[int, list[tuple[str, list[float], list[float]]]] = {}
        for r in self.con.execute("SELECT window_id, device, t_s_json, power_w_json FROM traces ORDER BY id"):
            out.setdefault(r[0], []).append((r[1], json.loads(r[2]), json.loads(r[3])))
        return out

    def integrity(self) -> str:
        return str(self.con.execute("PRAGMA integrity_check").fetchone()[0])

    # -- export ----------------------------------------------------------------------------------------
    def export_rows(self, table: str) -> list[dict]:
        if table == "models":
            return [{k: v for k, v in r.items() if k != "record_json"} for r in self.model_rows()]
        if table == "windows":
            return self.window_rows()
        if table == "points":
            return [{k: v for k, v in r.items() if k not in ("config_json", "document_json")} for r in self.points()]
        raise ConfigError(f"--table {table!r} is unknown; choose models, windows or points")

    def export_csv(self, table: str = "models") -> str:
        rows = self.export_rows(table)
        buf = io.StringIO()
        fields = list(rows[0]) if rows else ["id"]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    def export_document(self) -> dict:
        """Everything, nested: runs, then points with their full records (traces put back into windows)."""
        traces = self.traces()
        windows_by_model: dict[int, list[int]] = {}
        for r in self.con.execute("SELECT id, model_id FROM windows ORDER BY model_id, ordinal"):
            windows_by_model.setdefault(r["model_id"], []).append(r["id"])
        models_by_point: dict[int, list[dict]] = {}
        for r in self.con.execute("SELECT id, point_id, record_json FROM models ORDER BY point_id, ordinal"):
            rec = json.loads(r["record_json"])
            if isinstance(rec.get("windows"), list):
                dict_windows = [w for w in rec["windows"] if isinstance(w, dict)]
                for w, wid in zip(dict_windows, windows_by_model.get(r["id"], [])):
                    if wid in traces:
                        w["trace"] = {dev: [[t, p] for t, p in zip(ts, ws)] for dev, ts, ws in traces[wid]}
            models_by_point.setdefault(r["point_id"], []).append(rec)
        points = []
        for p in self.points():
            d = {k: v for k, v in p.items() if k not in ("config_json", "document_json")}
            d["config"] = json.loads(p["config_json"])
            d["document"] = json.loads(p["document_json"]) if p["document_json"] else None
            d["models"] = models_by_point.get(p["id"], [])
            points.append(d)
        runs = []
        for r in self.runs():
            d = {k: v for k, v in r.items() if not k.endswith("_json")}
            for k in ("grid", "environment", "meter"):
                raw = r[f"{k}_json"]
                d[k] = json.loads(raw) if raw else None
            runs.append(d)
        return {"schema": EXPORT_SCHEMA, "schema_version": schema_version(), "runs": runs, "points": points}


def damaged(path: str | Path, e: BaseException) -> str:
    """The one line for a database SQLite cannot use: damaged, truncated or not SQLite at all."""
    text = one_line(e)
    if "readonly" in text or "read-only" in text:
        return f"--db {path}: cannot write to it ({text}); check its and its directory's permissions"
    if "disk is full" in text:
        return f"--db {path}: {text}; free some space and run again"
    if "locked" in text:
        return f"--db {path}: {text} for over {BUSY_TIMEOUT_MS // 1000} s by another process; try again later"
    return (f"--db {path}: the database is damaged or not SQLite ({text}); restore a backup, or salvage it with "
            f"`sqlite3 {path} .recover`, or give another --db")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def merge(inputs: list[str | Path], out: str | Path) -> dict[str, int]:
    """Combine databases into a new file ``out`` (never replaced). A point present in several inputs
    (same run and point key) is kept once. Returns counts of what was copied and what was duplicate."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} already exists; merge writes a new file, choose another name")
    for p in inputs:
        if Path(p).resolve() == out.resolve():
            raise ConfigError(f"--out {out} is also an input; choose another name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    counts = {"runs": 0, "points": 0, "duplicate_points": 0, "models": 0, "windows": 0}
    try:
        dst = Store(tmp)
        try:
            for src_path in inputs:
                src = Store(src_path, create=False)
                try:
                    _copy_into(src, dst, counts)
                except sqlite3.DatabaseError as e:
                    raise ConfigError(damaged(src_path, e)) from None
                finally:
                    src.close()
            dst.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            dst.close()
        try:
            os.link(tmp, out)  # fails if someone created ``out`` meanwhile: never replace a file
        except FileExistsError:
            raise ConfigError(f"--out {out} appeared while merging; choose another name") from None
    finally:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(tmp + suffix):
                os.unlink(tmp + suffix)
    return counts


def _copy_into(src: Store, dst: Store, counts: dict[str, int]) -> None:
    with dst.transaction() as c:
        for r in src.con.execute("SELECT * FROM runs"):
            cur = c.execute("INSERT OR IGNORE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
                            tuple(r[k] for k in ("run_id", "created_utc", "command", "grid_name", "grid_hash",
                                                 "shard", "grid_json", "environment_json", "meter_json",
                                                 "tool_version")))
            counts["runs"] += cur.rowcount
        pcols = [d[1] for d in src.con.execute("PRAGMA table_info(points)") if d[1] != "id"]
        mcols = [d[1] for d in src.con.execute("PRAGMA table_info(models)") if d[1] not in ("id", "point_id")]
        wcols = [d[1] for d in src.con.execute("PRAGMA table_info(windows)") if d[1] not in ("id", "model_id")]
        tcols = [d[1] for d in src.con.execute("PRAGMA table_info(traces)") if d[1] not in ("id", "window_id")]
        for p in src.con.execute("SELECT * FROM points ORDER BY id").fetchall():
            seen = c.execute("SELECT 1 FROM points WHERE run_id = ? AND point_key = ?",
                             (p["run_id"], p["point_key"])).fetchone()
            if seen:
                counts["duplicate_points"] += 1
                continue
            pid = c.execute(f"INSERT INTO points ({', '.join(pcols)}) VALUES ({', '.join('?' * len(pcols))})",
                            tuple(p[k] for k in pcols)).lastrowid
            counts["points"] += 1
            for m in src.con.execute("SELECT * FROM models WHERE point_id = ? ORDER BY ordinal", (p["id"],)).fetchall():
                mid = c.execute(f"INSERT INTO models (point_id, {', '.join(mcols)}) "
                                f"VALUES (?, {', '.join('?' * len(mcols))})", (pid, *[m[k] for k in mcols])).lastrowid
                counts["models"] += 1
                for w in src.con.execute("SELECT * FROM windows WHERE model_id = ? ORDER BY ordinal",
                                         (m["id"],)).fetchall():
                    wid = c.execute(f"INSERT INTO windows (model_id, {', '.join(wcols)}) "
                                    f"VALUES (?, {', '.join('?' * len(wcols))})",
                                    (mid, *[w[k] for k in wcols])).lastrowid
                    counts["windows"] += 1
                    for t in src.con.execute("SELECT * FROM traces WHERE window_id = ? ORDER BY id",
                                             (w["id"],)).fetchall():
                        c.execute(f"INSERT INTO traces (window_id, {', '.join(tcols)}) "
                                  f"VALUES (?, {', '.join('?' * len(tcols))})", (wid, *[t[k] for k in tcols]))
