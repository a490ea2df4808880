"""Which CPU kernel to run an LLM layer's expert GEMMs with, per precision: fp32, bf16, int8 weight-only.

    PYTHONPATH=src python benchmarks/precision_kernels.py --arch olmoe-1b-7b --seconds 2 [--rows 1,2,8,32]
        [--layer-tokens 1,32,512] [--only a,b] [--no-wait-idle]

GEMMs: for each row count n, every expert's gate_up [2I, d] and down [d, I] GEMM runs on n rows, experts
visited in turn (all of the arch's experts: more weight bytes than any cache), through each candidate. Printed
per candidate: GB/s of its own weight bytes (int8: 1 byte an element) and GFLOP/s of its best round (other
work only ever adds time) and the median's GB/s; "of bound": the bound's time over the best round's, the bound
being the weight bytes at the copy bandwidth measured here (roofline.measure_bandwidth: read + write bytes of a
large copy, so a kernel that only reads can pass 1.0) or the FLOPs at the measured --dtype GEMM rate, the longer.

Layer (``--layer-tokens``): the whole MoELayer.from_arch in ``--dtype`` (router, sort, gather, combine and all) at
each token count: strategy ``grouped`` as kernels.py runs it, the same with ``kernels.prepack``, ``active_loop``,
and ``grouped`` on the same layer with its weights stored in each --weights format (quant.WEIGHT_FORMATS: int8,
w8a8, fp8; quantize_weights, as a run holds them), in ms and the speed-up.

Candidates are timed round by round, interleaved, each round starting one further along the list; one with no
kernel on this CPU (bf16 through oneDNN without avx512_core, say) is left out with a line saying why. On a shared
host each call first waits (up to 4 s) for the CPUs to be idle for 0.25 s (/proc/stat), so that rounds run
between other jobs' bursts; ``--no-wait-idle`` times straight through (measure.timing's way).

GEMM candidates (``--only`` picks some):
  fp32_onednn    oneDNN's linear (mkldnn._linear_pointwise) in fp32: kernels.linear's fp32 path
  bf16_onednn    the same in bf16, plain [out, in] weight (oneDNN re-lays it for AMX/VNNI on every call)
  bf16_packed    the same on a weight packed once (mkldnn._reorder_linear_weight; kernels.prepack)
  bf16_aten      F.linear in bf16 (aten's choice: oneDNN matmul or MKL's bf16 gemm)
  int8_pack      torch._weight_int8pack_mm as it is (ATen's AVX-512 int8 weight-only kernel)
  int8_fold      quant._folded: the same kernel on one row with the weight viewed [out/f, f*in]
  int8_dequant   quant._dequantized: the weight to bf16, F.linear, the scales on the output
  int8_deq_onednn  the same through oneDNN's linear
  int8_torchao   torchao's Int8WeightOnlyConfig tensor (Int8Tensor, PerRow) through F.linear, when importable
  int8_quant     quant.linear: what models/quant.py ships
  w8a8_fbgemm    quant.linear on a w8a8 weight: rows rounded to int8 per row, fbgemm's int8 GEMM (--weights w8a8)
  w8a8_int_mm    not weight-only, for reference: rows quantized per row, torch._int_mm (int8 x int8 -> int32)
  fp8_scaled_mm  only with --only (oneDNN's reference kernel: minutes): weights and rows float8_e4m3fn
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_energy.errors import ConfigError, described
from moe_energy.measure.roofline import host_busy, measure_bandwidth, measure_gemm
from moe_energy.models import kernels, quant
from moe_energy.models.archs import Arch, get_arch
from moe_energy.models.llm import MoELayer, quantize_weights

Gemm = Callable[[torch.Tensor, int, int], object]  # (rows, expert, projection 0 gate_up / 1 down) -> output
_lp = torch.ops.mkldnn._linear_pointwise
_STAT = Path("/proc/stat")


def _cpu_times() -> tuple[int, int]:
    fields = [int(v) for v in _STAT.read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # all, idle + iowait


def wait_idle(window: float = 0.25, busy_max: float = 0.08, timeout: float = 4.0) -> bool:
    """Wait until the CPUs were idle (under 8 % busy) for ``window`` seconds; False after ``timeout``."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        t1, i1 = _cpu_times()
        time.sleep(window)
        t2, i2 = _cpu_times()
        if t2 > t1 and 1 - (i2 - i1) / (t2 - t1) <= busy_max:
            return True
    return False


