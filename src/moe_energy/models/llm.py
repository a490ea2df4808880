"""An LLM's MoE feed-forward layer: hidden states [T, d] -> [T, d], routed SwiGLU experts plus shared ones.

The routed experts are stored as transformers 5 stores them (``gate_up_proj`` [E, 2I, d], ``down_proj``
[E, d, I], optional ``gate_up_proj_bias`` / ``down_proj_bias``), so a Mixtral, Qwen-MoE or DeepSeek block's
``experts`` state dict loads into ``MoELayer.experts`` as it is. Shared experts (DeepSeek, Qwen1.5/2-MoE) are
a plain SwiGLU MLP every token runs, with their own width and Qwen's optional sigmoid gate.

The router is any module with ``forward(x [T, d]) -> (expert_idx [T, k] int64, weights [T, k])``; the experts
run under any registered strategy (``strategies.py``), the same one set of weights for all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dtypes import device_here, dtype_of
from ..errors import ConfigError, kind_of
from .archs import PRESETS, Arch, get_arch
from .counting import LayerShape
from .experts import ACTIVATIONS, SwiGLUExperts
from .fp8 import FP8
from .kernels import FastLinear
from .moe import StrategyHost, check_shape, whole_number
from .quant import ACTIVATION_FORMATS, WEIGHT_FORMATS, QLinear, quantize, quantize_linears_, with_acts
from .routers import build_router
from .strategies import AUTO_CANDIDATES, AutoChoice


def archs() -> dict[str, Arch]:
    """The published layer presets by name (a copy: changing it changes nothing here)."""
    return dict(PRESETS)


@dataclass(frozen=True)
class LayerDims:
    """A built layer's shape as ``counting.py``'s LayerShape reads it, for a layer not built from an Arch."""

    d_model: int
    ffn_dim: int
    experts: int
    top_k: int  # 0: the router does not say (a custom router without ``top_k``)
    shared_experts: int
    shared_width: int
    shared_gate: bool
    expert_bias: bool
    router_bias: bool


@contextmanager
def building(device: torch.device, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Modules made inside are allocated on ``device`` in ``dtype`` from an RNG seeded with ``seed``: one copy of
    the weights where they run, never an fp32 one on the host first. The caller's RNG and default dtype are
    restored. The same seed gives other numbers on a GPU than on the CPU (another generator)."""
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def _arch_of(where: str, arch: Any) -> Arch:
    if isinstance(arch, Arch):
        return arch
    if isinstance(arch, str):
        return get_arch(arch)
    raise TypeError(f"{where}: arch={arch!r} is {kind_of(arch)}; give a preset's name (moe_energy.archs()) or an "
                    "Arch (models.archs.custom_arch)")


class StackedSwiGLU(nn.Module):
    """The routed experts' parameters, named and shaped as transformers 5's ``*Experts`` modules name them."""

    def __init__(self, experts: int, hidden: int, intermediate: int, bias: bool = False, act: str = "silu",
                 interleaved: bool = False, limit: float = 7.0, alpha: float = 1.702) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ConfigError(f"MoELayer: act={act!r} is unknown; choose from {', '.join(ACTIVATIONS)}")
        self.act, self.interleaved, self.limit, self.alpha = act, interleaved, float(limit), float(alpha)
        E, d, n = experts, hidden, intermediate  # n = I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * n, d))  # [E, 2I, d] rows [gate; up] (or interleaved)
        self.down_proj = nn.Parameter(torch.empty(E, d, n))  # [E, d, I]
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * n)) if bias else None  # [E, 2I]
        self.down_proj_bias = nn.Parameter(torch.empty(E, d)) if bias else None  # [E, d]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as nn.Linear would start: U(-1/sqrt(in), 1/sqrt(in)) for weights and biases."""
        with torch.no_grad():
            for w, b in ((self.gate_up_proj, self.gate_up_proj_bias), (self.down_proj, self.down_proj_bias)):
                bound = 1.0 / math.sqrt(w.shape[2])
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)

    def family(self, capacity_factor: float = 1.25, counters: Tensor | None = None) -> SwiGLUExperts:
        return SwiGLUExperts(self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias,
                             self.act, self.limit, self.alpha, self.interleaved, capacity_factor, counters,
                             getattr(self, "gate_up_scale", None), getattr(self, "down_scale", None),
                             getattr(self, "acts", False), getattr(self, "packs", None))

    def quantize_(self, weights: str = "int8") -> None:
        """Both stacks int8 (e4m3 for fp8) with per-channel scales (models.quant), in place: the float weights are
        dropped; w8a8 and fp8 round the activations too (w8a8 through fbgemm's packed copies on a CPU)."""
        packs = []
        for name in ("gate_up_proj", "down_proj"):
            q = quantize(getattr(self, name), weights)
            q = with_acts(q) if weights in ACTIVATION_FORMATS else q
            delattr(self, name)
            self.register_buffer(name, q.qdata)  # [E, out, in] int8 (e4m3)
            self.register_buffer(f"{name.removesuffix('_proj')}_scale", q.scale)  # [E, out] fp32
            packs.append(q.packed)
        self.acts = weights in ACTIVATION_FORMATS
        self.packs = None if None in packs else tuple(packs)


