"""The results store: one SQLite file holding every sweep's runs, points, models, windows and power traces.

Why SQLite: a sweep of hours must survive being killed, so each point is written in its own
transaction (WAL journal, synchronous=FULL): a SIGKILL loses at most the point in flight. Several
shards on one host can share a file (busy timeout), and ``merge`` joins files from several hosts.
Every model record is also kept whole as JSON, so fields added later by other modules are never lost.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import sqlite3
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, one_line
from .fileio import check_named, check_new_file, json_safe, link_new, now_utc, os_reason

DEFAULT_DB = "results/moe-energy.db"
EXPORT_SCHEMA = "moe-energy/export"
BUSY_TIMEOUT_MS = 30_000
SQLITE_MAGIC = b"SQLite format 3\x00"
SIDECARS = ("-wal", "-shm")  # SQLite's files beside a WAL-mode database
# The tables of schema version 1, kept by every later one: a store lacks none of them.
CORE_TABLES = ("runs", "points", "models", "windows", "traces")

if TYPE_CHECKING:
    from ..measure.records import ModelRecord

# Columns copied out of each model and window record: every one a field of measure.records' ModelRecord or
# WindowRecord, or of the LLM-layer family's LayerRecord (tests/test_records.py holds it), read with .get
# (absent: NULL); record_json keeps them all. The columns of schema version 1 are frozen here: a later
# version's columns go in its own migration, so that a shipped migration never changes.
_V1_MODEL_COLUMNS: dict[str, str] = {
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
_V1_WINDOW_COLUMNS: dict[str, str] = {
    "window_s": "REAL", "inferences": "INTEGER", "energy_j": "REAL", "average_power_w": "REAL",
    "inferences_per_second": "REAL", "inferences_per_joule": "REAL", "energy_method": "TEXT",
}
# Schema version 2: the LLM-layer family's per-token fields, the roofline split (which bound applies), and the
# power-cap and carbon/cost fields of issue 15; the point's family, arch and routing.
LAYER_MODEL_COLUMNS: dict[str, str] = {
    "arch": "TEXT", "tokens_per_forward": "INTEGER", "routing": "TEXT", "tokens_per_second": "REAL",
    "tokens_per_joule": "REAL", "joules_per_1k_tokens": "REAL", "experts_touched": "REAL",
    "experts_touched_if_uniform": "REAL", "expert_load_max_over_mean": "REAL",
    "weight_bytes_read_per_forward": "REAL", "roofline_bound_ms": "REAL", "memory_bound_ms": "REAL",
    "compute_bound_ms": "REAL", "bound": "TEXT", "fraction_of_roofline": "REAL",
}
CARBON_MODEL_COLUMNS: dict[str, str] = {
    "power_limit_w": "REAL", "power_limit_requested_w": "REAL", "cpu_power_limit_w": "REAL",
    "carbon_intensity_g_per_kwh": "REAL", "price_per_kwh": "REAL", "co2e_g_per_million": "REAL",
    "cost_per_million": "REAL", "carbon_basis": "TEXT",
}
_V2_WINDOW_COLUMNS: dict[str, str] = {"power_limit_w": "REAL", "cpu_power_limit_w": "REAL"}
_V2_POINT_COLUMNS: dict[str, str] = {"family": "TEXT", "arch": "TEXT", "routing": "TEXT"}
# Schema version 3: the whole-model family's fields (issue 23): which model, phase, batch and context a record
# measured, the layers built, the MoE blocks' implementation, the per-token figures and latencies, and the
# extrapolation to the whole model (a JSON object: its figures and its label); the point's model set and impl.
WHOLE_MODEL_COLUMNS: dict[str, str] = {
    "model": "TEXT", "phase": "TEXT", "batch": "INTEGER", "context": "INTEGER", "tokens_per_call": "INTEGER",
    "layers_measured": "INTEGER", "layers_total": "INTEGER", "moe_impl": "TEXT", "joules_per_token": "REAL",
    "ttft_ms": "REAL", "itl_p50_ms": "REAL", "itl_p90_ms": "REAL", "latency_p90_ms": "REAL",
    "whole_model_extrapolated": "TEXT",
}
_V3_POINT_COLUMNS: dict[str, str] = {"model": "TEXT", "moe_impl": "TEXT"}
# Schema version 4 (issue 24): how an LLM layer's weights were stored ('int8'; NULL: in the dtype) and what that
# cost in output error, per record; the point's weights (a sweep axis).
WEIGHTS_MODEL_COLUMNS: dict[str, str] = {"weights": "TEXT", "weights_output_error": "REAL"}
_V4_POINT_COLUMNS: dict[str, str] = {"weights": "TEXT"}
JSON_COLUMNS = ("whole_model_extrapolated",)  # a structured field kept as JSON text in its column (for export)
MODEL_COLUMNS: dict[str, str] = {**_V1_MODEL_COLUMNS, **LAYER_MODEL_COLUMNS, **CARBON_MODEL_COLUMNS,
                                 **WHOLE_MODEL_COLUMNS, **WEIGHTS_MODEL_COLUMNS}
WINDOW_COLUMNS: dict[str, str] = {**_V1_WINDOW_COLUMNS, **_V2_WINDOW_COLUMNS}
LAYER_FAMILY = "llm_layer"  # points.family of an LLM-layer point; NULL (schema 1's points): the seed's family
WHOLE_FAMILY = "whole_model"  # points.family of a whole-model point (a model set at its batches x contexts)

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
    {', '.join(f'{c} {t}' for c, t in _V1_MODEL_COLUMNS.items())},
    record_json TEXT NOT NULL
);
CREATE INDEX models_point ON models(point_id);
CREATE TABLE windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    {', '.join(f'{c} {t}' for c, t in _V1_WINDOW_COLUMNS.items())},
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


def _add_columns(table: str, columns: dict[str, str]) -> str:
    return "".join(f"ALTER TABLE {table} ADD COLUMN {c} {t};\n" for c, t in columns.items())


_V2 = (_add_columns("models", {**LAYER_MODEL_COLUMNS, **CARBON_MODEL_COLUMNS})
       + _add_columns("windows", _V2_WINDOW_COLUMNS) + _add_columns("points", _V2_POINT_COLUMNS)
       + "CREATE INDEX models_arch_tokens ON models(arch, tokens_per_forward);\n")

_V3 = (_add_columns("models", WHOLE_MODEL_COLUMNS) + _add_columns("points", _V3_POINT_COLUMNS)
       + "CREATE INDEX models_model_phase ON models(model, phase, batch, context);\n")

# int8 records written before version 4 hold their format in their JSON only: copied into the new columns (a row
# whose JSON is damaged keeps NULL, as a reader skips it)
_V4 = (_add_columns("models", WEIGHTS_MODEL_COLUMNS) + _add_columns("points", _V4_POINT_COLUMNS)
       + "UPDATE models SET weights = json_extract(record_json, '$.weights'), weights_output_error = "
         "json_extract(record_json, '$.weights_output_error') WHERE json_valid(record_json);\n"
       + "UPDATE points SET weights = json_extract(config_json, '$.options.weights') WHERE json_valid(config_json) "
         "AND family = 'llm_layer';\n")

# MIGRATIONS[i] brings a database from schema version i to i + 1. Append, never edit a shipped one.
MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4]


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


def _cell(key: str, v: Any) -> Any:
    """A model record's field as its column holds it: a JSON column's object as JSON text, else ``_finite``."""
    return dumps(v) if key in JSON_COLUMNS and isinstance(v, (dict, list)) else _finite(v)


def dumps(v: Any) -> str:
    return json.dumps(json_safe(v), sort_keys=True, allow_nan=False, default=str)


def _by_value(v: Any) -> Any:
    """Whole floats as ints, all the way down: a TOML ``warmup = 0`` and a flag's ``--warmup 0`` (0 and 0.0)
    are one setting, so one point."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _by_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_by_value(x) for x in v]
    return v


