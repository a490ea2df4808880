"""The GEMMs every model here runs, kept in one file (as torchtitan keeps its kernels apart from its modules).

On a GPU these are plain ``F.linear`` and ``grouped_mm``. On a CPU, for inference, they are oneDNN's linear
(``mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend calls for frozen Linear layers), because
the BLAS behind torch's own CPU matmul is slow at the GEMMs an MoE does: few rows against a large weight.
On this project's 2-core AMD EPYC (torch's MKL build, fp32), one expert's gate_up [1536, 2048] against 1, 2, 8
and 32 rows reads its weights at 18, 10, 8 and 5 GB/s through MKL and at 24, 21, 15 and 9 GB/s through oneDNN
(benchmarks/cpu_gemm.py). torch's grouped_mm on a CPU is itself a loop of MKL mm over the groups, so the loop
here over the same groups is no less grouped; on a CPU a tensor's values are read without any device sync.

The dense baselines run through the same ``linear`` (``FastLinear``), so a comparison never credits the MoE
with a faster library. Training (autograd), torch.compile tracing and other devices take the plain ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..dtypes import onednn_bf16

# public as F.grouped_mm in recent torch; torch._grouped_mm (same arguments) before that
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# bf16 only where oneDNN runs it: on a CPU without avx512_core (a 2-core AMD EPYC with AVX2) its bf16 linear has
# no kernel at all and F.linear's emulation is the only way
ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if onednn_bf16() else (torch.float32,)
# oneDNN's linear costs ~10-20 us more per call than MKL's, which only a weight of this many elements repays:
# on the 2-core EPYC, fp32, 8..128 rows, MKL / oneDNN time was 0.4-0.7 at 10x256 and 64x64, 0.67-1.0 at
# 256x256, 0.97-1.07 at 256x784 (2e5), 1.2-1.5 at 1024x784 and 1024x1024, 1.3-1.8 at 2048x2048.
ONEDNN_MIN_WEIGHT = 2**18


def use_onednn(x: Tensor, w: Tensor) -> bool:
    """Whether oneDNN's linear takes this GEMM: a CPU inference GEMM in fp32/bf16 on a weight large enough to
    repay its call, outside a compiled graph."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES and w.dtype == x.dtype
            and w.shape[-1] * w.shape[-2] >= ONEDNN_MIN_WEIGHT and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


# bf16 on AMX/VNNI wants its weights in blocked pairs (oneDNN's AB16b32a2b): given the plain [out, in] layout,
# oneDNN (and aten's F.linear, through oneDNN's matmul) re-lays every weight on every call. prepack() keeps a
# packed copy of each bf16 weight it meets (as inductor's freezing and CPU LLM servers do). On the 2-core Xeon
# (AMX; benchmarks/precision_kernels.py, interleaved, best rounds, runs on a shared host): one expert's GEMMs at
# 1 / 8 / 32 rows read 1.15-1.35x / 1.24-1.28x / 1.04-1.32x faster; whole bf16 layers (olmoe-1b-7b,
# qwen3-30b-a3b, strategy grouped) ran 1.06-1.35x faster at 1 token, 1.11-1.28x at 32, 1.20-1.25x at 512.
# Opt-in: the copy doubles those weights' memory, which memory.py's estimates do not count, and with torch 2.13 it
# no longer pays. Remeasured on the same class of Xeon (2026-12-07; whole bf16 layers, grouped, interleaved, 40
# rounds, two runs): packed / plain median 0.98-1.07x at 512 tokens and 0.96-1.03x at 32 (olmoe-1b-7b,
# qwen3-30b-a3b); a 20-round run that read 1.13-1.42x was this VM's noise. fp32 gains nothing (its kernels read
# the plain layout: 21.7 / 10.4 GB/s plain, 21.2 / 10.3 packed at 1 / 32 rows).
PREPACK = False
PACK_ROWS = 32  # the row count oneDNN is told to pack for; the packed weight serves every row count
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight's root tensor -> {"version": v, view key: packed}


def prepack(enabled: bool = True) -> None:
    """Pack bf16 weights for oneDNN once, on first use, and keep them while the weights live (or drop them)."""
    global PREPACK
    PREPACK = enabled
    if not enabled:
        _PACKED.clear()


