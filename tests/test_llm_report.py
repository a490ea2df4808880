"""The report's LLM-layer section (issue 14): the crossover over tokens per forward computed as the size crossover
is (exact values on constructed data), the J per 1,000 tokens table, one sub-section of plots per arch, estimates
hollow, empty and uncalibrated data still drawn, and the `report` command printing the per-token answer."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from moe_energy.report import LAYER_PLOTS, PLOTS, build
from moe_energy.report.analysis import Frame, layer_crossovers, layer_pairs, load
from moe_energy.report.html import layer_tokens_table
from moe_energy.storage.store import Store

TOKENS = (1, 4, 16, 64)
# MoE / total-matched dense tokens/J at each token count, per arch: olmoe leads at 1, falls behind at 4 and 16,
# leads again at 64; qwen trails at 1 and 4 and leads from 16
RATIO = {"olmoe-1b-7b": (4.0, 0.5, 0.5, 2.0), "qwen3-30b-a3b": (0.5, 0.5, 2.0, 4.0)}
E = {"olmoe-1b-7b": 64, "qwen3-30b-a3b": 128}
DENSE_TPJ = 100.0  # the total-matched FFN's tokens/J at every T
SPREAD = 0.1  # every record's repeats span x (1 - 0.1) .. x (1 + 0.1)
BW, PEAK = 2e10, 1e11  # the calibration the bounds below were computed with (B/s, FLOP/s)


def layer(arch: str, base: str, t: int, tpj: float, method: str = "counter") -> dict:
    """A model record as run_llm writes it, with the fields the report reads."""
    kind = "moe" if base.startswith("moe") else "dense"
    params = {"moe": 400_000_000, "dense_total": 400_100_000, "dense_active": 60_000_000}[base.split("[")[0]]
    touched = min(E[arch], 8 * t) if kind == "moe" else None
    nbytes = 4.0 * (params if kind == "dense" else params * (touched or 0) / E[arch])
    flops = 2.0 * (60_000_000 if kind == "moe" else params) * t
    mem, comp = nbytes / BW * 1e3, flops / PEAK * 1e3
    tps = 0.5 * t / (max(mem, comp) / 1e3)  # half of the bound; the power is what gives the tokens/J asked for
    wins = [{"window_s": 1.0, "inferences": t * 10, "energy_method": method, "tokens_per_forward": t,
             "experts_touched": touched} for _ in range(2)]
    return {"name": f"{base}@T={t}", "kind": kind, "match": None if kind == "moe" else base.split("_")[1],
            "strategy": "auto" if kind == "moe" else None, "params": params, "active_params": 60_000_000,
            "width": 1024, "flops_per_inference": flops / t, "dtype": "float32", "status": "measured",
            "batch_size": t, "tokens_per_forward": t, "arch": arch, "routing": "random", "repeats": 2,
            "inferences_per_second": tps, "tokens_per_second": tps, "inferences_per_joule": tpj,
            "tokens_per_joule": tpj,
            "inferences_per_joule_min": tpj * (1 - SPREAD), "inferences_per_joule_max": tpj * (1 + SPREAD),
            "joules_per_1k_tokens": 1000 / tpj, "average_power_w": tps / tpj, "energy_method": method,
            "energy_is_estimate": method == "estimate", "experts_touched": touched,
            "experts_touched_if_uniform": E[arch] * (1 - (1 - 8 / E[arch]) ** t) if kind == "moe" else None,
            "weight_bytes_read_per_forward": nbytes, "flops_per_batch": flops, "weight_bytes_per_batch": nbytes,
            "memory_bound_ms": mem, "compute_bound_ms": comp, "bound": "memory" if mem >= comp else "compute",
            "roofline_bound_ms": max(mem, comp), "fraction_of_roofline": 0.5,
            "windows": wins}


def fill_layers(db: Path, method: str = "counter", archs: tuple[str, ...] = tuple(RATIO)) -> None:
    """One point per arch (routing random), its three models at each of TOKENS; one arch skipped (no memory)."""
    with Store(db) as s:
        s.new_run("llm", {"grid": "llm"}, {"device_name": "Test CPU", "torch": "2.x"},
                  {"name": "rapl", "method": method}, grid_name="llm")
        for arch in archs:
            models = []
            for t, r in zip(TOKENS, RATIO[arch]):
                models += [layer(arch, "moe[auto]", t, DENSE_TPJ * r, method), layer(arch, "dense_total", t, DENSE_TPJ,
                           method), layer(arch, "dense_active", t, DENSE_TPJ * 3, method)]
            cfg = {"label": f"{arch} random", "family": "llm_layer", "routing": "random", "tokens": list(TOKENS),
                   "spec": {"name": arch, "experts": E[arch], "top_k": 8, "d_model": 2048},
                   "options": {"dtype": "float32"}, "total_params": 400_000_000}
            s.add_point("llm", f"k-{arch}", cfg, "done", document={"models": models})
        s.add_point("llm", "k-ds3", {"label": "deepseek-v3 random", "family": "llm_layer", "routing": "random",
                                     "spec": {"name": "deepseek-v3", "experts": 256, "top_k": 8},
                                     "options": {"dtype": "float32"}, "total_params": 11_300_000_000},
                    "skipped", reason="out of memory (building moe of 11.32 B params needs ~42.2 GiB, 20 GiB free)")


def frame_of(db: Path) -> Frame:
    with Store(db, create=False) as s:
        return load(s)


@pytest.fixture(scope="module")
def llm_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm_report")
    fill_layers(tmp / "l.db")
    return frame_of(tmp / "l.db"), build(tmp / "l.db", tmp / "out")


# -- analysis ---------------------------------------------------------------------------------------------------
def test_layers_are_kept_apart_from_the_seeds_models(llm_report):
    frame, _ = llm_report
    assert frame.models == [] and len(frame.layers) == 2 * 3 * len(TOKENS)
    assert len(frame.points) == 2 and [p["label"] for p in frame.skipped] == ["deepseek-v3 random"]
    groups = layer_pairs(frame)
    assert sorted(groups) == [("olmoe-1b-7b", "random", "float32", "float32", "auto", None),
                              ("qwen3-30b-a3b", "random", "float32", "float32", "auto", None)]  # None: no cap
    assert all([p.at for p in ps] == list(map(float, TOKENS)) for ps in groups.values())


def test_crossover_over_tokens_is_the_size_crossovers_method_with_its_interval(llm_report):
    frame, _ = llm_report
    xos = {(c.arch, c.metric): c for c in layer_crossovers(frame)}
    q = xos["qwen3-30b-a3b", "inferences_per_joule"]
    # log ratio -log 2 at 4 and +log 2 at 16: half way in log10(tokens), exactly 8 tokens
    assert q.status == "crossed" and q.axis == "tokens" and math.isclose(q.params, 8.0, rel_tol=1e-12)
    # repeats' spread: best case log(0.5 x 1.1/0.9) -> log(2 x 1.1/0.9); worst the reverse; linear in log10(T)
    hi_r, lo_r = (1 + SPREAD) / (1 - SPREAD), (1 - SPREAD) / (1 + SPREAD)
    best = -math.log(0.5 * hi_r) / (math.log(2 * hi_r) - math.log(0.5 * hi_r))
    worst = -math.log(0.5 * lo_r) / (math.log(2 * lo_r) - math.log(0.5 * lo_r))
    assert math.isclose(q.low, 4 * 4**best, rel_tol=1e-9) and math.isclose(q.high, 4 * 4**worst, rel_tol=1e-9)
    assert q.answer() == "~8 tokens per forward (interval 6.5 to 9.8)"
    o = xos["olmoe-1b-7b", "inferences_per_joule"]
    assert o.status == "below_grid" and o.answer().startswith("at or below 1 token per forward (")
    # behind at 4 and 16, ahead again at 64: the re-crossing half way between 16 and 64 in log10, sqrt(16 x 64)
    assert "MoE falls behind at 4 tokens per forward" in o.notes and "MoE leads again from ~32 tokens per forward" \
        in o.notes
    assert o.energy == "measured" and o.n_points == 4


def test_j_per_1k_tokens_table_gives_the_three_models_per_arch_and_token_count(llm_report):
    frame, _ = llm_report
    title, head, rows = layer_tokens_table(frame)
    assert "J per 1,000 tokens" in title and len(rows) == 2 * len(TOKENS)
    by = {(r[0], r[3]): dict(zip(head, r)) for r in rows}
    r = by["qwen3-30b-a3b", "16"]
    # MoE 200 tokens/J -> 5 J per 1k tokens; spread from the repeats' tokens/J (x 1.1 and x 0.9)
    assert r["MoE J/1k tokens"] == f"5 ({1000 / 220:,.4g}-{1000 / 180:,.4g})"
    assert r["dense (total) J/1k tokens"].startswith("10 (") and r["dense (active) J/1k tokens"].startswith("3.333")
    assert r["experts touched"] == "128 of 128" and r["MoE"] == "moe[auto]"
    assert by["olmoe-1b-7b", "1"]["experts touched"] == "8 of 64"
    assert by["olmoe-1b-7b", "1"]["MoE bound (of it)"] == "memory (50%)"
    assert by["olmoe-1b-7b", "1"]["dense (total) bound (of it)"] == "memory (50%)"
    assert by["olmoe-1b-7b", "64"]["dense (total) bound (of it)"] == "compute (50%)"


# -- the report ---------------------------------------------------------------------------------------------------
def test_report_has_an_llm_section_with_one_set_of_plots_per_arch(llm_report):
    _frame, files = llm_report
    text, md = files.html.read_text(), files.markdown.read_text()
    imgs = re.findall(r"<figure id='([^']+)'><img [^>]*src='data:image/png;base64,", text)
    want = [f"{slug}-{arch}" for arch in sorted(RATIO) for slug, _t, _f in LAYER_PLOTS]
    assert imgs == want  # no seed plots: the store holds only LLM layers
    assert len(files.images) == len(want) and all(p.read_bytes()[:4] == b"\x89PNG" for p in files.images)
    assert "Crossover: where MoE overtakes" not in text and "LLM MoE layers" in text
    assert "| arch | routing | dtype | tokens per forward | MoE | MoE J/1k tokens |" in md
    assert "~8 tokens per forward (interval 6.5 to 9.8)" in md and "MoE leads again from ~32 tokens per forward" in md
    assert "out of memory (building moe of 11.32 B" in md  # the skipped arch, with its reason
    for arch in RATIO:
        assert f"### {arch}: tokens per joule vs tokens per forward" in md


@pytest.mark.slow
def test_a_report_of_both_families_draws_both_sections(tmp_path):
    from test_report import fill

    db = tmp_path / "both.db"
    fill(db, batches=(128,))
    fill_layers(db, archs=("olmoe-1b-7b",))
    files = build(db, tmp_path / "out")
    text = files.html.read_text()
    assert text.count("<img ") == len(PLOTS) + len(LAYER_PLOTS)
    frame = frame_of(db)
    assert len(frame.models) == 4 * 3 and len(frame.layers) == 3 * len(TOKENS)  # the seed's plots never see layers
    assert "Crossover: where MoE overtakes" in text and "J per 1,000 tokens" in text


def test_report_command_prints_the_per_token_answer(tmp_path, capsys, monkeypatch):
    from moe_energy.cli import main
    from moe_energy.commands import console

    monkeypatch.setattr(console, "width", 240)  # a wide terminal: no cell wrapped
    fill_layers(tmp_path / "c.db", archs=("qwen3-30b-a3b",))
    assert main(["report", "--db", str(tmp_path / "c.db"), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "J per 1,000 tokens" in out and "~8 tokens per forward (interval 6.5 to 9.8)" in out
    assert "with 3 plot(s)" in out and "128 of 128" in out


# -- the plots -----------------------------------------------------------------------------------------------------
def test_every_layer_plot_is_titled_with_units_and_handles_an_empty_frame():
    for slug, _title, fn in LAYER_PLOTS:
        fig = fn(Frame())
        assert isinstance(fig, Figure) and fig._suptitle.get_text(), slug
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), slug
        fig.savefig(__import__("io").BytesIO(), format="png")


def test_estimates_are_hollow_in_the_tokens_per_joule_plot(tmp_path):
    fill_layers(tmp_path / "e.db", method="estimate", archs=("olmoe-1b-7b",))
    fig = dict((s, f) for s, _t, f in LAYER_PLOTS)["layer_tokens_per_joule"](frame_of(tmp_path / "e.db"))
    ax = fig.axes[0]
    est = [c for c in ax.collections if "(estimate)" in str(c.get_label())]
    assert len(est) == 3 and all(len(c.get_facecolors()) == 0 or c.get_facecolors()[0][3] == 0 for c in est)
    assert ax.get_xscale() == "log" and [int(t) for t in ax.get_xticks()] == list(TOKENS)


def _lines(fig: Figure) -> list[tuple[str, list[float], list[float]]]:
    out = []
    for ax in fig.axes:
        for ln in ax.get_lines():
            xs, ys = (np.asarray(v, dtype=float).tolist() for v in ln.get_data())
            out.append((str(ln.get_label()), xs, ys))
    return out


def test_layer_plots_draw_their_lines_in_x_order_with_the_right_values(llm_report):
    frame, _ = llm_report
    olmoe = Frame(layers=[m for m in frame.layers if m["arch"] == "olmoe-1b-7b"])
    plots = {s: f(olmoe) for s, _t, f in LAYER_PLOTS}
    for slug, fig in plots.items():
        for label, xs, _ys in _lines(fig):
            assert xs == sorted(xs), (slug, label, xs)
    touched = {label: (xs, ys) for label, xs, ys in _lines(plots["layer_experts_touched"])}
    assert touched["moe[auto] (counted)"] == ([1.0, 4.0, 16.0, 64.0], [8.0, 32.0, 64.0, 64.0])
    assert touched["all 64 experts"][1] == [64.0, 64.0]
    roof = next((xs, ys) for label, xs, ys in _lines(plots["layer_roofline"]) if label.startswith("bound"))
    assert max(roof[1]) == pytest.approx(PEAK / 1e9)  # the flat roof: the GEMM rate read back from the bounds
    assert roof[1][0] == pytest.approx(BW / 1e9 * roof[0][0])  # the slope: the copy bandwidth x intensity


def test_the_roofline_plot_says_when_nothing_was_calibrated(llm_report):
    frame, _ = llm_report
    bare = [{**m, "memory_bound_ms": None, "compute_bound_ms": None} for m in frame.layers]
    fig = dict((s, f) for s, _t, f in LAYER_PLOTS)["layer_roofline"](Frame(layers=bare))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("roofline not calibrated" in t for t in texts)


def test_a_skipped_rows_none_is_not_an_energy_method_of_the_report():
    """A (model, token count) skipped before any window has energy_method 'none'; the report must not then say
    that some models had no energy meter."""
    from moe_energy.report.analysis import Frame
    from moe_energy.report.html import _warnings

    measured = {"energy_method": "estimate", "repeats": 2}
    skipped = {"energy_method": "none", "repeats": 0}
    warn, headline = _warnings(Frame(runs=[], points=[], models=[skipped], layers=[measured, skipped]))
    assert headline.endswith("energy methods: estimate.")
    assert len(warn) == 1 and warn[0].startswith("Some energy figures are estimates")
    warn, headline = _warnings(Frame(runs=[], points=[], models=[], layers=[{**measured, "energy_method": "none"}]))
    assert headline.endswith("energy methods: none.") and "meter: none" in warn[0]


# -- int8 weights (issue 24) --------------------------------------------------------------------------------------
INT8_RATIO = (0.25, 0.25, 0.25, 4.0)  # qwen with int8 weights: behind up to 16 tokens, ahead at 64


def add_int8_point(db: Path, arch: str = "qwen3-30b-a3b") -> None:
    """The same arch measured again with int8 weights: every model int8, each with its output error."""
    errs = {"moe[auto]": 0.0125, "dense_total": 0.02, "dense_active": 0.03}
    models = []
    for t, r in zip(TOKENS, INT8_RATIO):
        for base, tpj in (("moe[auto]", DENSE_TPJ * r), ("dense_total", DENSE_TPJ), ("dense_active", DENSE_TPJ * 3)):
            models.append({**layer(arch, base, t, tpj), "weights": "int8", "weights_output_error": errs[base]})
    cfg = {"label": f"{arch} random", "family": "llm_layer", "routing": "random", "tokens": list(TOKENS),
           "spec": {"name": arch, "experts": E[arch], "top_k": 8, "d_model": 2048},
           "options": {"dtype": "float32", "weights": "int8"}, "total_params": 400_000_000}
    with Store(db) as s:
        s.add_point("llm", f"k-{arch}-int8", cfg, "done", document={"models": models})


@pytest.fixture(scope="module")
def int8_frame(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8_report")
    fill_layers(tmp / "i.db")
    add_int8_point(tmp / "i.db")
    return frame_of(tmp / "i.db"), tmp


def test_int8_layers_are_compared_only_with_int8_layers(int8_frame):
    frame, _ = int8_frame
    groups = layer_pairs(frame)
    q8 = groups["qwen3-30b-a3b", "random", "float32", "int8", "auto", None]
    assert [p.at for p in q8] == list(map(float, TOKENS))
    assert all(p.moe["weights"] == p.dense["weights"] == "int8" for p in q8)
    assert all(p.dense.get("weights") is None for p in groups["qwen3-30b-a3b", "random", "float32", "float32",
                                                              "auto", None])
    xos = {(c.arch, c.weights, c.metric): c for c in layer_crossovers(frame)}
    # each format's own crossover: the dtype's stays at 8 tokens; int8's is half way between 16 and 64 in log10
    assert math.isclose(xos["qwen3-30b-a3b", "float32", "inferences_per_joule"].params, 8.0, rel_tol=1e-12)
    assert math.isclose(xos["qwen3-30b-a3b", "int8", "inferences_per_joule"].params, 32.0, rel_tol=1e-12)
    assert xos["qwen3-30b-a3b", "int8", "inferences_per_joule"].n_points == 4


def test_layer_tables_get_a_weights_column_and_the_int8_output_error(int8_frame):
    from moe_energy.report.html import ERROR_HEAD, layer_crossover_table

    frame, _ = int8_frame
    _title, head, rows = layer_tokens_table(frame)
    assert head[:5] == ["arch", "routing", "dtype", "weights", "tokens per forward"]
    err = f"{ERROR_HEAD}: MoE / dense (total) / dense (active)"
    assert len(rows) == 3 * len(TOKENS)
    by = {(r[0], r[3], r[4]): dict(zip(head, r)) for r in rows}
    assert by["qwen3-30b-a3b", "int8", "16"][err] == "1.25% / 2.00% / 3.00%"
    assert by["qwen3-30b-a3b", "float32", "16"][err] == "- / - / -"
    assert by["qwen3-30b-a3b", "int8", "16"]["MoE J/1k tokens"].startswith("40 (")  # 25 tokens/J, not averaged
    _t, xhead, xrows = layer_crossover_table(layer_crossovers(frame))
    assert xhead[3] == "weights" and sorted({r[3] for r in xrows}) == ["float32", "int8"]


@pytest.mark.slow
def test_the_report_shows_int8_rows_their_error_and_panels_of_their_own(int8_frame):
    from moe_energy.report.plots import _layer_facets

    frame, tmp = int8_frame
    assert ("qwen3-30b-a3b", "random", "float32", "int8") in _layer_facets(frame) and len(_layer_facets(frame)) == 3
    files = build(tmp / "i.db", tmp / "out")
    html = files.html.read_text()
    assert "1.25% / 2.00% / 3.00%" in files.markdown.read_text() and "1.25% / 2.00% / 3.00%" in html
    assert "int8 rows are compared among themselves only" in html


def test_without_int8_the_layer_tables_keep_their_columns(llm_report):
    from moe_energy.report.html import layer_crossover_table

    frame, _ = llm_report
    assert "weights" not in layer_tokens_table(frame)[1]
    assert "weights" not in layer_crossover_table(layer_crossovers(frame))[1]
