"""int8 weight-only quantization: symmetric, one scale per output channel, as LLM servers ship MoE experts.

A decoding MoE layer is bound by the bytes of expert weights it reads, so int8 weights halve a bf16 layer's
memory traffic at the same activations (bf16 or fp32 in and out). w ~= qdata * scale[:, None] with
qdata in [-127, 127] (symmetric: no zero point, -128 unused) and scale = max|w_row| / 127 in fp32.

The GEMM on a CPU (bf16 rows, up to INT8PACK_MAX_ROWS a call): ``torch._weight_int8pack_mm``, ATen's
AVX-512 kernel, which converts the int8 weight in registers and never writes a dequantized copy; one-row calls
see the weight as [out/f, f*in] (``_folded``), which that kernel streams faster. More rows, or fp32/fp16 rows:
the weight converted to the rows' dtype, one GEMM, scales on the output (``_dequantized``): ATen's kernel has
no AMX path and falls behind (3.7 GB/s of int8 at 8 rows, 1.6-2.0 at 32), and it is 3-20x slower for fp32/fp16
rows. On the 2-core Xeon (AMX; olmoe-1b-7b, qwen3-30b-a3b shapes) one row reads int8 at 8-15 GB/s against
bf16's 10-19, so a decoding layer (1 token) ran 1.1-2.0x faster than the same layer in bf16 (runs on a shared
host vary); from ~8 rows an expert int8 loses to bf16 (a 512-token chunk: 0.4-0.7x), since the weight is read,
converted and read again. Elsewhere (GPU, autograd, compile) the weight is dequantized for F.linear /
grouped_mm. torchao 0.18.0 (imports and runs with torch 2.13) converts the int8 weight to bf16 per call too
(Int8Tensor, eager), no faster than ``_dequantized``.
Measurements: benchmarks/precision_kernels.py.

w8a8 (``--weights w8a8``): the same int8 weights, and each row of activations rounded to integers in [-n, n] on
its own scale (max|x_row| / n) per call, as LLM servers' int8 "w8a8" runs experts (SGLang's CPU backend,
per-token dynamic activations); n = 127 (8 bits), or 63 on CPUs where fbgemm's kernel would overflow 8-bit rows
(x86 without VNNI adds uint8 x int8 pairs in int16; ``act_levels`` runs the case that overflows). A row's
rounding depends on that row alone, so every strategy, batch and token count computes the same numbers.
On a CPU the GEMM is fbgemm's int8 kernel in PyTorch (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``,
the x86 inductor's static int8 linear, on a weight packed once, ``pack``): it multiplies int8 by int8 in
registers and reads each weight byte once. Its input quantization is given, not measured per call, so each row
goes in already rounded to integers with scale 1 and zero point n, which it takes exactly; the row scales go on
the output. Measured here (2-core AMD EPYC, AVX2 without VNNI, so n = 63; olmoe-1b-7b expert shapes, all 64
experts in turn): one row read int8 at 16 GB/s (fp32 F.linear: 16 GB/s of its 4-byte weights, so 4x the rows
per second; ATen's int8 weight-only kernel on bf16 rows: 7.7 GB/s), and it stays ahead of fp32 up to 64 rows an
expert (1.5x). Elsewhere (GPU, autograd, compile, or a torch without
fbgemm) the same rounding is applied to the rows and the weight dequantized: the same numbers, no int8 speed.

fp8 on a CPU: float8_e4m3fn / e5m2 tensors exist and ``torch._scaled_mm`` runs, but through oneDNN's reference
kernel (``ref:any``), ~300x slower than a bf16 GEMM on this Xeon (no fp8 arithmetic before AVX10.2); and
oneDNN's linear refuses fp8 weights. Nothing reads fp8 weights fast on a CPU here: fp8 is for GPUs
(``--weights fp8``: models/fp8.py, refused on a CPU).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8

QMAX = 127  # symmetric int8: [-127, 127]
WEIGHT_FORMATS = ("int8", "w8a8", "fp8")  # --weights: besides the dtype's own
ACTIVATION_FORMATS = ("w8a8", "fp8")  # formats whose activations are rounded too (to int8, to e4m3)
W8A8 = "w8a8"  # the format whose CPU kernel holds a packed copy beside the int8 weights
# w8a8: a row's activations as integers in [-127, 127], or [-63, 63] where fbgemm's kernel would overflow 8-bit
# rows: without VNNI it adds uint8 x int8 pairs in int16 (PyTorch's reduce_range); act_levels() finds out
ACT_LEVELS = (127, 63)
_INT8_LINEAR = "linear_with_input_q_dq_qweight_dq_output_fp32"  # fbgemm: fp32 rows in, given qparams, fp32 out
IN_DTYPE = "dtype"  # --weights dtype: the weights in the dtype (the default; a sweep axis value beside int8)
FP8_WHY = {f: "; fp8 weights are spelled fp8" for f in ("float8", "float8_e4m3fn", "e4m3")}
# bf16 rows up to which torch._weight_int8pack_mm beats converting the weight to bf16 for one GEMM (measured:
# 5.7 vs 4.6 GB/s of int8 at 8 rows, 3.9 vs 4.8 at 12; olmoe's gate_up)
INT8PACK_MAX_ROWS = 8
# ...and only for inputs a multiple of this wide: torch 2.13's kernel reads past the end of a row otherwise (a
# segfault, measured at in = 520, 2050, 2056; 544, 2064 run), so other widths take the dequantized GEMM
INT8PACK_K_MULTIPLE = 16
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # as kernels.py: F.grouped_mm in newer torch
FOLD_MIN_K, FOLD_MAX = 4096, 4  # _folded: one-row GEMMs get weight rows of at least 4096 bytes, by up to 4x


class QWeight(NamedTuple):
    """A quantized weight: qdata int8 (e4m3 for fp8) [..., out, in] (contiguous), scale fp32 [..., out]; ``acts``:
    the rows it meets are rounded too (w8a8, fp8), w8a8's through ``packed`` (fbgemm's packed weight, a tuple of
    them for a stack) on a CPU."""

    qdata: Tensor
    scale: Tensor
    acts: bool = False
    packed: Any = None

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    def __getitem__(self, e: int) -> QWeight:  # type: ignore[override]
        """Expert e of a stack: [E, out, in] -> [out, in]."""
        return QWeight(self.qdata[e], self.scale[e], self.acts, None if self.packed is None else self.packed[e])


def quantize(w: Tensor, weights: str = "int8") -> QWeight:
    """w [..., out, in] (any float dtype, any strides) -> QWeight in ``weights``' format (int8 for int8 and
    w8a8, e4m3 for fp8); a stack is done one expert at a time so the fp32 working copy is one expert's."""
    if w.dim() > 2:
        parts = [quantize(w[e], weights) for e in range(w.shape[0])]
        if not parts:
            return QWeight(torch.empty(w.shape, dtype=fp8.FP8 if weights == "fp8" else torch.int8, device=w.device),
                           torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device), weights == "fp8")
        return QWeight(torch.stack([p.qdata for p in parts]), torch.stack([p.scale for p in parts]), parts[0].acts)
    if weights == "fp8":
        return QWeight(*fp8.quantize(w), True)
    w32 = w.detach().float()  # [out, in]
    scale = w32.abs().amax(-1) / QMAX if w32.shape[-1] else w32.new_zeros(w32.shape[:-1])  # [out]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: any scale is exact
    qdata = (w32 / scale[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)  # [out, in]
    return QWeight(qdata.contiguous(), scale)


def dequantize(q: QWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """QWeight -> [..., out, in] in ``dtype`` (the reference every kernel here is tested against)."""
    return (q.qdata.to(torch.float32) * q.scale[..., None]).to(dtype)


def rate_key(weights: str | None, dtype: str) -> str:
    """The roofline GEMM rate a model's FLOPs run at: its format's kernel's where that format rounds the
    activations too (w8a8, fp8: int8 or fp8 FLOPs), else the dtype's."""
    return weights if weights in ACTIVATION_FORMATS else dtype  # type: ignore[return-value]


def describe(weights: str) -> str:
    """How a format holds the numbers, for tables and reports (w8a8's row grid is this host's)."""
    if weights == "int8":
        return "int8 weight-only, per-channel fp32 scales"
    if weights == "w8a8":
        n = act_levels()
        return (f"int8 weights (per-channel fp32 scales) and int8 activations (each row rounded on its own scale to "
                f"integers in [-{n}, {n}])")
    if weights == "fp8":
        return "fp8 e4m3 weights (per-channel fp32 scales) and fp8 e4m3 activations (each row on its own scale)"
    return weights


@functools.cache
def act_levels() -> int:
    """127 (8-bit rows), or 63 where this host's fbgemm kernel saturates 8-bit rows: found by running the case
    that saturates (rows and weights at +127, whose pair sums pass int16) and checking the exact answer."""
    if not _has_fbgemm():
        return ACT_LEVELS[0]  # no int8 kernel here: the reference rounding has no pair sums to overflow
    k, n = 64, ACT_LEVELS[0]
    packed = pack(QWeight(torch.full((8, k), QMAX, dtype=torch.int8), torch.ones(8)))
    y = int8_gemm(torch.full((1, k), float(n)), packed, n)  # [1, 8]
    return n if bool((y == QMAX * n * k).all()) else ACT_LEVELS[1]


def _has_fbgemm() -> bool:
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines and hasattr(torch, "_make_per_channel_quantized_tensor")
            and hasattr(torch.ops.quantized, _INT8_LINEAR))


def can_pack(q: QWeight) -> bool:
    """Whether this torch runs fbgemm's int8 GEMM for ``q`` (a CPU weight, on an x86 build: they have fbgemm)."""
    return q.qdata.device.type == "cpu" and _has_fbgemm()


def pack(q: QWeight) -> Any:
    """fbgemm's packed copy of q [out, in] (a stack [E, out, in]: a tuple, one per expert). PyTorch warns that
    quantized tensors are deprecated: the one made here only feeds the packing and is dropped."""
    if q.qdata.dim() > 2:
        return tuple(pack(q[e]) for e in range(q.qdata.shape[0]))
    zeros = torch.zeros(q.qdata.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qt = torch._make_per_channel_quantized_tensor(q.qdata, q.scale.double(), zeros, 0)
    return torch.ops.quantized.linear_prepack(qt, None)


def with_acts(q: QWeight) -> QWeight:
    """q as w8a8 (an int8 q) or fp8: activations rounded too; an int8 one packed for fbgemm where this torch has
    it."""
    int8 = q.qdata.dtype == torch.int8
    return QWeight(q.qdata, q.scale, True, pack(q) if int8 and can_pack(q) else None)


def row_scales(x: Tensor, dim: int = -1) -> Tensor:
    """Each row's w8a8 scale: max|x| / act_levels() along ``dim`` (kept), fp32; an all-zero row's is tiny, not 0."""
    return x.float().abs().amax(dim, keepdim=True).div_(act_levels()).clamp_min_(1e-30)


def round_rows(x: Tensor, dim: int = -1, like: Tensor | None = None) -> Tensor:
    """x with each row (along ``dim``) on w8a8's integer grid (or fp8's, when the weight ``like`` is e4m3), back
    in x's dtype: the numbers every w8a8 path computes with (the reference; fbgemm's kernel reproduces them)."""
    if like is not None and like.dtype == fp8.FP8:
        return fp8.round_rows(x, dim)
    if x.numel() == 0:
        return x
    s = row_scales(x, dim)
    return x.float().div(s).round_().mul_(s).to(x.dtype)


def _integers(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [n, in] -> (its rows as integers in [-levels, levels], fp32 [n, in]; their scales [n, 1])."""
    s = row_scales(x)
    return x.float().div(s).round_(), s


def int8_gemm(xq: Tensor, packed: Any, levels: int) -> Tensor:
    """Integer rows xq [n, in] (fp32, in [-levels, levels]) @ the packed weight^T -> [n, out] fp32: fbgemm takes
    them with scale 1 and zero point ``levels``, so it quantizes nothing and the int32 sums are exact."""
    return getattr(torch.ops.quantized, _INT8_LINEAR)(xq, 1.0, levels, packed)


def _rounded_rows(x: Tensor, q: QWeight) -> Tensor:
    """w8a8 and fp8: x [n, in] rounded per row, @ dequantize(q)^T -> [n, out] in x's dtype: the format's kernel
    where it takes the call (fbgemm for a packed w8a8 weight, fp8's on an fp8 GPU), else the same rounding on the
    dequantized weight."""
    if q.qdata.dtype == fp8.FP8 and fp8.takes(x, q.qdata):
        return fp8.linear(x, q.qdata, q.scale)
    if q.packed is None or not fast_cpu(x, q) or x.shape[0] == 0:
        return F.linear(round_rows(x, like=q.qdata), dequantize(q, x.dtype))
    xq, s = _integers(x)
    return int8_gemm(xq, q.packed, act_levels()).mul_(s).to(x.dtype)


def fold_factor(rows: int, out: int, k: int) -> int:
    """How many output channels to lay side by side for ``_folded``: 1 (none) unless one row meets rows shorter
    than FOLD_MIN_K and a factor up to FOLD_MAX divides ``out``."""
    f = 1
    while rows == 1 and f * k < FOLD_MIN_K and f < FOLD_MAX and out % (2 * f) == 0:
        f *= 2
    return f if f * k >= FOLD_MIN_K else 1


def _int8pack(x: Tensor, q: QWeight) -> Tensor:
    f = fold_factor(x.shape[0], q.qdata.shape[0], q.qdata.shape[1])
    if f > 1:
        return _folded(x, q, f)
    return torch._weight_int8pack_mm(x, q.qdata, q.scale.to(x.dtype))  # [n, out]; scales in x's dtype


def _folded(x: Tensor, q: QWeight, f: int) -> Tensor:
    """One row through _weight_int8pack_mm with the weight viewed [out/f, f*in] (the same bytes): its kernel
    streams each weight row separately, and rows of 2 KiB stream ~1.2-1.5x slower than rows of 4 KiB here.
    Row i of the block-diagonal input [f, f*in] holds x in block i, so output [i, j] is channel f*j + i; the
    per-channel scales go on afterwards (the folded rows mix channels), at the cost of one more rounding."""
    n_out, k = q.qdata.shape
    xs = torch.block_diag(*([x] * f))  # [f, f*in]
    ones = torch.ones(n_out // f, dtype=x.dtype, device=x.device)  # [out/f]
    y = torch._weight_int8pack_mm(xs, q.qdata.view(n_out // f, f * k), ones)  # [f, out/f]
    return torch.mul(y.t(), q.scale.to(x.dtype).view(n_out // f, f)).reshape(1, n_out)  # [1, out]


def _dequantized(x: Tensor, q: QWeight) -> Tensor:
    """The weight converted to x's dtype (int8 values are exact in bf16 and fp16), one GEMM, the scales on the
    output: what wins from ~12 rows here, and for fp32/fp16 rows, where ATen's int8 kernel is 3-20x slower."""
    return F.linear(x, q.qdata.to(x.dtype)).mul_(q.scale.to(x.dtype))  # [n, out]


def fast_cpu(x: Tensor, q: QWeight) -> bool:
    """Whether the CPU kernels take this GEMM: a CPU inference call in a float dtype they accept."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad))


def linear(x: Tensor, q: QWeight, b: Tensor | None = None) -> Tensor:
    """x [n, in] @ dequantize(q)^T (+ b [out]) -> [n, out] in x's dtype (w8a8, fp8: x rounded per row first)."""
    if q.acts:
        y = _rounded_rows(x, q)
    elif not fast_cpu(x, q):
        return F.linear(x, dequantize(q, x.dtype), b)
    else:
        packable = (x.dtype == torch.bfloat16 and x.shape[0] <= INT8PACK_MAX_ROWS
                    and x.shape[1] % INT8PACK_K_MULTIPLE == 0)
        y = _int8pack(x.contiguous(), q) if packable else _dequantized(x, q)
    return y if b is None else y.add_(b)


def grouped_linear(h: Tensor, q: QWeight, ends: Tensor, b: Tensor | None = None,
                   expert: Tensor | None = None) -> Tensor:
    """Rows sorted by group, each through its own int8 weight: h [R, in], q [E, out, in], ``ends`` [E] int32
    one past each group's last row, b [E, out] with ``expert`` [R] each row's group -> [R, out] (as
    kernels.grouped_linear)."""
    if q.acts and q.packed is not None and fast_cpu(h, q):
        return _grouped_w8a8(h, q, ends, b, expert)
    fp8_kernel = q.qdata.dtype == fp8.FP8 and fp8.takes(h, q.qdata, grouped=True)
    if fp8_kernel or not fast_cpu(h, q):  # no sync: one grouped GEMM (fp8's, or over the dequantized stack)
        h = h if fp8_kernel or not q.acts else round_rows(h, like=q.qdata)
        y = fp8.grouped_linear(h, q.qdata, q.scale, ends) if fp8_kernel else \
            _grouped_mm(h, dequantize(q, h.dtype).transpose(-2, -1), offs=ends)  # [R, out]
        return y if b is None else y.add_(b.index_select(0, expert))  # type: ignore[arg-type]
    out = h.new_empty(h.shape[0], q.qdata.shape[1])  # [R, out]
    start = 0
    for e, end in enumerate(ends.tolist()):  # a CPU tensor: reading it waits for nothing
        if end > start:
            out[start:end] = linear(h[start:end], q[e], None if b is None else b[e])
        start = end
    return out


def _grouped_w8a8(h: Tensor, q: QWeight, ends: Tensor, b: Tensor | None, expert: Tensor | None) -> Tensor:
    """grouped_linear through fbgemm: every row rounded once, each group's rows through its expert's packed
    weight, the row scales applied once."""
    xq, s, n = *_integers(h), act_levels()  # [R, in], [R, 1]
    out = xq.new_empty(h.shape[0], q.qdata.shape[1])  # [R, out] fp32
    start = 0
    for e, end in enumerate(ends.tolist()):  # a CPU tensor: reading it waits for nothing
        if end > start:
            out[start:end] = int8_gemm(xq[start:end], q.packed[e], n)
        start = end
    y = out.mul_(s).to(h.dtype)
    return y if b is None else y.add_(b.index_select(0, expert))  # type: ignore[arg-type]


class QLinear(nn.Module):
    """nn.Linear's place, its weight int8 (or e4m3) with per-channel scales: x [..., in] -> [..., out] in x's
    dtype. An fp8 weight is held zero-padded to widths the fp8 kernels take (a dense FFN matched to a layer's
    parameters has any width): the padding adds zeros, and the output is cut back to ``out``."""

    def __init__(self, lin: nn.Linear, weights: str = "int8") -> None:
        super().__init__()
        align = fp8.ALIGN if weights == "fp8" else 1
        self.pad_in = -lin.in_features % align
        w = F.pad(lin.weight.detach(), (0, self.pad_in, 0, -lin.out_features % align))  # [out', in']
        q = quantize(w, weights)
        q = with_acts(q) if weights in ACTIVATION_FORMATS else q
        self.in_features, self.out_features, self.weights = lin.in_features, lin.out_features, weights
        self.register_buffer("qweight", q.qdata)  # [out', in'] int8 (e4m3 for fp8)
        self.register_buffer("scale", q.scale)  # [out'] fp32
        b = None if lin.bias is None else F.pad(lin.bias.detach(), (0, w.shape[0] - lin.out_features))
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        self.acts = q.acts  # w8a8, fp8: the rows rounded too
        self.packed = q.packed  # w8a8: fbgemm's copy (a CPU's)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        q = QWeight(self.qweight, self.scale, self.acts, self.packed)
        y = linear(F.pad(x.reshape(-1, self.in_features), (0, self.pad_in)), q, self.bias)  # [n, out']
        return y[:, : self.out_features].reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}"


def quantize_linears_(module: nn.Module, skip: tuple[str, ...] = (), weights: str = "int8") -> int:
    """Every nn.Linear inside ``module`` (its subclasses too: FastLinear) replaced by a QLinear of its weights in
    format ``weights``, but those under a child named in ``skip`` (a router's); the count replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, QLinear(child, weights))
            n += 1
        else:
            n += quantize_linears_(child, skip, weights)
    return n