def timed(fns: dict[str, Callable[[], object]], seconds: float, gate: bool,
          min_rounds: int = 5) -> tuple[dict[str, list[float]], str]:
    """Seconds of each call, interleaved round by round (rotated); the second value says how many calls found
    the host idle. A candidate whose warm-up call raises (no kernel for it on this CPU) is left out, with a line
    saying why."""
    names = []
    for n, fn in fns.items():
        try:
            fn()  # warm-up: allocator, oneDNN primitive caches
        except Exception as e:  # noqa: BLE001 - any failure: this candidate cannot run here
            print(f"     {n}: not run ({described(e, 100)})")
        else:
            names.append(n)
    got: dict[str, list[float]] = {n: [] for n in names}
    if not names:
        return got, "no candidate ran"
    quiet = calls = rnd = 0
    start = time.perf_counter()
    while rnd < min_rounds or time.perf_counter() - start < seconds:
        k = rnd % len(names)
        for n in names[k:] + names[:k]:
            if gate:
                quiet += wait_idle()
                calls += 1
            t0 = time.perf_counter()
            fns[n]()
            got[n].append(time.perf_counter() - t0)
        rnd += 1
    return got, (f"{quiet}/{calls} calls on an idle host" if gate else "not waiting for an idle host")


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _lp(x, w, None, "none", [], "")


def _torchao(ws: list[torch.Tensor]) -> list[torch.Tensor] | str:
    try:
        from torchao.quantization import Int8Tensor, PerRow
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        return f"{type(e).__name__}: {e}"[:80]
    return [Int8Tensor.from_hp(w, granularity=PerRow()) for w in ws]


def candidates(stacks: tuple[torch.Tensor, torch.Tensor], qs: list[quant.QWeight], n: int,
               only: set[str]) -> tuple[dict[str, Gemm], dict[str, float]]:
    """Each candidate's per-expert GEMM (weights prepared outside the timing) and its bytes per weight."""
    E = stacks[0].shape[0]
    c: dict[str, Gemm] = {}
    size: dict[str, float] = {}

    def add(name: str, fn: Gemm, nbytes: float) -> None:
        c[name], size[name] = fn, nbytes

    def want(name: str) -> bool:
        return name in only if only else not name.startswith("fp8")

    if want("fp32_onednn"):
        w32 = [s.float() for s in stacks]
        add("fp32_onednn", lambda x, e, p: _onednn(x.float(), w32[p][e]), 4)
    if want("bf16_onednn"):
        add("bf16_onednn", lambda x, e, p: _onednn(x, stacks[p][e]), 2)
    if want("bf16_packed"):
        try:
            packed = [[torch.ops.mkldnn._reorder_linear_weight(s[e], kernels.PACK_ROWS) for e in range(E)]
                      for s in stacks]
        except RuntimeError as e:  # no bf16 packing on this CPU (it wants avx512 or avx_ne_convert)
            print(f"     bf16_packed: not run ({described(e, 100)})")
        else:
            add("bf16_packed", lambda x, e, p: _onednn(x, packed[p][e]), 2)
    if want("bf16_aten"):
        add("bf16_aten", lambda x, e, p: F.linear(x, stacks[p][e]), 2)
    if want("int8_pack"):
        add("int8_pack", lambda x, e, p: torch._weight_int8pack_mm(x, qs[p].qdata[e], qs[p].scale[e].to(x.dtype)), 1)
    if want("int8_fold") and n == 1:
        def fold(x: torch.Tensor, e: int, p: int) -> torch.Tensor:
            f = quant.fold_factor(x.shape[0], *qs[p].qdata.shape[1:])
            return quant._folded(x, qs[p][e], f) if f > 1 else quant._int8pack(x, qs[p][e])

        add("int8_fold", fold, 1)
    if want("int8_dequant"):
        add("int8_dequant", lambda x, e, p: quant._dequantized(x, qs[p][e]), 1)
    if want("int8_deq_onednn"):
        add("int8_deq_onednn", lambda x, e, p: _onednn(x, qs[p].qdata[e].to(x.dtype)) * qs[p].scale[e].to(x.dtype), 1)
    if want("int8_torchao"):
        ao = [_torchao([s[e] for e in range(E)]) for s in stacks]
        if isinstance(ao[0], str):
            print(f"     int8_torchao: not run ({ao[0]})")
        else:
            add("int8_torchao", lambda x, e, p: F.linear(x, ao[p][e]), 1)
    if want("int8_quant"):
        add("int8_quant", lambda x, e, p: quant.linear(x, qs[p][e]), 1)
    if want("w8a8_fbgemm"):
        qa = [quant.with_acts(q) for q in qs]
        add("w8a8_fbgemm", lambda x, e, p: quant.linear(x, qa[p][e]), 1)
    if want("w8a8_int_mm"):
        wt = [q.qdata.transpose(1, 2) for q in qs]  # [E, in, out] views of the int8 weights

        def w8a8(x: torch.Tensor, e: int, p: int) -> torch.Tensor:
            s = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # [n, 1]
            xq = (x.float() / s).round().to(torch.int8)  # [n, in]
            return (torch._int_mm(xq, wt[p][e]) * (s * qs[p].scale[e])).to(x.dtype)  # [n, out]

        add("w8a8_int_mm", w8a8, 1)
    if want("fp8_scaled_mm"):
        f8 = [s.to(torch.float8_e4m3fn) for s in stacks]  # these weights (|w| < 1) need no scale
        one = torch.ones((), dtype=torch.float32)
        add("fp8_scaled_mm", lambda x, e, p: torch._scaled_mm(x.to(torch.float8_e4m3fn), f8[p][e].t(), scale_a=one,
                                                              scale_b=one, out_dtype=x.dtype), 1)
    return c, size


