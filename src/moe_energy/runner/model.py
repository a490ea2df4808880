"""The whole-model workload: the choice users make (Qwen3-30B-A3B or Qwen3-32B?), an MoE LLM against its dense
siblings, each at every (phase, batch, context).

Two phases, measured in separate windows: prefill (B prompts of L tokens, one forward: J per prompt token, the time
to first token) and decode (B sequences, one new token each per step, a static KV cache held at L: J per output
token, the inter-token latency). The models are transformers' own classes with seeded random weights
(``models.whole``: nothing downloaded); their MoE blocks run as transformers runs them or, swapped for
moe-energy's ``MoELayer`` on the same tensors, as this tool does (``--moe-impl``). When a whole model does not fit,
its first N layers are built (the MoE/dense pattern kept; the default is the largest N that fits) and every
whole-model figure is extrapolated from them, labelled as such, with N in the record.

The engine serving them is transformers (``models.generate``: one forward, one decode step) or, on a CUDA host,
vLLM (``--engine vllm``, ``models.vllm_engine``: its offline API, its own batching and kernels); either gives each
phase as a callable and its tokens per call, so the windows, records, store and report are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import memory
from ..config import RunOptions
from ..device import resolve_device
from ..errors import ConfigError
from ..measure import roofline
from ..memory import OutOfMemory
from ..models.generate import decode_step, prefill_step
from ..models.plan import ModelPlan
from ..models.swap import swap_moe_blocks
from ..models.vllm_engine import DECODE_TOKENS, GPU_MEMORY_UTILIZATION, METHOD, build_engine, missing
from ..models.vllm_engine import decode_step as vllm_decode
from ..models.vllm_engine import prefill_step as vllm_prefill
from ..models.vllm_engine import version as vllm_version
from ..models.whole import (
    WholeModel,
    build_model,
    check_context,
    extrapolation_scale,
    forward_flops,
    get_model,
    memory_bytes,
    param_counts,
    tiny,
)
from ..storage.store import WHOLE_FAMILY
from .core import Built, Point, Run, Variant

PHASES = ("prefill", "decode")
MOE_IMPLS = ("transformers", "moe-energy", "eager", "batched_mm", "grouped_mm")
ENGINES = ("transformers", "vllm")
# flags that mean nothing to vLLM: key -> (the flag, why), refused in one line when given with --engine vllm
VLLM_REFUSED = {"moe_impl": ("--moe-impl", "vLLM runs the MoE blocks with its own fused kernels"),
                "layers": ("--layers", "vLLM builds the whole model"),
                "tiny": ("--tiny", "vLLM serves the published shapes on a GPU"),
                "compile": ("--compile", "vLLM compiles and captures CUDA graphs itself"),
                "parallel": ("--parallel expert", "vLLM shards a model itself; not offered here yet")}
# Whole models' windows, in `run --model` and `sweep --model` alike, unless --duration, --repeats, --warmup or
# --cooldown (flag or --config) say otherwise: a model set at every phase x batch x context is many rows, each call
# of which can take seconds, so the LLM grids' repeats, warm-up and cool-down, in 10 s windows: `--model
# olmoe-1b-7b --vs olmo-2-7b --batch 1,16` is 8 rows, 16 windows, 3 minutes of them instead of 12. The duration
# is also the default --max-forward-s, which picks the layers built: one protocol, so run and sweep build one N.
WHOLE_PROTOCOL = {"duration": 10.0, "repeats": 2, "warmup": 0.5, "cooldown": 0.0}
EXTRAPOLATION = ("EXTRAPOLATED from the first {n} of {total} layers: the measured figure x {scale:.3g} (a token's "
                 "matrix work in all {total} layers and the LM head / in the {n} built and the LM head, the head's "
                 "share per prompt token 1/L in a prefill)")


def model_set(name: str | WholeModel, vs: Sequence[str] | None = None, shrink: bool = False) -> list[WholeModel]:
    """The MoE ``name`` and the dense models it is compared with (``vs``, default its published siblings), each
    shrunk with ``shrink`` (--tiny): the one check of a model set, for `run` and `sweep` alike (one-line errors)."""
    first = get_model(name)
    names = list(dict.fromkeys(vs)) if vs is not None else list(first.siblings)
    if not names:
        raise ConfigError(f"--vs: {first.name} names no dense sibling; give the models to compare it with")
    ms = [first, *(get_model(n) for n in names)]
    for m in ms[1:]:
        if m.moe_arch is not None:
            raise ConfigError(f"--vs {m.name}: an MoE model; --vs takes dense models to compare {first.name} with")
    return [tiny(m) for m in ms] if shrink else ms


def phase_figures(phase: str, rec: Mapping[str, Any], steps: int = 1) -> dict[str, Any]:
    """A phase's per-token figures from its windows' summary (a record, or ``me.benchmark``'s): tokens are the
    inferences; a prefill's latency is its time to first token, a decode call's / its ``steps`` (vLLM's call
    decodes T tokens per sequence) its inter-token latency."""
    tps, tpj = rec.get("inferences_per_second"), rec.get("inferences_per_joule")
    decode = phase == "decode"

    def per_step(key: str) -> float | None:
        v = rec.get(key)
        return v / steps if decode and v is not None else None

    return {"tokens_per_second": tps, "tokens_per_joule": tpj, "joules_per_token": 1 / tpj if tpj else None,
            "ttft_ms": None if decode else rec.get("latency_p50_ms"),
            "itl_p50_ms": per_step("latency_p50_ms"), "itl_p90_ms": per_step("latency_p90_ms")}


def whole_plan(m: WholeModel, layers: int) -> ModelPlan:
    """The plan of ``m``'s first ``layers`` layers: its parameters and FLOPs per decoded token (``forward_flops``: the
    matrix products a token passes through, the LM head's included, the embedding's lookup not; attention's
    context-dependent products are not counted). A point's own figure is ``flops_per_token``."""
    total, active = param_counts(m, layers)
    return ModelPlan(m.name, "moe" if m.moe_arch is not None else "dense", None, m.d_model, total, active,
                     round(forward_flops(m, layers, "decode", 1, 1)), m)  # type: ignore[arg-type]


