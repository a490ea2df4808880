"""Crossover math on constructed data with known answers; estimate vs measured never compared silently."""

import math
from dataclasses import replace

import pytest

from moe_energy.report.analysis import Pair, crossing, crossover, pareto_front, sparsity, value


def rec(v, lo=None, hi=None, method="counter", acc=0.9, ips=None, diverged=False):
    """A model record as the runner writes it (only the fields the analysis reads)."""
    return {"inferences_per_joule": v, "inferences_per_joule_min": lo, "inferences_per_joule_max": hi,
            "inferences_per_second": ips if ips is not None else v, "energy_method": method, "accuracy": acc,
            "diverged": diverged}


def pairs(moe, dense, params=(1e6, 1e8), **kw):
    return [Pair(int(p), rec(m, **kw), rec(d, **kw)) for p, m, d in zip(params, moe, dense)]


def test_crossing_is_log_linear_between_neighbours():
    # d = -1 at 1e6 and +1 at 1e8: half way in log10(params) is exactly 1e7
    assert crossing([1e6, 1e8], [-1.0, 1.0]) == ("crossed", pytest.approx(1e7, rel=1e-12))
    # d = -1, +3: a quarter of the way: 10 ** (6 + 0.5)
    status, x = crossing([1e6, 1e8], [-1.0, 3.0])
    assert status == "crossed" and math.isclose(x, 10**6.5, rel_tol=1e-12)
    assert crossing([1e6, 1e8], [2.0, 3.0]) == ("below_grid", 1e6)
    assert crossing([1e6, 1e8], [-2.0, -0.1]) == ("not_reached", None)
    # the first upward crossing counts, not a later one
    status, x = crossing([1e6, 1e7, 1e8, 1e9], [-1.0, 1.0, -1.0, 1.0])
    assert status == "crossed" and math.isclose(x, 10**6.5, rel_tol=1e-12)


R2 = math.sqrt(2)


def test_crossover_exact_value_and_interval_from_spread():
    # MoE 1 -> 4 inferences/J, dense flat at 2: log(MoE/dense) = -log 2, +log 2 -> exactly half way, 1e7.
    # Spread x/÷ sqrt(2) on MoE only: best case log ratios -0.5 log 2, 1.5 log 2 -> a quarter of the way,
    # 10**6.5; worst case -1.5 log 2, 0.5 log 2 -> three quarters, 10**7.5
    ps = [Pair(10**6, rec(1.0, 1 / R2, R2), rec(2.0, 2.0, 2.0)), Pair(10**8, rec(4.0, 4 / R2, 4 * R2), rec(2.0))]
    c = crossover(ps, "inferences_per_joule", (128, "float32", "grouped", "4", None))
    assert c.status == "crossed"
    assert math.isclose(c.params, 1e7, rel_tol=1e-12)
    assert math.isclose(c.low, 10**6.5, rel_tol=1e-12)
    assert math.isclose(c.high, 10**7.5, rel_tol=1e-12)
    assert c.energy == "measured" and c.n_points == 2
    assert (c.batch_size, c.dtype, c.strategy, c.ek) == (128, "float32", "grouped", "4")
    assert "10,000,000" in c.answer() and "3,162,278" in c.answer() and "31,622,777" in c.answer()


def test_crossover_worst_case_beyond_grid_and_no_spread():
    ps = [Pair(10**6, rec(1.0, 0.5, 1.5), rec(2.0)), Pair(10**8, rec(4.0, 1.0, 5.0), rec(2.0))]
    c = crossover(ps, "inferences_per_joule")
    assert math.isclose(c.params, 1e7, rel_tol=1e-12)
    assert c.high is None and c.high_status == "not_reached"
    assert "beyond 100,000,000" in c.answer()
    # no spread fields: the interval collapses to the point
    c2 = crossover(pairs([1.0, 4.0], [2.0, 2.0]), "inferences_per_joule")
    assert c2.low == pytest.approx(1e7) and c2.high == pytest.approx(1e7)
    # a best case already ahead at the smallest point is an open lower end, and says so
    c3 = crossover([Pair(10**6, rec(1.0, 0.5, 3.0), rec(2.0)), Pair(10**8, rec(4.0), rec(2.0))], "inferences_per_joule")
    assert c3.low_status == "below_grid" and "interval at or below 1,000,000 to" in c3.answer()


