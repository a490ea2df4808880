"""Whether this CPU runs bf16 natively: the question to ask before reading a bf16 CPU measurement.

Without avx512_bf16 (or AMX) oneDNN and MKL still take bf16, but convert every element to fp32 and back, so
a bf16 layer is no faster than fp32 at the same bytes read and slower at any row count where compute counts;
its energy figures would then describe an emulation nobody serves with. torch reports the instruction sets
it detected (``torch.cpu.get_capabilities``, cpuinfo) and whether oneDNN itself will take bf16 fast paths
(``mkldnn._is_mkldnn_bf16_supported``); both are read here, the older private helpers where those are absent.
"""

from __future__ import annotations

import torch


def _cpu_flags() -> dict[str, bool]:
    """The feature flags torch detected: x86's avx512_bf16, amx_bf16, amx_tile; arm64's bf16 (BFDOT/BFMMLA)."""
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10: cpuinfo's full table
    if caps is not None:
        table = caps()
        return {k: bool(table.get(k, False)) for k in ("avx512_bf16", "amx_bf16", "amx_tile", "bf16")}
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return {"avx512_bf16": bool(bf16), "amx_bf16": bool(amx), "amx_tile": bool(amx), "bf16": False}


def _onednn_bf16() -> bool:
    """oneDNN's own answer (it needs avx512_core at least; bf16 instructions decide its fast paths)."""
    if not torch.backends.mkldnn.is_available():
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else True
    except RuntimeError:  # an op the build registered without a CPU kernel
        return False


def cpu_native_bf16() -> tuple[bool, str]:
    """(whether bf16 GEMMs run natively on this CPU, a one-line reason), e.g. (True, "AMX bf16 (oneDNN)")."""
    flags = _cpu_flags()
    onednn = _onednn_bf16()
    lib = "oneDNN" if onednn else "no oneDNN bf16 path: MKL only"
    if flags["amx_bf16"] and flags["amx_tile"]:
        return True, f"AMX bf16 and avx512_bf16 ({lib})" if flags["avx512_bf16"] else f"AMX bf16 ({lib})"
    if flags["avx512_bf16"]:
        return True, f"avx512_bf16 ({lib})"
    if flags["bf16"]:
        return True, f"arm64 bf16 ({lib})"
    return False, "no avx512_bf16 or AMX: bf16 would be emulated"
