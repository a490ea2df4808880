"""Validated specs: model shapes, presets, run options.

Everything a user types passes through here first, so every later module can trust its inputs.
A mistake the user can fix raises ``ConfigError`` with one line; the CLI prints it and exits 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .device import check_device_name
from .errors import ConfigError, one_line
from .models.archs import MAX_BATCH
from .models.counting import moe_params
from .models.quant import FP8_WHY, IN_DTYPE, WEIGHT_FORMATS
from .models.strategies import STRATEGIES

DTYPES = ("float32", "bfloat16", "float16")
# Largest parameter count we accept: far past any single-host model, well inside float64's exact range.
MAX_PARAMS = 10**13
# Longest duration, warm-up, rest or idle reading we accept, in seconds: a day (a typo like 3e10 is not a plan).
MAX_SECONDS = 86_400.0
# Largest Adam learning rate we accept: its first step, lr / (1 - beta1) = 10 x lr, must fit a float32 (3.4e38) or
# torch raises mid-training; up to here a silly rate still trains, diverges and is flagged so (train.py).
MAX_LR = 1e30


def _positive(name: str, v: Any, integer: bool) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name}={v!r} is not a number")
    if integer and not isinstance(v, int):
        raise ConfigError(f"{name}={v!r} must be a whole number")
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name}={v!r} must be a finite number > 0")


def _whole(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{name}={v!r} must be a whole number between {lo} and {hi}")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the MoE (and, through matching, of its dense baselines)."""

    experts: int
    hidden: int
    layers: int
    top_k: int
    input_dim: int = 784
    classes: int = 10

    def validate(self) -> ModelSpec:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{f.name}={v!r} is not a whole number; give a positive integer")
            if v <= 0:
                raise ConfigError(f"{f.name}={v} must be a positive integer")
        if self.top_k > self.experts:
            raise ConfigError(
                f"top_k={self.top_k} exceeds experts={self.experts}; choose top_k between 1 and {self.experts}"
            )
        if self.classes < 2:
            raise ConfigError(f"classes={self.classes} must be at least 2")
        total = moe_params(self)
        if total > MAX_PARAMS:
            raise ConfigError(
                f"experts={self.experts}, hidden={self.hidden}, layers={self.layers}, input_dim={self.input_dim}, "
                f"classes={self.classes} make {total:.3g} parameters, more than the {MAX_PARAMS:.0e} this tool "
                "accepts; choose smaller values"
            )
        return self


PRESETS: dict[str, ModelSpec] = {
    "small": ModelSpec(experts=8, hidden=256, layers=3, top_k=2),
    "large": ModelSpec(experts=16, hidden=1024, layers=4, top_k=4),
    "xl": ModelSpec(experts=20, hidden=2048, layers=5, top_k=5),
    "xxl": ModelSpec(experts=32, hidden=4096, layers=6, top_k=8),
}