def test_estimate_is_never_compared_with_measured():
    ps = [Pair(10**6, rec(1.0, method="estimate"), rec(2.0, method="counter")),
          Pair(10**7, rec(1.0, method="counter"), rec(2.0, method="counter")),
          Pair(10**8, rec(4.0, method="counter"), rec(2.0, method="counter"))]
    c = crossover(ps, "inferences_per_joule")
    assert c.n_points == 2  # the mixed pair is left out ...
    assert any("estimated energy figure is not compared with a measured one" in n for n in c.notes)  # ... and said
    assert math.isclose(c.params, 10**7.5, rel_tol=1e-12)  # half way between 1e7 and 1e8
    # speed is not an energy figure: the mixed pair counts there
    assert crossover(ps, "inferences_per_second").n_points == 3


def test_all_estimates_are_labelled_and_unmeasured_energy_is_not_measured():
    c = crossover(pairs([1.0, 4.0], [2.0, 2.0], method="estimate"), "inferences_per_joule")
    assert c.energy == "estimate" and any("estimate" in n for n in c.notes)
    none = crossover(pairs([None, None], [None, None], method="none", ips=5.0), "inferences_per_joule")
    assert none.status == "not_measured" and none.answer() == "not measured"
    # inferences/s still answers when energy was not measured
    speed = crossover([Pair(10**6, rec(None, method="none", ips=1.0), rec(None, method="none", ips=2.0)),
                       Pair(10**8, rec(None, method="none", ips=4.0), rec(None, method="none", ips=2.0))],
                      "inferences_per_second")
    assert speed.status == "crossed" and math.isclose(speed.params, 1e7, rel_tol=1e-12)


def test_correct_per_joule_weighs_accuracy():
    # MoE is more efficient per joule but far less accurate: per correct answer it never wins
    ps = [Pair(10**6, rec(3.0, acc=0.2), rec(2.0, acc=0.9)), Pair(10**8, rec(4.0, acc=0.3), rec(2.0, acc=0.9))]
    assert crossover(ps, "inferences_per_joule").status == "below_grid"
    c = crossover(ps, "correct_per_joule")
    assert c.status == "not_reached" and c.max_params == 1e8
    assert value(ps[0].moe, "correct_per_joule") == pytest.approx(0.6)


