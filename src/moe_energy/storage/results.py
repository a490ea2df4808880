"""The versioned JSON results document: written atomically, never over an existing file."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError
from .fileio import check_named, create_atomic, json_safe, now_utc, os_reason

SCHEMA = "moe-energy/run"
SCHEMA_VERSION = 1


def new_document(spec: dict, options: dict, environment: dict, dataset: dict) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": now_utc(),
        "spec": spec,
        "options": options,
        "environment": environment,
        "dataset": dataset,
        "models": [],
    }


# The probe writes this much: a results document with traces is hundreds of kB, so a disk that cannot take
# 1 MiB now would fail the write at the end of the run.
PROBE_BYTES = 2**20


def probe_write(d: Path, what: str) -> None:
    """Create, fill, fsync and delete a file of PROBE_BYTES in ``d``; ConfigError naming ``what`` if it fails.

    Every refusal of the OS is one line with its reason: a full disk, a file where a directory should be, a
    name longer than the file system allows, no permission, a path under /proc.
    """
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".probe-", delete=True) as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"{what}: cannot write there ({os_reason(e)}); {_fix(e)}") from None
    except ValueError as e:  # a NUL byte in the path (from a --config file): no OS call takes it
        raise ConfigError(f"{what}: cannot write there ({e}); choose a writable directory") from None


def _fix(e: OSError) -> str:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return "free space or choose a writable directory" if full else "choose a writable directory"


def check_writable(out_dir: str | Path) -> Path:
    """Fail before any work if results could not be saved (read-only dir, not a directory, full disk)."""
    check_named(out_dir, "--out", "results")
    d = Path(out_dir)
    try:
        probe_write(d, f"--out {d}")
    except ConfigError as e:
        msg = str(e).replace("cannot write there", "cannot write results there")
        raise ConfigError(msg) from None
    return d


class NotSaved(OSError):
    """The results could not be written where asked; ``rescue`` is where they went instead (or None)."""

    def __init__(self, message: str, doc: dict, rescue: Path | None) -> None:
        super().__init__(message)
        self.doc, self.rescue = doc, rescue


def save_or_rescue(doc: dict, out_dir: str | Path, stem: str) -> Path:
    """``write_atomic``; if that fails (disk filled during the run), write to the temp dir and raise NotSaved."""
    try:
        return write_atomic(doc, out_dir, stem)
    except OSError as e:
        rescue: Path | None
        try:
            rescue = write_atomic(doc, Path(tempfile.gettempdir()) / "moe-energy-rescue", stem)
        except OSError:
            rescue = None
        where = f"saved to {rescue} instead" if rescue else "and not to the temp directory either"
        raise NotSaved(f"--out {out_dir}: could not write the results ({os_reason(e)}); {where}", doc,
                       rescue) from None


def stamp(doc: dict) -> str:
    """The document's creation time as a file-name part, e.g. 20261128T2130."""
    return doc["created_utc"].replace(":", "").replace("-", "")[:15]


def run_stem(doc: dict, preset: str | None, suffix: str = "") -> str:
    """File stem of a run's results: creation time, preset (or 'custom'), e.g. run-20261128T2130-small."""
    return f"run-{stamp(doc)}-{preset or 'custom'}{suffix}"


def write_atomic(doc: dict, out_dir: str | Path, stem: str) -> Path:
    """Write ``doc`` as ``stem.json`` (or ``stem-N.json`` if taken) via a temp file and a link."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(doc), indent=2, allow_nan=False)
    return create_atomic(d, lambda n: f"{stem}.json" if n == 0 else f"{stem}-{n}.json", text.encode())


def read(path: str | Path) -> dict:
    """A run document written by this or an older version of the tool; a newer schema is refused."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror}); give a moe-energy results file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not a JSON results document ({type(e).__name__}); it may be truncated") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise ConfigError(f"{p}: not a moe-energy run document (schema {found!r}, expected {SCHEMA!r})")
    version = doc.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(f"{p}: schema_version={version!r} is not a version number; the file is damaged")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{p}: schema version {version} is newer than this tool's {SCHEMA_VERSION}; upgrade moe-energy"
        )
    if not isinstance(doc.get("models", []), list):
        raise ConfigError(f"{p}: 'models' is not a list; the file is damaged")
    return doc
