"""The report's whole-model section (issue 23): the MoE against its dense siblings per model set, the crossovers
over batch and over context (exact values on constructed records), ML.ENERGY's selection (the lowest J/token
configuration meeting each inter-token deadline) with flagged windows kept out and counted, the time-energy front,
one sub-section of plots per set, `report --itl-deadline-ms`, and a tiny sweep's report rendering in Chromium."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error
from matplotlib.figure import Figure

from moe_energy.cli import main
from moe_energy.report import WHOLE_PLOTS, build
from moe_energy.report.analysis import (
    PHASES,
    Frame,
    as_whole,
    caps,
    load,
    pareto_front,
    reference_cap,
    selections,
    stable,
    time_energy,
    unstable,
    value,
    whole_crossovers,
    whole_sets,
)
from moe_energy.report.html import selection_table, whole_crossover_table, whole_tokens_table
from moe_energy.runner.model import PHASES as RUNNER_PHASES
from moe_energy.storage.store import WHOLE_FAMILY, Store

MOE, BIG, SMALL = "qwen3-30b-a3b", "qwen3-32b", "qwen3-4b"
BATCHES, CONTEXTS = (1, 4, 16), (512, 2048)
# the MoE's decode tokens/J: 0.5, 2, 4 at batch 1, 4, 16 and four times that at context 2048; qwen3-32b's is 1 and
# qwen3-4b's 8 everywhere: along batch the MoE passes qwen3-32b half way between 1 and 4 (log scale, exactly 2) at
# context 512, and from the first batch at 2048; along context at batch 1 half way between 512 and 2048 (1024)
MOE_TPJ = {1: 0.5, 4: 2.0, 16: 4.0}
DENSE_TPJ = {BIG: 1.0, SMALL: 8.0}
ITL_P90 = {MOE: {1: 50.0, 4: 120.0, 16: 300.0}, BIG: {1: 80.0, 4: 200.0, 16: 600.0}, SMALL: {1: 20.0, 4: 40.0,
                                                                                             16: 90.0}}
SHORT = "window of 0.50 s is shorter than 1 s: energy unreliable"
ESTIMATE = "estimate: 10 W TDP (default) x process CPU utilisation, not a measurement"


def record(model: str, phase: str, b: int, c: int, tpj: float, method: str = "counter", flags: tuple = (),
           failed: str | None = None) -> dict:
    """A whole-model record as Whole.record writes it, with the fields the report reads."""
    moe = model == MOE or model.startswith("olmoe")
    decode = phase == "decode"
    itl = ITL_P90.get(model, {}).get(b, 10.0)
    windows = [{"window_s": 2.0, "inferences": 100, "energy_method": method, "flags": list(flags),
                **({"failed": failed} if failed else {})}]
    return {"name": f"{model}@{phase}-B{b}-L{c}", "kind": "moe" if moe else "dense", "strategy": None,
            "params": 30_532_000_000 if moe else 32_800_000_000, "active_params": 3_353_000_000, "dtype": "bfloat16",
            "status": "measured", "repeats": 1, "inferences_per_joule": tpj, "inferences_per_second": 100.0 * tpj,
            "energy_method": method, "energy_is_estimate": method == "estimate", "flags": list(flags),
            "windows": windows, "model": model, "phase": phase, "batch": b, "context": c,
            "tokens_per_call": b * c if phase == "prefill" else b, "layers_measured": 48, "layers_total": 48,
            "moe_impl": "transformers" if moe else None, "tokens_per_second": 100.0 * tpj, "tokens_per_joule": tpj,
            "joules_per_token": 1 / tpj, "ttft_ms": None if decode else 5.0 * b * c / 512,
            "itl_p50_ms": itl / 2 if decode else None, "itl_p90_ms": itl if decode else None,
            "whole_model_extrapolated": None}


def qwen_records() -> list[dict]:
    out = []
    for phase in PHASES:
        for c in CONTEXTS:
            for b in BATCHES:
                k = 4.0 if c == 2048 else 1.0
                flags = (SHORT,) if (phase, b, c) == ("decode", 4, 2048) else ()  # flagged: kept out
                out.append(record(MOE, phase, b, c, MOE_TPJ[b] * k, flags=flags))
                out.append(record(BIG, phase, b, c, DENSE_TPJ[BIG], failed="counter read failed" if
                                  (phase, b, c) == ("decode", 16, 512) else None))
                out.append(record(SMALL, phase, b, c, DENSE_TPJ[SMALL], flags=(ESTIMATE,) if b == 1 else ()))
    return out


def fill(db: Path) -> None:
    """Two model sets: qwen3-30b-a3b against qwen3-32b and qwen3-4b at every phase, batch and context, and
    olmoe-1b-7b against olmo-2-7b at one decode point; one whole-model point skipped for memory."""
    with Store(db) as s:
        s.new_run("w", {"grid": "models"}, {"device_name": "Test GPU", "torch": "2.x"}, {"name": "nvidia",
                                                                                        "method": "counter"})
        sets = {MOE: qwen_records(), "olmoe-1b-7b": [record("olmoe-1b-7b", "decode", 1, 512, 3.0),
                                                     record("olmo-2-7b", "decode", 1, 512, 1.5)]}
        for name, models in sets.items():
            cfg = {"label": f"{name} transformers", "family": WHOLE_FAMILY, "spec": {"name": name},
                   "moe_impl": "transformers", "options": {"dtype": "bfloat16"}, "total_params": 30_532_000_000}
            s.add_point("w", f"k-{name}", cfg, "done", document={"family": WHOLE_FAMILY, "models": models})
        s.add_point("w", "k-235", {"label": "qwen3-235b-a22b transformers", "family": WHOLE_FAMILY,
                                   "spec": {"name": "qwen3-235b-a22b"}, "moe_impl": "transformers",
                                   "options": {"dtype": "bfloat16"}, "total_params": 235_000_000_000},
                    "skipped", reason="out of memory (building qwen3-235b-a22b (1 of 94 layers) needs ~9.9 GiB)")


def frame_of(db: Path) -> Frame:
    with Store(db, create=False) as s:
        return load(s)


@pytest.fixture(scope="module")
def whole_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole_report")
    fill(tmp / "w.db")
    return tmp / "w.db", frame_of(tmp / "w.db"), build(tmp / "w.db", tmp / "out")


# -- analysis -------------------------------------------------------------------------------------------------
def test_whole_models_are_kept_apart_and_grouped_by_their_set(whole_report):
    _db, frame, _ = whole_report
    assert PHASES == RUNNER_PHASES
    assert frame.models == [] and frame.layers == [] and len(frame.wholes) == 2 * 2 * 3 * 3 + 2
    sets = whole_sets(frame)
    assert list(sets) == ["olmoe-1b-7b", MOE] and len(sets[MOE]) == 36
    assert {(m["set"], m["impl"]) for m in sets[MOE]} == {(MOE, "transformers")}
    assert [p["label"] for p in frame.skipped] == ["qwen3-235b-a22b transformers"]
    assert frame.wholes[0]["whole_model_extrapolated"] is None  # the record's, not the column's JSON text


def test_the_stability_rule_keeps_out_flagged_and_failed_windows_not_the_estimates_label():
    assert unstable(record(MOE, "decode", 1, 512, 1.0)) is None
    assert unstable(record(SMALL, "decode", 1, 512, 1.0, flags=(ESTIMATE,))) is None
    assert unstable(record(MOE, "decode", 1, 512, 1.0, flags=(SHORT,))) == SHORT
    assert unstable(record(BIG, "decode", 1, 512, 1.0, failed="counter read failed")) == \
        "window failed: counter read failed"
    assert unstable({"status": "skipped", "skipped": "out of memory", "repeats": 0}) == "out of memory"
    ok, flagged = stable([record(MOE, "decode", 1, 512, 1.0), record(MOE, "decode", 4, 512, 1.0, flags=(SHORT,)),
                          {"status": "skipped", "skipped": "out of memory"}, record(BIG, "decode", 1, 512, 1.0,
                                                                                    method="none")])
    assert len(ok) == 1 and flagged == 1  # the skipped one is not a flagged window; 'none' has no J/token


def test_j_per_token_is_the_inverse_of_tokens_per_joule_with_its_spread_swapped():
    m = {**record(MOE, "decode", 1, 512, 2.0), "inferences_per_joule_min": 1.0, "inferences_per_joule_max": 4.0}
    assert value(m, "joules_per_token") == 0.5
    assert (value(m, "joules_per_token", "min"), value(m, "joules_per_token", "max")) == (0.25, 1.0)


def test_crossover_over_batch_per_sibling_phase_and_context(whole_report):
    _db, frame, _ = whole_report
    xos = {(c.model, c.vs, c.phase, c.fixed): c for c in whole_crossovers(frame, "batch")}
    big = xos[MOE, BIG, "decode", "context 512"]
    # MoE/dense tokens/J 0.5, 2 at batch 1, 4: the log ratio crosses zero half way in log10(batch): exactly 2
    assert big.status == "crossed" and big.axis == "batch" and math.isclose(big.params, 2.0, rel_tol=1e-12)
    assert big.n_points == 2  # batch 16 of qwen3-32b had a failed window: kept out
    assert big.answer() == "~2 sequences per batch (interval 2 to 2)"  # no spread: one window each
    assert (big.dtype, big.strategy, big.energy) == ("bfloat16", "transformers", "measured")
    small = xos[MOE, SMALL, "decode", "context 512"]
    assert small.status == "not_reached" and small.answer() == "not reached up to 16 sequences per batch"
    wide = xos[MOE, BIG, "decode", "context 2048"]
    assert wide.status == "below_grid" and wide.answer().startswith("at or below 1 sequence per batch")
    assert wide.n_points == 2  # batch 4 flagged: kept out
    assert xos["olmoe-1b-7b", "olmo-2-7b", "decode", "context 512"].status == "below_grid"


def test_crossover_over_context_at_each_batch(whole_report):
    _db, frame, _ = whole_report
    xos = {(c.vs, c.phase, c.fixed): c for c in whole_crossovers(frame, "context") if c.model == MOE}
    c = xos[BIG, "prefill", "batch 1"]
    assert c.status == "crossed" and c.axis == "context" and math.isclose(c.params, 1024.0, rel_tol=1e-12)
    assert c.answer().startswith("~1,024 tokens of context")
    assert xos[BIG, "prefill", "batch 4"].status == "below_grid"
    assert xos[SMALL, "decode", "batch 1"].status == "not_reached"


def test_the_selection_is_the_lowest_j_per_token_meeting_each_deadline_flagged_rows_kept_out(whole_report):
    _db, frame, _ = whole_report
    got = {(c.model, c.phase, c.context, c.deadline_ms): c for c in selections(frame, (100.0, 250.0))}
    assert len(got) == (3 * 2 * 2 + 3 * 2) + (2 * 2)  # qwen: decode 2 deadlines + prefill, x 2 contexts; olmoe
    d = got[MOE, "decode", 512, 100.0]  # ITL p90 50, 120, 300 ms at batch 1, 4, 16: under 100 only batch 1
    assert d.record["batch"] == 1 and (d.meeting, d.candidates, d.flagged) == (1, 3, 0)
    d = got[MOE, "decode", 512, 250.0]
    assert d.record["batch"] == 4 and value(d.record, "joules_per_token") == 0.5 and d.meeting == 2
    d = got[MOE, "decode", 2048, 250.0]  # batch 4 flagged: kept out and counted; batch 16 misses 250 ms
    assert d.record["batch"] == 1 and (d.meeting, d.candidates, d.flagged) == (1, 2, 1)
    d = got[BIG, "decode", 512, 100.0]  # qwen3-32b: 80 ms at batch 1 only
    assert d.record["batch"] == 1 and d.flagged == 1  # batch 16's failed window
    assert got[BIG, "decode", 2048, 100.0].record["batch"] == 1
    d = got[MOE, "prefill", 512, None]  # a prefill has no ITL: the lowest J/token of all
    assert d.record["batch"] == 16 and d.deadline_ms is None and d.meeting == d.candidates == 3
    d = got[SMALL, "decode", 512, 100.0]  # the estimate's label is not a flag: all three stay
    assert d.record["batch"] in BATCHES and (d.candidates, d.flagged) == (3, 0) and d.energy == "measured"
    assert all(c.record is None for c in selections(frame, (1.0,)) if c.phase == "decode")


def partial(model: str, b: int, tpj: float, scale: float) -> dict:
    """A decode record of a model built on a quarter of its layers, its whole-model figures extrapolated x scale."""
    m = {**record(model, "decode", b, 512, tpj), "set": MOE, "impl": "transformers", "layers_measured": 12}
    m["whole_model_extrapolated"] = {"tokens_per_second": m["tokens_per_second"] / scale,
                                     "joules_per_token": scale / tpj, "label": "EXTRAPOLATED from the first 12 of 48"}
    return m


def test_a_model_built_on_fewer_layers_is_compared_on_its_whole_model_figures():
    w = as_whole(partial(MOE, 1, 3.0, 3.0))
    assert value(w, "joules_per_token") == pytest.approx(1.0) and w["inferences_per_joule"] == pytest.approx(1.0)
    assert w["itl_p90_ms"] == pytest.approx(150.0) and w["itl_p50_ms"] == pytest.approx(75.0)
    assert w["extrapolated"] == "EXTRAPOLATED from the first 12 of 48"
    whole = {**record(BIG, "decode", 1, 512, 2.0), "set": MOE, "impl": "transformers"}
    assert as_whole(whole) is whole  # built whole: as measured
    # measured on 12 layers the MoE's tokens/J is 3 and 12 (ahead of qwen3-32b's 2 at both batches); for the whole
    # model 1 and 4: behind at batch 1, ahead at 4, crossing half way (log scale) at exactly 2
    frame = Frame(wholes=[partial(MOE, 1, 3.0, 3.0), partial(MOE, 4, 12.0, 3.0),
                          {**record(BIG, "decode", 1, 512, 2.0), "set": MOE, "impl": "transformers"},
                          {**record(BIG, "decode", 4, 512, 2.0), "set": MOE, "impl": "transformers"}])
    [c] = whole_crossovers(frame, "batch")
    assert c.status == "crossed" and math.isclose(c.params, 2.0, rel_tol=1e-12)
    assert c.notes == [f"{MOE}: EXTRAPOLATED from the first 12 of 48"]
    got = {(s.model, s.deadline_ms): s for s in selections(frame, (100.0, 400.0))}
    assert got[MOE, 100.0].record is None  # 50 ms measured on 12 layers is 150 ms for the whole model
    assert got[MOE, 400.0].record["batch"] == 4 and got[MOE, 400.0].record["extrapolated"]


def test_time_energy_front_is_pareto_over_stable_configurations(whole_report):
    _db, frame, _ = whole_report
    recs = [m for m in whole_sets(frame)[MOE] if m["model"] == MOE and m["context"] == 512]
    pts, front = time_energy(recs, "decode")
    assert [(m["batch"], t, j) for m, t, j in pts] == [(1, 50.0, 2.0), (4, 120.0, 0.5), (16, 300.0, 0.25)]
    assert front == pareto_front([(t, j) for _, t, j in pts]) == [0, 1, 2]  # each faster one costs more per token
    pts, _ = time_energy([m for m in whole_sets(frame)[MOE] if m["model"] == MOE and m["context"] == 2048], "decode")
    assert [m["batch"] for m, _, _ in pts] == [1, 16]  # batch 4 flagged


def test_a_flagged_configuration_built_in_part_is_drawn_at_its_whole_model_figures():
    """The grey crosses of the time-energy plot sit beside the fronts, which are whole-model figures: a flagged record
    of 12 of 48 layers (ITL p90 50 ms, 3 tokens/J, x 3) is drawn at 150 ms and 1 J/token, not at 50 ms and 1/3."""
    from moe_energy.report.plots import whole_time_energy_front

    m = partial(MOE, 1, 3.0, 3.0)
    m["flags"] = [SHORT]
    fig = whole_time_energy_front(Frame(wholes=[m]))
    [ax] = [ax for ax in fig.axes if ax.get_title() == "decode, context 512"]
    [crosses] = [c for c in ax.collections if c.get_label() == "flagged: kept out (1)"]
    np.testing.assert_allclose(crosses.get_offsets(), [[150.0, 1.0]])


# -- the report's files -----------------------------------------------------------------------------------------
def test_the_report_has_a_whole_model_section_with_plots_per_set(whole_report):
    _db, _frame, files = whole_report
    html, md = files.html.read_text(), files.markdown.read_text()
    assert "Whole models: energy per token, the MoE against its dense siblings" in md
    assert f"### {MOE} against {BIG}, {SMALL}" in md and "### olmoe-1b-7b against olmo-2-7b" in md
    assert "Crossover: where MoE overtakes the total-matched dense model" not in md  # no seed section
    assert "the lowest energy per token meeting each inter-token deadline" in md
    assert "where the MoE uses less energy per token than each dense sibling" in md
    assert "36 configuration(s): 34 stable with energy, 2 flagged and kept out of the answers" in md
    assert f"| {MOE} | {BIG} | decode | batch | context 512 | bfloat16 | transformers | ~2 sequences per batch" in md
    assert f"| {MOE} | {MOE} | decode | 2048 | 250 | 1 | bfloat16 | transformers | 0.5 |" in md
    assert "| window failed: counter read failed |" in md and f"| {SHORT} |" in md
    for name in (MOE, "olmoe-1b-7b"):
        for slug, _t, _f in WHOLE_PLOTS:
            assert f"<figure id='{slug}-{name}'>" in html and f"plots/{slug}-{name}.png" in md
    assert len(files.images) == 2 * len(WHOLE_PLOTS)
    assert "qwen3-235b-a22b transformers" in md  # the skipped point, with its reason


def test_whole_plots_draw_an_empty_frame_and_each_set(whole_report):
    _db, frame, _ = whole_report
    for _slug, _title, fn in WHOLE_PLOTS:
        assert isinstance(fn(Frame()), Figure)
        fig = fn(Frame(wholes=whole_sets(frame)[MOE]))
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)  # units on every axis
        assert all("(ms" in ax.get_xlabel() or "batch" in ax.get_xlabel() for ax in fig.axes)
        assert all("J/token" in ax.get_ylabel() for ax in fig.axes)


def test_report_command_takes_the_deadlines_and_prints_the_selection(whole_report, tmp_path, capsys):
    db, _frame, _ = whole_report
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "r"), "--itl-deadline-ms", "250,60"]) == 0
    out = capsys.readouterr().out
    assert "ML.ENERGY's selection" in " ".join(out.split()) and "250" in out and "60" in out
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"| {MOE} | {MOE} | decode | 512 | 60 | 1 |" in md and f"| {MOE} | {MOE} | decode | 512 | 100 |" not in md
    assert "| qwen3-30b-a3b | qwen3-32b | decode | 512 | 60 | none meets it |" in md  # 2 stable, both too slow
    for bad, needle in (("x", "'x' is not a number of milliseconds"), ("0", "must be a finite number of "
                                                                             "milliseconds > 0")):
        code = main(["report", "--db", str(db), "--out", str(tmp_path / "bad"), "--itl-deadline-ms", bad])
        one_line_error(code, capsys.readouterr().err, "--itl-deadline-ms", needle)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_tiny_whole_model_sweep_reports_and_its_plots_render_in_chromium(tmp_path):
    from matplotlib.image import imread
    from test_report import CHROMIUM, TILE_H, TILE_W, _screenshot, _tiled_page
    from test_whole_sweep import FAST, cli

    db = tmp_path / "tiny.db"
    r = cli("sweep", "--model", "olmoe-1b-7b", "--vs", "olmo-2-1b", "--tiny", "--batch", "1,2", "--context", "4",
            *FAST, "--db", str(db))
    assert r.returncode == 0, r.stderr
    rep = cli("report", "--db", str(db), "--out", str(tmp_path / "r"))
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    # 0.1 s windows are flagged as too short: every configuration is drawn, none is an answer, and the report says so
    assert "8 configuration(s): 0 stable with energy, 8 flagged and kept out of the answers" in md
    assert "| olmoe-1b-7b-tiny | olmoe-1b-7b-tiny | decode | 4 | 100 | no stable record |" in md
    assert "| olmoe-1b-7b-tiny | olmoe-1b-7b-tiny | prefill | 4 | none (prefill) | no stable record |" in md
    assert "none meets it" not in md  # nothing was there to meet a deadline
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("chromium not installed (runs in CI)")
    ids = _tiled_page((tmp_path / "r" / "report.html").read_text(), "whole_", tmp_path / "tiles.html")
    assert ids == [f"{slug}-olmoe-1b-7b-tiny" for slug, _t, _f in WHOLE_PLOTS]
    tiles = tmp_path / "tiles.png"
    shot = _screenshot(tmp_path / "tiles.html", tiles, f"{TILE_W * len(ids)},{TILE_H}", tmp_path / "profile")
    assert tiles.exists(), shot.stderr[-2000:]
    img = (imread(tiles)[..., :3] * 255).astype(np.uint8)
    for k, name in enumerate(ids):
        tile = img[:TILE_H, k * TILE_W:(k + 1) * TILE_W].reshape(-1, 3)
        white = float((tile.min(axis=1) > 245).mean())
        assert len(np.unique(tile, axis=0)) > 40 and 0.3 < white < 0.995, (name, white)


def test_a_whole_crossover_never_sets_a_capped_record_against_an_uncapped_one():
    # uncapped, the MoE's decode tokens/J 0.5, 2 at batch 1, 4 against qwen3-32b's 1: crossed at exactly 2; at a
    # 200 W cap 5, 6 against 10: not reached. Grouped without the cap, the capped MoE (the last record of each batch)
    # was paired with both dense figures and the store answered "at or below 1 sequence per batch" from 4 pairs
    def at(model: str, b: int, tpj: float, cap: float | None = None) -> dict:
        m = {**record(model, "decode", b, 512, tpj), "set": MOE, "impl": "transformers"}
        return {**m, "power_limit_requested_w": cap} if cap else m

    frame = Frame(wholes=[at(MOE, 1, 0.5), at(MOE, 4, 2.0), at(BIG, 1, 1.0), at(BIG, 4, 1.0), at(MOE, 1, 5.0, 200.0),
                          at(MOE, 4, 6.0, 200.0), at(BIG, 1, 10.0, 200.0), at(BIG, 4, 10.0, 200.0)])
    free, capped = whole_crossovers(frame, "batch")
    assert (free.power_limit_w, free.status, free.n_points, free.fixed) == (None, "crossed", 2, "context 512")
    assert math.isclose(free.params, 2.0, rel_tol=1e-12)
    assert (capped.power_limit_w, capped.status, capped.n_points) == (200.0, "not_reached", 2)
    assert capped.fixed == "context 512"
    _title, head, rows = whole_crossover_table([free, capped])
    assert [r[head.index("power cap W")] for r in rows] == ["-", "200"]


def test_a_whole_crossover_pairs_each_sibling_with_the_moe_of_its_own_point():
    # the set measured (point 1: MoE 0.5, 2 vs qwen3-32b's 1 at batch 1, 4: crossed at exactly 2) and estimated
    # (point 2: MoE 5, 6 vs 1: ahead from batch 1). Keyed by batch alone, the MoE's later (estimated) record met
    # both dense ones: the measured pairs were dropped as mixed and the answer was the estimate's "at or below 1"
    def at(model: str, b: int, tpj: float, point: int, method: str) -> dict:
        return {**record(model, "decode", b, 512, tpj, method), "set": MOE, "impl": "transformers", "point_id": point}

    frame = Frame(wholes=[at(MOE, 1, 0.5, 1, "counter"), at(MOE, 4, 2.0, 1, "counter"), at(BIG, 1, 1.0, 1, "counter"),
                          at(BIG, 4, 1.0, 1, "counter"), at(MOE, 1, 5.0, 2, "estimate"), at(MOE, 4, 6.0, 2, "estimate"),
                          at(BIG, 1, 1.0, 2, "estimate"), at(BIG, 4, 1.0, 2, "estimate")])
    [c] = whole_crossovers(frame, "batch")
    assert (c.status, c.energy, c.n_points) == ("crossed", "measured", 2)
    assert math.isclose(c.params, 2.0, rel_tol=1e-12)
    assert not any("not compared with a measured one" in n for n in c.notes)  # no pair across the two points


def test_a_store_of_whole_models_at_two_caps_draws_one_cap_and_says_which_cap_each_answer_chose(tmp_path):
    # decode at context 512: uncapped the MoE's tokens/J 0.5, 2 at batch 1, 4; at 200 W 5, 6 (qwen3-32b's 1 and
    # 10). caps() read the seed's and the layers' records only, so the plots mixed both caps and the selection's
    # pick (200 W, batch 4: 1/6 J/token) sat in a table with no cap column beside uncapped rows of the same batch
    def at(model: str, b: int, tpj: float, cap: float | None = None) -> dict:
        m = {**record(model, "decode", b, 512, tpj), "set": MOE}
        return {**m, "power_limit_requested_w": cap} if cap else m

    recs = [at(MOE, 1, 0.5), at(MOE, 4, 2.0), at(BIG, 1, 1.0), at(BIG, 4, 1.0), at(MOE, 1, 5.0, 200.0),
            at(MOE, 4, 6.0, 200.0), at(BIG, 1, 10.0, 200.0), at(BIG, 4, 10.0, 200.0)]
    db = tmp_path / "w.db"
    with Store(db) as s:
        s.new_run("w", {"grid": "models"}, {"device_name": "Test GPU", "torch": "2.x"}, {"name": "nvidia",
                                                                                        "method": "counter"})
        cfg = {"label": f"{MOE} transformers", "family": WHOLE_FAMILY, "spec": {"name": MOE},
               "moe_impl": "transformers", "options": {"dtype": "bfloat16"}, "total_params": 30_532_000_000}
        s.add_point("w", "k", cfg, "done", document={"family": WHOLE_FAMILY, "models": recs})
    frame = frame_of(db)
    assert caps(frame) == [None, 200.0] and reference_cap(frame) is None
    _title, head, rows = selection_table(selections(frame, (250.0,)))
    pick = {(r[head.index("model")], r[head.index("ITL p90 deadline ms")]): r for r in rows}
    moe = pick[(MOE, "250")]
    assert (moe[head.index("batch")], moe[head.index("power cap W")]) == ("4", "200")
    assert moe[head.index("J/token")] == f"{1 / 6.0:.4g}"
    _title, head, rows = whole_tokens_table(recs)
    assert sorted(r[head.index("power cap W")] for r in rows) == ["-"] * 4 + ["200"] * 4
    build(db, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "drawn from the uncapped points" in md
    assert "The tables hold every power cap; the plots of each set are drawn from the uncapped points." in md
    assert "Power caps: the cap that maximises" not in md  # no seed or layer setting at two caps: no empty section
    table = md.split("## qwen3-30b-a3b against qwen3-32b", 1)[1]
    assert table.count("| decode | 512 |") == 8  # the set's table keeps both caps, its plots are of one


def test_the_selection_is_made_within_the_most_exact_energy_method():
    # a merged store: batch 16 measured on sampled power (J/token 0.125) beside counter records at batches 1 and 4:
    # the lowest J/token is chosen among the counter's, never a sampled figure against a counter's
    frame = Frame(wholes=[{**record(MOE, "decode", b, 512, tpj, method), "set": MOE, "impl": "transformers"}
                          for b, tpj, method in ((1, 1.0, "counter"), (4, 2.0, "counter"), (16, 8.0, "sampled"))])
    [c] = selections(frame, (400.0,))
    assert (c.record["batch"], c.meeting, c.candidates, c.energy) == (4, 2, 2, "measured")
