"""The issue's CPU targets, measured: repeat bench-strategies and report medians over the repeats.

    PYTHONPATH=src python benchmarks/strategy_targets.py --preset small --repeats 5 [--seconds 3] [--out DIR]

On a shared machine one run's figures swing with the neighbours' load; each run already interleaves
every model round by round, and the median over repeats smooths what is left. "Fastest MoE" counts the
exact strategies only (not the seed's two, not padded_capacity, which may drop pairs), of those that ran (a
strategy with no kernel for this shape is a row with no figures). Each model's ms/batch is the median over the
runs, and its inf/s and fraction of roofline are that median's (so the columns agree with an even --repeats too);
the ratios (vs active_loop, efficiency vs ideal) are each run's own, side by side, then their median.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from moe_energy.bench.strategies import bench_strategies
from moe_energy.config import PRESETS
from moe_energy.measure import roofline

FAST = ("grouped", "grouped_fm", "padded", "dense_experts", "auto")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, all cores)")
    p.add_argument("--out", default=None, help="write every run's document and the summary here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    roof = roofline.load(dev)
    runs = []
    for i in range(a.repeats):
        doc = bench_strategies(PRESETS[a.preset], batch_size=a.batch_size, dtype=a.dtype, device=dev,
                               seconds=a.seconds, roof=roof)
        rows = {r["name"]: r for r in doc["rows"]}
        fast = [rows[f"moe[{s}]"] for s in FAST if rows.get(f"moe[{s}]", {}).get("ms_per_batch") is not None]
        if not fast:
            raise SystemExit(f"run {i + 1}: none of {', '.join(FAST)} ran: "
                             + "; ".join(f"{r['name']}: {r.get('not_timed')}" for r in doc["rows"]
                                         if r["ms_per_batch"] is None))
        best = min(fast, key=lambda r: r["ms_per_batch"])
        runs.append({"doc": doc, "best": best["name"], "best_layout": best["weight_layout"],
                     "speedup": best["speedup_vs_active_loop"], "efficiency": best["efficiency_vs_ideal"]})
        load = " -> ".join("?" if v is None else f"{v:.1f}" for v in doc["host_load_average_1m"].values())
        print(f"run {i + 1}: fastest {best['name']} ({best['weight_layout']}) {best['speedup_vs_active_loop']:.2f}x "
              f"active_loop, efficiency vs ideal {best['efficiency_vs_ideal']:.2f} (1-minute host load {load})",
              flush=True)
    names = [r["name"] for r in runs[0]["doc"]["rows"]]
    print(f"\n{a.preset}, batch {a.batch_size}, {a.dtype}, {torch.get_num_threads()} threads, median of {a.repeats} "
          "runs (each a median of rounds):")
    print(f"{'model':22s} {'ms/batch':>9s} {'inf/s':>9s} {'vs active_loop':>14s} {'eff. vs ideal':>13s} "
          f"{'of roofline':>11s}  layouts chosen")
    summary = {}
    for n in names:
        rs = [r for run in runs for r in run["doc"]["rows"] if r["name"] == n]

        def med(key, rs=rs):
            xs = [r[key] for r in rs if r.get(key) is not None]
            return statistics.median(xs) if xs else None

        ms, bound = med("ms_per_batch"), med("roofline_bound_ms")
        summary[n] = {"ms_per_batch": ms,  # inf/s and the fraction from the median ms: one consistent row
                      "inferences_per_second": a.batch_size / (ms / 1e3) if ms else None,
                      "speedup_vs_active_loop": med("speedup_vs_active_loop"),
                      "efficiency_vs_ideal": med("efficiency_vs_ideal"),
                      "fraction_of_roofline": bound / ms if ms and bound is not None else None,
                      "runs_timed": sum(r.get("ms_per_batch") is not None for r in rs)}
        s = summary[n]
        if ms is None:
            why = next((r.get("not_timed") for r in rs if r.get("not_timed")), "no figures")
            print(f"{n:22s} not timed in any run: {why}")
            continue
        lay = sorted({r.get("weight_layout") for r in rs if r.get("weight_layout")})
        eff = f"{s['efficiency_vs_ideal']:.2f}" if s["efficiency_vs_ideal"] is not None else "(dense)"
        roof_f = f"{s['fraction_of_roofline']:.0%}" if s["fraction_of_roofline"] is not None else "n/a"
        print(f"{n:22s} {ms:9.3f} {s['inferences_per_second']:9.0f} "
              f"{s['speedup_vs_active_loop']:13.2f}x {eff:>13s} {roof_f:>11s}  {','.join(lay)}")
    sp = statistics.median(r["speedup"] for r in runs)
    ef = statistics.median(r["efficiency"] for r in runs)
    print(f"\nfastest exact MoE per run: {[r['best'] for r in runs]}")
    print(f"median over runs of the fastest exact MoE: {sp:.2f}x active_loop, efficiency vs ideal {ef:.2f}")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"targets-{a.preset}-{a.dtype}-b{a.batch_size}-t{torch.get_num_threads()}.json").write_text(json.dumps(
            {"summary": summary, "fastest_speedup_median": sp, "fastest_efficiency_median": ef,
             "runs": [r["doc"] for r in runs]}, indent=1))


if __name__ == "__main__":
    main()
