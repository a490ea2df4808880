"""What a report says against what its store holds (an audit of real sweeps' reports): a report never replaces a
file it did not write, says when it replaces its own and leaves none of an earlier report's plots beside it, ..."""

from __future__ import annotations

from pathlib import Path

from conftest import in_process, one_line_error
from test_llm_report import fill_layers
from test_report import fill


def test_a_report_replaces_only_its_own_and_says_so(tmp_path: Path) -> None:
    seed, llm, out = tmp_path / "seed.db", tmp_path / "llm.db", tmp_path / "rep"
    fill(seed)
    fill_layers(llm)
    first = in_process("report", "--db", str(seed), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "replaced" not in first.stdout
    seed_plots = {p.name for p in (out / "plots").iterdir()}
    assert "inferences_per_joule.png" in seed_plots
    second = in_process("report", "--db", str(llm), "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert f"replaced the earlier report in {out}; {len(seed_plots)} of its plot(s)" in second.stdout
    md = (out / "report.md").read_text()
    linked = {line.split("](plots/")[1].rstrip(")") for line in md.splitlines() if "](plots/" in line}
    assert {p.name for p in (out / "plots").iterdir()} == linked  # no plot of the seed's store left beside it
    assert not linked & seed_plots


def test_a_report_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    db, out = tmp_path / "seed.db", tmp_path / "rep"
    fill(db)
    out.mkdir()
    for name in ("report.md", "report.html"):
        (out / name).write_text("my own notes\n")
        r = in_process("report", "--db", str(db), "--out", str(out))
        one_line_error(r.returncode, r.stderr, f"{out / name} is not a moe-energy report")
        assert (out / name).read_text() == "my own notes\n"
        assert not (out / "plots").exists()
        (out / name).unlink()


def _flag_windows(db: Path, flags: dict[int, list[str]]) -> None:
    """Give the stored windows of the models whose ordinal is a key ``flags`` (as the meter writes them)."""
    import json
    import sqlite3

    con = sqlite3.connect(db)
    for mid, ordinal, rec in con.execute("select id, ordinal, record_json from models").fetchall():
        if ordinal not in flags:
            continue
        r = json.loads(rec)
        for w in r["windows"]:
            w["flags"] = list(flags[ordinal])
        con.execute("update models set record_json=? where id=?", (json.dumps(r), mid))
    con.commit()
    con.close()


def test_flagged_windows_are_said_at_the_top_of_the_report_and_on_the_terminal(tmp_path: Path) -> None:
    db, out = tmp_path / "seed.db", tmp_path / "rep"
    fill(db)  # 8 points x 3 models x 2 windows
    short = "window of 0.51 s is shorter than 1 s: energy unreliable"
    _flag_windows(db, {0: [short, "estimate: 10 W TDP x process CPU utilisation, not a measurement"],
                       1: ["estimate: 10 W TDP x process CPU utilisation, not a measurement"]})
    r = in_process("report", "--db", str(db), "--out", str(out))
    assert r.returncode == 0, r.stderr
    said = f"16 of 48 measurement windows carry warnings (16x '{short}' and the like)"  # the estimate's label is none
    assert said in (out / "report.md").read_text()
    assert said in (out / "report.html").read_text().replace("&#x27;", "'")
    assert said in r.stderr and "Traceback" not in r.stderr
    # no window flagged, only estimate labels: nothing to say (the report prints the line only when there is one)
    from moe_energy.report.analysis import load
    from moe_energy.report.html import window_warnings
    from moe_energy.storage.store import Store

    fill(tmp_path / "clean.db")
    _flag_windows(tmp_path / "clean.db", {0: ["estimate: 10 W TDP x process CPU utilisation, not a measurement"]})
    with Store(tmp_path / "clean.db", create=False) as s:
        assert window_warnings(load(s)) is None


def test_correct_per_joule_of_a_model_that_did_not_learn_is_not_comparable_rather_than_not_measured(tmp_path):
    """A 1-epoch sweep: every model 'did not learn'. Its inferences/J and accuracy are stored, so the report must
    not say 'not measured'; it says why the figure is left out."""
    import json
    import sqlite3

    from moe_energy.report.analysis import crossovers, load
    from moe_energy.report.html import points_table
    from moe_energy.storage.store import Store

    db = tmp_path / "seed.db"
    fill(db, batches=(128,))
    con = sqlite3.connect(db)
    for mid, rec in con.execute("select id, record_json from models").fetchall():
        r = json.loads(rec)
        r.update(diverged=True, train={"failure": "did not learn"})
        con.execute("update models set record_json=?, diverged=1 where id=?", (json.dumps(r), mid))
    con.commit()
    con.close()
    with Store(db, create=False) as s:
        frame = load(s)
    (c,) = [c for c in crossovers(frame) if c.metric == "correct_per_joule"]
    assert c.answer() == "not comparable: training failed at every point"
    assert any(n.startswith("4 point(s) left out: the MoE's or the dense model's training failed") for n in c.notes)
    _title, head, rows = points_table(frame)
    assert {r[head.index("correct inferences/J")] for r in rows} == {"not comparable (did not learn)"}
    (ipj,) = [c for c in crossovers(frame) if c.metric == "inferences_per_joule"]
    assert ipj.status == "crossed"  # speed and energy stay valid


def test_the_llm_table_says_how_its_j_per_1k_tokens_is_made_and_never_rounds_a_bound_fraction_to_zero(tmp_path):
    """Two repeats at 38.5 and 998.8 tokens/J: the store's J/1k is 1,000 / their median (1.93), not the median of
    their J/1k (13.5), and the title says so; a CPU forward at 0.0216 % of its bound is not shown as '0%'."""
    from moe_energy.report.analysis import load
    from moe_energy.report.html import layer_tokens_table
    from moe_energy.storage.store import Store

    db = tmp_path / "llm.db"
    fill_layers(db, archs=("olmoe-1b-7b",))
    with Store(db, create=False) as s:
        frame = load(s)
    for m in frame.layers:
        m.update(inferences_per_joule=518.6, inferences_per_joule_min=38.48, inferences_per_joule_max=998.8,
                 fraction_of_roofline=0.000216 if m["kind"] == "moe" else 0.0197)
    title, head, rows = layer_tokens_table(frame)
    assert "1,000 / the median tokens/J of the repeats" in title
    row = dict(zip(head, rows[0]))
    assert row["MoE J/1k tokens"] == "1.928 (1.001-25.99)"
    assert row["MoE bound (of it)"].endswith("(0.022%)")
    assert row["dense (total) bound (of it)"].endswith("(2%)")
