"""The device helpers every layer above the models shares: check and pick a device, wait for queued work, free
memory. (Naming dtypes and parsing device arguments is ``dtypes``', below the models.)"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from .dtypes import onednn_bf16
from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def check_device_name(name: object) -> None:
    """A device name this tool runs on (auto, cpu, cuda, cuda:N, mps), or a one-line ConfigError; whether the
    device is present is ``resolve_device``'s question."""
    kind, _, index = name.partition(":") if isinstance(name, str) else ("", "", "")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"--device {name!r} is unknown; choose auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda > mps > cpu; ``cuda:N`` one GPU. A device that is not there, or a name torch does not
    run here, is the user's error to fix: one line, never torch's own parse error."""
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)


# Whether a CPU runs bf16 natively: without avx512_bf16 (or AMX) oneDNN and MKL still take bf16 but convert every
# element to fp32 and back, so a bf16 layer is no faster than fp32 at the same bytes and slower wherever compute
# counts: its energy would describe an emulation nobody serves with. torch reports the instruction sets it detected
# (``torch.cpu.get_capabilities``, cpuinfo) and whether oneDNN takes bf16 fast paths; both are read here.


def _cpu_flags() -> dict[str, bool]:
    """The feature flags torch detected: x86's avx512_bf16, amx_bf16, amx_tile; arm64's bf16 (BFDOT/BFMMLA)."""
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10: cpuinfo's full table
    if caps is not None:
        table = caps()
        return {k: bool(table.get(k, False)) for k in ("avx512_bf16", "amx_bf16", "amx_tile", "bf16")}
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return {"avx512_bf16": bool(bf16), "amx_bf16": bool(amx), "amx_tile": bool(amx), "bf16": False}


def cpu_native_bf16() -> tuple[bool, str]:
    """(whether bf16 GEMMs run natively on this CPU, a one-line reason), e.g. (True, "AMX bf16 (oneDNN)")."""
    flags = _cpu_flags()
    onednn = onednn_bf16()
    lib = "oneDNN" if onednn else "no oneDNN bf16 path: MKL only"
    if flags["amx_bf16"] and flags["amx_tile"]:
        return True, f"AMX bf16 and avx512_bf16 ({lib})" if flags["avx512_bf16"] else f"AMX bf16 ({lib})"
    if flags["avx512_bf16"]:
        return True, f"avx512_bf16 ({lib})"
    if flags["bf16"]:
        return True, f"arm64 bf16 ({lib})"
    return False, "no avx512_bf16 or AMX: bf16 would be emulated"


def llm_default_dtype(device: torch.device) -> tuple[str, str]:
    """An LLM's dtype when none is asked for, and why: bfloat16 where the device runs it natively (as LLMs are
    served), float32 where it would be emulated."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", f"{torch.cuda.get_device_name(device)} runs bf16 natively"
        return "float32", f"{torch.cuda.get_device_name(device)} would emulate bf16"
    if device.type == "cpu":
        native, why = cpu_native_bf16()
        return ("bfloat16", f"this CPU runs bf16 natively: {why}") if native else ("float32", why)
    return "float32", f"no native bf16 known for {device.type}"


def sync(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU, whose ops return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_sync(device: torch.device) -> Callable[[], None]:
    """``sync`` bound to one device: what a measurement window calls at its edges."""
    return lambda: sync(device)


def free(device: torch.device | None = None) -> None:
    """Return dropped tensors' memory: Python's garbage first, then the CUDA allocator's cache."""
    gc.collect()
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