def every_expert(gemm: Gemm, x: torch.Tensor, h: torch.Tensor, E: int) -> Callable[[], None]:
    def run() -> None:
        for e in range(E):
            gemm(x, e, 0)  # [n, 2I]
            gemm(h, e, 1)  # [n, d]

    return run


def gemms(a: argparse.Namespace, stacks: tuple[torch.Tensor, torch.Tensor], qs: list[quant.QWeight],
          bw: float, peak: float, only: set[str]) -> None:
    E = stacks[0].shape[0]
    elems = stacks[0].numel() + stacks[1].numel()
    print(f"{'rows':>4s} {'candidate':15s} {'GB/s':>6s} {'GB/s med':>8s} {'GFLOP/s':>8s} {'of bound':>8s} "
          f"{'vs bf16_onednn':>14s}")
    for n in (int(r) for r in a.rows.split(",")):
        x, h = torch.randn(n, stacks[0].shape[2]).bfloat16(), torch.randn(n, stacks[1].shape[2]).bfloat16()
        cands, size = candidates(stacks, qs, n, only)
        t, how = timed({k: every_expert(g, x, h, E) for k, g in cands.items()}, a.seconds, a.wait_idle)
        base = min(t["bf16_onednn"]) if "bf16_onednn" in t else None
        for k, v in t.items():
            nbytes, flops = elems * size[k], 2.0 * n * elems
            bound_s = max(nbytes / bw, flops / peak)
            best, med = min(v), statistics.median(v)
            rel = f"{base / best:13.2f}x" if base else ""
            # 3 significant digits: a tiny shape's rate still reads as a number, not 0.0
            print(f"{n:4d} {k:15s} {nbytes / best / 1e9:6.3g} {nbytes / med / 1e9:8.3g} {flops / best / 1e9:8.3g} "
                  f"{bound_s / best:8.3g} {rel:>14s}", flush=True)
        print(f"     ({how})")
        del cands


def quantized(arch: Arch, dt: str, weights: str) -> MoELayer:
    """The same seeded layer with its experts stored as ``weights`` (int8, w8a8), run as a run runs it."""
    return quantize_weights(MoELayer.from_arch(arch, dtype=dt, device="cpu", strategy="grouped", seed=0).eval(),
                            weights)


