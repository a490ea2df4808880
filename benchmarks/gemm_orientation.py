"""Why grouped_fm exists: one expert's GEMM chain, token-major vs feature-major, by rows per expert.

    PYTHONPATH=src python benchmarks/gemm_orientation.py --preset large [--rows 16,24,32,34,40,48] [--seconds 2]

For each row count n, every expert of the preset runs its L+1 layers on n rows, once as the seed and
``grouped`` do (token-major, h [n, in] @ W^T) and once as ``grouped_fm`` does (feature-major,
W [out, in] @ h [in, n]). Experts are visited in turn, so each chain reads its weights from memory as in a
real batch. Both orientations are timed round by round, interleaved, the order alternating (measure.timing), and
the median is reported; the last column is feature-major's time per row of one expert's chain (ms / (n x E)). On the
project's 2-core EPYC (MKL, AVX2), feature-major was ~1.3x faster at 16-64 rows, its cost stepped with
16-row tiles (34 rows cost like 48), and at 8 rows or fewer it was ~1.4x slower than token-major (and
slower than itself at 16): hence grouped_fm's padding of each expert's group to GROUP_ALIGN = 16.
"""

from __future__ import annotations

import argparse

import torch

from moe_energy.config import PRESETS
from moe_energy.measure.timing import time_interleaved


def chains(weights: list[torch.Tensor], biases: list[torch.Tensor], n: int, d: int) -> dict:
    """The two orientations as callables over all experts, on random inputs of n rows."""
    E, last = weights[0].shape[0], len(weights) - 1
    x = torch.randn(E, n, d)
    xt = x.transpose(1, 2).contiguous()  # [E, d, n]

    def token_major() -> None:
        for e in range(E):
            h = x[e]  # [n, in]
            for layer, (w, b) in enumerate(zip(weights, biases)):
                h = torch.addmm(b[e], h, w[e].t())  # [n, out]
                if layer < last:
                    h = h.relu_()

    def feature_major() -> None:
        for e in range(E):
            h = xt[e]  # [in, n]
            for layer, (w, b) in enumerate(zip(weights, biases)):
                h = torch.addmm(b[e][:, None], w[e], h)  # [out, n]
                if layer < last:
                    h = h.relu_()

    return {"token_major": token_major, "feature_major": feature_major}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="large", choices=list(PRESETS))
    p.add_argument("--rows", default="8,16,24,32,34,40,48,64", help="rows per expert to try (comma list)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row count")
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    spec = PRESETS[a.preset]
    dims = [spec.input_dim] + [spec.hidden] * spec.layers + [spec.classes]
    torch.manual_seed(0)
    weights = [torch.randn(spec.experts, o, i) / i**0.5 for i, o in zip(dims[:-1], dims[1:])]  # [E, out, in]
    biases = [torch.zeros(spec.experts, o) for o in dims[1:]]
    print(f"{a.preset}: {spec.experts} experts x {spec.layers + 1} layers, fp32, {torch.get_num_threads()} threads")
    print(f"{'rows':>5s} {'token-major ms':>15s} {'feature-major ms':>17s} {'fm speed-up':>12s} {'fm us/row':>10s}")
    with torch.inference_mode():
        for n in rows:
            # rotated rounds: token-major no longer always runs first, right after feature-major's last call
            t = time_interleaved(chains(weights, biases, n, spec.input_dim), min_rounds=3, budget_s=a.seconds)
            tm, fm = (t[k].median_ms for k in ("token_major", "feature_major"))
            print(f"{n:5d} {tm:15.2f} {fm:17.2f} {tm / fm:11.2f}x {fm * 1e3 / (n * spec.experts):10.1f}")


if __name__ == "__main__":
    main()