# Options a config holds (what the sweep was told) that do not change what a point measures, so not who it is:
# --max-forward-s only decides which of a layer point's rows run (a measured row is the same at any limit) and,
# without --layers, a whole model's N of layers, as free memory and the host's roofline do (N is in each record,
# the figures extrapolated from it). Keyed, a sweep resumed or a store merged with another limit measured every
# point again and the report counted both. Dropped when the key is made, so stored configs give the new key.
NOT_IDENTITY_OPTIONS = ("max_forward_s",)
# The words of a row skipped under --max-forward-s (runner/layer.py writes them): such a point is complete only for
# a sweep whose limit is no higher than the one it was measured under (Store.time_limited).
TIME_LIMIT_MARK = "over --max-forward-s"


def point_key(config: dict) -> str:
    """A point's identity: its config (as stored, so a stored one gives the same key) without its label (the
    same shape reached from two grids is one point) and ``NOT_IDENTITY_OPTIONS``, numbers compared by value."""
    c = json.loads(dumps({k: v for k, v in config.items() if k != "label"}))
    if isinstance(c.get("options"), dict):
        c["options"] = {k: v for k, v in c["options"].items() if k not in NOT_IDENTITY_OPTIONS}
    return hashlib.sha256(dumps(_by_value(c)).encode()).hexdigest()[:20]


