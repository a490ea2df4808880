"""Why models/kernels.py exists: one LLM layer's expert GEMMs through MKL (torch's matmul) and oneDNN.

    PYTHONPATH=src python benchmarks/cpu_gemm.py --arch qwen3-30b-a3b [--rows 1,2,8,32] [--seconds 2]

For each row count n, every expert's gate_up [2I, d] and down [d, I] GEMM runs on n rows, experts visited in
turn so each reads its weights from memory as in a real batch; the libraries are timed round by round,
interleaved (measure.timing), and the weight bytes read per second of the median round are printed. On the
project's 2-core AMD EPYC (fp32), qwen3-30b-a3b's experts at 1 / 2 / 8 / 32 rows read 18 / 10 / 8 / 5 GB/s
through MKL and 24 / 21 / 15 / 9 GB/s through oneDNN; a plain copy moves about 34 GB/s there.

The third column turns the GEMM feature-major for oneDNN (the weight as its input, the rows as its weight:
y^T [out, n] = W x^T), calling oneDNN's linear directly: kernels.linear would hand it to MKL, since its "weight"
(the n rows) is under kernels.ONEDNN_MIN_WEIGHT elements. Until 2026-12 it went through kernels.linear, so the
figures first quoted for it (qwen3-30b-a3b, 128 experts: 24.9 against 21.7 GB/s at 2 rows, 11.7 against 12.6
from 16) were MKL's feature-major GEMM, not oneDNN's. Inside a layer's forward feature-major lost at every
threshold tried (qwen3-30b-a3b, fp32: 109 against 98 ms a forward at 32 tokens with groups of 2 rows or more
feature-major, 358 against 333 ms at 512 tokens with groups of 8 or more): each output must be copied back
transposed. kernels.py keeps the token-major call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_energy.measure.timing import time_interleaved
from moe_energy.models.archs import get_arch
from moe_energy.models.kernels import ONEDNN, linear


def expert_gemms(gate_up: torch.Tensor, down: torch.Tensor, n: int,
                 how: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """Every expert's two GEMMs on n random rows through ``how`` (F.linear or kernels.linear)."""
    x, h = torch.randn(n, gate_up.shape[2]), torch.randn(n, down.shape[2])

    def run() -> None:
        for e in range(gate_up.shape[0]):
            how(x, gate_up[e])  # [n, 2I]
            how(h, down[e])  # [n, d]

    return run


def feature_major(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """oneDNN's linear with the roles swapped: w [out, in] as the input, x [n, in] as the weight -> [out, n].
    Straight to the op: through kernels.linear a "weight" of n rows (under ONEDNN_MIN_WEIGHT) would go to MKL."""
    return torch.ops.mkldnn._linear_pointwise(w, x, None, "none", [], "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-30b-a3b")
    p.add_argument("--experts", type=int, default=32, help="experts to visit (of the arch's E; fewer is quicker)")
    p.add_argument("--rows", default="1,2,8,32", help="rows per expert (comma list)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row count")
    a = p.parse_args()
    if not ONEDNN:
        raise SystemExit("this torch build has no oneDNN: nothing to compare")
    arch = get_arch(a.arch)
    E, d, i = min(a.experts, arch.experts), arch.d_model, arch.ffn_dim
    torch.manual_seed(0)
    gate_up, down = torch.randn(E, 2 * i, d), torch.randn(E, d, i)  # transformers 5's storage
    nbytes = (gate_up.numel() + down.numel()) * 4
    print(f"{a.arch}: {E} experts, d={d}, I={i}, fp32, {torch.get_num_threads()} threads; GB/s of weights read")
    print(f"{'rows':>5s} {'MKL GB/s':>9s} {'oneDNN GB/s':>12s} {'oneDNN fm GB/s':>15s} {'speed-up':>9s}")
    with torch.inference_mode():
        for n in (int(r) for r in a.rows.split(",")):
            fns = {"mkl": expert_gemms(gate_up, down, n, F.linear), "onednn": expert_gemms(gate_up, down, n, linear),
                   "onednn_fm": expert_gemms(gate_up, down, n, feature_major)}
            t = time_interleaved(fns, sync=lambda: None, min_rounds=3, budget_s=a.seconds)
            mkl, dnn, fm = (nbytes / (t[k].median_ms / 1e3) / 1e9 for k in fns)
            print(f"{n:5d} {mkl:9.2f} {dnn:12.2f} {fm:15.2f} {dnn / mkl:8.2f}x")


if __name__ == "__main__":
    main()