def flops_per_token(m: WholeModel, layers: int, point: Point) -> float:
    """The matrix FLOPs per token of ``point``'s call (``forward_flops`` over the tokens it counts: B x L in a
    prefill, whose LM head runs at B positions only; B per decode step)."""
    phase, b, c = point.head["phase"], point.head["batch"], point.head["context"]
    return forward_flops(m, layers, phase, b, c) / (b * c if phase == "prefill" else b)


def held_bytes(m: WholeModel, layers: int, dtype: str, points: Sequence[Point]) -> dict[str, int]:
    """What ``m``'s rows hold on the device at once: its ``weights``, every decode point's KV cache (``kv_caches``:
    each decode step keeps its cache from its build to the end of the model's windows) and the largest point's
    own ``activations`` (a decode row's are a decode step's, not its context's prefill). `plan` shows these and
    `run` checks them, so both choose the same N."""
    needs = [memory_bytes(m, layers, dtype, p.head["batch"], p.head["context"], p.head["phase"]) for p in points]
    return {"weights": needs[0]["weights"],
            "kv_caches": sum(n["kv_cache"] for n, p in zip(needs, points) if p.head["phase"] == "decode"),
            "activations": max(n["activations"] for n in needs)}


def inputs_bytes(m: WholeModel, layers: int, dtype: str, points: Sequence[Point]) -> int:
    """Device memory ``m``'s rows need at once (``held_bytes``) and the allocator's margin."""
    return sum(held_bytes(m, layers, dtype, points).values()) + memory.OVERHEAD_BYTES


