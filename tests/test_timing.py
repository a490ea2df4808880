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


# -- the window's warm-up and latency pass: how many forwards, by the fake clock ----------------------------
@pytest.fixture
def window_clock(monkeypatch):
    import time
    from types import SimpleNamespace

    from moe_energy.energy import meter
    from moe_energy.measure import window

    clock = FakeClock()
    monkeypatch.setattr(window, "time", SimpleNamespace(perf_counter=clock))
    # the window's seconds are its meter's (one window, one clock): the meter reads the same fake clock
    monkeypatch.setattr(meter, "time", SimpleNamespace(**{**vars(time), "perf_counter": clock}))
    return clock


@pytest.mark.parametrize("ms, seconds, calls", [(1.0, 0.5, 500), (300.0, 0.5, 2), (5000.0, 0.5, 1),
                                                (5000.0, 0.0, 3)])
def test_warm_up_fills_its_seconds_with_one_call_at_least_or_makes_a_fixed_count(window_clock, ms, seconds, calls):
    from moe_energy.measure.window import warm_up

    warm_up(window_clock.candidate("f", ms), window_clock.sync, seconds)
    assert len(window_clock.calls()) == calls


@pytest.mark.parametrize("ms, budget, at_least, at_most, calls", [
    (1.0, 0.2, 10, 200, 200),  # fast forwards: the budget, capped at at_most
    (30.0, 0.2, 10, 200, 10),  # ten of them fit in 2 x the budget
    (150.0, 0.2, 10, 200, 3),  # a 2 x budget (0.4 s) stretch holds three
    (5000.0, 0.2, 10, 200, 1),  # a prefill chunk of seconds: one
    (5000.0, 0.0, 7, 7, 7),  # expert parallelism: a fixed count whatever it costs
])
def test_latency_pass_counts(window_clock, ms, budget, at_least, at_most, calls):
    from moe_energy.measure.window import latency_pass

    lat = latency_pass(window_clock.candidate("f", ms), window_clock.sync, budget, at_least, at_most)
    assert len(lat) == calls and lat == [pytest.approx(ms)] * calls


@pytest.mark.parametrize("ms, calls, batches, latencies", [
    (5000.0, 2, 1, 1),  # a call of 5 s: its warm-up call and the window's one call, which is its latency sample too
    (300.0, 7, 4, 1),  # 0.3 s calls: 2 to warm up, 4 in the window (not one call's latency), 1 timed after
])
def test_a_one_call_window_is_its_own_latency_sample(window_clock, ms, calls, batches, latencies):
    from moe_energy.energy.meter import NullMeter
    from moe_energy.measure.window import measure

    res = measure(window_clock.candidate("f", ms), (), 1.0, NullMeter(), None, warmup=0.5, sync=window_clock.sync,
                  batch_size=1)
    assert len(window_clock.calls()) == calls and res.batches == batches
    assert res.latency_ms == [pytest.approx(ms)] * latencies


@pytest.mark.parametrize("warmup, last, want", [(0.5, None, 0.5), (0.5, 54.0, None), (0.5, 0.1, 0.5), (0.0, 54.0, 0.0)])
def test_a_window_after_one_whose_call_outlasted_the_warm_up_takes_none(warmup, last, want):
    from moe_energy.measure.window import warm_up_for

    assert warm_up_for(warmup, last) == want


def test_no_warm_up_is_no_warm_up_call(window_clock):
    from moe_energy.energy.meter import NullMeter
    from moe_energy.measure.window import measure

    res = measure(window_clock.candidate("f", 5000.0), (), 1.0, NullMeter(), None, warmup=None,
                  sync=window_clock.sync, batch_size=1)
    assert len(window_clock.calls()) == 1 and res.batches == 1 and res.latency_ms == [pytest.approx(5000.0)]


def test_the_api_warms_a_slow_model_once_over_its_windows():
    """Calls of 30 ms against a 10 ms warm-up and 10 ms windows: the first window's warm-up call, then one call a
    window (each its own latency sample): 4 calls for 3 windows, where every window warming up made 6."""
    import time

    from moe_energy.api import WindowPlan, _windows
    from moe_energy.energy.meter import NullMeter

    calls = []
    how = WindowPlan(duration=0.01, repeats=3, warmup=0.01, cooldown=0.0, meter=NullMeter(), sync=lambda: None,
                     idle=None)
    windows = _windows(lambda: (calls.append(1), time.sleep(0.03)), (), how, None, 1)
    assert len(calls) == 4 and [w["batches"] for w in windows] == [1, 1, 1]


def test_prune_stops_calling_a_candidate_that_cannot_win():
    c = FakeClock()
    fns = {"fast": c.candidate("fast", 10.0), "close": c.candidate("close", 12.0), "slow": c.candidate("slow", 40.0)}
    t = time_interleaved(fns, sync=c.sync, min_rounds=4, clock=c, prune=3.0)
    calls = c.calls()
    assert calls.count("slow") == 2  # its warm-up and the first round: 40 > 3 x 10
    assert calls.count("fast") == calls.count("close") == 5
    assert t["slow"].samples_ms == (pytest.approx(40.0),) and len(t["fast"].samples_ms) == 4
    assert min(t, key=lambda n: t[n].best_ms) == "fast"


def test_max_s_ends_long_rounds_before_min_rounds_but_runs_one():
    c = FakeClock()
    fns = {"a": c.candidate("a", 3000.0), "b": c.candidate("b", 2000.0)}
    t = time_interleaved(fns, sync=c.sync, min_rounds=5, clock=c, max_s=4.0)
    assert [len(x.samples_ms) for x in t.values()] == [1, 1]  # one round took 5 s > 4 s
    c2 = FakeClock()
    t2 = time_interleaved({"a": c2.candidate("a", 3000.0)}, sync=c2.sync, min_rounds=5, clock=c2, max_s=7.0)
    assert len(t2["a"].samples_ms) == 3  # 3 s, 6 s, 9 s: the round that passed 7 s is the last
