"""Writing files so that a reader never sees half of one: a temp file in the same folder, fsynced, then
linked or renamed into place; and the one UTC timestamp every document carries."""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, one_line


def now_utc() -> str:
    """The current UTC time to the second, ISO 8601: every document's and window's timestamp."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def os_reason(e: OSError) -> str:
    """Why the OS refused a path, in its own words ('File name too long'), with what they mean here where
    they are cryptic; never empty."""
    why = e.strerror or one_line(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return why + ": the disk (or quota) is full"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return why + ": the path, or a part of it, is a file, not a directory"
    return why


def check_named(text: str | Path | None, label: str, example: str) -> None:
    """A path given empty or blank (an unset shell variable: ``--out "$DIR"``) is a one-line ConfigError, never read
    as the current folder (``Path("")`` is ``.``) or as the flag's default; None (not given) passes."""
    if text is not None and not str(text).strip():
        raise ConfigError(f"{label} {str(text)!r} is an empty path; give one such as {example}")


def path_exists(path: Path, label: str) -> bool:
    """Whether ``path`` exists; a name the OS refuses (too long, under a file) is a one-line ConfigError."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ConfigError(f"{label}: cannot use this path ({os_reason(e)}); choose another") from None
    return True


def check_new_file(path: Path, label: str, exists: str) -> None:
    """``path`` must be a name the OS accepts and not an existing file: refused before any work is done."""
    if path_exists(path, label):
        raise ConfigError(f"{label} already exists; {exists}")


def json_safe(v: Any) -> Any:
    """JSON has no inf/NaN: a non-finite float becomes null (and keys strings) rather than an invalid document."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_with(d: Path, prefix: str, data: bytes) -> str:
    """A temp file in ``d`` holding ``data``, fsynced, with the mode a plain ``open`` would give it."""
    fd, tmp = tempfile.mkstemp(dir=d, prefix=prefix, suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are for sharing like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def replace_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, replacing what is there (a cache, a report being redrawn) all at once."""
    p = Path(path)
    tmp = _temp_with(p.parent, f".{p.name}-", data)
    try:
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def link_new(tmp: str | Path, path: Path) -> bool:
    """Put the finished file ``tmp`` at ``path``, or False when a file is there already: never over one. A hard
    link; on a filesystem without them, the name claimed exclusively, then ``tmp`` renamed over it (the empty
    placeholder removed again if that fails)."""
    try:
        os.link(tmp, path)  # fails if the name exists: never replaces a result
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(path)
        raise
    return True


def create_atomic(d: str | Path, name: Callable[[int], str], data: bytes) -> Path:
    """Write ``data`` under the first free name ``name(0)``, ``name(1)``, ... in ``d``: never over a file."""
    d = Path(d)
    tmp = _temp_with(d, f".{name(0)}-", data)
    try:
        n = 0
        while not link_new(tmp, d / name(n)):
            n += 1
        return d / name(n)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