def check_strategies(strategies: Sequence[str], impls: Sequence[str], given: bool) -> None:
    """--moe-strategy with whole models (`run` and `sweep` alike): one strategy, since a set measures one row per
    model and point (``Whole.row_strategies``; a second one would never run), and only where some --moe-impl is
    moe-energy, the one implementation that reads it."""
    if len(strategies) > 1:
        raise ConfigError(f"--moe-strategy {','.join(strategies)}: whole models run one strategy (one row per model "
                          "and point); give one (a run or sweep for each)")
    if given and "moe-energy" not in impls:
        raise ConfigError(f"--moe-strategy: no meaning with --moe-impl {','.join(impls)} (only moe-energy's blocks "
                          "run a strategy); add --moe-impl moe-energy or drop it")


def check_vllm(given: Sequence[str], device: str) -> None:
    """--engine vllm's refusals, in one line each before anything is built (`run` and `sweep` alike): the
    ``VLLM_REFUSED`` keys given, vLLM not installed, no CUDA GPU (vLLM runs here on CUDA only)."""
    for key in (k for k in VLLM_REFUSED if k in given):
        name, why = VLLM_REFUSED[key]
        raise ConfigError(f"{name}: no meaning with --engine vllm ({why}); drop it")
    if (problem := missing()) is not None:
        raise ConfigError(problem)
    kind = resolve_device(device).type
    if kind != "cuda":
        raise ConfigError(f"--engine vllm needs a CUDA GPU (the device here is {kind}); run it on a CUDA "
                          "host, or use --engine transformers")