@dataclass(frozen=True)
class RunOptions:
    """How a run trains and measures; defaults are the seed's recipe."""

    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 128
    samples: int = 10_000
    test_fraction: float = 0.2
    duration: float = 30.0
    warmup: float = 2.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    strategies: tuple[str, ...] = ("auto",)
    compile: bool = False  # torch.compile (CUDA graphs on a GPU) for every model alike
    data: str | None = None
    out: str = "results"
    models: tuple[str, ...] = ("moe", "dense_total", "dense_active")
    # energy windows (issue 3): repeats per model, seconds between windows, idle-power seconds (0 skips)
    repeats: int = 3
    cooldown: float = 2.0  # enough for a GPU to leave its boost transient; longer via --cooldown
    idle_seconds: float = 5.0
    # LLM layers (issue 14): a (model, token count) whose one forward takes at least this long at the roofline
    # bound is skipped with the reason (a prefill chunk of a big dense FFN takes minutes on a CPU); None: no limit
    max_forward_s: float | None = None
    # LLM layers (issue 24): how the weights are stored: None, the dtype's own; "int8", weight-only int8 with fp32
    # per-channel scales (models.quant), every model alike, the activations in the dtype; "w8a8", the same weights
    # with each row of activations rounded to int8 too
    weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> RunOptions:
        """Every option of the right kind and in range, or a one-line ConfigError naming it."""
        self._check_kinds()
        self._check_sizes()
        self._check_seconds()
        self._check_names()
        return self

    def _check_kinds(self) -> None:
        _whole("seed", self.seed, 0, 2**32 - 1)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile={self.compile!r} must be true or false")
        for name in ("strategies", "models"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not v or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{name}={v!r} must be a non-empty list of names")
        for name in ("data", "out"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{name}={v!r} must be a path")

    def _check_sizes(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs!r} must be a whole number >= 0")
        _positive("lr", self.lr, False)
        if self.lr > MAX_LR:
            raise ConfigError(f"lr={self.lr!r} is too large; give at most {MAX_LR:.0e} (Adam's first step, 10 x lr, "
                              "must fit a float32; typical rates are 1e-4 to 1e-2)")
        _positive("batch_size", self.batch_size, True)
        _positive("samples", self.samples, True)
        for name, most in (("samples", 10**8), ("batch_size", MAX_BATCH), ("epochs", 10**6)):
            if getattr(self, name) > most:
                raise ConfigError(f"{name}={getattr(self, name)} is too large; give at most {most:.0e}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) \
                or not (0 < self.test_fraction < 1):
            raise ConfigError(f"test_fraction={self.test_fraction!r} must be between 0 and 1")
        _whole("repeats", self.repeats, 1, 1000)

    def _check_seconds(self) -> None:
        _positive("duration", self.duration, False)
        if not isinstance(self.warmup, (int, float)) or not math.isfinite(self.warmup) or self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r} must be a finite number >= 0")
        for name in ("cooldown", "idle_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name.replace('_', '-')}={v!r} must be a finite number of seconds >= 0")
        if self.max_forward_s is not None:
            _positive("max_forward_s", self.max_forward_s, False)
        for name in ("duration", "warmup", "cooldown", "idle_seconds", "max_forward_s"):
            v = getattr(self, name)
            if v is not None and v > MAX_SECONDS:
                raise ConfigError(f"{name.replace('_', '-')}={v!r} is too long; give at most {MAX_SECONDS:.0f} seconds")

    def _check_names(self) -> None:
        check_device_name(self.device)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"moe-strategy={s!r} is unknown; choose from {', '.join(STRATEGIES)} (or 'all')")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ConfigError(f"weights={self.weights!r} is unknown; choose {', '.join(WEIGHT_FORMATS)} or "
                              f"{IN_DTYPE} (the weights in the dtype, the default; --dtype sets it)"
                              + FP8_WHY.get(self.weights, ""))
        for m in self.models:
            if m not in ("moe", "dense_total", "dense_active"):
                raise ConfigError(f"model={m!r} is unknown; choose from moe, dense_total, dense_active")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "strategies": list(self.strategies), "models": list(self.models)}


# Which options belong to which workload: the one table `run`, `plan`, `bench-strategies` and `sweep` read. A
# workload's key given to another is refused in one line, never silently ignored; a key in two workloads' rows
# means something to both (--layers: the seed's expert depth, a whole model's layers built), and every other
# option is shared. An LLM layer is chosen by --arch (or a sweep's --grid llm), a whole model by --model.
WORKLOAD_KEYS: dict[str, tuple[str, ...]] = {
    "seed": ("preset", "hidden", "layers", "input_dim", "classes", "data", "epochs", "lr", "batch_size", "samples",
             "test_fraction", "models"),
    "llm_layer": ("arch", "tokens", "routing", "d_model", "ffn_dim", "shared_experts", "router", "max_forward_s",
                  "models", "weights"),
    "whole_model": ("model", "vs", "batch", "context", "layers", "moe_impl", "tiny", "engine", "max_forward_s"),
}


def foreign(family: str) -> list[str]:
    """The keys of every other workload that mean nothing to ``family``, in the table's order."""
    mine = WORKLOAD_KEYS[family]
    return list(dict.fromkeys(k for other, keys in WORKLOAD_KEYS.items() if other != family
                              for k in keys if k not in mine))


def flag(key: str) -> str:
    """A config key's command-line flag: ``max_forward_s`` -> ``--max-forward-s``."""
    return "--" + key.replace("_", "-")


SPEC_KEYS = {f.name for f in fields(ModelSpec)}
OPTION_KEYS = {f.name for f in fields(RunOptions)} - {"extra"}
CONFIG_KEYS = SPEC_KEYS | OPTION_KEYS | {"preset"}
# `run`'s own keys beside the shared ones (issue 15): power caps, and the carbon intensity and price that turn
# energy into grams and money. Not in RunOptions: none changes what a window measures the way they are applied
# (each cap is a run of its own; carbon and cost are arithmetic on the figures), and a sweep point's key must
# not change with them.
CAP_KEYS = ("power_limit", "cpu_power_limit")
CARBON_KEYS = ("carbon_intensity", "price_per_kwh")
RUN_CONFIG_KEYS = CONFIG_KEYS | set(CAP_KEYS) | set(CARBON_KEYS)
# Environment variables for the two figures a user sets once per machine (their grid, their tariff); below a
# --config file and the flags: preset < environment < --config < flags.
CARBON_ENV = {"carbon_intensity": "MOE_ENERGY_CARBON_INTENSITY", "price_per_kwh": "MOE_ENERGY_PRICE_PER_KWH"}
# No grid emits more than about 1,200 g CO2e/kWh (lignite); above this a figure is in the wrong unit (g/MWh).
MAX_CARBON_INTENSITY = 5000.0
# A power cap above this many watts is no device's (the largest accelerators draw 1000-1400 W).
MAX_POWER_LIMIT_W = 5000.0