def test_notes_when_moe_falls_behind_again_and_equal_sizes_are_averaged():
    c = crossover(pairs([1.0, 4.0, 1.0], [2.0, 2.0, 2.0], params=(1e6, 1e7, 1e8)), "inferences_per_joule")
    assert c.status == "crossed" and any("falls behind again at 100,000,000" in n for n in c.notes)
    # two shapes of equal total size: log ratios (log 1/2 + log 1/8) / 2 = -2 log 2 at 1e6, +2 log 2 at 1e8
    ps = [Pair(10**6, rec(1.0), rec(2.0)), Pair(10**6, rec(1.0), rec(8.0)), Pair(10**8, rec(8.0), rec(2.0))]
    c2 = crossover(ps, "inferences_per_joule")
    assert math.isclose(c2.params, 1e7, rel_tol=1e-12)
    assert any("averaged" in n for n in c2.notes)
    # the note names the crossover's own axis: along batch it said "share a token count"
    at_batch = [replace(p, x=float(p.params // 10**6)) for p in ps]
    assert "1 point(s) share their sequences per batch with another" in \
        crossover(at_batch, "inferences_per_joule", axis="batch").notes[0]


def test_crossover_sits_where_the_log_log_curves_cross():
    # straight lines in (log10 params, log inferences/J): MoE 1 -> 5, dense 2 -> 3 over 1e6 -> 1e8.
    # They meet where log 1 + s (log 5 - log 1) = log 2 + s (log 3 - log 2), s = log 2 / log(10/3)
    c = crossover(pairs([1.0, 5.0], [2.0, 3.0]), "inferences_per_joule")
    s = math.log(2) / math.log(10 / 3)
    assert c.status == "crossed" and math.isclose(c.params, 10 ** (6 + 2 * s), rel_tol=1e-12)


def test_pareto_front_and_sparsity():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (0.5, 9.0)]
    assert pareto_front(pts) == [4, 0, 1, 3]
    assert sparsity(8, 2) == "4" and sparsity(8, 3) == "2.67" and sparsity(None, 2) == "?"


def test_a_curve_never_runs_from_estimated_points_to_measured_ones():
    # a store holding an estimated pair at 1e6 (MoE 1 vs dense 2) and a measured one at 1e8 (4 vs 2): each pair is
    # alike, but a crossover interpolated between them (1e7, labelled measured) set an estimate against a measurement
    ps = [Pair(10**6, rec(1.0, method="estimate"), rec(2.0, method="estimate")),
          Pair(10**7, rec(1.0), rec(2.0)), Pair(10**8, rec(4.0), rec(2.0))]
    c = crossover(ps, "inferences_per_joule")
    assert c.energy == "measured" and c.n_points == 2 and c.min_params == 10**7
    assert math.isclose(c.params, 10**7.5, rel_tol=1e-12)  # half way between the two measured points
    assert any("1 estimated point(s) left out" in n for n in c.notes)
    # only one measured pair left beside the estimate: MoE ahead there, nothing interpolated across kinds
    c2 = crossover([ps[0], ps[2]], "inferences_per_joule")
    assert (c2.status, c2.n_points, c2.params) == ("below_grid", 1, 10**8)
    # speed is not an energy figure: all three count
    assert crossover(ps, "inferences_per_second").n_points == 3


def test_a_best_case_ahead_at_the_smallest_point_is_said_so_when_the_median_never_leads():
    # median MoE/dense 1/2 and 1/4: not reached; best case 3/2 at the first point, ahead there already. The note said
    # "could lead from ~1,000,000 params", as if interpolated there, and "~1 tokens per forward" on a layer's axis
    ps = [Pair(10**6, rec(1.0, 0.5, 3.0), rec(2.0)), Pair(10**8, rec(1.0), rec(4.0))]
    c = crossover(ps, "inferences_per_joule")
    assert c.status == "not_reached" and c.low_status == "below_grid"
    assert "within the repeats' spread MoE could lead at or below 1,000,000 params" in c.notes
    tokens = [replace(p, x=x) for p, x in zip(ps, (1.0, 16.0))]
    assert "within the repeats' spread MoE could lead at or below 1 token per forward" in \
        crossover(tokens, "inferences_per_joule", axis="tokens").notes
    # a best case that crosses between points keeps its interpolated "~"
    c2 = crossover([Pair(10**6, rec(1.0, 0.5, 1.0), rec(2.0)), Pair(10**8, rec(1.0, 0.5, 8.0), rec(4.0))],
                   "inferences_per_joule")
    assert "within the repeats' spread MoE could lead from ~10,000,000 params" in c2.notes


def test_a_curve_keeps_its_most_exact_method_and_names_the_points_left_out():
    # counter pairs at 1e6 and 1e7 (MoE behind), sampled pairs at 1e8 and 1e9 (MoE ahead), an estimate at 1e10: one
    # curve through them all crossed at ~3.16e7, exactly where the method changes; the counter's curve never crosses
    ps = [Pair(10**6, rec(1.0), rec(4.0)), Pair(10**7, rec(2.0), rec(4.0)),
          Pair(10**8, rec(8.0, method="sampled"), rec(4.0, method="sampled")),
          Pair(10**9, rec(16.0, method="sampled"), rec(4.0, method="sampled")),
          Pair(10**10, rec(32.0, method="estimate"), rec(4.0, method="estimate"))]
    c = crossover(ps, "inferences_per_joule")
    assert (c.status, c.n_points, c.max_params, c.energy) == ("not_reached", 2, 10**7, "measured")
    assert c.notes == ["2 sampled point(s) left out: the others are read from an energy counter, and sampled power "
                       "integrated is less exact (a curve through both could cross only where the method changes)",
                       "1 estimated point(s) left out: the others are measured, and an estimate is not compared with "
                       "a measured figure"]
    # without the counter's points, sampled is the most exact left: it keeps its curve, the estimate still left out
    c2 = crossover(ps[2:], "inferences_per_joule")
    assert (c2.status, c2.n_points, c2.energy) == ("below_grid", 2, "measured") and len(c2.notes) == 1
    # a pair is only as exact as its weaker figure: a sampled dense beside a counter MoE is a sampled pair
    c3 = crossover([ps[0], ps[1], Pair(10**8, rec(8.0), rec(4.0, method="sampled"))], "inferences_per_joule")
    assert c3.n_points == 2 and c3.notes[0].startswith("1 sampled point(s) left out")
    assert crossover(ps, "inferences_per_second").n_points == 5  # speed is no energy figure: every point counts


def test_a_store_merged_from_a_counter_shard_and_a_sampled_shard_gives_one_method_per_curve(tmp_path):
    from test_report import model

    from moe_energy.report.analysis import crossovers, load
    from moe_energy.storage.store import Store, merge

    def shard(db, method, points):
        with Store(db) as s:
            s.new_run(method, {"grid": "custom"}, {"device_name": "GPU"}, {"name": "nvidia", "method": method},
                      grid_name="custom")
            for p, m, d in points:
                cfg = {"label": f"s{p}", "spec": {"experts": 8, "hidden": 64, "layers": 2, "top_k": 2},
                       "options": {"batch_size": 128, "dtype": "float32"}, "total_params": p}
                s.add_point(method, f"k{p}", cfg, "done", document={"models": [
                    model("moe[grouped]", p, m, method), model("dense_total", p + 10, d, method)]})

    shard(tmp_path / "volta.db", "counter", [(10**6, 1.0, 4.0), (10**7, 2.0, 4.0)])
    shard(tmp_path / "pascal.db", "sampled", [(10**8, 8.0, 4.0), (10**9, 16.0, 4.0)])
    merge([tmp_path / "volta.db", tmp_path / "pascal.db"], tmp_path / "all.db")
    with Store(tmp_path / "all.db", create=False) as s:
        [c] = crossovers(load(s), ["inferences_per_joule"])
    assert (c.status, c.n_points, c.min_params, c.max_params) == ("not_reached", 2, 10**6, 10**7)
    assert c.answer() == "not reached up to 10,000,000 params"
    assert [n[:36] for n in c.notes] == ["2 sampled point(s) left out: the oth"]


def test_the_best_cap_is_chosen_within_the_most_exact_method():
    from moe_energy.report.analysis import Frame, best_caps

    def capped(cap, ipj, method):
        return {**rec(ipj, method=method), "name": "moe[grouped]", "label": "s0", "batch_size": 128,
                "dtype": "float32", "power_limit_requested_w": cap}

    # 350 W was measured on sampled power (a merged shard): its 15 inferences/J is not set against the counter's
    frame = Frame(models=[capped(250.0, 10.0, "counter"), capped(300.0, 12.0, "counter"),
                          capped(350.0, 15.0, "sampled"), capped(400.0, 30.0, "estimate")])
    [b] = best_caps(frame)
    assert (b.cap, b.n_caps, b.energy, b.highest["power_limit_requested_w"]) == (300.0, 2, "measured", 300.0)
