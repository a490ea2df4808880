"""The report: every plot drawn (also from partial data), HTML self-contained with one image per plot,
Markdown beside its PNGs, estimates visibly apart, and the page renders (not blank) in headless Chromium."""

import base64
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from moe_energy.report import LAYER_PLOTS, PLOTS, build
from moe_energy.report.analysis import Frame, load
from moe_energy.report.html import points_table
from moe_energy.storage.store import Store

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def model(name, params, ipj, method="counter", batch=128, ips=None, watts=100.0):
    kind = "moe" if name.startswith("moe") else "dense"
    wins = [{"window_s": 2.0, "inferences": 1000, "energy_method": method, "average_power_w": watts + r,
             "trace": {"gpu0": [[t / 10, watts + r + (t % 3)] for t in range(20)]}} for r in range(2)]
    return {"name": name, "kind": kind, "match": None if kind == "moe" else name.split("_")[1],
            "strategy": "grouped" if kind == "moe" else None, "params": params, "active_params": params // 4,
            "width": 64, "flops_per_inference": 2 * params, "dtype": "float32", "batch_size": batch,
            "accuracy": 0.9, "diverged": False, "inferences_per_second": ips or ipj * watts,
            "inferences_per_joule": ipj, "inferences_per_joule_min": ipj * 0.95, "inferences_per_joule_max": ipj * 1.05,
            "average_power_w": watts, "idle_power_w": 40.0, "energy_method": method, "latency_p50_ms": 1e5 / ipj,
            "energy_is_estimate": method == "estimate", "windows": wins}