class SharedExperts(nn.Module):
    """Always-on experts: down(silu(gate_proj x) * up_proj x), width I_shared (DeepSeek: n_shared * I), times
    sigmoid(gate x) when ``gated`` (Qwen's ``shared_expert_gate``, a Linear(d, 1) without bias)."""

    def __init__(self, hidden: int, intermediate: int, gated: bool = False) -> None:
        super().__init__()
        self.gate_proj = FastLinear(hidden, intermediate, bias=False)  # [I_s, d]
        self.up_proj = FastLinear(hidden, intermediate, bias=False)  # [I_s, d]
        self.down_proj = FastLinear(intermediate, hidden, bias=False)  # [d, I_s]
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None  # [1, d]

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, d]
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


class MoELayer(StrategyHost, nn.Module):
    """x [T, d] -> [T, d]: router -> (expert_idx, weights) [T, k] -> strategy over the routed experts, plus the
    shared experts. ``shared_intermediate=0`` means none."""

    def __init__(self, hidden: int, intermediate: int, experts: int, router: nn.Module, *,
                 shared_intermediate: int = 0, shared_gate: bool = False, expert_bias: bool = False,
                 act: str = "silu", interleaved: bool = False, limit: float = 7.0, alpha: float = 1.702,
                 strategy: str = "grouped", capacity_factor: float = 1.25) -> None:
        super().__init__()
        shape = check_shape("MoELayer", hidden=hidden, intermediate=intermediate, experts=experts)
        self.strategy, self.capacity_factor = strategy, capacity_factor  # checked before any weight exists
        self.hidden, self.intermediate, self.num_experts = shape["hidden"], shape["intermediate"], shape["experts"]
        self.router = router
        self.experts = StackedSwiGLU(self.num_experts, self.hidden, self.intermediate, expert_bias, act,
                                     interleaved, limit, alpha)
        if shared_intermediate:
            width = check_shape("MoELayer", shared_intermediate=shared_intermediate)["shared_intermediate"]
            self.shared: SharedExperts | None = SharedExperts(self.hidden, width, shared_gate)
        else:
            self.shared = None
        # [routed pairs, dropped pairs] added up by capacity strategies on the device; read outside windows
        self.register_buffer("pair_counts", torch.zeros(2, dtype=torch.long), persistent=False)
        self.auto_candidates: tuple[str, ...] = AUTO_CANDIDATES
        self.auto_choice: AutoChoice | None = None
        self.arch: Arch | None = None  # the shape it was built from (from_arch), for exact counts

    @classmethod
    def from_arch(cls, arch: Arch | str, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, strategy: str = "auto", seed: int = 0) -> MoELayer:
        """``arch``'s layer (a preset's name or an Arch) with seeded random weights, allocated on ``device``
        (default the CPU) in ``dtype`` (default float32); DeepSeek's router stays fp32 as transformers keeps it.

        Random weights are what an energy benchmark needs: the cost of a forward depends on the shapes and the
        routing, not on trained values.
        """
        a = _arch_of("MoELayer.from_arch", arch)
        dt = torch.float32 if dtype is None else dtype_of(dtype)
        dev = device_here("MoELayer.from_arch", device) or torch.device("cpu")
        whole_number("MoELayer.from_arch", "seed", seed, least=0)
        with building(dev, dt, seed):
            layer = cls(a.d_model, a.ffn_dim, a.experts, build_router(a),
                        shared_intermediate=a.shared_experts * a.shared_width, shared_gate=a.shared_gate,
                        expert_bias=a.expert_bias, act=a.act, interleaved=a.act == "gpt_oss", strategy=strategy)
        layer.arch = a
        return layer.to(device=dev, dtype=dt)

    def dims(self) -> LayerShape:
        """This layer's shape for the counting functions: its Arch when built from one, else read off its
        modules (the router counted as a Linear(d, E), plus its bias when it has one)."""
        if self.arch is not None:
            return self.arch
        router = self.router
        while isinstance(getattr(router, "router", None), nn.Module):  # a wrapper (routing.BenchRouter)
            router = router.router
        top_k = getattr(self.router, "top_k", getattr(router, "top_k", None))
        width = self.shared.gate_proj.out_features if self.shared is not None else 0
        return LayerDims(self.hidden, self.intermediate, self.num_experts, top_k if type(top_k) is int else 0,
                         1 if width else 0, width, self.shared is not None and self.shared.gate is not None,
                         self.experts.gate_up_proj_bias is not None,
                         isinstance(getattr(router, "bias", None), Tensor))

    @property
    def layout(self) -> str:
        """gate_up_proj's storage: "out_in" (nn.Linear, contiguous) or "in_out" (e.g. gpt-oss's transposed view)."""
        return "in_out" if self.experts.gate_up_proj.stride(1) == 1 else "out_in"

    def stack(self) -> SwiGLUExperts:
        return self.experts.family(self.capacity_factor, self.pair_counts)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, d] -> expert_idx [T, k] int64, gate_w [T, k] in x's dtype (a router may compute in fp32)."""
        idx, w = self.router(x)
        return idx, w.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.hidden:  # shapes only: no sync
            self._bad_input(x)
        idx, w = self.route(x)  # [T, k], [T, k]
        y = self.run_experts(x, idx, w, self.stack())  # [T, d]
        return y if self.shared is None else y + self.shared(x)

    def _bad_input(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoELayer: input x is {kind_of(x)}; give a tensor [tokens, hidden={self.hidden}]")
        raise ConfigError(f"MoELayer: input x has shape {list(x.shape)}; give [tokens, hidden={self.hidden}] "
                          "(flatten batch and sequence into tokens)")

    def extra_repr(self) -> str:
        shared = self.shared.down_proj.in_features if self.shared is not None else 0
        return (f"hidden={self.hidden}, intermediate={self.intermediate}, experts={self.num_experts}, "
                f"shared_intermediate={shared}, act={self.experts.act!r}, strategy={self._strategy!r}")


def quantize_weights(model: nn.Module, weights: str = "int8") -> nn.Module:
    """``model``'s weights stored as ``weights`` (int8 with per-channel scales), in place: an MoELayer's routed and
    shared experts (its router keeps the dtype: it decides the routing), or every Linear of a dense FFN, so no
    comparison credits one side with a cheaper format. The activations keep the dtype (int8), or are rounded per
    row before each projection (w8a8 to int8, fp8 to e4m3: models.fp8). A model already quantized, one with no
    Linear, or the seed's ``MoE`` (its experts are no Linears) is refused: each would leave weights unquantized or
    round int8 ones again."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_weights: model is {kind_of(model)}; give an nn.Module (an MoELayer or a dense FFN)")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights={weights!r} is unknown; choose from {', '.join(WEIGHT_FORMATS)}")
    held = _quantized_as(model)
    if held is not None:
        raise ConfigError(f"quantize_weights: {type(model).__name__}'s weights are already {held}; quantize a "
                          "fresh float copy (MoELayer.from_arch, matched_dense) instead")
    if any(isinstance(m, StrategyHost) and not isinstance(m, MoELayer) for m in model.modules()):
        raise ConfigError("quantize_weights: an MoE classifier's experts are no Linears, so only its gate would be "
                          "quantized; int8 weights are built for LLM layers (MoELayer) and their dense FFNs")
    if _quantize_(model, weights) == 0:
        raise ConfigError(f"quantize_weights: {type(model).__name__} holds no nn.Linear and no MoELayer, so nothing "
                          "would be quantized; give an MoELayer or a dense FFN")
    return model


def _quantized_as(model: nn.Module) -> str | None:
    """The format of weights ``model`` already holds quantized (a QLinear's, or experts no longer float); else None."""
    for m in model.modules():
        if isinstance(m, QLinear):
            return m.weights
        if isinstance(m, StackedSwiGLU) and m.gate_up_proj.dtype in (torch.int8, FP8):
            return "fp8" if m.gate_up_proj.dtype == FP8 else ("w8a8" if getattr(m, "acts", False) else "int8")
    return None


def _quantize_(module: nn.Module, weights: str) -> int:
    """Every MoELayer inside ``module`` (itself included) with its experts quantized and its router kept, every other
    Linear replaced by a QLinear; the count of Linears and expert stacks quantized."""
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.experts.quantize_(weights)
    return len(layers) + quantize_linears_(module, skip=("router", "experts") if layers else (), weights=weights)