def _options(config_json: str | None) -> dict:
    """A stored config's options, or {} where the config no longer parses."""
    try:
        options = json.loads(config_json or "").get("options")
    except (AttributeError, TypeError, ValueError):
        return {}
    return options if isinstance(options, dict) else {}


def stored_key(row: Any) -> str:
    """A stored point's identity, from its config: stores written before keys compared numbers by value hold
    other keys in ``point_key``, and resume and the report must still see those points as the same ones.
    A config that no longer parses keeps its stored key."""
    try:
        config = json.loads(row["config_json"])
    except (TypeError, ValueError):
        return str(row["point_key"])
    return point_key(config) if isinstance(config, dict) else str(row["point_key"])


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text} is out of range")
    return v


def stored_json(raw: Any, want: type = dict) -> Any:
    """A JSON column's value when it is strict JSON (no NaN or Infinity, which ``dumps`` never writes) of type
    ``want``; None when it is not: such a row was damaged outside this tool (a bad disk, a hand edit), and a
    reader skips and counts it rather than stop at it."""
    if not isinstance(raw, (str, bytes)):
        return None
    try:
        v = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return None
    return v if isinstance(v, want) else None


def _numbers(xs: list) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)


def _series(trace: Any) -> tuple[list[float], list[float]] | None:
    """(t_s, power_w) from one device's samples: [[t, w], ...], [{"t_s": t, "power_w": w}, ...] or
    {"t_s": [...], "power_w": [...]}; None if it is none of these or empty."""
    t_keys, w_keys = ("t_s", "time_s", "t"), ("power_w", "watts", "w")
    if isinstance(trace, dict):
        t = next((trace[k] for k in t_keys if k in trace), None)
        w = next((trace[k] for k in w_keys if k in trace), None)
        if not (isinstance(t, list) and isinstance(w, list) and len(t) == len(w)):
            return None
        trace = list(zip(t, w))  # the same (t, w) pairs as the list form
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
        return [(str(dev), *s) for dev, samples in trace.items() if (s := _series(samples)) is not None]
    return []


def point_columns(config: dict) -> dict[str, Any]:
    """A point's shape columns, by family: the seed's E, H, L, k, task and batch; an LLM layer's arch and weights
    format (its spec is an Arch: no batch); a whole model's MoE and impl (its spec is the MoE's WholeModel: none of
    the seed's)."""
    spec, opts, family = config.get("spec", {}), config.get("options", {}), config.get("family")
    shape = ("experts", "hidden", "layers", "top_k", "input_dim", "classes")
    out: dict[str, Any] = {k: None if family == WHOLE_FAMILY else spec.get(k) for k in shape}
    out.update(batch_size=opts.get("batch_size") if family is None else None, dtype=opts.get("dtype"),
               total_params=config.get("total_params"), arch=spec.get("name") if family == LAYER_FAMILY else None,
               model=spec.get("name") if family == WHOLE_FAMILY else None,
               moe_impl=config.get("moe_impl") if family == WHOLE_FAMILY else None,
               weights=opts.get("weights") if family == LAYER_FAMILY else None)
    return out


_POINT_COLS = ", ".join(f"p.{c} AS point_{c}"
                        for c in ("label", "experts", "hidden", "layers", "top_k", "total_params"))
MODEL_ROWS = (f"SELECT m.*, p.run_id, p.point_key, p.status AS point_status, {_POINT_COLS}, "
              "p.batch_size AS point_batch_size, p.dtype AS point_dtype, p.family AS point_family, p.finished_utc "
              "FROM models m JOIN points p ON p.id = m.point_id ORDER BY p.id, m.ordinal")
WINDOW_ROWS = ("SELECT w.*, m.point_id, m.name AS model_name, m.kind AS model_kind, m.strategy AS model_strategy, "
               "(SELECT COUNT(*) FROM traces t WHERE t.window_id = w.id) AS trace_devices "
               "FROM windows w JOIN models m ON m.id = w.model_id ORDER BY w.model_id, w.ordinal")


