"""Sweeps: a grid of points (shape x batch x dtype x repeats), sharded, resumable, each point one runner call.

A point is identified by a key hashed from everything that decides its figures (shape, run options,
meter), never by its position: so ``--resume`` skips exactly what is already in the store, and shards of
one grid run on different hosts can be merged without clashes.

Two families share this one loop: the seed's classifier (a point = one shape trained and measured by
``pipeline.run``) and the LLM MoE layer of issue 13 (a point = one arch x one routing x its token counts,
measured by ``llm_pipeline.run_llm``, one record per (model, token count)). A point knows its family; keys,
resume, shards, the fit check, the ETA and the store writes are the same code for both.

Power caps (issue 15) are one more axis of either family: each point carries the GPU cap and the CPU cap it is
measured under (part of its key, so --resume works per cap; an uncapped point's key is what it always was),
and runs through ``capped.run_capped`` like `run`: set, measured, read back, restored on every way out. The
carbon intensity and price only price the records (``carbon.add_carbon``): they are not part of any key.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import sqlite3
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import memory
from ..config import (
    CAP_KEYS,
    CARBON_KEYS,
    CONFIG_KEYS,
    PRESETS,
    WORKLOAD_KEYS,
    CarbonPrice,
    ConfigError,
    ModelSpec,
    RunOptions,
    flag,
    foreign,
    read_toml,
    resolve_config,
)
from ..device import free
from ..errors import check_choice, described
from ..measure.window import latency_budget
from ..models.archs import PRESETS as ARCH_PRESETS
from ..models.archs import Arch, custom_arch, get_arch
from ..models.counting import layer_params, matched_width, moe_params
from ..models.plan import ModelPlan
from ..models.routing import parse_routing
from ..models.whole import WholeModel, param_counts
from ..power.capped import CapPlan, run_capped
from ..storage.fileio import now_utc
from ..storage.results import write_atomic
from ..storage.store import LAYER_FAMILY, WHOLE_FAMILY, Store, point_key
from . import core
from .core import Workload
from .layer import Layer, check_tokens
from .model import ENGINES, MOE_IMPLS, PHASES, WHOLE_PROTOCOL, Whole, check_strategies, check_vllm, model_set
from .seed import Seed

SEED_PRESETS = ("small", "large", "xl", "xxl")
SHAPE_AXES = ("experts", "hidden", "layers", "top_k")
OPTION_AXES = ("batch_size", "dtype", "repeats")
AXES = SHAPE_AXES + OPTION_AXES
TEXT_AXES = ("dtype", "weights")  # axes of names; the others are whole numbers
BUILTIN_GRIDS = ("seed", "scale", "llm")
# --grid llm's protocol where the user sets none: 8 presets x 7 token counts x 3 models is 168 rows, so the
# seed's 3 repeats, 2 s warm-ups and 2 s rests would take over an hour at --duration 2 on a 2-core CPU before any
# forward outlasts its window. Two windows give each figure its interval; and a forward longer than one window
# (max_forward_s: --duration) is skipped with its reason. Every one of them is a flag to set otherwise.
LLM_GRID_PROTOCOL = {"repeats": 2, "warmup": 0.5, "cooldown": 0.0}
# LLM layers: the axes of their own (a custom shape also takes --experts and --top-k), and the seed's keys that
# mean nothing for a layer built, not trained (refused, never silently ignored).
LAYER_AXES = tuple(k for k in WORKLOAD_KEYS["llm_layer"] if k not in ("max_forward_s", "models", "weights"))
LAYER_SHAPE_AXES = ("d_model", "ffn_dim", "experts", "top_k", "shared_experts")
# a layer point's options that are axes: the seed's, and how the weights are stored (dtype, int8: issue 24)
LAYER_OPTION_AXES = (*OPTION_AXES, "weights")
SEED_ONLY_KEYS = (*foreign("llm_layer"), "presets", "per_decade")
LLM_TOKENS = tuple(4**i for i in range(7))  # 1, 4, ..., 4096: a decoding step up to a prefill chunk
# Whole models (issue 23): their own axes, and what means nothing for a model set (refused, never ignored): the
# seed's shape and training, a layer's, the size grids' limits, --batch-size (their batches are --batch).
MODEL_AXES = ("model", "vs", "batch", "context", "moe_impl", "engine", "tiny")
MODEL_REFUSED = ("grid", "max_params", "per_decade", "presets", "preset", "experts", "top_k")
# Keys a grid TOML may hold besides run options and shape fields.
GRID_KEYS = {"grid", "max_params", "per_decade", "preset", "presets", *LAYER_AXES, *MODEL_AXES}
DEFAULT_PER_DECADE = 4
MAX_PER_DECADE = 100  # sizes per decade: more is a typo, and would expand to a grid nobody could run
ALIGN = 8  # scale-grid widths are multiples of this: 16-byte rows in fp32 and in bf16/fp16
# Options that do not change a point's figures, so they are left out of its config (and key; the store's
# NOT_IDENTITY_OPTIONS are kept in the config, what the sweep was told, and left out of the key only).
NOT_IN_KEY = ("out", "extra")
# options newer than stored configs: unset, a point's config (and key) is what it always was
KEY_ONLY_IF_SET = ("max_forward_s", "weights")


@dataclass(frozen=True)
class Point:
    """One cell of the grid: a shape and run options; ``error`` says why it cannot run (kept as skipped).

    An LLM-layer point's ``spec`` is an ``Arch`` and it carries its token counts per forward and its routing. A
    whole-model point's ``spec`` is the MoE's ``WholeModel``; it carries the dense models it is compared with, the
    batches and contexts every model is measured at, the layers built (None: the largest N that fits) and how the
    MoE blocks run."""

    label: str
    spec: ModelSpec | Arch | WholeModel
    opts: RunOptions
    error: str | None = None
    tokens: tuple[int, ...] = ()
    routing: str | None = None
    power_limit_w: float | None = None  # the GPU cap asked (--power-limit); None: the limit in force, untouched
    cpu_power_limit_w: float | None = None  # the CPU packages' long-term RAPL cap asked (--cpu-power-limit)
    siblings: tuple[WholeModel, ...] = ()
    batches: tuple[int, ...] = ()
    contexts: tuple[int, ...] = ()
    layers: int | None = None
    moe_impl: str | None = None
    engine: str = "transformers"

    @property
    def is_layer(self) -> bool:
        return isinstance(self.spec, Arch)

    @property
    def is_whole(self) -> bool:
        return isinstance(self.spec, WholeModel)

    @cached_property
    def workload(self) -> Workload:
        """What the point runs: the seed's classifiers of its shape, its LLM layer at its tokens and routing, or
        its model set at its batches and contexts (each checked when the grid was built)."""
        if isinstance(self.spec, Arch):
            return Layer(self.spec, list(self.tokens), parse_routing(self.routing or "random"), self.opts.weights)
        if isinstance(self.spec, WholeModel):
            return Whole([self.spec, *self.siblings], list(self.batches), list(self.contexts), self.layers,
                         self.moe_impl or "transformers", self.engine)
        return Seed(self.spec)

    @property
    def total_params(self) -> int:
        """The MoE's total parameters (an LLM layer's: router, every expert, shared experts; a whole model's: all
        its layers, whatever N a run builds)."""
        if isinstance(self.spec, WholeModel):
            return param_counts(self.spec)[0]
        return ModelPlan.of("moe", self.spec).params

    def config(self, meter: str) -> dict:
        opts = {k: v for k, v in self.workload.options(self.opts).items()
                if k not in NOT_IN_KEY and not (k in KEY_ONLY_IF_SET and v is None)}
        # the caps only when capped: an uncapped point's key never changes
        caps = {k: getattr(self, k) for k in ("power_limit_w", "cpu_power_limit_w") if getattr(self, k) is not None}
        return {"label": self.label, "spec": asdict(self.spec), "options": opts, "meter": meter,
                "total_params": self.total_params, **self.workload.key_fields(), **caps}

    @property
    def caps_text(self) -> str:
        """'250 W', 'CPU 15 W', '250 W, CPU 15 W', or '-' when uncapped."""
        parts = ([f"{self.power_limit_w:g} W"] if self.power_limit_w is not None else []) + \
            ([f"CPU {self.cpu_power_limit_w:g} W"] if self.cpu_power_limit_w is not None else [])
        return ", ".join(parts) or "-"

    def key(self, meter: str) -> str:
        return point_key(self.config(meter))


@dataclass
class Grid:
    name: str
    points: list[Point]
    source: dict = field(default_factory=dict)  # what the user asked for, for the runs table

    def hash(self, meter: str) -> str:
        return hashlib.sha256("\n".join(p.key(meter) for p in self.points).encode()).hexdigest()[:20]


# -- shapes ----------------------------------------------------------------------------------------------
def label_for(spec: ModelSpec) -> str:
    """The preset's name of a preset's shape, else the shape written out."""
    return next((name for name, p in PRESETS.items() if p == spec),
                f"E{spec.experts}-H{spec.hidden}-L{spec.layers}-k{spec.top_k}")


def seed_shapes() -> list[ModelSpec]:
    """The blog's four points."""
    return [PRESETS[n] for n in SEED_PRESETS]


