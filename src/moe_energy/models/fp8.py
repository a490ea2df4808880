"""fp8 weights and activations (``--weights fp8``): what an H100 serves MoE experts in.

Weights float8_e4m3fn with one fp32 scale per output channel (max|w_row| / 448); each row of activations is
rounded to e4m3 on its own scale (max|x_row| / 448) before every projection: vLLM's and SGLang's fp8 "W8A8"
with per-token dynamic activation scales. A row's rounding depends on that row alone, so every strategy and
token count computes the same numbers.

Where it runs fast: a CUDA GPU with fp8 arithmetic (compute capability 8.9+: Ada, Hopper, Blackwell). There
a linear is ``torch._scaled_mm`` with row-wise scales (bf16 out, as its row-wise path requires) and the experts'
grouped GEMM ``torch._scaled_grouped_mm`` (Hopper and later), one kernel over every expert, no host sync. Both
need widths that are multiples of 16 (``problem`` refuses others). Anywhere else (a CPU, an older GPU, autograd,
compile) the same rounding is applied to the rows and the weight dequantized: the same numbers, no fp8 speed,
and the CLI refuses fp8 there rather than time an emulation.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and later
GROUPED_CAPABILITY = (9, 0)  # torch._scaled_grouped_mm's kernels
ALIGN = 16  # _scaled_mm: every width a multiple of 16
_scaled_grouped_mm = getattr(torch, "_scaled_grouped_mm", None)


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, in] -> (e4m3 [out, in], fp32 scale [out]): each output channel scaled so its largest is 448."""
    w32 = w.detach().float()
    scale = w32.abs().amax(-1) / FP8_MAX if w32.shape[-1] else w32.new_zeros(w32.shape[:-1])  # [out]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: any scale is exact
    return (w32 / scale[:, None]).to(FP8).contiguous(), scale


def row_scales(x: Tensor, dim: int = -1) -> Tensor:
    """Each row's scale, max|x| / 448 along ``dim`` (kept), fp32; an all-zero row's is tiny, not 0."""
    return x.float().abs().amax(dim, keepdim=True).div_(FP8_MAX).clamp_min_(1e-30)


def round_rows(x: Tensor, dim: int = -1) -> Tensor:
    """x with each row (along ``dim``) rounded to e4m3 on its own scale, back in x's dtype: the numbers every fp8
    path computes with."""
    if x.numel() == 0:
        return x
    s = row_scales(x, dim)
    return x.float().div(s).to(FP8).float().mul_(s).to(x.dtype)


def _rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [n, in] -> (e4m3 rows [n, in], their fp32 scales [n, 1])."""
    s = row_scales(x)
    return x.float().div(s).to(FP8), s


def kernels_for(x: Tensor, grouped: bool = False) -> bool:
    """Whether the fp8 kernels take this call: a CUDA inference call on a GPU with fp8 arithmetic."""
    if not x.is_cuda or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        return False
    need = GROUPED_CAPABILITY if grouped else MIN_CAPABILITY
    return torch.cuda.get_device_capability(x.device) >= need and (not grouped or _scaled_grouped_mm is not None)


def _aligned(*widths: int) -> bool:
    return all(w % ALIGN == 0 for w in widths)


def takes(x: Tensor, qdata: Tensor, grouped: bool = False) -> bool:
    """Whether ``linear`` (``grouped_linear``) runs this call: the kernels here, rows, widths they take. Otherwise
    models.quant applies the same rounding to the dequantized weight, as for w8a8."""
    return kernels_for(x, grouped) and _aligned(*qdata.shape[-2:]) and x.shape[0] > 0


def linear(x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """x [n, in] rounded per row @ (qdata * scale)^T -> [n, out] in x's dtype, through torch._scaled_mm."""
    xq, s = _rows(x)
    y = torch._scaled_mm(xq, qdata.t(), scale_a=s, scale_b=scale[None, :], out_dtype=torch.bfloat16)
    return y.to(x.dtype)  # [n, out]


def grouped_linear(h: Tensor, qdata: Tensor, scale: Tensor, ends: Tensor) -> Tensor:
    """Rows sorted by group, each through its expert: h [R, in], qdata [E, out, in], scale [E, out], ``ends``
    [E] int32 one past each group's last row -> [R, out] in h's dtype: one torch._scaled_grouped_mm, no sync."""
    xq, s = _rows(h)
    y = _scaled_grouped_mm(xq, qdata.transpose(-2, -1), scale_a=s.squeeze(-1), scale_b=scale,  # type: ignore[misc]
                           offs=ends, out_dtype=torch.bfloat16)
    return y.to(h.dtype)  # [R, out]


def problem(device: torch.device, *widths: int, fix: str = "use --weights int8 or w8a8 here") -> str | None:
    """Why ``--weights fp8`` is refused on ``device`` for a layer of these widths, or None; ``fix`` ends it."""
    if device.type != "cuda":
        return (f"fp8 weights run on CUDA GPUs with fp8 arithmetic (compute capability 8.9+: Ada, Hopper); "
                f"{device.type} has no fast fp8 kernel, and an emulation's speed and energy would answer nothing; "
                f"{fix}")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"fp8 weights need compute capability 8.9+ (Ada, Hopper); {torch.cuda.get_device_name(device)} "
                f"has {cap[0]}.{cap[1]}; {fix}")
    if not _aligned(*widths):
        return f"fp8 weights need every width a multiple of {ALIGN} (torch._scaled_mm); this layer has {widths}; {fix}"
    return None
