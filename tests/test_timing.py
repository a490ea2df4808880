"""The one timing loop: round structure, interleaving, medians and bests, and failing candidates.

A fake clock stands in for the host's: each candidate advances it by a set number of ms per call, so every
figure is exact and nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import pytest

from moe_energy.measure.timing import Timings, rotation, time_interleaved, time_one


class FakeClock:
    """A clock that only moves when a candidate says so; it logs every call and sync in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def sync(self) -> None:
        self.log.append("sync")

    def candidate(self, name: str, ms: list[float] | float):
        """A callable that logs its name and advances the clock by its next cost (the last one repeats)."""
        costs = list(ms) if isinstance(ms, list) else [ms]

        def fn() -> None:
            self.log.append(name)
            self.now += (costs.pop(0) if len(costs) > 1 else costs[0]) / 1e3

        return fn

    def calls(self) -> list[str]:
        return [e for e in self.log if e != "sync"]


def test_timings_median_and_best():
    t = Timings((3.0, 1.0, 2.0, 10.0))
    assert t.median_ms == 2.5 and t.best_ms == 1.0 and t.samples_ms == (3.0, 1.0, 2.0, 10.0)


def test_each_round_runs_every_candidate_once_in_rotated_order():
    c = FakeClock()
    got = time_interleaved({n: c.candidate(n, 1.0) for n in "abc"}, sync=c.sync, min_rounds=4, clock=c)
    warmup, rounds = c.calls()[:3], c.calls()[3:]
    assert warmup == ["a", "b", "c"]  # one untimed call each, in the given order
    assert rounds == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(got[n].samples_ms) == 4 for n in "abc")
    assert c.calls().count("a") == 1 + 4  # warm-up + rounds


def test_rotation_gives_each_candidate_each_place():
    assert [rotation([1, 2, 3], r) for r in range(4)] == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]
    assert rotation([], 3) == []


def test_every_timed_call_is_synced_at_both_ends():
    c = FakeClock()
    time_interleaved({"a": c.candidate("a", 1.0), "b": c.candidate("b", 1.0)}, sync=c.sync, min_rounds=2,
                     clock=c)
    timed = c.log[4:]  # after the warm-up: a, sync, b, sync
    assert c.log[:4] == ["a", "sync", "b", "sync"]
    assert timed == ["sync", "a", "sync", "sync", "b", "sync"] + ["sync", "b", "sync", "sync", "a", "sync"]


def test_samples_are_the_ms_each_call_took_and_exclude_the_warm_up():
    c = FakeClock()
    got = time_interleaved({"slow": c.candidate("slow", [100.0, 5.0, 3.0, 4.0]), "fast": c.candidate("fast", 1.0)},
                           min_rounds=3, clock=c)
    assert got["slow"].samples_ms == pytest.approx((5.0, 3.0, 4.0))  # the 100 ms warm-up is not a sample
    assert got["slow"].median_ms == pytest.approx(4.0) and got["slow"].best_ms == pytest.approx(3.0)
    assert got["fast"].samples_ms == pytest.approx((1.0, 1.0, 1.0))


def test_rounds_go_on_until_the_budget_is_spent_within_the_bounds():
    c = FakeClock()
    got = time_interleaved({"a": c.candidate("a", 10.0)}, min_rounds=2, budget_s=0.055, clock=c)
    assert len(got["a"].samples_ms) == 6  # 6 rounds of 10 ms: the first to pass 55 ms
    capped = time_interleaved({"a": c.candidate("a", 10.0)}, min_rounds=2, max_rounds=3, budget_s=1.0, clock=c)
    assert len(capped["a"].samples_ms) == 3
    floor = time_interleaved({"a": c.candidate("a", 10.0)}, min_rounds=4, budget_s=0.0, clock=c)
    assert len(floor["a"].samples_ms) == 4


def test_warmup_count_is_the_callers_choice():
    c = FakeClock()
    time_interleaved({"a": c.candidate("a", 1.0)}, min_rounds=2, warmup=0, clock=c)
    assert c.calls() == ["a", "a"]
    c = FakeClock()
    time_interleaved({"a": c.candidate("a", 1.0)}, min_rounds=2, warmup=3, clock=c)
    assert c.calls() == ["a"] * 5


def broken(msg: str = "no kernel for this dtype"):
    def fn() -> None:
        raise RuntimeError(msg)

    return fn


def test_failing_candidate_is_recorded_and_dropped_when_errors_are_kept():
    c = FakeClock()
    errors: dict[str, str] = {}
    got = time_interleaved({"bad": broken(), "ok": c.candidate("ok", 2.0)}, min_rounds=3, errors=errors, clock=c)
    assert set(got) == {"ok"} and len(got["ok"].samples_ms) == 3
    assert errors == {"bad": "RuntimeError: no kernel for this dtype"}


def test_candidate_failing_in_a_later_round_is_dropped_too():
    c = FakeClock()
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("out of memory\nmore detail")

    errors: dict[str, str] = {}
    got = time_interleaved({"flaky": flaky, "ok": c.candidate("ok", 1.0)}, min_rounds=4, errors=errors, clock=c)
    assert set(got) == {"ok"} and len(got["ok"].samples_ms) == 4
    assert errors == {"flaky": "ValueError: out of memory"}


def test_all_failing_gives_no_timings_and_every_reason():
    errors: dict[str, str] = {}
    assert time_interleaved({"x": broken("a"), "y": broken("b")}, errors=errors) == {}
    assert errors == {"x": "RuntimeError: a", "y": "RuntimeError: b"}


def test_errors_propagate_unless_the_caller_keeps_them():
    with pytest.raises(RuntimeError, match="no kernel"):
        time_interleaved({"bad": broken()})
    with pytest.raises(RuntimeError, match="no kernel"):
        time_one(broken())


def test_single_candidate_is_the_same_loop():
    c = FakeClock()
    t = time_one(c.candidate("a", [9.0, 4.0, 2.0, 6.0]), sync=c.sync, min_rounds=3, max_rounds=3, clock=c)
    assert t.samples_ms == pytest.approx((4.0, 2.0, 6.0)) and t.best_ms == pytest.approx(2.0)
    assert c.calls() == ["a"] * 4 and c.log.count("sync") == 1 + 2 * 3


@pytest.mark.parametrize(("kw", "msg"), [({"min_rounds": 0}, "min_rounds"), ({"min_rounds": 5, "max_rounds": 2},
                                                                            "max_rounds")])
def test_bad_round_bounds_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        time_one(lambda: None, **kw)


def test_real_clock_gives_positive_samples():
    t = time_one(lambda: sum(range(1000)), min_rounds=3)
    assert len(t.samples_ms) == 3 and all(ms >= 0 for ms in t.samples_ms)