@dataclass
class Whole:
    """The whole-model workload (``core.Workload``): the first model against the others, at every point."""

    models: list[WholeModel]
    batches: list[int]
    contexts: list[int]
    layers: int | None = None  # N of each model's layers (None: the largest that fits)
    moe_impl: str = "transformers"
    engine: str = "transformers"  # or "vllm": every model served by vLLM (models.vllm_engine), whole
    family = WHOLE_FAMILY
    trains = False
    chosen: dict[str, int] = field(default_factory=dict)  # model -> the N built (check decides it)
    why: dict[str, str] = field(default_factory=dict)  # model -> why that N
    notices: list[str] = field(default_factory=list)  # the roofline's calibration, when choosing N needed it
    kv_tokens: dict[str, int | None] = field(default_factory=dict)  # vLLM: model -> tokens its KV cache holds

    @property
    def experts(self) -> int:
        raise ConfigError("--parallel expert does not run whole models yet: run them in one process")

    @property
    def vllm(self) -> bool:
        return self.engine == "vllm"

    @property
    def decode_tokens(self) -> int:
        """Output tokens per sequence in one decode call: vLLM's call decodes T, transformers' step one."""
        return DECODE_TOKENS if self.vllm else 1

    def check_inputs(self) -> None:
        """Every context a position each model has (the decoded token sits at position L; vLLM's T decoded
        tokens at L to L + T - 1)."""
        for m in self.models:
            for b in self.batches:
                for c in self.contexts:
                    check_context(m, b, c)
                    if self.vllm and c + DECODE_TOKENS > m.max_positions:
                        raise ConfigError(f"--engine vllm: context {c} + the {DECODE_TOKENS} tokens each decode "
                                          f"call generates pass {m.name}'s {m.max_positions} positions; give "
                                          f"--context at most {m.max_positions - DECODE_TOKENS}")

    def check(self, opts: RunOptions, device: torch.device, strategies: tuple[str, ...]) -> None:
        """The inputs; the N of layers each model builds (the largest that fits, unless given)."""
        self.check_inputs()
        self.choose_layers(opts, device)

    def choose_layers(self, opts: RunOptions, device: torch.device) -> None:
        """Each model's N and why: --layers; else the largest N whose weights, KV caches and activations fit in
        free memory and whose longest call (the largest prefill) takes at most --max-forward-s (default
        --duration) at this host's roofline bound, so a window holds a call or more: a dense 7B's 32 layers fit
        a 24 GiB CPU host, but one prefill of 16 x 512 tokens through them takes ~15 minutes on 2 cores."""
        limit = opts.max_forward_s if opts.max_forward_s is not None else opts.duration
        roof = None
        for m in self.models:
            if self.vllm:  # vLLM builds the whole model and sizes its KV cache from the memory left
                self.chosen[m.name], self.why[m.name] = m.layers, "vLLM serves the whole model"
                continue
            if self.layers is not None:
                self.chosen[m.name], self.why[m.name] = min(self.layers, m.layers), "--layers"
                continue
            n = self._fitting(m, opts.dtype, device)
            roof = roof or roofline.load_or_calibrate(device, opts.dtype, self.notices.append)
            self.chosen[m.name], self.why[m.name] = self._in_time(m, n, roof, opts.dtype, limit)

    def _fitting(self, m: WholeModel, dtype: str, device: torch.device) -> int:
        free = memory.available_bytes(device)
        points = self.points()
        n = m.layers
        while n > 1 and free is not None and inputs_bytes(m, n, dtype, points) > free:
            n -= 1
        return n

    def _in_time(self, m: WholeModel, fits: int, roof: roofline.Roofline, dtype: str, limit: float
                 ) -> tuple[int, str]:
        """(the largest N <= ``fits`` whose longest call's bound is within ``limit`` (1 at least), why)."""
        def bound(n: int) -> float:
            return max(roof.bound_s(forward_flops(m, n, p.head["phase"], p.head["batch"], p.head["context"]),
                                    memory_bytes(m, n, dtype, 1, 1)["weights"], dtype) or 0.0
                       for p in self.points())

        n = fits
        while n > 1 and bound(n) > limit:
            n -= 1
        why = f"{fits} fit in free memory" if fits < m.layers else "all fit in free memory"
        t = bound(n)  # computed once: every point's FLOPs and bytes
        if t > limit:  # even one layer is over the limit: 1, the least, is built anyway
            why += (f"; 1, the least: its longest call takes {t:.3g} s at this host's roofline bound, over "
                    f"{limit:g} s (--max-forward-s, default --duration)")
        elif n < fits:
            why += (f"; {n} keep the longest call under {limit:g} s (--max-forward-s, default --duration) at this "
                    f"host's roofline bound ({t:.3g} s)")
        return n, why

    def load(self, opts: RunOptions, device: torch.device, dtype: torch.dtype, rank: int) -> None:
        pass  # each point's token ids are made with its step, from --seed

    def identity(self) -> tuple[dict[str, Any], str]:
        engine = {"engine": self.engine} if self.vllm else {}  # unset, a transformers point's key is unchanged
        return {"models": [m.name for m in self.models], "batches": self.batches, "contexts": self.contexts,
                "layers": self.layers, "moe_impl": self.impl, **engine}, "-"

    @property
    def impl(self) -> str:
        """What runs the MoE blocks: --moe-impl, or vLLM's own fused MoE kernels under vLLM."""
        return "vllm" if self.vllm else self.moe_impl

    def options(self, opts: RunOptions) -> dict[str, Any]:
        drop = ("epochs", "lr", "batch_size", "samples", "test_fraction", "data", "models")
        return {k: v for k, v in opts.as_dict().items() if k not in drop}

    def document(self, opts: RunOptions) -> dict[str, Any]:
        return {"spec": {"models": [m.name for m in self.models]}, "options": self.options(opts),
                "dataset": {"source": "random token ids (torch.randint on the CPU from --seed)",
                            "batches": self.batches, "contexts": self.contexts},
                "family": self.family, "whole_models": [asdict(m) for m in self.models], "moe_impl": self.impl,
                "phases": list(PHASES), "layers_built": dict(self.chosen), "layers_why": dict(self.why),
                "notices": list(self.notices), "engine": self.engine, "engine_method": self.method()}

    def method(self) -> dict[str, Any] | None:
        """What a vLLM call measures, per phase, and the vLLM that measured it (None: transformers' engine)."""
        if not self.vllm:
            return None
        return {**METHOD, "decode_tokens_per_call": DECODE_TOKENS, "vllm_version": vllm_version(),
                "gpu_memory_utilization": GPU_MEMORY_UTILIZATION, "load_format": "dummy (random weights)"}

    def plans(self, models: Sequence[str]) -> list[ModelPlan]:
        return [whole_plan(m, self.chosen.get(m.name, m.layers)) for m in self.models]

    def points(self) -> list[Point]:
        return [Point(b * c if phase == "prefill" else b * self.decode_tokens, f"@{phase}-B{b}-L{c}",
                      {"phase": phase, "batch": b, "context": c})
                for phase in PHASES for b in self.batches for c in self.contexts]

    def row_strategies(self, plan: ModelPlan, strategies: tuple[str, ...]) -> tuple[str | None, ...]:
        return (None,)  # one row per model and point: --moe-impl (and --moe-strategy inside it) decides how it runs

    def fit_problem(self, plan: ModelPlan, opts: RunOptions, device: torch.device) -> str | None:
        m = self._model(plan)
        if self.vllm:  # vLLM sizes its KV cache from what its weights leave: the weights must fit
            need = memory_bytes(m, m.layers, opts.dtype, 1, 1)["weights"] + memory.OVERHEAD_BYTES
            return memory.fit_problem(need, device, f"building {m.name} in vLLM (its weights)")
        need = inputs_bytes(m, self.chosen.get(m.name, m.layers), opts.dtype, self.points())
        return memory.fit_problem(need, device, f"building {m.name} ({self.chosen.get(m.name, m.layers)} of "
                                                f"{m.layers} layers) and its KV caches")

    def together_problem(self, plans: list[ModelPlan], opts: RunOptions, device: torch.device) -> str | None:
        if self.vllm:
            return (f"vLLM takes {GPU_MEMORY_UTILIZATION:.0%} of the GPU for each model it serves, so one model is "
                    "served at a time")
        need = sum(inputs_bytes(self._model(p), self.chosen.get(p.name, 0) or 1, opts.dtype, self.points())
                   for p in plans)
        return memory.fit_problem(need, device, f"holding {', '.join(p.name for p in plans)} together")

    def _model(self, plan: ModelPlan) -> WholeModel:
        return next(m for m in self.models if m.name == plan.name)

    def build(self, r: Run, plan: ModelPlan) -> Built:
        """The model's first N layers on the device, its MoE blocks as --moe-impl says; OutOfMemory, released."""
        m = self._model(plan)
        problem = self.fit_problem(plan, r.opts, r.device)
        if problem is not None:
            raise OutOfMemory(problem)
        try:
            if self.vllm:  # Built.model is the engine: variant() asks it for the phases' calls
                r.ui.info(f"building {m.name} in vLLM (random weights: load_format='dummy')")
                engine = build_engine(m, r.opts.dtype, max(self.batches), max(self.contexts), r.opts.seed)
                self.kv_tokens[m.name] = engine.kv_cache_tokens()
                return Built(plan, engine)  # type: ignore[arg-type]
            r.ui.info(f"building {m.name} ({self.chosen[m.name]} of {m.layers} layers)")
            model = build_model(m, self.chosen[m.name], r.dtype, r.device, r.opts.seed)
            if self.moe_impl != "transformers":
                swap_moe_blocks(model, self.moe_impl, r.strategies[0] if r.strategies else "auto")
            return Built(plan, model)
        except Exception as e:
            if not memory.is_oom(e):
                raise
        raise OutOfMemory(memory.describe_need(None, r.device, f"building {m.name}"))

    def variant(self, r: Run, built: Built, point: Point, label: str, strategy: str | None
                ) -> tuple[Variant, str | None]:
        """The phase's step at (B, L), made now (a decode step fills its KV cache to L here, outside any window;
        vLLM's its prefix cache), and under vLLM what its last call found cached and generated, after each window."""
        b, c, prefill = point.head["batch"], point.head["context"], point.head["phase"] == "prefill"
        prefill_fn, decode_fn = (vllm_prefill, vllm_decode) if self.vllm else (prefill_step, decode_step)
        step, rows = (prefill_fn if prefill else decode_fn)(built.model, b, c, r.opts.seed)  # type: ignore
        m, n = self._model(built.plan), self.chosen[built.name]
        need = memory_bytes(m, n, r.opts.dtype, b, c, point.head["phase"])["activations"]  # this phase's own
        return Variant(label, step, None, (), round(flops_per_token(m, n, point)), need, parked=False,
                       head=dict(point.head), rows=rows, ready=True, after_window=getattr(step, "facts", None)), None

    def record(self, r: Run, plan: ModelPlan, point: Point, rec: dict[str, Any]) -> dict[str, Any]:
        """The per-token figures of this (model, phase, batch, context), and the whole model's, extrapolated from
        the N layers built when N is not all of them."""
        m, n = self._model(plan), self.chosen.get(plan.name, plan.shape.layers)  # type: ignore[union-attr]
        out: dict[str, Any] = {
            "model": m.name, **point.head, "tokens_per_call": point.rows, "layers_measured": n,
            "layers_total": m.layers, "moe_impl": self.impl if m.moe_arch is not None else None,
            "engine": self.engine, **phase_figures(point.head["phase"], rec, self.decode_tokens),
            "whole_model_extrapolated": None,
        }
        short = self._kv_short(m, point)
        if short is not None and rec.get("status") == "measured":
            out["flags"] = [*rec.get("flags", []), short]
        tps, tpj = out["tokens_per_second"], out["tokens_per_joule"]
        if n < m.layers and tps:
            scale = extrapolation_scale(m, n, point.head["phase"], point.head["context"])
            out["whole_model_extrapolated"] = {
                "tokens_per_second": tps / scale, "joules_per_token": out["joules_per_token"] * scale
                if tpj else None, "scale": scale, "label": EXTRAPOLATION.format(n=n, total=m.layers, scale=scale)}
        return out

    def _kv_short(self, m: WholeModel, point: Point) -> str | None:
        """Why vLLM cannot have run this point's B sequences at once (its KV cache holds fewer tokens than B x
        their longest length): the batch shrank, ML.ENERGY's reason to keep a window out. None: it could."""
        held = self.kv_tokens.get(m.name)
        b, c = point.head["batch"], point.head["context"]
        need = b * (c + (self.decode_tokens if point.head["phase"] == "decode" else 1))
        if not self.vllm or held is None or need <= held:
            return None
        return (f"batch shrank: vLLM's KV cache holds {held:,} tokens, {b} sequences of up to {need // b:,} need "
                f"{need:,}; at most {held // (need // b)} ran at once")

    def bytes_read(self, plan: ModelPlan, point: Point, rec: dict[str, Any], dtype: str) -> float | None:
        return None  # no roofline for a whole model (attention and the KV cache have no bound here yet)

    def stem(self) -> str | None:
        name = self.models[0].name
        return name if name.replace("-", "").replace(".", "").isalnum() else None

    # -- a sweep's facts: a point is one model set at all its batches x contexts (runner/sweep.py) ------------
    sweep_oom = "skip"

    def key_fields(self) -> dict[str, Any]:
        return {"family": self.family, **self.identity()[0]}

    def work_flops(self, opts: RunOptions) -> float:
        return float(sum(flops_per_token(self._model(p), self.chosen.get(p.name, self._model(p).layers), q) * q.rows
                         for p in self.plans(()) for q in self.points()))

    def seconds_floor(self, opts: RunOptions, roof: Any) -> float | None:
        return None

    def point_problem(self, opts: RunOptions, device: torch.device) -> str | None:
        """Why not even one layer of some model fits here (the layers each builds are chosen first, as ``check``
        chooses them: a model too large whole is measured on its first N layers, not skipped)."""
        self.choose_layers(opts, device)
        return next((why for p in self.plans(()) if (why := self.fit_problem(p, opts, device))), None)

    def need_bytes(self, opts: RunOptions) -> int:
        return max(inputs_bytes(m, self.chosen.get(m.name, m.layers), opts.dtype, self.points()) for m in self.models)
