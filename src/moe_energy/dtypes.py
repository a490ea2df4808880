"""Dtypes and devices a user names, as torch values: the parsing every layer shares, models included. It imports
nothing of this package but ``errors``, so the models stay below everything that measures or runs them."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError, kind_of

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``"bfloat16"``); a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_arg(where: str, device: Any) -> torch.device | None:
    """A Python API's ``device=`` argument as a torch.device (None stays None): a wrong kind is a TypeError, a
    name torch cannot parse a one-line ConfigError naming the function."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{where}: device={device!r} is {kind_of(device)}; give a torch.device or a "
                        "name such as 'cpu' or 'cuda:0'")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{where}: device={device!r} is not a device; give e.g. 'cpu', 'cuda' or 'cuda:0'") \
            from None


def device_here(where: str, device: Any) -> torch.device | None:
    """``device_arg`` for an argument that allocates: also a one-line ConfigError when this host has no such device
    (torch would fail on the first tensor with "Torch not compiled with CUDA enabled", an AssertionError)."""
    dev = device_arg(where, device)
    if dev is None:
        return None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where}: device={device!r}: no CUDA GPU is visible to PyTorch here; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{where}: device={device!r}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered "
                          "from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: device={device!r}: Apple MPS is not available here; use device='cpu'")
    return dev


def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (it needs avx512_core at least; bf16 instructions decide its fast
    paths): where it does not, its bf16 linear has no kernel at all ("could not create a primitive descriptor")."""
    if not torch.backends.mkldnn.is_available():
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else True
    except RuntimeError:  # an op the build registered without a CPU kernel
        return False
