"""The device helpers every layer above the models shares: check and pick a device, wait for queued work, free
memory. (Naming dtypes and parsing device arguments is ``dtypes``', below the models.)"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

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
