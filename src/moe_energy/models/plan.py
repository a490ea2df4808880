"""The typed model plan: what one model of a run is (kind, size, arithmetic, memory), before it exists.

One plan type for every workload: the seed's classifiers (their shape a ``ModelSpec``) and an LLM MoE layer
(its shape an ``Arch``) are planned here, so the memory `plan` shows is the memory `run` checks before
allocating, and a record's shape fields are written once. A "row" is what one forward processes per
inference: a sample of the seed's batch, or a token of a layer's forward (``flops_per_inference`` is per row).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import memory
from .archs import Arch
from .counting import (
    Shape,
    dense_flops,
    layer_active_params,
    layer_flops,
    layer_params,
    layer_weight_bytes,
    mlp_params,
    moe_active_params,
    moe_flops,
    moe_params,
    moe_weight_params_read,
    router_params,
    swiglu_params,
)
from .dense import DenseMLP, DenseSwiGLU, Match, dense_width, swiglu_width
from .llm import MoELayer, building
from .moe import MoE

Kind = Literal["moe", "dense"]
MODEL_NAMES = ("moe", "dense_total", "dense_active")
FP32_ROUTERS = ("deepseek_v2", "sigmoid_group")  # held in fp32 whatever the layer's dtype (routers.py)

# Training runs the padded strategy: differentiable everywhere (grouped_mm's backward needs 16-byte
# aligned strides, which a [E, 10, H] output layer does not have). Weights are shared, so any
# strategy can then run inference on them.
TRAIN_STRATEGY = "padded"


@dataclass(frozen=True)
class ModelPlan:
    """One model of a run: ``name`` is "moe", "dense_total" or "dense_active"; counts are per inference (row)."""

    name: str
    kind: Kind
    match: Match | None  # the dense baseline's rule; None for the MoE
    width: int  # the MoE's expert hidden width (I of an LLM expert), or the dense model's width
    params: int
    active_params: int
    flops_per_inference: int
    shape: Shape | Arch  # the MoE's shape: a ModelSpec (the seed's classifiers) or an Arch (an LLM layer)

    @classmethod
    def of(cls, name: str, shape: Shape | Arch) -> ModelPlan:
        """The plan of model ``name`` for the MoE shape ``shape``; allocates nothing."""
        if name not in MODEL_NAMES:
            raise ValueError(f"model {name!r} is unknown; choose from {', '.join(MODEL_NAMES)}")
        match: Match | None = None if name == "moe" else "total" if name == "dense_total" else "active"
        if isinstance(shape, Arch):
            if match is None:
                return cls(name, "moe", None, shape.ffn_dim, layer_params(shape), layer_active_params(shape),
                           layer_flops(shape), shape)
            w = swiglu_width(shape, match)
            p = swiglu_params(shape.d_model, w)
            return cls(name, "dense", match, w, p, p, 2 * p, shape)  # 2 FLOPs per MAC, one MAC per weight
        if match is None:
            return cls(name, "moe", None, shape.hidden, moe_params(shape), moe_active_params(shape), moe_flops(shape),
                       shape)
        w = dense_width(shape, match)
        p = mlp_params(shape.input_dim, w, shape.layers, shape.classes)
        return cls(name, "dense", match, w, p, p, dense_flops(shape.input_dim, w, shape.layers, shape.classes), shape)

    @property
    def is_layer(self) -> bool:
        return isinstance(self.shape, Arch)

    @property
    def flops_per_token(self) -> int:
        """An LLM layer's name for ``flops_per_inference``: its inferences are tokens."""
        return self.flops_per_inference

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of the weights held (DeepSeek's router at 4 bytes a parameter: it stays fp32)."""
        b = memory.BYTES[dtype]
        if self.kind == "moe" and isinstance(self.shape, Arch) and self.shape.router.kind in FP32_ROUTERS:
            r = router_params(self.shape)
            return (self.params - r) * b + 4 * r
        return self.params * b

    def weight_bytes_read(self, dtype: str, touched: float | None = None) -> float | None:
        """Weight bytes one forward reads at least: all of a dense model; the MoE's gate or router, the experts
        that got a token (``touched``; the seed's default: every expert) and any shared experts. An LLM layer's
        MoE without ``touched`` is None: its routing decides."""
        b = memory.BYTES[dtype]
        if self.kind == "dense":
            return float(self.params * b)
        s = self.shape
        if not isinstance(s, Arch):
            return moe_weight_params_read(s, None if touched is None else int(touched)) * b
        if touched is None:
            return None
        fp32_router = router_params(s) * (4 - b) if s.router.kind in FP32_ROUTERS else 0
        return layer_weight_bytes(s, touched, b) + fp32_router

    def activation_bytes(self, rows: int, strategies: tuple[str, ...] = ()) -> int:
        """An LLM layer's generous bytes of one forward's intermediates: fp32 worst case, twice for temporaries."""
        a = self.shape
        assert isinstance(a, Arch), "the seed's activations are in memory.inference_bytes"
        if self.kind == "dense":
            per_token = 2 * a.d_model + 3 * self.width
        else:  # x, out, router scores; per pair a gathered row, gate/up/h, its output; the shared experts
            per_token = 2 * a.d_model + a.experts + a.top_k * (2 * a.d_model + 3 * a.ffn_dim) \
                + a.shared_experts * 3 * a.shared_width
            if "dense_experts" in strategies:  # every expert on every token
                per_token = max(per_token, a.experts * (3 * a.ffn_dim + a.d_model))
        return 2 * 4 * rows * per_token

    def memory_bytes(self, rows: int, dtype: str, training: bool = False, strategies: tuple[str, ...] = ()) -> int:
        """Bytes this model needs on its device for a forward of ``rows``: training state (the seed's) or
        inference weights, plus the forward's activations."""
        s = self.shape
        if isinstance(s, Arch):
            return self.weight_bytes(dtype) + self.activation_bytes(rows, strategies) + memory.OVERHEAD_BYTES
        if training:
            return memory.training_bytes(self.params, self.widest, rows, s.layers)
        return memory.inference_bytes(self.params, self.widest, rows, dtype)

    @property
    def widest(self) -> int:
        """The seed's widest activation row: an MoE's hidden layer holds top_k rows per token."""
        s = self.shape
        assert not isinstance(s, Arch), "an LLM layer's activations are activation_bytes'"
        return max(self.width * (s.top_k if self.kind == "moe" else 1), s.input_dim)

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seed: int | None = None,
              strategy: str | None = None) -> nn.Module:
        """A fresh model with this plan's shape. The seed's: on the CPU in fp32 (it trains), from torch's RNG
        state (``seed`` re-seeds it first), then moved to ``device``; an LLM layer's: its seeded random weights
        allocated on ``device`` in ``dtype`` (one copy)."""
        s = self.shape
        if isinstance(s, Arch):
            if self.kind == "moe":
                return MoELayer.from_arch(s, dtype=dtype, device=device, strategy=strategy or "auto",
                                          seed=seed or 0)
            with building(torch.device(device), dtype or torch.float32, seed or 0):
                return DenseSwiGLU(s.d_model, self.width)
        if seed is not None:
            torch.manual_seed(seed)
        model = MoE.from_spec(s, strategy=strategy or TRAIN_STRATEGY) if self.kind == "moe" else \
            DenseMLP(s.input_dim, self.width, s.layers, s.classes)
        return model.to(device)

    def fields(self) -> dict[str, Any]:
        """The shape fields of this model's result record (the JSON and DB format: the MoE has no ``match``)."""
        out: dict[str, Any] = {"kind": self.kind, "params": self.params, "active_params": self.active_params,
                               "flops_per_inference": self.flops_per_inference, "width": self.width}
        if self.match is not None:
            out["match"] = self.match
        return out


def plans(shape: Shape | Arch, models: Iterable[str] = MODEL_NAMES) -> list[ModelPlan]:
    """The plan of each model a run builds, in order, without allocating any."""
    return [ModelPlan.of(name, shape) for name in models]