class Store:
    """An open results database.

    ``Store(path)`` opens it to write: it creates the file (or migrates an older store in place).
    ``Store(path, create=False)`` opens an existing store to read it, read-only: not a byte of the file is
    ever written, an older schema is migrated in an in-memory copy only, and a file that is not a moe-energy
    store (someone else's database, an empty file) is refused in one line rather than given our tables.
    """

    def __init__(self, path: str | Path, create: bool = True, check: bool = True, label: str | None = None) -> None:
        """``check``: read every page once (PRAGMA quick_check) and refuse a damaged file before any work.
        ``label``: how messages name the file (default ``--db PATH``)."""
        self.path = Path(path)
        self.label = label or f"--db {self.path}"
        self.readonly = not create
        self._lock_fd: int | None = None
        # a read-only connection gives a WAL file its -wal and -shm and cannot remove them: close() tidies
        # those this store made
        self._made_sidecars = self.readonly and not self._sidecars_exist()
        self._identities: dict[int, str] = {}  # completed point id -> identity, read once (such rows never change)
        self._limited: dict[str, float] = {}  # time_limited's answer over the finished rows up to _limited_seen
        self._limited_seen = 0
        self._check_file()
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), one per point
            if self.readonly:
                self._identify_untouched()
            self.con = sqlite3.connect(self._uri("mode=ro") if self.readonly else self.path, uri=self.readonly,
                                       timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.DatabaseError as e:
            raise ConfigError(damaged(self.path, e, self.label)) from None
        except sqlite3.Error as e:
            raise ConfigError(f"{self.label}: cannot open ({e}); check the path and its permissions") from None
        try:
            self._prepare(check)
        except sqlite3.DatabaseError as e:
            self.con.close()
            raise ConfigError(damaged(self.path, e, self.label)) from None
        except BaseException:
            self.con.close()
            raise

    def _check_file(self) -> None:
        """Refuse, before SQLite sees it, a path that cannot be a store: one the OS refuses (too long a name, under
        a regular file), a directory or device, a file of other bytes; for a read, a missing or empty file too
        (SQLite would quietly make either a new database)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.readonly:
                raise ConfigError(f"{self.label}: no such database; run `moe-energy sweep --db {self.path}` "
                                  "first or give the right path") from None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{self.label}: cannot create its directory ({os_reason(e)})") from None
            return
        except OSError as e:
            raise ConfigError(f"{self.label}: cannot use this path ({os_reason(e)}); give another") from None
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{self.label} is a directory; give a file name such as {self.path}/moe-energy.db")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{self.label} is not a regular file; give a moe-energy database or a new file name")
        if st.st_size == 0:
            if self.readonly:
                raise ConfigError(foreign(self.label, "the file is empty"))
            return
        try:
            with open(self.path, "rb") as f:
                magic = f.read(16)
        except OSError as e:
            raise ConfigError(f"{self.label}: cannot read it ({os_reason(e)}); check its permissions") from None
        if magic != SQLITE_MAGIC:
            raise ConfigError(f"{self.label}: not a usable SQLite database (it starts with {magic[:12]!r}, "
                              "not 'SQLite format 3'); give a moe-energy database or a new file name")

    def _uri(self, query: str) -> str:
        return f"{self.path.absolute().as_uri()}?{query}"

    def _identify_untouched(self) -> None:
        """Before a read-only connection (which gives a WAL-mode file its -wal and -shm companions), look at the
        file through an immutable one, which creates nothing, so that a foreign file is refused untouched.
        Only when no -wal file exists: then the main file alone holds the whole database."""
        if os.path.lexists(f"{self.path}-wal"):
            return
        probe = sqlite3.connect(self._uri("immutable=1"), uri=True)
        try:
            identify(probe, self.label, allow_empty=False)
        finally:
            probe.close()

    def _prepare(self, check: bool) -> None:
        """Settings, the integrity check, then the schema: identified first, so that a foreign file is refused
        before anything (not even its journal mode) is changed."""
        self.con.row_factory = sqlite3.Row
        self.con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if self.readonly:
            self.con.execute("PRAGMA query_only = ON")
        if check:
            problem = str(self.con.execute("PRAGMA quick_check(1)").fetchone()[0])
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
        version = identify(self.con, self.label, allow_empty=not self.readonly)
        if self.readonly:
            if version < len(MIGRATIONS):
                self._to_memory()
                self._migrate()
            return
        self._use_wal()
        self.con.execute("PRAGMA synchronous = FULL")
        self.con.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    def _use_wal(self) -> None:
        """Switch to WAL, retrying up to the busy timeout. The switch needs an exclusive lock, and SQLite answers
        "locked" at once, without its busy handler, while another process has the file open (two sweeps that
        start together on a new store)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if str(self.con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    self.con.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _to_memory(self) -> None:
        """Read an older store through a copy in memory, migrated there: a read never upgrades the file."""
        mem = sqlite3.connect(":memory:", isolation_level=None)
        try:
            self.con.backup(mem)
        except BaseException:
            mem.close()
            raise
        self.con.close()
        self.con = mem
        self.con.row_factory = sqlite3.Row

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()
        if self._made_sidecars:
            self._made_sidecars = False
            self._remove_sidecars()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases this process's point claims
            self._lock_fd = None

    def _remove_sidecars(self) -> None:
        """The -wal and -shm a read made, removed as SQLite removes them when its last connection closes: a
        read-write connection (never creating the file) opened and closed, which leaves them if another process
        has the file open and writes nothing to it (its WAL is empty). Where it cannot, they stay: harmless."""
        if not self._sidecars_exist():
            return
        with contextlib.suppress(sqlite3.Error):
            con = sqlite3.connect(self._uri("mode=rw"), uri=True, timeout=0)
            try:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                con.close()

    def _sidecars_exist(self) -> bool:
        return any(os.path.lexists(f"{self.path}{s}") for s in SIDECARS)

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
            with contextlib.suppress(sqlite3.Error):
                self.con.execute("ROLLBACK")

    def version(self) -> int:
        row = self.con.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        v = self.version()
        if v > len(MIGRATIONS):
            raise ConfigError(_newer(self.label, v))
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
                raise ConfigError(f"{self.label}: migrating the schema from version {i} to {i + 1} failed "
                                  f"({e}); the database is unchanged") from None
            except BaseException:
                self._rollback()
                raise
            self.con.execute("COMMIT")

    # -- writing ---------------------------------------------------------------------------------------
    def new_run(self, run_id: str, grid: dict, environment: dict, meter: dict | None = None,
                command: str | None = None, grid_name: str | None = None, grid_hash: str | None = None,
                shard: str | None = None) -> str:
        from .. import __version__

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
        models = list((document or {}).get("models", []))
        head = {k: v for k, v in (document or {}).items() if k != "models"}
        cols = {**point_columns(config), "family": config.get("family"), "routing": config.get("routing")}
        with self.transaction() as c:
            # a point that failed before is retried by --resume within the same run: its new outcome replaces it
            c.execute("DELETE FROM points WHERE run_id = ? AND point_key = ? AND status = 'failed'",
                      (run_id, point_key))
            names = ["run_id", "point_key", "status", "reason", "label", *cols, "started_utc", "finished_utc",
                     "seconds", "config_json", "document_json"]
            point_id = _insert(c, "points", names, (run_id, point_key, status, reason, config.get("label"),
                                                    *cols.values(), started_utc, now_utc(), _finite(seconds),
                                                    dumps(config), dumps(head) if document is not None else None))
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
        model_id = _insert(c, "models", ["point_id", "ordinal", *MODEL_COLUMNS, "record_json"],
                           (point_id, ordinal, *[_cell(k, rec.get(k)) for k in MODEL_COLUMNS], dumps(slim)))
        for j, w in enumerate(windows):
            if not isinstance(w, dict):
                continue
            vals = [_finite(w.get(k, w.get("seconds") if k == "window_s" else None)) for k in WINDOW_COLUMNS]
            window_id = _insert(c, "windows", ["model_id", "ordinal", *WINDOW_COLUMNS, "metrics_json"],
                                (model_id, j, *vals, dumps({k: v for k, v in w.items() if k != "trace"})))
            for dev, ts, ws in normalize_trace(w.get("trace")):
                _insert(c, "traces", ["window_id", "device", "samples", "t_s_json", "power_w_json"],
                        (window_id, dev, len(ts), dumps(ts), dumps(ws)))

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
        """Keys of points already finished (measured, or skipped for a reason that will not change). A sweep asks
        before every point: each row's config is parsed once, since a finished row is never changed or removed
        and ids only grow (AUTOINCREMENT, one writer at a time)."""
        seen = max(self._identities, default=0)
        for r in self.con.execute("SELECT id, point_key, config_json FROM points "
                                  "WHERE status IN ('done', 'skipped') AND id > ?", (seen,)):
            self._identities[r["id"]] = stored_key(r)
        return set(self._identities.values())

    def time_limited(self) -> dict[str, float]:
        """{key: --max-forward-s} of the points whose latest finished measurement skipped a row under that limit.
        The limit is not in the key, so without this a sweep resumed with a higher one (what the skip's reason
        asks for) would call such a point complete and never measure the rows it skipped. Read on from the last
        row it saw, as ``completed_keys``: a sweep asks before every point, and finished rows never change."""
        out = self._limited
        for r in self.con.execute("SELECT p.id, p.point_key, p.config_json, EXISTS (SELECT 1 FROM models m WHERE "
                                  "m.point_id = p.id AND instr(m.record_json, ?) > 0) AS limited FROM points p "
                                  "WHERE p.status IN ('done', 'skipped') AND p.id > ? ORDER BY p.id",
                                  (TIME_LIMIT_MARK, self._limited_seen)):
            key = self._identities.get(r["id"]) or stored_key(r)
            out.pop(key, None)  # the latest measurement of a key decides
            limit = _options(r["config_json"]).get("max_forward_s")
            if r["limited"] and isinstance(limit, (int, float)):
                out[key] = float(limit)
            self._limited_seen = r["id"]
        return dict(out)

    def points(self) -> list[dict]:
        return [dict(r) for r in self.con.execute("SELECT * FROM points ORDER BY id")]

    def point_count(self) -> int:
        return int(self.con.execute("SELECT COUNT(*) FROM points").fetchone()[0])

    def model_rows(self) -> list[dict]:
        """One row per measured model, with its point's shape and options (the table pandas users want)."""
        return [dict(r) for r in self.con.execute(MODEL_ROWS)]

    def window_rows(self) -> list[dict]:
        return [dict(r) for r in self.con.execute(WINDOW_ROWS)]

    def traces(self, damaged: Counter[str] | None = None) -> dict[int, list[tuple[str, list[float], list[float]]]]:
        """{window id: [(device, t_s [N], power_w [N]), ...]}; a damaged row is skipped and counted in
        ``damaged['traces']``."""
        out: dict[int, list[tuple[str, list[float], list[float]]]] = {}
        for r in self.con.execute("SELECT window_id, device, t_s_json, power_w_json FROM traces ORDER BY id"):
            ts, ws = stored_json(r[2], list), stored_json(r[3], list)
            if ts is None or ws is None or len(ts) != len(ws) or not _numbers(ts) or not _numbers(ws):
                if damaged is not None:
                    damaged["traces"] += 1
                continue
            out.setdefault(r[0], []).append((str(r[1]), ts, ws))
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

    def export_columns(self, table: str) -> list[str]:
        """``export_rows(table)``'s columns, read from the query itself: an empty table's CSV keeps its header."""
        sql = {"models": MODEL_ROWS, "windows": WINDOW_ROWS, "points": "SELECT * FROM points"}[table]
        dropped = {"models": ("record_json",), "points": ("config_json", "document_json")}.get(table, ())
        return [d[0] for d in self.con.execute(f"SELECT * FROM ({sql}) LIMIT 0").description if d[0] not in dropped]

    def export_csv(self, table: str = "models") -> str:
        rows = self.export_rows(table)
        buf = io.StringIO()
        fields = list(rows[0]) if rows else self.export_columns(table)
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    def export_document(self, damaged: Counter[str] | None = None) -> dict:
        """Everything, nested: runs, then points with their full records (traces put back into windows).

        A row whose stored JSON is damaged is left out and counted in ``damaged`` by table: the rest still exports.
        """
        damaged = damaged if damaged is not None else Counter()
        models = self._export_models(self.traces(damaged), damaged)
        return {"schema": EXPORT_SCHEMA, "schema_version": schema_version(), "runs": self._export_runs(damaged),
                "points": self._export_points(models, damaged)}

    def _export_models(self, traces: dict[int, list[tuple[str, list[float], list[float]]]],
                       damaged: Counter[str]) -> dict[int, list[dict]]:
        """{point id: [full model record, ...]}, each window's trace put back in."""
        windows_by_model: dict[int, list[int]] = {}
        for r in self.con.execute("SELECT id, model_id FROM windows ORDER BY model_id, ordinal"):
            windows_by_model.setdefault(r["model_id"], []).append(r["id"])
        by_point: dict[int, list[dict]] = {}
        for r in self.con.execute("SELECT id, point_id, record_json FROM models ORDER BY point_id, ordinal"):
            rec = stored_json(r["record_json"])
            if rec is None:
                damaged["models"] += 1
                continue
            if isinstance(rec.get("windows"), list):
                dict_windows = [w for w in rec["windows"] if isinstance(w, dict)]
                for w, wid in zip(dict_windows, windows_by_model.get(r["id"], [])):
                    if wid in traces:
                        w["trace"] = {dev: [[t, p] for t, p in zip(ts, ws)] for dev, ts, ws in traces[wid]}
            by_point.setdefault(r["point_id"], []).append(rec)
        return by_point

    def _export_points(self, models: dict[int, list[dict]], damaged: Counter[str]) -> list[dict]:
        points = []
        for p in self.points():
            config = stored_json(p["config_json"])
            document = stored_json(p["document_json"]) if p["document_json"] is not None else None
            if config is None or (p["document_json"] is not None and document is None):
                damaged["points"] += 1
                continue
            d = {k: v for k, v in p.items() if k not in ("config_json", "document_json")}
            d.update(config=config, document=document, models=models.get(p["id"], []))
            points.append(d)
        return points

    def _export_runs(self, damaged: Counter[str]) -> list[dict]:
        runs = []
        for r in self.runs():
            d = {k: v for k, v in r.items() if not k.endswith("_json")}
            for k in ("grid", "environment", "meter"):
                d[k] = stored_json(r[f"{k}_json"])
            if d["grid"] is None or d["environment"] is None or (r["meter_json"] is not None and d["meter"] is None):
                damaged["runs"] += 1
                continue
            runs.append(d)
        return runs


def damaged(path: str | Path, e: BaseException, label: str | None = None) -> str:
    """The one line for a database SQLite cannot use: damaged, truncated or not SQLite at all."""
    text = one_line(e)
    label = label or f"--db {path}"
    if "readonly" in text or "read-only" in text:
        return f"{label}: cannot write to it ({text}); check its and its directory's permissions"
    if "disk is full" in text:
        return f"{label}: {text}; free some space and run again"
    if "locked" in text:
        return f"{label}: {text} for over {BUSY_TIMEOUT_MS // 1000} s by another process; try again later"
    return (f"{label}: the database is damaged or not SQLite ({text}); restore a backup, or salvage it with "
            f"`sqlite3 {path} .recover`, or give another --db")


def foreign(label: str, why: str) -> str:
    return (f"{label}: not a moe-energy store ({why}); give a database written by `moe-energy sweep`, "
            "or another path")


def _newer(label: str, version: int) -> str:
    return (f"{label}: schema version {version} is newer than this tool's {len(MIGRATIONS)}; upgrade moe-energy "
            "or use another --db")


def _names(tables: set[str]) -> str:
    shown = sorted(tables)[:4]
    return ", ".join(repr(t) for t in shown) + (f" and {len(tables) - len(shown)} more" if len(tables) > 4 else "")


def identify(con: sqlite3.Connection, label: str, allow_empty: bool) -> int:
    """The schema version of the moe-energy store behind ``con``; 0 for a database with no tables at all (a
    store is made there only when ``allow_empty``). Any other database is someone else's: refused, so that
    nothing ever adds moe-energy's tables to it."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                        "AND name NOT LIKE 'sqlite!_%' ESCAPE '!'")}
    if not tables:
        if allow_empty:
            return 0
        raise ConfigError(foreign(label, "it is an empty database"))
    if [r[1] for r in con.execute("PRAGMA table_info(schema_version)")] != ["version"]:
        raise ConfigError(foreign(label, f"it holds tables {_names(tables)}, and no moe-energy schema_version"))
    rows = con.execute("SELECT version FROM schema_version LIMIT 2").fetchall()
    if len(rows) > 1 or (rows and (not isinstance(rows[0][0], int) or rows[0][0] < 0)):
        raise ConfigError(foreign(label, "its schema_version table does not hold one version number"))
    version = int(rows[0][0]) if rows else 0
    if version > len(MIGRATIONS):
        raise ConfigError(_newer(label, version))
    missing = [t for t in CORE_TABLES if t not in tables]
    if (version == 0 and tables != {"schema_version"}) or (version > 0 and missing):
        why = f"it has no {', '.join(missing)} table" if version else f"it holds tables {_names(tables)}"
        raise ConfigError(foreign(label, why))
    return version


def _insert(c: sqlite3.Connection, table: str, cols: list[str], values: Sequence[Any]) -> int:
    """One row of ``values`` into ``table``'s ``cols``; its rowid."""
    return int(c.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         tuple(values)).lastrowid)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def merge(inputs: list[str | Path], out: str | Path) -> dict[str, int]:
    """Combine databases into a new file ``out`` (never replaced). A point present in several inputs
    (same run and point key) is kept once. Returns counts of what was copied and what was duplicate.

    The inputs are only read. ``out`` is built as a temp file beside it and linked into place when complete;
    any way out (an error, Ctrl-C, or SIGTERM/SIGHUP under ``interrupts.signals_raise``) removes the temp file
    and its -wal and -shm, so a failed merge leaves nothing behind."""
    check_named(out, "--out", "results/merged.db")  # before Path(): '' would be '.', "already exists"
    out = Path(out)
    label = f"--out {out}"
    _check_merge_paths(inputs, out, label)
    for src_path in inputs:  # every input refused now (not a store, damaged, newer), before any copying
        Store(src_path, create=False, check=False).close()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"{label}: cannot write there ({os_reason(e)}); choose another path") from None
    os.close(fd)
    os.unlink(tmp)
    counts = {"runs": 0, "points": 0, "duplicate_points": 0, "models": 0, "windows": 0}
    try:
        _merge_into(inputs, tmp, label, counts)
        _publish(tmp, out, label)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.lexists(tmp + suffix):
                os.unlink(tmp + suffix)
    return counts


