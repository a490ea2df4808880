"""The versioned JSON results document: written atomically, never over an existing file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import ConfigError

SCHEMA = "moe-energy/run"
SCHEMA_VERSION = 1


def _clean(v: Any) -> Any:
    """JSON has no inf/NaN: a non-finite float becomes null rather than an invalid document."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def new_document(spec: dict, options: dict, environment: dict, dataset: dict) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec,
        "options": options,
        "environment": environment,
        "dataset": dataset,
        "models": [],
    }


def check_writable(out_dir: str | Path) -> Path:
    """Fail before any work if results could not be saved (read-only dir, not a directory, full disk)."""
    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".probe-", delete=True) as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        msg = f"--out {d}: cannot write results there ({e.strerror}); choose a writable directory"
        raise ConfigError(msg) from None
    return d


def write_atomic(doc: dict, out_dir: str | Path, stem: str) -> Path:
    """Write ``doc`` as ``stem.json`` (or ``stem-N.json`` if taken) via a temp file and a rename."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(doc), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        n = 0
        while True:
            path = d / (f"{stem}.json" if n == 0 else f"{stem}-{n}.json")
            try:
                os.link(tmp, path)  # fails if the name exists: never replaces a result
                break
            except FileExistsError:
                n += 1
            except OSError:  # filesystems without hard links: exclusive create, then rename over it
                try:
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    n += 1
                    continue
                os.replace(tmp, path)
                return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ConfigError(f"{path}: not a moe-energy run document")
    if doc.get("schema_version", 0) > SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: schema version {doc['schema_version']} is newer than this tool's {SCHEMA_VERSION}; "
            "upgrade moe-energy"
        )
    return doc
