"""The project's error types, one of each kind, and the one way to turn an exception into one line.

``ConfigError`` is the user's mistake (the CLI prints it and exits 2); ``Unavailable`` is hardware or a
library that cannot be used here (a meter falls back or says why); ``PeerLost`` is another rank of a
distributed job gone (not the user's mistake: its own exit code).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any


class ConfigError(ValueError):
    """A mistake in the user's input; its message is one line saying what is wrong and how to fix it."""


def check_choice(flag: str, value: Any, choices: Collection[str]) -> None:
    """A one-line ConfigError naming the choices when ``value`` is none of them."""
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is unknown; choose from {', '.join(choices)}")


class Unavailable(RuntimeError):
    """An energy source (or other hardware path) cannot be used here; the message is one line saying why.

    ``kind`` says what kind of why: "absent" (no such hardware or library), "no permission", "unreadable".
    """

    def __init__(self, message: str, kind: str = "absent") -> None:
        super().__init__(message)
        self.kind = kind


class PeerLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout or became unreachable."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit`` chars.

    A leading ``[file:line]`` tag (gloo's source prefix) is dropped: it names our dependency's source, not
    the problem.
    """
    text = str(e).strip()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]) if text else type(e).__name__
    return line[:limit] if limit is not None else line


def described(e: BaseException, limit: int | None = None) -> str:
    """``Type: first line``: an unexpected failure told with its kind, where the kind is the news."""
    return f"{type(e).__name__}: {one_line(e, limit)}"


def kind_of(v: Any) -> str:
    """'an int', 'a str', 'None': what a wrong argument was, for a message."""
    if v is None:
        return "None"
    name = type(v).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
