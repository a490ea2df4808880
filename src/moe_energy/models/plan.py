"""The typed model plan: what one model of a run is (kind, size, arithmetic, memory), before it exists.

One plan type for every workload: the seed's classifiers (their shape a ``ModelSpec``) and an LLM MoE layer
(its shape an ``Arch``) are planned here, so the memory `plan` shows is the memory `run` checks before
allocating, and a record's shape fields are written once. A "row" is what one forward processes per
inference: a sample of the seed's batch, or a token of a layer's forward (``flops_per_inference`` is per row).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
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
from .llm import MoELayer, building, quantize_weights
from .moe import MoE
from .quant import W8A8, rate_key

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
    weights: str | None = None  # an LLM layer's weights stored as "int8" (models.quant); None: in the dtype

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

    def quantized(self, weights: str | None) -> ModelPlan:
        """This plan with its weights stored as ``weights`` (an LLM layer's only: the seed's models train)."""
        if weights is not None and not self.is_layer:
            raise ValueError("int8 weights are built for LLM layers only")
        return replace(self, weights=weights)

    def rate_key(self, dtype: str) -> str:
        """The roofline GEMM rate this model's FLOPs run at (quant.rate_key)."""
        return rate_key(self.weights, dtype)

    def _param_bytes(self, dtype: str) -> float:
        """Bytes one weight parameter is held in: the dtype's, or int8's 1 plus its share of the fp32 scale of
        its output channel (gate/up rows of d inputs, down rows of I; exact for the routed experts)."""
        if self.weights is None:
            return memory.BYTES[dtype]
        s = self.shape
        assert isinstance(s, Arch)
        d, w = s.d_model, self.width
        return 1 + 4 * (2 * w + d) / (3 * d * w)

    def _router_bytes(self, dtype: str) -> float:
        """Extra bytes the MoE's router holds beyond ``_param_bytes``: it stays in the dtype (fp32 for DeepSeek's)
        when the experts are int8."""
        s = self.shape
        if self.kind != "moe" or not isinstance(s, Arch):
            return 0.0
        b = 4 if s.router.kind in FP32_ROUTERS else memory.BYTES[dtype]
        return router_params(s) * (b - self._param_bytes(dtype))

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of the weights held (DeepSeek's router at 4 bytes a parameter: it stays fp32; int8 weights at
        about 1 byte, the router in the dtype; w8a8 also holds fbgemm's packed copy, 1 byte more, on a CPU)."""
        packed = 0.0
        if self.weights == W8A8:
            packed = self.params - (router_params(self.shape) if self.kind == "moe" else 0)  # type: ignore[arg-type]
        return round(self.params * self._param_bytes(dtype) + self._router_bytes(dtype) + packed)

    def weight_bytes_read(self, dtype: str, touched: float | None = None) -> float | None:
        """Weight bytes one forward reads at least: all of a dense model; the MoE's gate or router, the experts
        that got a token (``touched``; the seed's default: every expert) and any shared experts. An LLM layer's
        MoE without ``touched`` is None: its routing decides."""
        b = self._param_bytes(dtype)
        if self.kind == "dense":
            return float(self.params * b)
        s = self.shape
        if not isinstance(s, Arch):
            return moe_weight_params_read(s, None if touched is None else int(touched)) * b
        if touched is None:
            return None
        return layer_weight_bytes(s, touched, b) + self._router_bytes(dtype)

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
        if isinstance(s, Arch):  # int8: built in the dtype, then quantized one stack at a time (its peak)
            held = max(self.weight_bytes(dtype), self.quantized(None).weight_bytes(dtype))
            return held + self.activation_bytes(rows, strategies) + memory.OVERHEAD_BYTES
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
                model: nn.Module = MoELayer.from_arch(s, dtype=dtype, device=device, strategy=strategy or "auto",
                                                      seed=seed or 0)
            else:
                with building(torch.device(device), dtype or torch.float32, seed or 0):
                    model = DenseSwiGLU(s.d_model, self.width)
            return model if self.weights is None else quantize_weights(model, self.weights)
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


def plans(shape: Shape | Arch, models: Iterable[str] = MODEL_NAMES, weights: str | None = None) -> list[ModelPlan]:
    """The plan of each model a run builds, in order, without allocating any."""
    return [ModelPlan.of(name, shape).quantized(weights) for name in models]