def fill(db: Path, method="counter", batches=(64, 128), energy=True):
    """Four sizes where MoE overtakes dense between the 2nd and 3rd; one skipped point."""
    sizes = [10**6, 10**7, 10**8, 10**9]
    moe_ipj, dense_ipj = [100.0, 30.0, 12.0, 4.0], [400.0, 60.0, 8.0, 1.0]
    with Store(db) as s:
        s.new_run("r1", {"grid": "custom"}, {"device_name": "Test GPU", "torch": "2.x"},
                  {"name": "nvidia", "method": method, "power_limit_w": 300.0}, grid_name="custom")
        for b in batches:
            for i, (p, m, d) in enumerate(zip(sizes, moe_ipj, dense_ipj)):
                scale = b / 128
                ms = [model("moe[grouped]", p, m * scale, method, b, watts=150.0),
                      model("dense_total", p + 10, d * scale, method, b, watts=280.0),
                      model("dense_active", p // 4, d * 3, method, b, watts=120.0)]
                if not energy:
                    for rec in ms:
                        rec.update(inferences_per_joule=None, inferences_per_joule_min=None,
                                   inferences_per_joule_max=None, average_power_w=None, idle_power_w=None,
                                   energy_method="none", inferences_per_second=1000.0 / (i + 1))
                        for w in rec["windows"]:
                            w.pop("trace")
                cfg = {"label": f"s{i}", "spec": {"experts": 8, "hidden": 64, "layers": 2, "top_k": 2},
                       "options": {"batch_size": b, "dtype": "float32"}, "total_params": p}
                s.add_point("r1", f"k{b}-{i}", cfg, "done", document={"models": ms})
        s.add_point("r1", "big", {"label": "xxl", "spec": {}, "options": {"batch_size": 128}, "total_params": 10**10},
                    "skipped", reason="out of memory (training moe needs ~150 GiB, 60 GiB free on cuda)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    db = tmp / "r.db"
    fill(db)
    files = build(db, tmp / "out")
    return db, files


@pytest.mark.slow
def test_html_is_self_contained_with_one_image_per_plot(report):
    _db, files = report
    text = files.html.read_text()
    imgs = re.findall(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(imgs) == len(PLOTS) == 7
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src='http" not in text and "<script" not in text and "<link" not in text  # nothing fetched
    # the answer: MoE 12 vs dense 8 at 1e8, 30 vs 60 at 1e7 -> crossover between them
    assert "Crossover: where MoE overtakes" in text and "out of memory (training moe" in text
    assert "Test GPU" in text


def test_markdown_summary_links_its_pngs(report):
    _db, files = report
    md = files.markdown.read_text()
    links = re.findall(r"!\[[^\]]+\]\((plots/[a-z_]+\.png)\)", md)
    assert len(links) == len(PLOTS)
    for link in links:
        assert (files.markdown.parent / link).read_bytes()[:4] == b"\x89PNG"
    assert "| batch size | dtype | strategy | E/k | figure | crossover (total params)" in md
    # inferences/J at batch 128: MoE/dense = 30/60 at 1e7, 12/8 at 1e8; log ratio crosses 0 at
    # t = log 2 / (log 2 + log 1.5) = log 2 / log 3 of the way in log10(params)
    assert f"~{10 ** (7 + math.log(2) / math.log(3)):,.0f} params" in md


def test_every_plot_is_titled_with_units_and_handles_an_empty_frame():
    for slug, _title, fn in PLOTS:
        fig = fn(Frame())
        assert isinstance(fig, Figure)
        assert fig._suptitle is not None and fig._suptitle.get_text(), slug
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), slug
        fig.savefig(__import__("io").BytesIO(), format="png")


def test_estimates_are_drawn_hollow_and_labelled(tmp_path):
    db = tmp_path / "e.db"
    fill(db, method="estimate", batches=(128,))
    with Store(db, create=False) as s:
        frame = load(s)
    fig = dict((slug, fn) for slug, _t, fn in PLOTS)["inferences_per_joule"](frame)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("(estimate)" in lab for lab in labels)
    scatters = [c for c in ax.collections if c.get_label() and "(estimate)" in c.get_label()]
    assert scatters and all(len(c.get_facecolors()) == 0 or c.get_facecolors()[0][3] == 0 for c in scatters)


def test_partial_data_one_batch_size_and_no_energy_still_renders(tmp_path):
    db = tmp_path / "n.db"
    fill(db, batches=(128,), energy=False)
    files = build(db, tmp_path / "out")
    text = files.html.read_text()
    assert text.count("<img ") == len(PLOTS)
    assert "not measured" in text
    md = files.markdown.read_text()
    # speed still crosses: 1000/(i+1) is equal for MoE and dense here, so never exceeded
    assert "not reached up to" in md


def _distinct_colours(png: Path) -> int:
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    return len(np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0))


def _screenshot(page: Path, shot: Path, size: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={shot}", f"--window-size={size}",
           page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


TILE_W, TILE_H = 420, 300


def _tiled_page(report_html: str, prefix: str, out: Path) -> list[str]:
    """A page of the report's own embedded images whose figure id starts with ``prefix``, each in a fixed tile
    side by side (so one screenshot shows them all); returns their ids."""
    figs = re.findall(r"<figure id='(" + prefix + r"[^']*)'><img alt='[^']*' src='(data:image/png;base64,[^']+)'",
                      report_html)
    tiles = "".join(f"<img id='{i}' src='{src}' style='width:{TILE_W}px;height:{TILE_H}px;display:block;"
                    f"float:left;margin:0;border:0'>" for i, src in figs)
    out.write_text(f"<!DOCTYPE html><html><body style='margin:0;background:#fff'>{tiles}</body></html>")
    return [i for i, _ in figs]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed (runs in CI)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    """The whole page renders (far from blank), and every LLM-layer plot of a report holding both families, and every
    power-cap plot of a report holding several caps, taken from the report's own page, renders as a non-blank
    image in Chromium."""
    from matplotlib.image import imread
    from test_llm_report import fill_layers

    assert CHROMIUM is not None, "CI must have chromium (apt-get install chromium)"
    _db, files = report
    shot = tmp_path / "shot.png"
    r = _screenshot(files.html, shot, "1200,2000", tmp_path / "profile")
    assert shot.exists(), r.stderr[-2000:]
    assert _distinct_colours(shot) > 200  # text, tables and plots: far from a blank page

    db = tmp_path / "both.db"
    fill(db, batches=(128,))
    fill_layers(db)
    both = build(db, tmp_path / "both")
    ids = _tiled_page(both.html.read_text(), "layer_", tmp_path / "tiles.html")
    assert len(ids) == len(LAYER_PLOTS) * 2, ids  # two archs
    tiles = tmp_path / "tiles.png"
    r = _screenshot(tmp_path / "tiles.html", tiles, f"{TILE_W * len(ids)},{TILE_H}", tmp_path / "profile2")
    assert tiles.exists(), r.stderr[-2000:]
    img = (imread(tiles)[..., :3] * 255).astype(np.uint8)
    assert img.shape[1] >= TILE_W * len(ids)
    for k, name in enumerate(ids):
        tile = img[:TILE_H, k * TILE_W:(k + 1) * TILE_W].reshape(-1, 3)
        white = float((tile.min(axis=1) > 245).mean())
        assert len(np.unique(tile, axis=0)) > 40 and 0.3 < white < 0.995, (name, white)  # a drawn plot, not blank
    _cap_plots_render(tmp_path)


def _cap_plots_render(tmp_path: Path) -> None:
    """With power caps in the store, every CAP_PLOTS image of the report's page renders non-blank in Chromium."""
    from matplotlib.image import imread
    from test_power_report import fill_caps

    from moe_energy.report import CAP_PLOTS

    fill_caps(tmp_path / "caps.db")
    capped = build(tmp_path / "caps.db", tmp_path / "caps")
    slugs = "|".join(slug for slug, _t, _f in CAP_PLOTS)
    ids = _tiled_page(capped.html.read_text(), f"(?:{slugs})", tmp_path / "cap_tiles.html")
    assert ids == [slug for slug, _t, _f in CAP_PLOTS], ids
    tiles = tmp_path / "cap_tiles.png"
    r = _screenshot(tmp_path / "cap_tiles.html", tiles, f"{TILE_W * len(ids)},{TILE_H}", tmp_path / "profile3")
    assert tiles.exists(), r.stderr[-2000:]
    img = (imread(tiles)[..., :3] * 255).astype(np.uint8)
    for k, name in enumerate(ids):
        tile = img[:TILE_H, k * TILE_W:(k + 1) * TILE_W].reshape(-1, 3)
        white = float((tile.min(axis=1) > 245).mean())
        assert len(np.unique(tile, axis=0)) > 40 and 0.3 < white < 0.995, (name, white)


# -- lines are drawn in x order, whatever order the sweep measured the points in ------------------------
SWEEP_SIZES = [10**8, 10**6, 10**9, 10**7]  # measured out of size order, as a resumed or sharded sweep is
ACTIVE = [4 * 10**6, 9 * 10**5, 2 * 10**6, 3 * 10**5]  # active-matched dense sizes, not monotone in total size
TRACE_T = [0.3, 0.0, 0.2, 0.1]  # samples stored out of time order


def fill_shuffled(db: Path) -> Frame:
    with Store(db) as s:
        s.new_run("r1", {"grid": "scale"}, {"device_name": "Test GPU"}, {"name": "nvidia", "method": "counter"},
                  grid_name="scale")
        for b in (512, 32, 128):
            for i, (p, a) in enumerate(zip(SWEEP_SIZES, ACTIVE)):
                ms = [model("moe[grouped]", p, 50.0 / (i + 1), batch=b), model("dense_total", p + 10, 80.0 / (i + 2),
                      batch=b), model("dense_active", a, 7.0 * (i + 1) + b, batch=b)]
                for rec in ms:
                    for w in rec["windows"]:
                        w["trace"] = {"gpu0": [[t, 100.0 + 10 * t + i] for t in TRACE_T]}
                cfg = {"label": f"s{i}", "spec": {"experts": 8, "hidden": 64, "layers": 2, "top_k": 2},
                       "options": {"batch_size": b, "dtype": "float32"}, "total_params": p}
                s.add_point("r1", f"k{b}-{i}", cfg, "done", document={"models": ms})
    with Store(db, create=False) as s:
        return load(s)


def _lines(frame: Frame) -> dict[tuple[str, int, int], tuple[list[float], list[float]]]:
    """Every Line2D of every axes of every plot: (slug, axes, line) -> (xs, ys), plain floats."""
    out = {}
    for slug, _title, fn in PLOTS:
        for a, ax in enumerate(fn(frame).axes):
            for j, line in enumerate(ax.get_lines()):
                xs, ys = (np.asarray(v, dtype=float).tolist() for v in line.get_data())
                out[slug, a, j] = (xs, ys)
    return out


@pytest.mark.slow
def test_every_line_is_drawn_in_x_order_with_each_y_kept_on_its_x(tmp_path, monkeypatch):
    frame = fill_shuffled(tmp_path / "s.db")
    drawn = _lines(frame)
    for key, (xs, _ys) in drawn.items():
        assert all(a <= b for a, b in zip(xs, xs[1:])), (key, xs)
    # the same lines drawn in the frame's own (sweep) order hold exactly the same (x, y) pairs
    from moe_energy.report import plots

    monkeypatch.setattr(plots, "_by_x", lambda xs, *cols: (list(xs), *map(list, cols)))
    unsorted = _lines(frame)
    assert unsorted.keys() == drawn.keys()
    assert any(xs != sorted(xs) for xs, _ in unsorted.values())  # the data did arrive out of order
    for key, (xs, ys) in drawn.items():
        assert sorted(zip(xs, ys)) == sorted(zip(*unsorted[key])), key


def test_active_matched_dense_line_runs_along_the_size_axis(tmp_path):
    frame = fill_shuffled(tmp_path / "s.db")
    fig = dict((slug, fn) for slug, _t, fn in PLOTS)["inferences_per_joule"](frame)
    ax = fig.axes[[32, 128, 512].index(128)]  # panels in batch order
    grey = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and ln.get_color() == "#8c8c8c"]
    assert len(grey) == 1
    want = sorted((float(a), 7.0 * (i + 1) + 128) for i, a in enumerate(ACTIVE))
    assert list(zip(*(np.asarray(v, dtype=float).tolist() for v in grey[0].get_data()))) == want


def test_by_x_sorts_every_column_by_x_and_keeps_ties_in_order():
    from moe_energy.report.plots import _by_x

    assert _by_x([3, 1, 2, 1], ["a", "b", "c", "d"], [30, 10, 20, 11]) == ([1, 1, 2, 3], ["b", "d", "c", "a"],
                                                                           [10, 11, 20, 30])
    assert _by_x([]) == ([],)


def test_a_model_that_did_not_learn_is_not_said_to_have_diverged(tmp_path):
    db = tmp_path / "d.db"
    ms = [model("moe[grouped]", 10**6, 50.0), model("dense_total", 10**6 + 10, 40.0),
          model("dense_active", 10**5, 90.0)]
    ms[0].update(diverged=True, train={"failure": "did not learn", "diverged_reason": "held-out accuracy 0.10 is at "
                                       "chance (0.11)"})
    ms[1].update(diverged=True, train={"diverged_reason": "loss is nan in epoch 1"})  # a record from before 'failure'
    ms[2].update(diverged=True, train={"failure": "untrained", "diverged_reason": "--epochs 0: the weights are their "
                                       "random initialisation"})
    with Store(db) as s:
        s.new_run("r1", {"grid": "custom"}, {"device_name": "Test GPU", "torch": "2.x"},
                  {"name": "nvidia", "method": "counter"}, grid_name="custom")
        s.add_point("r1", "k", {"label": "s0", "spec": {"experts": 8, "hidden": 64, "layers": 2, "top_k": 2},
                                "options": {"batch_size": 128, "dtype": "float32"}, "total_params": 10**6},
                    "done", document={"models": ms})
    with Store(db, create=False) as s:
        frame = load(s)
    _title, head, rows = points_table(frame)
    acc = {r[head.index("model")]: r[head.index("held-out acc")] for r in rows}
    assert acc == {"moe[grouped]": "90.0% (did not learn: accuracy meaningless)",
                   "dense_total": "90.0% (diverged: accuracy meaningless)",
                   "dense_active": "90.0% (untrained: accuracy meaningless)"}
    cpj = {r[head.index("model")]: r[head.index("correct inferences/J")] for r in rows}
    assert cpj["dense_active"] == "not comparable (untrained)"


def test_series_of_two_sparsities_are_told_apart_in_the_legend(tmp_path):
    """One model at E/k 4 and E/k 2 shares its colour: each E/k gets its own marker and line style."""
    with Store(tmp_path / "ek.db") as s:
        s.new_run("r1", {"grid": "custom"}, {"device_name": "Test GPU"}, {"name": "nvidia", "method": "counter"},
                  grid_name="custom")
        for i, (p, k) in enumerate([(10**6, 2), (10**7, 2), (10**6, 4), (10**7, 4)]):
            ms = [model("moe[grouped]", p, 100.0 / (i + 1)), model("dense_total", p + 10, 80.0 / (i + 1))]
            cfg = {"label": f"s{i}", "spec": {"experts": 8, "hidden": 64, "layers": 2, "top_k": k},
                   "options": {"batch_size": 128, "dtype": "float32"}, "total_params": p}
            s.add_point("r1", f"k{i}", cfg, "done", document={"models": ms})
    with Store(tmp_path / "ek.db", create=False) as s:
        frame = load(s)
    ax = dict((slug, fn) for slug, _t, fn in PLOTS)["inferences_per_joule"](frame).axes[0]
    marks = {c.get_label(): (c.get_paths()[0].vertices.round(3).tobytes(), tuple(c.get_edgecolor()[0]))
             for c in ax.collections if c.get_label().startswith(("moe", "dense"))}
    assert sorted(marks) == ["dense (total-matched) E/k=2", "dense (total-matched) E/k=4", "moe[grouped] E/k=2",
                             "moe[grouped] E/k=4"]
    assert len(set(marks.values())) == 4  # no two legend entries look alike
    lines: dict[str, set[str]] = {"#d62728": set(), "#222222": set()}  # the MoE's and the dense model's colours
    for ln in ax.get_lines():
        lines.get(ln.get_color(), set()).add(str(ln.get_linestyle()))
    assert lines == {"#d62728": {"-", "--"}, "#222222": {"-", "--"}}
