"""The one timing loop: interleaved rounds over named candidates, each call synced at both ends.

Each round runs every candidate once, starting one further along the list each round, so drift and
background load land on all candidates alike and none always runs first after another. Each candidate
gets untimed warm-up calls first (allocator, kernel selection, lazy init). Only the host clock is read:
nothing here copies a tensor to the host.

Callers take the median of a candidate's rounds (a typical figure) or its best (least) round (noise from
other work only ever adds time). A single candidate is the same loop with one entry (``time_one``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import described

K = TypeVar("K", bound=Hashable)
Clock = Callable[[], float]


@dataclass(frozen=True)
class Timings:
    """One candidate's timed rounds, in ms per call, in the order they ran."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def best_ms(self) -> float:
        return min(self.samples_ms)


def _no_sync() -> None:
    pass


def rotation(names: list[K], rnd: int) -> list[K]:
    """The order of round ``rnd``: the list rotated by ``rnd``, so each candidate takes each place in turn."""
    if not names:
        return []
    k = rnd % len(names)
    return names[k:] + names[:k]


def time_interleaved(
    candidates: Mapping[K, Callable[[], object]],
    *,
    sync: Callable[[], None] = _no_sync,
    min_rounds: int = 5,
    max_rounds: int | None = None,
    budget_s: float = 0.0,
    warmup: int = 1,
    errors: dict[K, str] | None = None,
    clock: Clock = time.perf_counter,
    max_s: float | None = None,
    prune: float | None = None,
) -> dict[K, Timings]:
    """Time every candidate in interleaved rounds until ``budget_s`` has passed after the warm-up (at least
    ``min_rounds``, at most ``max_rounds``); ``sync`` (the device's) runs before and after each timed call.

    ``max_s`` ends the rounds once they took that long, ``min_rounds`` or not (one round at least: calls of
    seconds each need few rounds to tell apart); ``prune`` drops, after each round, a candidate whose best
    call is over ``prune`` times the fastest best (it cannot win; each of its calls only costs time). A pruned
    candidate's timings are still returned, with the rounds it ran.

    A candidate that raises propagates the error, unless ``errors`` is given: then it is dropped from the
    result (warm-up or any round) and ``errors[name]`` says why, in one line ("RuntimeError: ..."), e.g. a
    strategy with no kernel for this device. Returns the timings of each candidate that never failed.
    """
    if min_rounds < 1:
        raise ValueError(f"min_rounds={min_rounds}: at least one timed round is needed")
    if max_rounds is not None and max_rounds < min_rounds:
        raise ValueError(f"max_rounds={max_rounds} is below min_rounds={min_rounds}")
    samples: dict[K, list[float]] = {}
    for name, fn in candidates.items():
        if _run(name, fn, warmup, sync, errors):
            samples[name] = []
    t_start = clock()
    rnd = 0
    racing = list(samples)
    while racing and (max_rounds is None or rnd < max_rounds):
        for name in rotation(racing, rnd):
            sync()
            t0 = clock()
            if _run(name, candidates[name], 1, sync, errors):
                samples[name].append((clock() - t0) * 1e3)
            else:
                del samples[name]
        racing = [n for n in racing if n in samples]
        if prune is not None and racing:
            fastest = min(min(samples[n]) for n in racing)
            racing = [n for n in racing if min(samples[n]) <= prune * fastest]
        rnd += 1
        elapsed = clock() - t_start
        if (rnd >= min_rounds and elapsed >= budget_s) or (max_s is not None and elapsed >= max_s):
            break
    return {name: Timings(tuple(ms)) for name, ms in samples.items()}


def _run(name: K, fn: Callable[[], object], calls: int, sync: Callable[[], None], errors: dict[K, str] | None) -> bool:
    """Call ``fn`` ``calls`` times, then sync; False (reason in ``errors``) if it raised and errors are kept."""
    try:
        for _ in range(calls):
            fn()
        sync()
    except Exception as e:
        if errors is None:
            raise
        errors[name] = described(e, 200)
        return False
    return True


def time_one(fn: Callable[[], object], **options: Any) -> Timings:
    """``time_interleaved`` with a single candidate and its keyword options (but not ``errors``: a failure
    of the only candidate propagates, there is nothing else to time)."""
    return time_interleaved({0: fn}, **options)[0]
