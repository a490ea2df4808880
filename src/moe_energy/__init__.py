"""moe-energy: measure when a Mixture-of-Experts model really uses less energy per inference than a dense one.

The public Python API (everything else is private)::

    import moe_energy as me
    meter = me.auto_meter()                       # the meter `--meter auto` picks
    with meter.window("my-block") as w:           # syncs the device at both edges
        model(x)
    w.result.joules, w.result.seconds, w.result.method
    res = me.benchmark(model, x, duration=10, repeats=3)
    moe = me.MoE(experts=8, hidden=256, layers=3, top_k=2, strategy="auto")
    dense = me.matched_dense(moe, match="total")
    me.archs()                                    # LLM MoE layer presets: name -> Arch
    layer = me.MoELayer.from_arch("mixtral-8x7b", dtype="bfloat16", device="cuda")
    ffn = me.matched_dense(layer, match="active") # the dense SwiGLU FFN of the layer's active params
    me.benchmark(layer, x)                        # x [tokens, d_model]: inferences are tokens
    me.quantize_weights(layer, "int8")            # experts int8 weight-only in place (router kept); dense FFNs too
                                                  # ("w8a8": int8 activations too, per row; fbgemm on a CPU)
    me.models()                                   # whole-LLM presets: name -> WholeModel
    llm = me.build_model("qwen3-30b-a3b", layers=4, dtype="bfloat16", device="cuda")
    r = me.benchmark_generate(llm, batch=8, context=512)  # prefill and decode: J/token, TTFT, ITL p50/p90

Names load on first use, so ``import moe_energy`` stays light (torch is imported only when needed).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "auto_meter": ("api", "auto_meter"),
    "make_meter": ("api", "make_meter"),
    "benchmark": ("api", "benchmark"),
    "BenchmarkResult": ("api", "BenchmarkResult"),
    "Measurement": ("energy.meter", "Measurement"),
    "MeterBase": ("energy.meter", "MeterBase"),
    "MoE": ("models.moe", "MoE"),
    "MoELayer": ("models.llm", "MoELayer"),
    "archs": ("models.llm", "archs"),
    "quantize_weights": ("models.llm", "quantize_weights"),
    "build_model": ("api", "build_model"),
    "benchmark_generate": ("api", "benchmark_generate"),
    "GenerateResult": ("api", "GenerateResult"),
    "DenseMLP": ("models.dense", "DenseMLP"),
    "matched_dense": ("models.dense", "matched_dense"),
    "ModelSpec": ("config", "ModelSpec"),
    "presets": ("config", "PRESETS"),
    "strategies": ("models.strategies", "STRATEGIES"),
}

__all__ = [
    "BenchmarkResult", "DenseMLP", "GenerateResult", "Measurement", "MeterBase", "ModelSpec", "MoE", "MoELayer",
    "__version__", "archs", "auto_meter", "benchmark", "benchmark_generate", "build_model", "make_meter",
    "matched_dense", "models", "presets", "quantize_weights", "strategies",
]

if TYPE_CHECKING:
    from .api import (
        BenchmarkResult,
        GenerateResult,
        auto_meter,
        benchmark,
        benchmark_generate,
        build_model,
        make_meter,
    )
    from .config import PRESETS as presets
    from .config import ModelSpec
    from .energy.meter import Measurement, MeterBase
    from .models.dense import DenseMLP, matched_dense
    from .models.llm import MoELayer, archs
    from .models.moe import MoE
    from .models.strategies import STRATEGIES as strategies


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_energy' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    if module.startswith("models"):  # an MoE's strategy auto is timed by the runner's probe: install it
        importlib.import_module(".runner.prepare", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | {"models"})


class _Models(types.ModuleType):
    """The ``models`` subpackage, callable: ``me.models()`` is every whole-model preset by name (issue 23), while
    ``me.models.MoE`` and ``from moe_energy.models import ...`` stay the package they always were."""

    def __call__(self) -> dict[str, Any]:
        return importlib.import_module(".whole", self.__name__).models()


class _Package(types.ModuleType):
    """This package, whose ``models`` attribute is the subpackage made callable: the import system binds a
    subpackage to its parent's attribute, so the binding is where it becomes ``_Models``, whoever imports it first."""

    @property
    def models(self) -> _Models:
        if "models" not in self.__dict__:
            importlib.import_module(".models", self.__name__)  # binds it, through the setter below
        return self.__dict__["models"]

    @models.setter
    def models(self, package: types.ModuleType) -> None:
        package.__class__ = _Models
        self.__dict__["models"] = package


sys.modules[__name__].__class__ = _Package
