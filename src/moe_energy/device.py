"""The device helpers every layer shares: pick a device, name a dtype, wait for queued work, free memory."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from .config import check_device_name
from .errors import ConfigError, kind_of

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``"bfloat16"``); a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def llm_default_dtype(device: torch.device) -> str:
    """An LLM layer's dtype when none is asked for: bfloat16 where a GPU runs it natively (as served), else float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return "float32"


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
