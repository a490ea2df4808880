"""Shared fixtures: small shapes that train and measure in seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Tests must not fight each other (or CI's 2 cores) for threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_spec():
    from moe_energy.config import ModelSpec

    return ModelSpec(experts=4, hidden=16, layers=2, top_k=2, input_dim=40, classes=4)
