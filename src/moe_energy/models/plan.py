"""The typed model plan: what one model of a run is (kind, size, arithmetic, memory), before it exists.

Built once per model from the spec and used by every command that sizes, builds or records a model
(`plan`, `run`, `sweep`, `bench-strategies`, `selfcheck`, the API, expert parallelism), so the memory a
`plan` shows is the memory `run` checks before allocating, and a record's shape fields are written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .. import memory
from .counting import (
    Shape,
    dense_flops,
    mlp_params,
    moe_active_params,
    moe_flops,
    moe_params,
    moe_weight_params_read,
)
from .dense import DenseMLP, Match, dense_width
from .moe import MoE

Kind = Literal["moe", "dense"]
MODEL_NAMES = ("moe", "dense_total", "dense_active")

# Training runs the padded strategy: differentiable everywhere (grouped_mm's backward needs 16-byte
# aligned strides, which a [E, 10, H] output layer does not have). Weights are shared, so any
# strategy can then run inference on them.
TRAIN_STRATEGY = "padded"


@dataclass(frozen=True)
class ModelPlan:
    """One model of a run: ``name`` is "moe", "dense_total" or "dense_active"; counts are per inference."""

    name: str
    kind: Kind
    match: Match | None  # the dense baseline's rule; None for the MoE
    width: int  # the MoE's expert hidden width, or the dense MLP's width
    params: int
    active_params: int
    flops_per_inference: int
    weight_params_read: int  # parameters one batch reads at least (the MoE: gate + every expert reached)
    spec: Shape

    @classmethod
    def of(cls, name: str, spec: Shape) -> ModelPlan:
        """The plan of model ``name`` for the MoE shape ``spec``; allocates nothing."""
        if name == "moe":
            return cls("moe", "moe", None, spec.hidden, moe_params(spec), moe_active_params(spec), moe_flops(spec),
                       moe_weight_params_read(spec), spec)
        if name not in MODEL_NAMES:
            raise ValueError(f"model {name!r} is unknown; choose from {', '.join(MODEL_NAMES)}")
        match: Match = "total" if name == "dense_total" else "active"
        w = dense_width(spec, match)
        p = mlp_params(spec.input_dim, w, spec.layers, spec.classes)
        return cls(name, "dense", match, w, p, p, dense_flops(spec.input_dim, w, spec.layers, spec.classes), p, spec)

    @property
    def widest(self) -> int:
        """Widest activation row: an MoE's hidden layer holds top_k rows per token."""
        return max(self.width * (self.spec.top_k if self.kind == "moe" else 1), self.spec.input_dim)

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of weights one batch reads at least in ``dtype`` (the roofline's memory traffic)."""
        return self.weight_params_read * memory.BYTES[dtype]

    def memory_bytes(self, batch_size: int, dtype: str, training: bool) -> int:
        """Bytes this model needs on its device: training state (or inference weights) plus one batch."""
        if training:
            return memory.training_bytes(self.params, self.widest, batch_size, self.spec.layers)
        return memory.inference_bytes(self.params, self.widest, batch_size, dtype)

    def build(self, strategy: str = TRAIN_STRATEGY) -> nn.Module:
        """A fresh model with this plan's shape (initialised from torch's current RNG state)."""
        s = self.spec
        if self.kind == "moe":
            return MoE.from_spec(s, strategy=strategy)
        return DenseMLP(s.input_dim, self.width, s.layers, s.classes)

    def fields(self) -> dict[str, Any]:
        """The shape fields of this model's result record (the JSON and DB format: the MoE has no ``match``)."""
        out: dict[str, Any] = {"kind": self.kind, "params": self.params, "active_params": self.active_params,
                               "flops_per_inference": self.flops_per_inference, "width": self.width}
        if self.match is not None:
            out["match"] = self.match
        return out


def plans(spec: Shape, models: Iterable[str] = MODEL_NAMES) -> Iterator[ModelPlan]:
    """The plan of each model a run builds, in order, without allocating any."""
    for name in models:
        yield ModelPlan.of(name, spec)
