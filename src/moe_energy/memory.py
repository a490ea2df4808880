"""How much memory a model needs, and whether the device has it: checked before anything is allocated;
and the words for a model that ran out anyway.

Estimates are deliberately simple and a little generous: parameters x bytes, x4 for training with Adam
(weights, gradients, two moments), plus activations for one batch, plus a fixed allowance.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OVERHEAD_BYTES = 256 * 2**20  # allocator slack, CUDA context, small buffers


def training_bytes(params: int, widest: int, batch_size: int, layers: int) -> int:
    """fp32 training with Adam: weights + grads + 2 moments, and the activations of one batch."""
    activations = 4 * batch_size * widest * (layers + 2) * 3
    return 16 * params + activations + OVERHEAD_BYTES


def inference_bytes(params: int, widest: int, batch_size: int, dtype: str) -> int:
    return BYTES[dtype] * params + 4 * batch_size * widest * 4 + OVERHEAD_BYTES


def dataset_bytes(samples: int, input_dim: int, classes: int) -> int:
    """Host bytes the synthetic task peaks at: x and its train/test copies, labels, the class scores."""
    return 2 * samples * (4 * input_dim + 8) + 3 * 4 * samples * classes


def batch_bytes(batch_size: int, input_dim: int, dtype: str) -> int:
    """Bytes of the one batch the windows repeat: staged in fp32 on the host, then cast on the device."""
    return batch_size * input_dim * (4 + BYTES[dtype])


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (containers: /proc/meminfo shows the host's)."""
    try:
        rel = ""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and (parts[1] == "" or "memory" in parts[1].split(",")):
                rel = parts[2].lstrip("/")
                if parts[1]:
                    break
        for base in (Path("/sys/fs/cgroup") / rel, Path("/sys/fs/cgroup")):
            for limit_f, usage_f in (("memory.max", "memory.current"),  # cgroup v2
                                     ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
                lim, use = base / limit_f, base / usage_f
                if lim.is_file() and use.is_file():
                    text = lim.read_text().strip()
                    if text == "max" or not text.isdigit() or int(text) >= 2**60:
                        return None
                    return max(0, int(text) - int(use.read_text().strip()))
    except (OSError, ValueError):
        return None
    return None


def _address_space_free() -> int | None:
    """Bytes left under ``ulimit -v`` (RLIMIT_AS), which fails allocations long before RAM runs out."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        m = re.search(r"^VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return max(0, soft - int(m.group(1)) * 1024) if m else None
    except (ImportError, OSError, ValueError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now, or None where it cannot be known (MPS).

    Host memory is the smallest of the kernel's MemAvailable, the cgroup's remaining limit and the
    address space left under ``ulimit -v``: whichever runs out first makes the allocation fail.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        found: list[int] = []
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
        found += [extra for extra in (_cgroup_free(), _address_space_free()) if extra is not None]
        return min(found) if found else None
    return None


def describe_need(needed: int | None, device: torch.device, what: str) -> str:
    """'out of memory (WHAT needs ~X GiB, Y GiB free on DEVICE)': the words every skip record uses."""
    free = available_bytes(device)
    need = f"needs ~{needed / GIB:.1f} GiB" if needed is not None else "needs more than is free"
    have = f"{free / GIB:.1f} GiB free on {device}" if free is not None else f"free memory on {device} unknown"
    return f"out of memory ({what} {need}, {have})"


def fit_problem(needed: int, device: torch.device, what: str) -> str | None:
    """None if ``needed`` bytes fit on ``device``; else the reason, in the words a skip record uses."""
    free = available_bytes(device)
    if free is None or needed <= free:
        return None
    return f"out of memory ({what} needs ~{needed / GIB:.1f} GiB, {free / GIB:.1f} GiB free on {device})"


def is_oom(e: BaseException) -> bool:
    """An allocation failure: CUDA/MPS out of memory, the CPU allocator's ENOMEM, Python's MemoryError."""
    if isinstance(e, MemoryError) or type(e).__name__ in ("OutOfMemoryError", "OutOfMemory"):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
        "failed to allocate"))


_TRIED = re.compile(r"(?:tried to allocate|allocate)\s+([\d.]+)\s*(bytes|[KMGT]i?B)", re.I)
_UNITS = {"bytes": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40}


def requested_bytes(e: BaseException) -> int | None:
    """The size of the allocation that failed, when the error message says it (CUDA and CPU allocators do)."""
    m = _TRIED.search(str(e))
    return int(float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1)) if m else None


class OutOfMemory(RuntimeError):
    """A model that did not fit; ``reason`` is its skip record's text. Its memory is already released."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
