"""How much memory a model needs, and whether the device has it: checked before anything is allocated.

Estimates are deliberately simple and a little generous: parameters x bytes, x4 for training with Adam
(weights, gradients, two moments), plus activations for one batch, plus a fixed allowance.
"""

from __future__ import annotations

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


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now, or None where it cannot be known (MPS)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def fit_problem(needed: int, device: torch.device, what: str) -> str | None:
    """None if ``needed`` bytes fit on ``device``; else the reason, in the words a skip record uses."""
    free = available_bytes(device)
    if free is None or needed <= free:
        return None
    return f"out of memory ({what} needs ~{needed / GIB:.1f} GiB, {free / GIB:.1f} GiB free on {device})"
