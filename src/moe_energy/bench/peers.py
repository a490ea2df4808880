"""transformers' own MoE block for an arch, holding moe-energy's layer weights 1:1: the peer to beat.

``bench-strategies --arch`` times it beside moe-energy's strategies. The block is built from a config of the
arch's shape and the ``MoELayer``'s router, experts and shared experts are copied into it under the block's
names, in the block's own storage (most transformers 5 experts store weights as ``MoELayer`` does; gpt-oss's
are transposed, DBRX's split into w1/v1/w2), so both compute the same function on the same weights.
transformers dispatches the routed experts on ``config._experts_implementation`` (``eager`` plus every entry
of ``integrations.moe.ALL_EXPERTS_FUNCTIONS``: ``batched_mm``, ``grouped_mm``, and GPU kernels); one peer
per implementation, all sharing one copy of the weights. Experts without that dispatch (DBRX) have eager only.

transformers is an optional dependency (the ``test`` extra): it is imported here, lazily, and its absence is
a one-line reason, never an ImportError.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import described
from ..models.archs import Arch
from ..models.families import Family, family_for, implementations, layer_state
from ..models.llm import MoELayer

# Implementations that load a hub kernel for a CUDA GPU: never tried elsewhere (no download on a CPU host).
GPU_ONLY = {"deepgemm": "needs a CUDA GPU and bfloat16 (DeepGEMM hub kernel)",
            "sonicmoe": "needs a CUDA GPU (sonic-moe hub kernel)"}


@dataclass
class Peer:
    """transformers' block under one experts implementation; ``block`` None and ``reason`` set when unavailable."""

    implementation: str
    block: nn.Module | None = None
    reason: str | None = None

    @property
    def name(self) -> str:
        return f"transformers[{self.implementation}]"

    def __call__(self, x: Tensor) -> Tensor:
        """x [T, d] -> [T, d], as ``MoELayer`` (the block wants [batch, seq, d]; gpt-oss's also returns its
        router scores)."""
        assert self.block is not None, self.reason
        y = self.block(x.unsqueeze(0))
        return (y[0] if isinstance(y, tuple) else y).squeeze(0)


@dataclass
class Peers:
    """Every peer of one layer, or (``reason``) why there are none at all."""

    family: str | None = None
    version: str | None = None
    peers: list[Peer] = field(default_factory=list)
    reason: str | None = None

    @property
    def available(self) -> list[Peer]:
        return [p for p in self.peers if p.block is not None]

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "transformers_version": self.version, "unavailable": self.reason,
                "implementations": {p.implementation: p.reason for p in self.peers}}


def transformers_or_reason() -> tuple[Any, str | None]:
    """The transformers module, or None and a one-line reason (it is in the ``test`` extra only)."""
    try:
        return importlib.import_module("transformers"), None
    except ImportError as e:
        return None, (f"transformers is not installed ({described(e, 80)}); pip install 'moe-energy[test]' "
                      "(or transformers>=5) to time its MoE blocks")


def build_block(tf: Any, f: Family, arch: Arch, implementation: str, state: dict[str, Tensor]) -> nn.Module:
    """``f``'s block for ``arch`` made on the meta device (no random init) and given ``state``'s tensors."""
    config = getattr(tf, f.config)(**f.kwargs(arch))
    config._experts_implementation = implementation
    module = importlib.import_module(f"transformers.models.{f.name}.modeling_{f.name}")
    with torch.device("meta"):
        block = getattr(module, f.block)(config)
    block.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{f.block}: {', '.join(left)} not copied from the layer")
    return block.eval()


def _why_not(implementation: str, block: nn.Module, layer: MoELayer) -> str | None:
    """None when this implementation runs here (one token through it), else the one-line reason. Experts that
    transformers' ``use_experts_implementation`` does not wrap (it sets ``is_transposed``) run eager whatever
    the config says: a row under another name would time eager again."""
    p = layer.experts.gate_up_proj
    if implementation != "eager" and not hasattr(block.experts, "is_transposed"):
        return f"{type(block.experts).__name__} has only its eager forward (no experts-implementation dispatch)"
    if implementation in GPU_ONLY and (p.device.type != "cuda" or
                                       (implementation == "deepgemm" and p.dtype != torch.bfloat16)):
        return GPU_ONLY[implementation]
    try:
        with torch.inference_mode():
            Peer(implementation, block)(torch.zeros(1, layer.hidden, device=p.device, dtype=p.dtype))
    except Exception as e:  # a kernel missing for this device or dtype: that implementation is not offered here
        return described(e, 160)
    return None


def build_peers(layer: MoELayer, only: list[str] | None = None) -> Peers:
    """transformers' block for ``layer`` once per experts implementation (``only``: those names), each tried
    on one token; whatever cannot run here is a peer with a reason, not an error."""
    tf, why = transformers_or_reason()
    if tf is None:
        return Peers(reason=why)
    if layer.arch is None:
        return Peers(version=tf.__version__, reason="the layer was not built from an Arch (MoELayer.from_arch)")
    f, why = family_for(layer.arch)
    if f is None:
        return Peers(version=tf.__version__, reason=why)
    state = layer_state(layer, f)
    out = Peers(family=f.name, version=tf.__version__)
    for impl in only or implementations():
        block = build_block(tf, f, layer.arch, impl, state)
        reason = _why_not(impl, block, layer)
        out.peers.append(Peer(impl, None if reason else block, reason))
    return out