def scale_shapes(per_decade: int = DEFAULT_PER_DECADE) -> list[ModelSpec]:
    """A geometric ladder of total sizes through the seed's four points, every shape with E/k = 4 (theirs).

    Between two neighbouring seed points the target totals are evenly spaced in log(params); E follows a
    geometric path rounded to a multiple of the ratio (so k = E/ratio stays whole), L a linear one, and H
    is the smallest multiple of 8 that reaches the target total (a multiple of 8 keeps every weight row
    16-byte aligned in fp32 and bf16, which grouped GEMM kernels require; the seed's widths all are).
    Each seed point is on the ladder.
    """
    if per_decade < 1:
        raise ConfigError(f"per-decade={per_decade} must be a whole number >= 1")
    anchors = seed_shapes()
    ratios = {a.experts / a.top_k for a in anchors}
    if len(ratios) != 1:
        raise ConfigError("the seed presets no longer share one E/k ratio; the scale grid needs one")
    ratio = int(anchors[0].experts // anchors[0].top_k)
    out: list[ModelSpec] = []
    for a, b in zip(anchors, anchors[1:]):
        pa, pb = moe_params(a), moe_params(b)
        n = max(1, math.ceil(math.log10(pb / pa) * per_decade))
        out.append(a)
        for i in range(1, n):
            f = i / n
            target = pa * (pb / pa) ** f
            e_geo = math.exp(math.log(a.experts) + f * (math.log(b.experts) - math.log(a.experts)))
            experts = max(ratio, ratio * round(e_geo / ratio))
            layers = round(a.layers + f * (b.layers - a.layers))
            shape = replace(a, experts=experts, top_k=experts // ratio, layers=layers, hidden=1)
            per_expert = (target - (shape.input_dim + 1) * experts) / experts
            hidden = matched_width(max(1, math.ceil(per_expert)), shape.input_dim, layers, shape.classes)
            hidden = ALIGN * math.ceil(hidden / ALIGN)
            out.append(replace(shape, hidden=hidden).validate())
    out.append(anchors[-1])
    return list(dict.fromkeys(sorted(out, key=moe_params)))  # a shape reached twice is one point


# -- grid from flags / TOML --------------------------------------------------------------------------------
def as_list(key: str, v: Any, kind: type) -> list:
    """A comma string, a TOML list or a scalar -> a list of ``kind``; ConfigError names the bad item.

    A value given twice (``16,16`` or ``32,032``) is one axis value: the same point measured once, not twice.
    """
    items = v if isinstance(v, (list, tuple)) else (str(v).split(",") if isinstance(v, str) else [v])
    out = []
    for x in items:
        if isinstance(x, str):
            x = x.strip()
            if not x:
                continue
        try:
            if kind is int:
                if isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()):
                    raise ValueError
                out.append(int(x))
            else:
                out.append(str(x))
        except (TypeError, ValueError):
            raise ConfigError(f"{flag(key)}: {x!r} is not a whole number; give a comma list such as 8,16") from None
    if not out:
        raise ConfigError(f"{flag(key)}: empty list; give at least one value")
    return list(dict.fromkeys(out))


def load_grid_toml(path: str | Path) -> dict[str, Any]:
    """A sweep's --config: run options as in `run`, plus any axis as a list and grid/max_params/per_decade, and
    run's power caps, carbon intensity and price; a [sweep] table is accepted as well as top-level keys."""
    return read_toml(path, CONFIG_KEYS | GRID_KEYS | set(AXES) | set(CAP_KEYS) | set(CARBON_KEYS), flatten="sweep")


def _limits(cfg: dict[str, Any]) -> tuple[float | None, int]:
    """(max_params, per_decade) taken out of ``cfg``, each checked."""
    max_params = cfg.pop("max_params", None)
    per_decade = cfg.pop("per_decade", DEFAULT_PER_DECADE)
    if max_params is not None:
        try:
            max_params = float(max_params)
        except (TypeError, ValueError):
            raise ConfigError(f"--max-params {max_params!r} is not a number; give e.g. 5e7") from None
        if not math.isfinite(max_params) or max_params <= 0:
            raise ConfigError(f"--max-params {max_params} must be a positive number such as 5e7")
    if isinstance(per_decade, bool) or not isinstance(per_decade, int) or not 1 <= per_decade <= MAX_PER_DECADE:
        raise ConfigError(f"--per-decade {per_decade!r} must be a whole number between 1 and {MAX_PER_DECADE}")
    return max_params, per_decade


def _builtin_shapes(name: str, cfg: dict, shape_axes: dict, presets: Any, per_decade: int) -> list[ModelSpec]:
    """The seed's or the scale ladder's shapes, with the task's input_dim and classes."""
    if name not in BUILTIN_GRIDS:
        raise ConfigError(f"--grid {name!r} is unknown; choose seed, scale or llm (or give axes as flags/TOML)")
    if shape_axes or presets:
        raise ConfigError(f"--grid {name} fixes the shapes; drop --experts/--hidden/--layers/--top-k/--preset "
                          "or drop --grid")
    base = _resolve(cfg, {})[0]
    return [replace(s, input_dim=base.input_dim, classes=base.classes)
            for s in (seed_shapes() if name == "seed" else scale_shapes(per_decade))]


def _axis_shapes(cfg: dict, shape_axes: dict, presets: Any) -> tuple[list[ModelSpec], dict[int, str]]:
    """Each preset x the product of the shape axes; an invalid shape is kept with its reason (index -> why)."""
    preset_names = as_list("preset", presets, str) if presets else ["small"]
    for pn in preset_names:
        check_choice("--preset", pn, PRESETS)
    shapes: list[ModelSpec] = []
    errors: dict[int, str] = {}
    keys = list(shape_axes)
    task = {k: cfg[k] for k in ("input_dim", "classes") if k in cfg}
    for pn in preset_names:
        for combo in itertools.product(*(shape_axes[k] for k in keys)):
            s = replace(PRESETS[pn], **dict(zip(keys, combo)))
            why = None
            try:
                s = _resolve(cfg, {**asdict(s), **task})[0]
            except ConfigError as e:
                why = str(e)
            if s in shapes:  # two presets the axes override alike: one shape, one point (one key), measured once
                continue
            if why is not None:
                errors[len(shapes)] = why
            shapes.append(s)
    return shapes, errors


def _grid_points(cfg: dict, shapes: list[ModelSpec], errors: dict[int, str], option_axes: dict,
                 max_params: float | None) -> list[Point]:
    """Every shape x option combination at or below ``max_params``; options are validated once up front (a typo
    there is the user's to fix, not a skipped point)."""
    first_ok = next((i for i in range(len(shapes)) if i not in errors), None)
    okeys = list(option_axes)
    combos = list(itertools.product(*(option_axes[k] for k in okeys)))
    if first_ok is not None:
        for combo in combos:
            _resolve(cfg, {**asdict(shapes[first_ok]), **dict(zip(okeys, combo))})
    points: list[Point] = []
    for i, s in enumerate(shapes):
        if max_params is not None and moe_params(s) > max_params:
            continue
        for combo in combos:
            extra = dict(zip(okeys, combo))
            if i in errors:
                _spec, opts = _resolve(cfg, {**asdict(PRESETS["small"]), **extra})
                points.append(Point(label_for(s), s, opts, error=f"invalid shape: {errors[i]}"))
                continue
            spec, opts = _resolve(cfg, {**asdict(s), **extra})
            points.append(Point(label_for(spec), spec, opts))
    return points


def build_grid(cfg: dict[str, Any]) -> Grid:
    """Points from a merged config (TOML, then flags): built-in grid or the product of the axes.

    Each point's spec and options pass the same validation as `run` (``config.resolve_config``).
    """
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if "model" in cfg:
        return build_model_grid(cfg)
    if cfg.get("grid") == "llm" or "arch" in cfg:
        return build_layer_grid(cfg)
    for keys, what in (((*LAYER_AXES, "max_forward_s", "weights"), "LLM-layer settings; give --arch (or --grid llm)"),
                       (MODEL_AXES, "whole-model settings; give --model")):
        stray = [k for k in keys if k in cfg]
        if stray:
            raise ConfigError(f"{', '.join(flag(k) for k in stray)}: {what} with them, or drop them")
    name = cfg.pop("grid", None)
    if "per_decade" in cfg and name != "scale":  # the scale ladder's density: any other grid would ignore it
        raise ConfigError("--per-decade: only with --grid scale (sizes per decade of its ladder); add --grid scale "
                          "or drop it")
    max_params, per_decade = _limits(cfg)
    presets = cfg.pop("presets", None) or cfg.pop("preset", None)
    cfg.pop("preset", None)
    shape_axes = {k: as_list(k, cfg.pop(k), int) for k in SHAPE_AXES if k in cfg}
    option_axes = {k: as_list(k, cfg.pop(k), str if k in TEXT_AXES else int) for k in OPTION_AXES if k in cfg}
    errors: dict[int, str] = {}
    if name is not None:
        shapes = _builtin_shapes(name, cfg, shape_axes, presets, per_decade)
    else:
        name = "custom"
        shapes, errors = _axis_shapes(cfg, shape_axes, presets)
    points = _grid_points(cfg, shapes, errors, option_axes, max_params)
    if points and all(p.error for p in points):  # one bad combination is skipped; a grid of only bad ones is a typo
        raise ConfigError(errors[min(errors)])
    if not points:
        raise ConfigError("the grid has no points"
                          + (f" at or below --max-params {max_params:.3g}; raise it" if max_params else ""))
    source = {"grid": name, "max_params": max_params, "per_decade": per_decade if name == "scale" else None,
              "axes": {**shape_axes, **option_axes}, "presets": presets, "options": cfg}
    return Grid(name, points, source)


# -- LLM layers ------------------------------------------------------------------------------------------
def _custom_archs(shape: dict[str, list[int]], routers: list[str]) -> list[Arch]:
    """Every combination of the custom-shape axes, each named by its shape (so two customs never share a name)."""
    missing = [flag(k) for k in LAYER_SHAPE_AXES[:4] if k not in shape]
    if missing:
        raise ConfigError(f"--arch custom needs {', '.join(missing)} (and optionally --shared-experts, --router)")
    out = []
    keys = list(shape)
    for combo in itertools.product(*(shape[k] for k in keys), routers):
        f = dict(zip(keys, combo[:-1]))
        shared = f.get("shared_experts", 0)
        name = (f"custom-d{f['d_model']}-I{f['ffn_dim']}-E{f['experts']}-k{f['top_k']}" + (f"-s{shared}" if shared
                else "") + (f"-{combo[-1]}" if len(routers) > 1 or combo[-1] != "softmax_topk" else ""))
        out.append(custom_arch(f["d_model"], f["ffn_dim"], f["experts"], f["top_k"], shared, combo[-1], name=name))
    return out


def layer_archs(name: str, cfg: dict) -> list[Arch]:
    """The archs of an LLM grid, taken out of ``cfg``: every preset (``--grid llm``), or ``--arch`` names, where
    ``custom`` is every combination of --d-model, --ffn-dim, --experts, --top-k (--shared-experts, --router)."""
    shape = {k: as_list(k, cfg.pop(k), int) for k in LAYER_SHAPE_AXES if k in cfg}
    routers = as_list("router", cfg.pop("router"), str) if "router" in cfg else None
    if name == "llm":
        if "arch" in cfg or shape or routers:
            raise ConfigError("--grid llm fixes the archs (every preset); drop --arch and the shape flags, or drop "
                              "--grid")
        return list(ARCH_PRESETS.values())
    if name != "custom":
        raise ConfigError(f"--grid {name!r} with --arch: --arch is its own grid; drop --grid")
    names = as_list("arch", cfg.pop("arch"), str)
    if (shape or routers) and "custom" not in names:
        raise ConfigError(f"{', '.join(flag(k) for k in (*shape, *(['router'] if routers else [])))}: shape flags "
                          "of --arch custom; add custom to --arch or drop them")
    archs: list[Arch] = []
    for n in names:
        archs += _custom_archs(shape, routers or ["softmax_topk"]) if n == "custom" else [get_arch(n)]
    return list({a.name: a for a in archs}.values())


def build_layer_grid(cfg: dict[str, Any]) -> Grid:
    """LLM-layer points: each arch at or below ``max_params`` (the MoE layer's total) x routing x dtype x repeats,
    every point measuring all its token counts (default 1, 4, ..., 4096); options checked as `run` checks them."""
    name = cfg.pop("grid", None) or "custom"
    if name == "llm":
        cfg = {**LLM_GRID_PROTOCOL, "max_forward_s": cfg.get("duration", RunOptions.duration), **cfg}
    seed_only = [flag(k) for k in SEED_ONLY_KEYS if k in cfg]
    if seed_only:
        raise ConfigError(f"{', '.join(seed_only)}: no meaning for LLM layers (built, not trained; their shape is "
                          "--arch or --d-model/--ffn-dim/--experts/--top-k); drop "
                          f"{'it' if len(seed_only) == 1 else 'them'}")
    max_params, _ = _limits(cfg)
    archs = layer_archs(name, cfg)
    tokens = tuple(check_tokens(as_list("tokens", cfg.pop("tokens"), int), "--tokens") if "tokens" in cfg
                   else LLM_TOKENS)
    routings = list(dict.fromkeys(parse_routing(r).text for r in as_list("routing", cfg.pop("routing", "random"),
                                                                          str)))
    option_axes = {k: as_list(k, cfg.pop(k), str if k in TEXT_AXES else int) for k in LAYER_OPTION_AXES if k in cfg}
    combos = [dict(zip(option_axes, c)) for c in itertools.product(*option_axes.values())]
    points = [Point(f"{arch.name} {routing}", arch, _resolve(cfg, extra)[1], tokens=tokens, routing=routing)
              for arch in archs if max_params is None or layer_params(arch) <= max_params
              for routing in routings for extra in combos]
    if not points:
        why = f": no arch at or below --max-params {max_params:.3g} (the MoE layer's total params); raise it"
        raise ConfigError("the grid has no points" + (why if max_params else ""))
    source = {"grid": name, "family": LAYER_FAMILY, "max_params": max_params, "archs": [a.name for a in archs],
              "tokens": list(tokens), "routing": routings, "axes": option_axes, "options": cfg}
    return Grid(name, points, source)


# -- whole models -----------------------------------------------------------------------------------------
def _one_layer_count(v: Any) -> int | None:
    """--layers for whole models: one N (each model builds min(N, its layers)), or None: the largest that fits."""
    if v is None:
        return None
    ns = as_list("layers", v, int)
    if len(ns) > 1 or ns[0] < 1:
        raise ConfigError(f"--layers {v!r}: give one whole number >= 1 with --model (each model builds its first N "
                          "layers, or drop it for the largest N that fits)")
    return ns[0]


def _model_sets(cfg: dict, shrink: bool) -> list[list[WholeModel]]:
    """Each --model with its --vs (default its dense siblings), --tiny applied; taken out of ``cfg``, checked."""
    names = as_list("model", cfg.pop("model"), str)
    vs = as_list("vs", cfg.pop("vs"), str) if "vs" in cfg else None
    return [model_set(n, vs, shrink) for n in names]


def _vllm_refusals(engines: list[str], cfg: dict, impls: list[str], layers: int | None, shrink: bool) -> None:
    """With vllm among --engine, `run --engine vllm`'s refusals (a vLLM point runs its own kernels on the whole
    model, so --moe-impl other than transformers, --layers and --tiny mean nothing; vLLM and a CUDA GPU needed)."""
    if "vllm" in engines:
        given = {"moe_impl": impls != ["transformers"], "layers": layers is not None, "tiny": shrink,
                 "compile": bool(cfg.get("compile"))}
        check_vllm([k for k, v in given.items() if v], str(cfg.get("device") or "auto"))


def build_model_grid(cfg: dict[str, Any]) -> Grid:
    """Whole-model points: each model set (--model and its --vs) x --engine x --moe-impl x dtype x repeats, every
    point measuring all its batches x contexts (default 1,8 x 512), in `run --model`'s windows unless told
    (``WHOLE_PROTOCOL``); every input checked as `run --model` checks it."""
    refused = [flag(k) for k in (*MODEL_REFUSED, *foreign(WHOLE_FAMILY)) if k in cfg]
    if refused:
        raise ConfigError(f"{', '.join(dict.fromkeys(refused))}: no meaning with --model (a whole LLM is built "
                          "from its preset, not trained; its inputs are --batch and --context); drop "
                          f"{'it' if len(set(refused)) == 1 else 'them'}")
    shrink = bool(cfg.pop("tiny", False))
    sets = _model_sets(cfg, shrink)
    batches = tuple(as_list("batch", cfg.pop("batch", "1,8"), int))
    contexts = tuple(as_list("context", cfg.pop("context", "512"), int))
    layers = _one_layer_count(cfg.pop("layers", None))
    impls = as_list("moe_impl", cfg.pop("moe_impl", "transformers"), str)
    for impl in impls:
        check_choice("--moe-impl", impl, MOE_IMPLS)
    engines = as_list("engine", cfg.pop("engine", "transformers"), str)
    for engine in engines:
        check_choice("--engine", engine, ENGINES)
    for ms in sets:  # every context a position each model has, every batch >= 1: before any point runs
        for engine in engines:
            Whole(ms, list(batches), list(contexts), engine=engine).check_inputs()
    _vllm_refusals(engines, cfg, impls, layers, shrink)
    option_axes = {k: as_list(k, cfg.pop(k), str if k in TEXT_AXES else int) for k in ("dtype", "repeats") if k in cfg}
    cfg = {**WHOLE_PROTOCOL, **cfg}  # repeats given are an axis, which a point's own values override
    combos = [dict(zip(option_axes, c)) for c in itertools.product(*option_axes.values())]
    points = [Point(f"{ms[0].name} {impl if engine == 'transformers' else engine}", ms[0], _resolve(cfg, extra)[1],
                    siblings=tuple(ms[1:]), batches=batches, contexts=contexts, layers=layers, moe_impl=impl,
                    engine=engine)
              for ms in sets for engine in engines for impl in impls for extra in combos]
    check_strategies(points[0].opts.strategies, impls, "strategies" in cfg)
    source = {"grid": "models", "family": WHOLE_FAMILY, "models": [[m.name for m in ms] for ms in sets],
              "batches": list(batches), "contexts": list(contexts), "layers": layers, "moe_impl": impls,
              **({"engine": engines} if engines != ["transformers"] else {}), "axes": option_axes, "options": cfg}
    return Grid("models", points, source)


def _resolve(cfg: dict, fields: dict) -> tuple[ModelSpec, RunOptions]:
    """One point's spec and options: the sweep's settings with this point's axis values."""
    return resolve_config({**cfg, **fields, "preset": None})


def with_caps(grid: Grid, gpu_caps: list[float], cpu_caps: list[float]) -> Grid:
    """Every point once per cap (the caps innermost: one shape's caps run back to back); the grid as it is
    without caps. The caps are the checked ones (``capped.plan_caps``: 'sweep' resolved; ``resolve_caps``: one
    device's caps at a time)."""
    if not gpu_caps and not cpu_caps:
        return grid
    points = [replace(p, power_limit_w=g, cpu_power_limit_w=c) for p in grid.points
              for c in (cpu_caps or [None]) for g in (gpu_caps or [None])]
    source = {**grid.source, "power_limit_w": list(gpu_caps) or None, "cpu_power_limit_w": list(cpu_caps) or None}
    return Grid(grid.name, points, source)


# -- shard and resume --------------------------------------------------------------------------------------
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
K8S_INDEX = "JOB_COMPLETION_INDEX"


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4): shard 2 of 4 (1-based); 'auto' and 'auto/N' read the scheduler's environment
    (``shard_from_env``)."""
    if text is None:
        return None
    if text == "auto" or text.startswith("auto/"):
        return shard_from_env(text, os.environ if environ is None else environ)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} is not I/N; give e.g. --shard 1/2") from None
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: I must be between 1 and N (N >= 1), e.g. --shard 1/{max(n, 2)}")
    return i, n


def _env_int(env: Mapping[str, str], name: str, why: str) -> int:
    """A whole number from the scheduler's environment, or one line naming the variable."""
    raw = env.get(name)
    if raw is None:
        raise ConfigError(f"--shard auto: {name} is not set: {why}")
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"--shard auto: {name}={raw!r} is not a whole number") from None