def resolve_spec(preset: str | None, **overrides: int | None) -> ModelSpec:
    """A preset (default small) with any of its fields overridden; validated."""
    name = "small" if preset is None else preset  # an empty name is a typo, not a request for the default
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    return replace(PRESETS[name], **given).validate()


def split_list(value: str | None) -> tuple[str, ...] | None:
    """'a, b,c' -> ('a', 'b', 'c'); None stays None."""
    return None if value is None else tuple(s.strip() for s in value.split(",") if s.strip())


def _path(key: str, v: Any) -> str:
    """A path option: a non-empty string (a TOML list or number is a typo, never a folder named after it)."""
    if isinstance(v, Path):
        v = str(v)
    if not isinstance(v, str) or not v.strip() or "\0" in v:
        raise ConfigError(f"{key}={v!r} must be a path (a non-empty string); e.g. {key} = \"results\"")
    return v


def resolve_config(cfg: dict[str, Any]) -> tuple[ModelSpec, RunOptions]:
    """Spec and options from merged settings (preset, then --config, then flags: the caller merges).

    The one validation path for `run`, `plan`, each sweep point and the API: a typo is a ConfigError here.
    """
    spec = resolve_spec(cfg.get("preset"), **{k: cfg.get(k) for k in SPEC_KEYS})
    custom = any(cfg.get(k) is not None for k in ("experts", "hidden", "layers", "top_k"))
    given = {k: v for k, v in cfg.items() if k in OPTION_KEYS and v is not None}
    for k in ("strategies", "models"):
        if isinstance(given.get(k), str):
            given[k] = split_list(given[k])
        if isinstance(given.get(k), tuple):  # each once, order kept (as --tokens, --batch): a model named twice
            given[k] = tuple(dict.fromkeys(given[k]))  # would be trained and measured twice, two rows of one name
    if given.get("strategies") == ("all",):
        given["strategies"] = tuple(STRATEGIES)
    for k in ("data", "out"):
        if k in given:
            given[k] = _path(k, given[k])
    if given.get("data") and given.get("samples") is not None:  # else ignored, and the record's samples untrue
        raise ConfigError(f"--samples {given['samples']} sizes the synthetic task, but --data {given['data']} brings "
                          "its own rows: drop --samples (or --data)")
    if given.get("weights") == IN_DTYPE:  # the default spelled out (a sweep's --weights dtype,int8): keyed as unset
        del given["weights"]
    extra = {"preset": None if custom else (cfg.get("preset") or "small")}
    try:
        opts = RunOptions(**given, extra=extra)
    except TypeError as e:  # a TOML value of the wrong kind for a field
        raise ConfigError(f"--config: {e}") from None
    return spec, opts.validate()


def read_toml(path: str | Path, allowed: set[str], flatten: str | None = None) -> dict[str, Any]:
    """The one TOML loader (`run`'s and `sweep`'s --config): unknown keys are an error, never ignored.

    ``flatten`` names a table whose keys count as top-level ones (a sweep's ``[sweep]``); lists of names
    (strategies, models) become tuples, as the flags give them.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"--config {p}: cannot read ({e.strerror}); give a readable TOML file") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: not valid TOML ({one_line(e)})") from None
    if flatten is not None and isinstance(doc.get(flatten), dict):
        doc = {**{k: v for k, v in doc.items() if k != flatten}, **doc[flatten]}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ConfigError(f"--config {p}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for k in ("strategies", "models"):
        if isinstance(doc.get(k), list):
            doc[k] = tuple(doc[k])
    return doc


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read `run`'s --config file: the shared keys and run's power caps, carbon intensity and price."""
    return read_toml(path, RUN_CONFIG_KEYS)


# ---------------------------------------------------------------------------------------------------------
# Power caps, carbon and cost (issue 15): `run`'s settings beside the run options