def _packed(w: Tensor) -> Tensor:
    """w's packed copy (made once per weight version), or w itself when not packing or w cannot be tracked."""
    if not PREPACK or w.dtype != torch.bfloat16:
        return w
    root = w if w._base is None else w._base  # an expert's slice or a transposed view: keyed under the stack
    try:
        version = root._version  # bumped by every in-place write (load_state_dict, copy_)
    except RuntimeError:  # an inference tensor tracks no version: a packed copy could go stale unseen
        return w
    table = _PACKED.get(root)
    if table is None or table["version"] != version:
        table = _PACKED[root] = {"version": version}
    key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
    p = table.get(key)
    if p is None:
        p = table[key] = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
    return p


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """oneDNN's linear, except on one row of a row-major weight: there ATen's matrix-vector product (``torch.mv``,
    fp32 accumulation, the weight read once in its plain layout) reads the weight faster. One bf16 row against
    olmoe-1b-7b's 64 experts' gate_up and down on the 2-core Xeon (AMX; interleaved, 30 rounds, two runs): 14.9-15.4
    GB/s median against oneDNN's 10.8-11.6 plain and 11.7-13.5 packed; fp32 20.6-21.5 against 19.0-20.2. Decoding
    is one row an expert, and the dense FFNs take the same path (``linear``)."""
    if x.shape[0] == 1 and w.stride(-1) == 1:
        y = torch.mv(w, x[0])  # [out]
        return (y if b is None else y.add_(b))[None]  # [1, out]
    return torch.ops.mkldnn._linear_pointwise(x, _packed(w), b, "none", [], "")


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x [n, in] @ w [out, in]^T (+ b [out]) -> [n, out], any strides of w."""
    return _onednn_linear(x, w, b) if use_onednn(x, w) else F.linear(x, w, b)


def grouped_mm_ready(t: Tensor) -> bool:
    """Whether ``grouped_mm`` takes ``t`` as an operand: its data 16-byte aligned and, of its two innermost
    dimensions, one contiguous and the other's stride a multiple of 16 bytes (torch's own check)."""
    size = t.element_size()
    inner = [s for s in t.stride()[-2:] if s != 1] or [0]
    return t.data_ptr() % 16 == 0 and 1 in t.stride()[-2:] and all(s * size % 16 == 0 for s in inner)


def grouped_linear(h: Tensor, w: Tensor, ends: Tensor, b: Tensor | None = None,
                   expert: Tensor | None = None) -> Tensor:
    """Rows sorted by group, each group through its own weight: h [R, in], w [E, out, in] (any strides),
    ``ends`` [E] int32 one past each group's last row, b [E, out] with ``expert`` [R] each row's group -> [R, out].

    Any shape runs: where grouped_mm's 16-byte rule does not hold (an odd width such as 250 in fp32), a CPU
    loops over the groups (as grouped_mm itself does there) and another device pads ``in`` with zeros.
    """
    if use_onednn(h, w):
        return _group_loop(h, w, ends, b, _onednn_linear)  # checked once, here: the hot path of grouped on a CPU
    wt = w.transpose(-2, -1)  # [E, in, out]
    if grouped_mm_ready(h) and grouped_mm_ready(wt):
        y = grouped_mm(h, wt, offs=ends)  # [R, out]
    elif h.device.type == "cpu":
        return _group_loop(h, w, ends, b, F.linear)
    else:
        y = padded_grouped_mm(h, w, ends)
    return y if b is None else y.add_(b.index_select(0, expert))  # type: ignore[arg-type]


def padded_grouped_mm(h: Tensor, w: Tensor, ends: Tensor) -> Tensor:
    """grouped_mm for any width: ``in`` padded with zero columns to 16 bytes (they add nothing to a product), and
    the output's rows to 16 bytes too, then cut back. h [R, in], w [E, out, in] -> [R, out]."""
    align = 16 // h.element_size()
    pad_in, pad_out = -h.shape[1] % align, -w.shape[1] % align
    hp = F.pad(h, (0, pad_in))  # [R, in']
    wp = F.pad(w, (0, pad_in, 0, pad_out))  # [E, out', in']
    return grouped_mm(hp, wp.transpose(-2, -1), offs=ends)[:, : w.shape[1]]  # [R, out']  -> [R, out]


def _group_loop(h: Tensor, w: Tensor, ends: Tensor, b: Tensor | None,
                kernel: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
    """``kernel(rows, w[e], b[e])`` group by group into one [R, out] (a CPU tensor's values read without a sync)."""
    out = h.new_empty(h.shape[0], w.shape[1])  # [R, out]
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = kernel(h[start:end], w[e], None if b is None else b[e])
        start = end
    return out


class FastLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose inference forward takes ``linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