def shard_from_env(text: str, env: Mapping[str, str]) -> tuple[int, int]:
    """(i, n) of this task: 'auto/N' from a Kubernetes Indexed Job (JOB_COMPLETION_INDEX 0 .. N-1, N its
    completions, given); 'auto' from a Slurm array (its id counted from SLURM_ARRAY_TASK_MIN in steps of
    SLURM_ARRAY_TASK_STEP, of SLURM_ARRAY_TASK_COUNT): ids need not start at 0 or 1. Anything missing or
    inconsistent is one line: a task that guessed its shard would measure another's points, or none."""
    if text != "auto":
        n = text.removeprefix("auto/")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--shard {text!r}: N must be a whole number >= 1 (the Indexed Job's completions)")
        count = int(n)
        index = _env_int(env, K8S_INDEX, "each pod of a Kubernetes Indexed Job has it; under a Slurm array give "
                         "--shard auto")
        if not 0 <= index < count:
            raise ConfigError(f"--shard {text}: {K8S_INDEX}={index} is not between 0 and {count - 1}; give the "
                              "Job's completions as N")
        return index + 1, count
    why = "each task of a Slurm array (sbatch --array) has it; in a Kubernetes Indexed Job give --shard auto/N"
    task, count, low = (_env_int(env, name, why) for name in SLURM)
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", why) if "SLURM_ARRAY_TASK_STEP" in env else 1
    high = _env_int(env, "SLURM_ARRAY_TASK_MAX", why) if "SLURM_ARRAY_TASK_MAX" in env else low + (count - 1) * step
    if count < 1 or step < 1 or high != low + (count - 1) * step:
        raise ConfigError(f"--shard auto: the Slurm array is not an evenly spaced range (ids {low} to {high}, "
                          f"step {step}, {count} tasks); submit it as --array=A-B or A-B:S")
    if task < low or task > high or (task - low) % step:
        raise ConfigError(f"--shard auto: SLURM_ARRAY_TASK_ID={task} is not one of the array's ids ({low} to "
                          f"{high}, step {step})")
    return (task - low) // step + 1, count


def shard(points: list[Point], which: tuple[int, int] | None) -> list[Point]:
    """Every n-th point from the i-th: deterministic, and small and large points spread over all shards."""
    if which is None:
        return list(points)
    i, n = which
    return points[i - 1 :: n]


# -- cost, memory and ETA ----------------------------------------------------------------------------------
def measured_models(p: Point) -> int:
    """Rows the point measures: each model (the MoE once per strategy), at each token count for an LLM layer; a
    whole model's: each model of its set at each phase, batch and context."""
    if p.is_whole:
        return (1 + len(p.siblings)) * len(PHASES) * len(p.batches) * len(p.contexts)
    n = sum(len(p.opts.strategies) if m == "moe" else 1 for m in p.opts.models)
    return n * max(1, len(p.tokens))


def fixed_seconds(p: Point) -> float:
    """Seconds the point spends measuring whatever the hardware's speed: windows, warm-ups, rests, idle."""
    o = p.opts
    per_model = o.warmup + o.repeats * o.duration + latency_budget(o.duration)
    return measured_models(p) * per_model + max(0, o.repeats - 1) * o.cooldown * measured_models(p) + o.idle_seconds


@dataclass
class Eta:
    """Remaining time: fixed measuring seconds, plus the work FLOPs (``Workload.work_flops``: training, forwards
    of seconds) at the rate the finished points ran."""

    flops_done: float = 0.0
    train_seconds: float = 0.0

    def record(self, p: Point, elapsed_s: float) -> None:
        self.flops_done += p.workload.work_flops(p.opts)
        self.train_seconds += max(elapsed_s - fixed_seconds(p), 1e-3)

    def remaining(self, todo: Iterable[Point]) -> float | None:
        if self.flops_done <= 0:
            return None
        rate = self.flops_done / self.train_seconds
        return sum(fixed_seconds(p) + p.workload.work_flops(p.opts) / rate for p in todo)


# -- the loop --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    already: int = 0
    busy: int = 0  # points another sweep on the same database was measuring: left to it
    failures: list[str] = field(default_factory=list)

    def count(self, status: str, failure: str) -> None:
        """One more point of ``status`` ("done", "skipped" or "failed"; a failure keeps its line)."""
        setattr(self, status, getattr(self, status) + 1)
        if status == "failed":
            self.failures.append(failure)


class StoreWriteFailed(RuntimeError):
    """A measured point could not be written to the database (disk full, file gone read-only).

    ``rescue`` is the JSON file the point was saved to instead (None if that failed too)."""

    def __init__(self, message: str, rescue: Path | None) -> None:
        super().__init__(message)
        self.rescue = rescue


def _rescue(key: str, cfg: dict, status: str, reason: str | None, doc: dict | None) -> Path | None:
    """Write a point the store refused to a JSON file in the temp directory, so no measurement is lost."""
    try:
        return write_atomic({"schema": "moe-energy/point", "schema_version": 1, "point_key": key, "config": cfg,
                             "status": status, "reason": reason, "document": doc},
                            Path(tempfile.gettempdir()) / "moe-energy-rescue", f"point-{key}")
    except OSError:
        return None


def _add(store: Store, run_id: str, key: str, cfg: dict, status: str, **kw: Any) -> None:
    """store.add_point; a write the disk refuses stops the sweep after the point is rescued to a file."""
    try:
        store.add_point(run_id, key, cfg, status, **kw)
    except sqlite3.OperationalError as e:
        rescue = _rescue(key, cfg, status, kw.get("reason"), kw.get("document"))
        where = f"this point was saved to {rescue}" if rescue else "this point could not be saved anywhere"
        raise StoreWriteFailed(f"--db {store.path}: cannot write ({e}); {where}; the points before it are in the "
                               "database; free space, then rerun with --resume", rescue) from None


def oom_reason(p: Point, device: Any, tried: int = 0) -> str:
    """The skip text for a point whose allocation failed: the estimate (or the failed request) and what is free."""
    return memory.describe_need(max(p.workload.need_bytes(p.opts), tried), device, f"point {p.label}")


@dataclass
class Levers:
    """What every point runs under besides its options: the checked power caps (their devices; each point's own
    caps are on the point) and the carbon intensity and price its records are priced at."""

    plan: CapPlan = field(default_factory=CapPlan)
    carbon: CarbonPrice = field(default_factory=CarbonPrice)


def call_runner(p: Point, meter: Any, ui: Any, run: Callable[..., tuple[dict | None, Any]] | None = None,
                levers: Levers | None = None) -> dict:
    """The point's document from the one runner (``run``: default ``runner.core.run``), in this process, under the
    point's caps with the limits restored whatever ends it, carbon and cost added; nothing saved, the store keeps
    it. A workload whose points are whole (the seed's) ends on a model out of memory; a layer's skips that model."""
    levers = levers or Levers()
    runner = run or core.run

    def body() -> dict:
        doc = runner(p.workload, p.opts, core.Team(meter), ui, save=False, oom=p.workload.sweep_oom)[0]
        assert doc is not None
        return doc

    return run_capped(levers.plan.at(p.power_limit_w, p.cpu_power_limit_w), levers.carbon, body)


def measure_point(p: Point, meter: Any, device: Any, run: Callable[..., tuple[dict | None, Any]] | None,
                  ui: Any, levers: Levers | None = None) -> tuple[str, str | None, dict | None]:
    """(status, reason, document) of one point: "done", or "skipped" (out of memory), or "failed" with why.

    A ConfigError or KeyboardInterrupt propagates: the sweep stops, the point in flight is discarded.
    """
    failure: tuple[str, str] | None = None
    tried = 0
    try:
        return "done", None, call_runner(p, meter, ui, run, levers)
    except core.Refused as e:  # this point's shape or size, not the sweep's options: skip it, measure the rest
        return "skipped", str(e), None
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - one point's failure must not end an hours-long sweep
        if isinstance(e, memory.OutOfMemory):
            failure = ("skipped", e.reason)  # the runner's words, its memory already released
        elif memory.is_oom(e):
            failure, tried = ("skipped", ""), memory.requested_bytes(e) or 0
        else:
            where = traceback.extract_tb(e.__traceback__)[-1].name
            failure = ("failed", f"{described(e)} ({where})")
    free()  # outside the except block: the traceback's tensors are gone
    status, reason = failure
    return status, reason or oom_reason(p, device, tried), None  # free memory read after freeing


def complete_keys(points: Iterable[Point], store: Store, meter_name: str) -> set[str]:
    """The keys of ``points`` that ``store`` holds finished. A point whose latest measurement skipped rows under a
    lower --max-forward-s than its own is not: the limit is not in the key, and the skip's reason asks the user to
    raise it, so a sweep resumed with a higher one measures those rows."""
    done, limited = store.completed_keys(), store.time_limited()
    keys = {p.key(meter_name): p.opts.max_forward_s for p in points}
    return {k for k, limit in keys.items() if k in done and (limit or math.inf) <= limited.get(k, math.inf)}


def run_points(points: list[Point], store: Store, run_id: str, meter: Any, device: Any,
               run: Callable[..., tuple[dict | None, Any]] | None, ui: Any,
               on_point: Callable[[int, Point, float | None], None] | None = None,
               skip_keys: set[str] | None = None, resume: bool = False, levers: Levers | None = None) -> Outcome:
    """Measure each point with ``run`` (default ``runner.core.run``) and commit it on its own; one already complete
    is skipped. ``levers``: the caps' devices and the carbon figures.

    Another sweep may write to the same database: each point is claimed while it is measured (a point
    another process holds is left to it) and, with ``resume``, a point it completed meanwhile is skipped.
    """
    out = Outcome()
    eta = Eta()
    todo = [p for p in points if p.key(meter.name) not in (skip_keys or set())]
    out.already = len(points) - len(todo)
    for i, p in enumerate(todo):
        key, cfg = p.key(meter.name), p.config(meter.name)
        if on_point is not None:
            on_point(i, p, eta.remaining(todo[i:]))
        with store.claim(key) as mine:
            if not mine:
                out.busy += 1
                continue
            if resume and key in complete_keys([p], store, meter.name):  # completed by another sweep since
                out.already += 1
                continue
            reason = p.error or p.workload.point_problem(p.opts, device)
            if reason is not None:
                _add(store, run_id, key, cfg, "skipped", reason=reason, started_utc=now_utc())
                out.skipped += 1
                continue
            started, t0 = now_utc(), time.perf_counter()
            status, reason, doc = measure_point(p, meter, device, run, ui, levers)
            elapsed = time.perf_counter() - t0
            _add(store, run_id, key, cfg, status, reason=reason, document=doc, started_utc=started, seconds=elapsed)
            out.count(status, f"{p.label}: {reason}")
            if status == "done":
                eta.record(p, elapsed)
    return out