def _check_merge_paths(inputs: list[str | Path], out: Path, label: str) -> None:
    """``out`` must be a new file the OS accepts the name of, and none of the inputs; no path empty."""
    for p in inputs:
        check_named(p, "--db", "results/moe-energy.db")
    check_new_file(out, label, "merge writes a new file, choose another name")
    for p in inputs:
        if Path(p).resolve() == out.resolve():
            raise ConfigError(f"{label} is also an input; choose another name")


def _merge_into(inputs: list[str | Path], tmp: str, label: str, counts: dict[str, int]) -> None:
    """Copy every input into the new database ``tmp``; an error names the file it is about."""
    dst = Store(tmp, label=label)
    try:
        for src_path in inputs:
            src = Store(src_path, create=False)
            try:
                _copy_into(src, dst, counts)
            except sqlite3.DatabaseError as e:
                text = one_line(e)
                mine = "disk is full" in text or "readonly" in text or "read-only" in text
                raise ConfigError(damaged(tmp, e, label) if mine else damaged(src_path, e)) from None
            finally:
                src.close()
        try:
            dst.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            raise ConfigError(damaged(tmp, e, label)) from None
    finally:
        dst.close()


def _publish(tmp: str, out: Path, label: str) -> None:
    """Put the finished ``tmp`` at ``out``, never over a file someone created meanwhile."""
    try:
        placed = link_new(tmp, out)
    except OSError as e:
        raise ConfigError(f"{label}: cannot write it ({os_reason(e)}); choose another path") from None
    if not placed:
        raise ConfigError(f"{label} appeared while merging; choose another name")


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
            pid = _insert(c, "points", pcols, [p[k] for k in pcols])
            counts["points"] += 1
            for m in src.con.execute("SELECT * FROM models WHERE point_id = ? ORDER BY ordinal", (p["id"],)).fetchall():
                mid = _insert(c, "models", ["point_id", *mcols], [pid, *[m[k] for k in mcols]])
                counts["models"] += 1
                for w in src.con.execute("SELECT * FROM windows WHERE model_id = ? ORDER BY ordinal",
                                         (m["id"],)).fetchall():
                    wid = _insert(c, "windows", ["model_id", *wcols], [mid, *[w[k] for k in wcols]])
                    counts["windows"] += 1
                    for t in src.con.execute("SELECT * FROM traces WHERE window_id = ? ORDER BY id",
                                             (w["id"],)).fetchall():
                        _insert(c, "traces", ["window_id", *tcols], [wid, *[t[k] for k in tcols]])