@dataclass(frozen=True)
class PowerCaps:
    """The caps a user asked for, checked as numbers; whether the hardware allows them is energy.power_limit's."""

    gpu_w: tuple[float, ...] = ()  # --power-limit W[,W...], in the order given
    gpu_sweep: bool = False  # --power-limit sweep: the GPU's maximum down to its minimum in 25 W steps
    cpu_w: tuple[float, ...] = ()  # --cpu-power-limit W[,W...]: each CPU package's long-term RAPL cap (several: sweep)

    @property
    def given(self) -> bool:
        return bool(self.gpu_w) or self.gpu_sweep or bool(self.cpu_w)


@dataclass(frozen=True)
class CarbonPrice:
    """The user's grid carbon intensity (g CO2e per kWh) and electricity price (per kWh, their currency).

    Neither is measured: every figure built on them is an estimate and says so (carbon.py)."""

    carbon_intensity_g_per_kwh: float | None = None
    price_per_kwh: float | None = None

    @property
    def given(self) -> bool:
        return self.carbon_intensity_g_per_kwh is not None or self.price_per_kwh is not None


def _watts(key: str, v: Any) -> float:
    """One cap in W: a finite number > 0 and below any device's draw."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{key}={v!r} must be a finite number of watts > 0")
    if v > MAX_POWER_LIMIT_W:
        raise ConfigError(f"{key}={v!r} W is above any device's power ({MAX_POWER_LIMIT_W:g} W); give watts, not mW")
    return float(v)


def _gpu_caps(v: Any) -> tuple[tuple[float, ...], bool]:
    """--power-limit as a flag ('250,300', 'sweep') or a --config value (250, [250, 300], "sweep")."""
    if isinstance(v, str) and v.strip().lower() == "sweep":
        return (), True
    return _caps("power_limit", v, " or 'sweep'"), False


def _caps(key: str, v: Any, or_else: str = "") -> tuple[float, ...]:
    """Caps in W as a flag ('250,300') or a --config value (250, [250, 300]), each checked, none twice."""
    parts: list[Any] = list(split_list(v) or ()) if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) \
        else [v]
    if not parts:
        raise ConfigError(f"{key}={v!r} is empty; give watts such as 250,300{or_else}")
    caps: list[float] = []
    for part in parts:
        if isinstance(part, str):
            try:
                part = float(part)
            except ValueError:
                raise ConfigError(f"{key}={v!r}: {part!r} is not a number of watts; give W[,W...] such as "
                                  f"250,300{or_else}") from None
        caps.append(_watts(key, part))
    if len(set(caps)) < len(caps):
        raise ConfigError(f"{key}={v!r} names a cap twice; give each once")
    return tuple(caps)


def resolve_caps(cfg: Mapping[str, Any]) -> PowerCaps:
    """The caps of merged settings (--config, then flags); numbers checked, hardware not asked."""
    gpu, sweep = _gpu_caps(cfg["power_limit"]) if cfg.get("power_limit") is not None else ((), False)
    cpu = _caps("cpu_power_limit", cfg["cpu_power_limit"]) if cfg.get("cpu_power_limit") is not None else ()
    if (gpu or sweep) and len(cpu) > 1:  # the report reads one cap per record: the GPU's where both are set
        raise ConfigError("--cpu-power-limit with several caps and --power-limit: sweep one device's caps at a "
                          "time; give one CPU cap, or drop --power-limit")
    return PowerCaps(gpu, sweep, cpu)


def _figure(key: str, v: Any, source: str, most: float | None) -> float:
    """A carbon intensity or price: a finite number >= 0 (from the environment, text that parses as one)."""
    if isinstance(v, str) and source.startswith("MOE_ENERGY_"):
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{source}={v!r} is not a number; set it to a number such as 400, or unset it") \
                from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{source}={v!r} must be a finite number >= 0")
    if most is not None and v > most:
        raise ConfigError(f"{source}={v!r} is above any grid's intensity ({most:g} g CO2e/kWh); give grams per kWh")
    return float(v)


def resolve_carbon(cfg: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> CarbonPrice:
    """Carbon intensity and price from merged settings, else from MOE_ENERGY_CARBON_INTENSITY /
    MOE_ENERGY_PRICE_PER_KWH; None where none gives one. Nothing is looked up on a network."""
    env = os.environ if environ is None else environ
    out: dict[str, float | None] = {}
    for key, var in CARBON_ENV.items():
        most = MAX_CARBON_INTENSITY if key == "carbon_intensity" else None
        if cfg.get(key) is not None:
            out[key] = _figure(key, cfg[key], key, most)
        elif env.get(var, "").strip():
            out[key] = _figure(key, env[var].strip(), var, most)
        else:
            out[key] = None
    return CarbonPrice(out["carbon_intensity"], out["price_per_kwh"])
