"""One GPU session's checks for the fast strategies: equivalence and no host sync on CUDA, the roofline,
and the strategy tables (eager and compiled) for the small and xl presets in bf16.

    PYTHONPATH=src python benchmarks/gpu_strategies.py OUT_DIR [--dry-run]

--dry-run runs the same steps on the CPU with a tiny shape (to check the script before spending GPU time);
without it, a host with no CUDA device is refused (exit 2). Every step is independent: a failure is printed and
the next step runs. Each table is saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

T0 = time.time()


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def step(name, fn) -> None:
    log(f"== {name}")
    try:
        fn()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description="One GPU session's checks for the fast strategies (a CUDA device, or "
                                            "--dry-run on the CPU).")
    p.add_argument("out", metavar="OUT_DIR", help="where the tables (JSON) and the compile cache go")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny shapes")
    a = p.parse_args()
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        p.exit(2, f"gpu_strategies: no CUDA device here (torch {torch.__version__}); --dry-run runs the steps on "
                  "the CPU\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MOE_ENERGY_CACHE_DIR", str(out / "cache"))
    from rich.console import Console

    from moe_energy.bench.strategies import bench_strategies
    from moe_energy.commands.strategies import strategies_table
    from moe_energy.config import PRESETS, ModelSpec
    from moe_energy.measure import roofline
    from moe_energy.models import MoE
    from moe_energy.models.strategies import STRATEGIES

    console = Console(width=200)
    dev = torch.device("cpu" if dry else "cuda")
    log("torch", torch.__version__, "device", torch.cuda.get_device_name() if not dry else "cpu (dry run)")
    small = ModelSpec(4, 32, 2, 2, 32, 10) if dry else PRESETS["small"]
    xl = ModelSpec(6, 64, 3, 3, 32, 10) if dry else PRESETS["xl"]
    secs = 0.2 if dry else 1.5

    def equivalence() -> None:
        torch.manual_seed(0)
        m = MoE.from_spec(small).to(dev).eval()
        x = torch.randn(128, small.input_dim, device=dev)
        with torch.inference_mode():
            m.strategy = "active_loop"
            ref = m(x).float()
            for dt in (torch.float32, torch.bfloat16):
                m.to(dt)
                for layout in ("out_in", "in_out"):
                    m.set_layout(layout)
                    for s in STRATEGIES:
                        m.strategy = s
                        if s == "padded_capacity":
                            m.capacity_factor = small.experts / small.top_k  # no drop: must be exact
                        y = m(x.to(dt)).float()
                        log(f"{str(dt):15s} {layout:6s} {s:16s} max|diff| {(y - ref).abs().max().item():.2e}"
                            f"  (ref max {ref.abs().max().item():.2f})")
                m.to(torch.float32)
            m.capacity_factor = 1.25

    def no_sync() -> None:
        torch.manual_seed(0)
        m = MoE.from_spec(small).to(dev, torch.bfloat16).eval()
        x = torch.randn(128, small.input_dim, device=dev, dtype=torch.bfloat16)
        for s in ("grouped", "grouped_fm", "padded_capacity", "dense_experts", "padded", "active_loop"):
            m.strategy = s
            with torch.inference_mode():
                m(x)
                torch.cuda.synchronize() if not dry else None
                if not dry:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    m(x)
                    log(f"{s}: no host sync")
                except RuntimeError as e:
                    log(f"{s}: syncs ({str(e).splitlines()[0][:80]})")
                finally:
                    if not dry:
                        torch.cuda.set_sync_debug_mode("default")

    roof_box: dict = {}

    def calibrate() -> None:
        r = roofline.calibrate(dev, ("float32", "bfloat16"), seconds=0.1 if dry else 0.4,
                               gemm_size=256 if dry else None, copy_bytes=2**22 if dry else None)
        roof_box["r"] = r
        log("roofline", {k: f"{v / 1e12:.1f} TFLOP/s" for k, v in r.gemm_flops_per_s.items()},
            f"{r.bandwidth_bytes_per_s / 1e9:.0f} GB/s")

    def bench(tag, spec, compile, strategies) -> None:
        doc = bench_strategies(spec, batch_size=128, dtype="bfloat16", device=dev, strategies=strategies,
                               compile=compile, seconds=secs, roof=roof_box.get("r"), on_phase=log)
        (out / f"{tag}.json").write_text(json.dumps(doc, indent=1, default=str))
        console.print(strategies_table(doc))
        rows = {r["name"] + (" compiled" if r.get("compile") else ""): r for r in doc["rows"]}
        dense = {k: v for k, v in rows.items() if v["kind"] == "dense"}
        # a strategy that could not run here is a row with no figures (its note says why): not a candidate
        exact = [v for v in rows.values() if v["kind"] == "moe" and v.get("strategy") != "padded_capacity"
                 and v["inferences_per_second"] is not None]
        if not exact:
            log(f"{tag}: no exact MoE strategy ran")
            return
        best = max(exact, key=lambda v: v["inferences_per_second"])
        for k, v in dense.items():
            ratio = best["inferences_per_second"] / v["inferences_per_second"]
            log(f"{tag}: best exact MoE {best['name']} ({best.get('weight_layout')}) "
                f"{best['inferences_per_second']:,.0f} inf/s = {ratio:.2f}x {k}")

    step("equivalence on device", equivalence)
    step("host syncs (cuda sync debug mode)", no_sync)
    step("calibrate", calibrate)
    all_s = list(STRATEGIES)
    step("small bf16 eager", lambda: bench("small-bf16-eager", small, False, all_s))
    step("small bf16 compiled", lambda: bench("small-bf16-compiled", small, True,
                                              ["active_loop", "grouped", "padded_capacity"]))
    xl_s = ["active_loop", "grouped", "grouped_fm", "padded", "padded_capacity", "dense_experts", "auto"]
    step("xl bf16 eager", lambda: bench("xl-bf16-eager", xl, False, xl_s))
    step("xl bf16 compiled", lambda: bench("xl-bf16-compiled", xl, True, ["active_loop", "grouped"]))
    log("done")


if __name__ == "__main__":
    main()