def layers(a: argparse.Namespace, arch: Arch, layer: MoELayer) -> None:
    def strategy(name: str, pack: bool, model: MoELayer = layer) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            kernels.PREPACK = pack  # the packed copies stay cached while it is off
            model.strategy = name
            return model(x)

        return forward

    dt = a.dtype.replace("bfloat16", "bf16").replace("float32", "fp32")
    fwd = {f"{dt} grouped": strategy("grouped", False), f"{dt} grouped+prepack": strategy("grouped", True),
           f"{dt} active_loop": strategy("active_loop", False),
           **{f"{w} grouped": strategy("grouped", False, quantized(arch, a.dtype, w)) for w in quant.WEIGHT_FORMATS}}
    print(f"\nwhole layer ({a.arch}, {a.dtype} activations): ms per forward, best (median) of interleaved rounds, "
          f"speed-up over {dt} grouped")
    for T in (int(t) for t in a.layer_tokens.split(",")):
        x = torch.randn(T, layer.hidden, generator=torch.Generator().manual_seed(T)).to(getattr(torch, a.dtype))
        ref = fwd[f"{dt} grouped"](x).float()
        for name, f in fwd.items():  # every variant computes the same layer (bf16 / int8 rounding apart)
            err = float((f(x).float() - ref).norm() / ref.norm())
            if err > 0.1:  # a wrong kernel, not rounding (w8a8's 7-bit rows: ~5 %)
                raise SystemExit(f"{name} at {T} tokens is off by {err:.1%} (||y - y_ref|| / ||y_ref||)")
        t, how = timed({k: (lambda f=f, x=x: f(x)) for k, f in fwd.items()}, a.seconds, a.wait_idle)
        base = min(t[f"{dt} grouped"])
        row = "  ".join(f"{k} {min(v) * 1e3:.1f} ({statistics.median(v) * 1e3:.1f}) {base / min(v):.2f}x"
                        for k, v in t.items())
        print(f"{T:4d} tokens: {row}  [{how}]", flush=True)
    kernels.prepack(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="olmoe-1b-7b")
    p.add_argument("--experts", type=int, default=0, help="fewer experts than the arch's (a quick look; k stays)")
    p.add_argument("--d-model", type=int, default=0, help="another hidden size (a quick look)")
    p.add_argument("--ffn-dim", type=int, default=0, help="another expert width I (a quick look)")
    p.add_argument("--rows", default="1,2,8,32", help="rows per expert (comma list; empty: no GEMM table)")
    p.add_argument("--layer-tokens", default="1,32,512", help="tokens per whole-layer forward (empty: none)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="the whole layer's weights and activations (the GEMM table runs bf16 rows)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row count (at least 5 rounds)")
    p.add_argument("--only", default="", help="comma list of GEMM candidates (default: all but fp8)")
    p.add_argument("--gemm-n", type=int, default=1536,
                   help="size of the square GEMM the --dtype rate (the bound's) is measured on (smaller: quicker)")
    p.add_argument("--no-wait-idle", dest="wait_idle", action="store_false",
                   help="time straight through, without waiting for other jobs' bursts to pass")
    a = p.parse_args()
    a.wait_idle = a.wait_idle and _STAT.exists()
    shape = {"experts": a.experts, "d_model": a.d_model, "ffn_dim": a.ffn_dim}
    try:
        arch = dataclasses.replace(get_arch(a.arch), **{k: v for k, v in shape.items() if v})
    except ConfigError as e:  # an unknown arch, fewer experts than its top_k
        p.error(str(e))
    cpu = torch.device("cpu")
    layer = MoELayer.from_arch(arch, dtype=a.dtype, device="cpu", strategy="grouped", seed=0).eval()
    ex = layer.experts
    stacks = (ex.gate_up_proj.detach().bfloat16(), ex.down_proj.detach().bfloat16())  # [E, 2I, d], [E, d, I]
    qs = [quant.quantize(s) for s in stacks]
    if a.wait_idle:
        wait_idle()
    bw = measure_bandwidth(cpu, 256 * 2**20, 1.0)
    peak = measure_gemm(cpu, getattr(torch, a.dtype), a.gemm_n, 1.0)  # the dtype's rate (bf16's emulated one is slow)
    print(f"{a.arch}: {arch.experts} experts, d={arch.d_model}, I={arch.ffn_dim}, {torch.get_num_threads()} threads; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s, {a.dtype} GEMM {peak / 1e9:.0f} GFLOP/s (n={a.gemm_n}); "
          f"host: {host_busy(cpu) or 'idle'}")
    with torch.inference_mode():
        if a.rows:
            gemms(a, stacks, qs, bw, peak, {s for s in a.only.split(",") if s})
        if a.layer_tokens:
            layers(a, arch, layer)


if __name__ == "__main__":
    main()
