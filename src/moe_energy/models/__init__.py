"""Models: the MoE with stacked experts, its execution strategies and the matched dense baselines."""

from .dense import DenseMLP, dense_width, matched_dense
from .moe import MoE

__all__ = ["MoE", "DenseMLP", "dense_width", "matched_dense"]
