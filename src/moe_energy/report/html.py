"""The report's files: one self-contained HTML page (PNG plots embedded as base64) and a Markdown summary
beside its PNGs. Both carry the same tables; the crossover table comes first because it is the answer.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..analysis import METRICS, Crossover, Frame, correct_per_joule, crossovers, energy_kind, pairs, value
from ..fileio import now_utc, replace_atomic
from .plots import PLOTS

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows (already formatted text)

METHOD_NOTE = (
    "Crossover: the smallest total parameter count where the MoE's figure exceeds that of the dense model "
    "matched to its total parameters, interpolated between neighbouring sweep points with log(MoE / dense) "
    "linear in log10(params) (a straight line on the log-log plots, so the mark sits where the curves cross). "
    "The interval uses the repeats' spread: from the best case "
    "(MoE's best window vs dense's worst) to the worst case (MoE's worst vs dense's best). "
    "An estimated energy figure is never compared with a measured one."
)


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    images: list[Path]


def _num(v: float | None, spec: str = ",.1f") -> str:
    return "not measured" if v is None else f"{v:{spec}}"


def _spread(m: dict, metric: str, spec: str) -> str:
    v = value(m, metric)
    if v is None:
        return "not measured"
    lo, hi = value(m, metric, "min"), value(m, metric, "max")
    text = f"{v:{spec}}"
    if lo is not None and hi is not None and (lo != v or hi != v):
        text += f" ({lo:{spec}}-{hi:{spec}})"
    return text


def _energy(m: dict, metric: str, spec: str) -> str:
    if energy_kind(m) == "none":
        return "not measured"
    text = _spread(m, metric, spec)
    return text + " (estimate)" if energy_kind(m) == "estimate" and text != "not measured" else text


def crossover_table(xos: list[Crossover]) -> Table:
    head = ["batch size", "dtype", "strategy", "E/k", "figure", "crossover (total params)", "energy", "points",
            "notes"]
    rows = []
    for c in xos:
        energy = c.energy or ("-" if c.metric not in ("inferences_per_joule", "correct_per_joule") else "not measured")
        rows.append([str(c.batch_size), str(c.dtype), str(c.strategy), str(c.ek), METRICS[c.metric], c.answer(), energy,
                     str(c.n_points), "; ".join(c.notes)])
    return "Crossover: where MoE overtakes the total-matched dense model", head, rows


def points_table(frame: Frame) -> Table:
    head = ["point", "E/H/L/k", "batch", "dtype", "model", "params", "active params", "held-out acc",
            "inferences/s", "avg W", "inferences/J", "correct inferences/J", "energy method"]
    rows = []
    pts = {p["id"]: p for p in frame.points}
    for m in sorted(frame.models, key=lambda m: (m["total_params"] or 0, m["batch_size"] or 0, str(m["dtype"]),
                                                  m["point_id"], m.get("ordinal", 0))):
        p = pts.get(m["point_id"], {})
        acc = _num(value(m, "accuracy"), ".1%") + (" (diverged: accuracy meaningless)" if m.get("diverged") else "")
        cpj = correct_per_joule(m)
        rows.append([
            str(m["label"]), f"{p.get('experts')}/{p.get('hidden')}/{p.get('layers')}/{p.get('top_k')}",
            str(m["batch_size"]), str(m["dtype"]), str(m["name"]), f"{m['params']:,}", f"{m['active_params']:,}", acc,
            _spread(m, "inferences_per_second", ",.0f"), _energy(m, "average_power_w", ",.1f"),
            _energy(m, "inferences_per_joule", ",.1f"),
            "not measured" if cpj is None or energy_kind(m) == "none" else
            f"{cpj:,.1f}" + (" (estimate)" if energy_kind(m) == "estimate" else ""),
            str(m.get("energy_method")),
        ])
    return "Every point measured (median of the repeats, spread in brackets)", head, rows


def comparison_table(frame: Frame) -> Table:
    """The blog's table: at each size, the MoE against the dense model of the same total size."""
    head = ["point", "total params", "batch", "dtype", "strategy", "MoE inferences/J", "dense inferences/J",
            "ratio", "MoE inferences/s", "dense inferences/s", "ratio", "MoE avg W", "dense avg W",
            "MoE acc", "dense acc"]
    rows = []
    for (b, dt, st, _ek), ps in sorted(pairs(frame).items(), key=lambda kv: (kv[0][0] or 0, *map(str, kv[0][1:]))):
        for p in ps:
            m, d = p.moe, p.dense
            comparable = energy_kind(m) == energy_kind(d) != "none"
            ipj_m, ipj_d = value(m, "inferences_per_joule"), value(d, "inferences_per_joule")
            ips_m, ips_d = value(m, "inferences_per_second"), value(d, "inferences_per_second")
            est = " (estimate)" if comparable and energy_kind(m) == "estimate" else ""
            rows.append([
                p.label, f"{p.params:,}", str(b), str(dt), str(st),
                _energy(m, "inferences_per_joule", ",.1f"), _energy(d, "inferences_per_joule", ",.1f"),
                (f"{ipj_m / ipj_d:.3f}{est}" if comparable and ipj_m and ipj_d else "not comparable"),
                _spread(m, "inferences_per_second", ",.0f"), _spread(d, "inferences_per_second", ",.0f"),
                f"{ips_m / ips_d:.3f}" if ips_m and ips_d else "not measured",
                _energy(m, "average_power_w", ",.1f"), _energy(d, "average_power_w", ",.1f"),
                _num(value(m, "accuracy"), ".1%") + (" (diverged: accuracy meaningless)" if m.get("diverged") else ""),
                _num(value(d, "accuracy"), ".1%") + (" (diverged: accuracy meaningless)" if d.get("diverged") else ""),
            ])
    return "MoE vs the dense model of the same total size, at each point (ratio above 1: MoE better)", head, rows


