"""Parameter, FLOP and byte counts: arithmetic only, so xl/xxl can be sized without allocating them.

Conventions: FLOPs = 2 x multiply-accumulates of the matrix products (biases, ReLU, softmax and
routing are not counted: they are O(width), the products are O(width^2)).
"""

from __future__ import annotations

import math
from typing import Protocol


class Shape(Protocol):
    experts: int
    hidden: int
    layers: int
    top_k: int
    input_dim: int
    classes: int


def mlp_params(input_dim: int, width: int, layers: int, classes: int) -> int:
    """Linear(in,W) + (L-1) x Linear(W,W) + Linear(W,out), biases included: the seed's expert/dense shape."""
    return (input_dim * width + width) + (layers - 1) * (width * width + width) + (width * classes + classes)


def mlp_macs(input_dim: int, width: int, layers: int, classes: int) -> int:
    return input_dim * width + (layers - 1) * width * width + width * classes


def gate_params(s: Shape) -> int:
    return s.input_dim * s.experts + s.experts


def expert_params(s: Shape) -> int:
    return mlp_params(s.input_dim, s.hidden, s.layers, s.classes)


def moe_params(s: Shape) -> int:
    """Total trainable parameters of the MoE (gate + all experts)."""
    return gate_params(s) + s.experts * expert_params(s)


def moe_active_params(s: Shape) -> int:
    """Parameters one inference touches: the gate and k experts."""
    return gate_params(s) + s.top_k * expert_params(s)


def moe_flops(s: Shape) -> int:
    """FLOPs per inference (one sample): the gate plus k experts."""
    return 2 * (s.input_dim * s.experts + s.top_k * mlp_macs(s.input_dim, s.hidden, s.layers, s.classes))


def dense_flops(input_dim: int, width: int, layers: int, classes: int) -> int:
    return 2 * mlp_macs(input_dim, width, layers, classes)


def matched_width(target: int, input_dim: int, layers: int, classes: int) -> int:
    """Smallest whole width W whose dense MLP has >= target parameters (the seed's rule).

    Parameters are (L-1) W^2 + (in + 1 + (L-1) + out) W + out, so W is the ceiling of the quadratic's
    root; the integer nudge afterwards makes float rounding irrelevant.
    """
    a = layers - 1
    b = input_dim + 1 + (layers - 1) + classes
    c = classes - target
    if a == 0:
        w = math.ceil(-c / b)
    else:
        w = math.ceil((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    w = max(w, 1)
    while w > 1 and mlp_params(input_dim, w - 1, layers, classes) >= target:
        w -= 1
    while mlp_params(input_dim, w, layers, classes) < target:
        w += 1
    return w


def weight_bytes(params: int, bytes_per_param: int) -> int:
    return params * bytes_per_param


def moe_weight_params_read(s: Shape, experts_touched: int | None = None) -> int:
    """Parameters a batch must read at least: the gate and every expert that got a token.

    ``experts_touched`` defaults to all E (what a batch of >= E/k well-spread tokens reaches); pass the
    count seen in a real routing for small batches.
    """
    n = s.experts if experts_touched is None else experts_touched
    if not 0 <= n <= s.experts:
        raise ValueError(f"experts_touched={n} must be between 0 and experts={s.experts}")
    return gate_params(s) + n * expert_params(s)


# -- LLM MoE layers (models/archs.py): router + E SwiGLU experts + shared experts ---------------------------
class LayerShape(Protocol):
    """What the LLM-layer arithmetic reads from an ``Arch``."""

    d_model: int
    ffn_dim: int
    experts: int
    top_k: int
    shared_experts: int
    shared_width: int
    shared_gate: bool
    expert_bias: bool

    @property
    def router_bias(self) -> bool: ...


def swiglu_params(d_model: int, width: int, bias: bool = False) -> int:
    """gate, up [W, d] and down [d, W]: 3 d W, plus 2W + d with gpt-oss's biases."""
    return 3 * d_model * width + ((2 * width + d_model) if bias else 0)


def router_params(s: LayerShape) -> int:
    """The router's Linear(d, E) (its bias for gpt-oss). DeepSeek-V3's selection bias is a buffer, not counted."""
    return s.d_model * s.experts + (s.experts if s.router_bias else 0)


def llm_expert_params(s: LayerShape) -> int:
    return swiglu_params(s.d_model, s.ffn_dim, s.expert_bias)


def shared_params(s: LayerShape) -> int:
    """Shared experts (DeepSeek fuses n of width I into one of width n I: the same count) and Qwen's gate."""
    return s.shared_experts * swiglu_params(s.d_model, s.shared_width) + (s.d_model if s.shared_gate else 0)


def layer_params(s: LayerShape) -> int:
    """Every parameter of one MoE layer: router, E experts, shared experts."""
    return router_params(s) + s.experts * llm_expert_params(s) + shared_params(s)


def layer_active_params(s: LayerShape) -> int:
    """Parameters one token uses: router, its k experts, the shared experts."""
    return router_params(s) + s.top_k * llm_expert_params(s) + shared_params(s)


def layer_flops(s: LayerShape) -> int:
    """FLOPs per token: 2 x MACs of the router, k experts and the shared experts (3 d W each) and Qwen's gate."""
    macs = s.d_model * s.experts + s.top_k * 3 * s.d_model * s.ffn_dim
    macs += s.shared_experts * 3 * s.d_model * s.shared_width + (s.d_model if s.shared_gate else 0)
    return 2 * macs


def layer_weight_bytes(s: LayerShape, experts_touched: float, bytes_per_param: float = 2) -> float:
    """Weight bytes one forward must read at least: router, the experts that got a token, shared experts.

    Linear in ``experts_touched``, so ``expected_experts_touched`` gives the expected bytes (a float).
    """
    if not 0 <= experts_touched <= s.experts:
        raise ValueError(f"experts_touched={experts_touched} must be between 0 and experts={s.experts}")
    if not bytes_per_param > 0:
        raise ValueError(f"bytes_per_param={bytes_per_param} must be > 0")
    params = router_params(s) + experts_touched * llm_expert_params(s) + shared_params(s)
    return params * bytes_per_param


def expected_experts_touched(experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts T tokens reach when each picks a uniformly random k-subset of E.

    One token misses a given expert with probability C(E-1, k) / C(E, k) = 1 - k/E; tokens are independent,
    so the expert is missed by all T with probability (1 - k/E)^T and E [1 - (1 - k/E)^T] are touched.
    """
    if not 1 <= top_k <= experts or tokens < 0:
        raise ValueError(f"need 1 <= top_k={top_k} <= experts={experts} and tokens={tokens} >= 0")
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)