def skipped_table(frame: Frame) -> Table:
    head = ["point", "total params", "batch", "dtype", "status", "reason"]
    rows = [[str(p["label"]), f"{p['total_params']:,}" if p["total_params"] else "-", str(p["batch_size"]),
             str(p["dtype"]), p["status"], str(p["reason"])] for p in frame.skipped]
    return "Points skipped or failed", head, rows


def environment_table(frame: Frame) -> Table:
    rows = []
    for r in frame.runs:
        env = json.loads(r["environment_json"]) if r.get("environment_json") else {}
        meter = json.loads(r["meter_json"]) if r.get("meter_json") else {}
        rows.append([r["run_id"][:8], r["created_utc"], str(r.get("grid_name")), str(r.get("shard") or "-"),
                     str(env.get("device_name")), str(env.get("torch")),
                     f"{meter.get('name')} ({meter.get('method')})" if meter else "-",
                     str(meter.get("notice") or "")])
    return "Runs", ["run", "started (UTC)", "grid", "shard", "device", "torch", "energy meter", "meter notice"], rows


def all_tables(frame: Frame) -> list[Table]:
    return [crossover_table(crossovers(frame)), comparison_table(frame), points_table(frame), skipped_table(frame),
            environment_table(frame)]


def png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _html_table(t: Table) -> str:
    title, head, rows = t
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p class='none'>none</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    title, head, rows = t
    if not rows:
        return f"## {title}\n\nnone\n"
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1250px;color:#222;
background:#fff;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
.note{background:#f7f7e8;border-left:4px solid #c9c26b;padding:.5em 1em;font-size:.9em}.none{color:#777}
"""


def write_report(frame: Frame, out_dir: str | Path, db: str | Path) -> ReportFiles:
    """Draw every plot, then write report.html (self-contained) and report.md with plots/*.png."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    created = now_utc()
    tables = all_tables(frame)
    images: list[tuple[str, str, bytes]] = []
    for slug, title, fn in PLOTS:
        fig = fn(frame)
        images.append((slug, title, png(fig)))
    methods = sorted(frame.methods())
    warn = []
    if "estimate" in methods:
        warn.append("Some energy figures are estimates (a TDP model, not a reading): hollow markers, hatched bars "
                    "and '(estimate)' mark them; they are never compared with measured ones.")
    if "none" in methods:
        warn.append("Some models have no energy figure (meter: none); only their speed is compared.")
    headline = f"{len(frame.points)} point(s) measured, {len(frame.skipped)} skipped or failed; energy methods: " \
               f"{', '.join(methods) or 'none'}."

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>moe-energy report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>moe-energy report: when does a Mixture of Experts use less energy per inference?</h1>",
             f"<p>Generated {html.escape(created)} from <code>{html.escape(str(db))}</code>. "
             f"{html.escape(headline)}</p>"]
    parts += [f"<p class='note'>{html.escape(w)}</p>" for w in warn]
    parts.append(_html_table(tables[0]))
    parts.append(f"<p class='note'>{html.escape(METHOD_NOTE)}</p>")
    parts.append(_html_table(tables[1]))
    for slug, title, data in images:
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f"<figure id='{slug}'><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    parts += [_html_table(t) for t in tables[2:]]
    parts.append("</body></html>")

    paths = []
    for slug, _title, data in images:
        p = out / "plots" / f"{slug}.png"
        replace_atomic(p, data)
        paths.append(p)
    md = ["# moe-energy report: when does a Mixture of Experts use less energy per inference?", "",
          f"Generated {created} from `{db}`. {headline}", ""]
    md += [f"> {w}\n" for w in warn]
    md.append(_md_table(tables[0]))
    md.append(f"{METHOD_NOTE}\n")
    md.append(_md_table(tables[1]))
    md += [f"![{title}](plots/{slug}.png)\n" for slug, title, _ in images]
    md += [_md_table(t) for t in tables[2:]]
    html_path, md_path = out / "report.html", out / "report.md"
    replace_atomic(html_path, "".join(parts).encode("utf-8"))
    replace_atomic(md_path, "\n".join(md).encode("utf-8"))
    return ReportFiles(html_path, md_path, paths)
