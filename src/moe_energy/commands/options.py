"""Argument groups shared by commands (shape, run options) and their merge: preset < --config < flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config import (
    PRESETS,
    CarbonPrice,
    ModelSpec,
    PowerCaps,
    RunOptions,
    load_toml,
    resolve_caps,
    resolve_carbon,
    resolve_config,
)
from ..models.strategies import STRATEGIES

if TYPE_CHECKING:
    import torch

    from ..energy.meter import Meter


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model shape (a preset, then any field overridden)")
    g.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default small)")
    g.add_argument("--experts", type=int, help="number of experts E")
    g.add_argument("--hidden", type=int, help="expert hidden width H")
    g.add_argument("--layers", type=int, help="hidden layers per expert L")
    g.add_argument("--top-k", type=int, dest="top_k", help="experts per token k")
    g.add_argument("--input-dim", type=int, dest="input_dim", help="input features (default 784)")
    g.add_argument("--classes", type=int, help="output classes (default 10)")
    g.add_argument("--config", help="TOML file with any of these options (flags override it)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training and measurement")
    g.add_argument("--data", help=".npz with arrays x float [N, d] and y int [N] (default: synthetic task)")
    g.add_argument("--epochs", type=int, help="training epochs (default 15)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    g.add_argument("--batch-size", type=int, dest="batch_size", help="batch, training and inference (128)")
    g.add_argument("--samples", type=int, help="synthetic samples (default 10000)")
    g.add_argument("--duration", type=float, help="seconds per measurement window (default 30)")
    g.add_argument("--warmup", type=float, help="untimed warm-up seconds before each window (default 2)")
    g.add_argument("--seed", type=int, help="seed for data and weights (default 0)")
    g.add_argument("--device", help="auto|cpu|cuda|mps (default auto: cuda > mps > cpu)")
    g.add_argument("--dtype", help="float32|bfloat16|float16 for the benchmark (default float32)")
    g.add_argument("--moe-strategy", dest="strategies",
                   help=f"comma list of {', '.join(STRATEGIES)}, or 'all' (default auto)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile every model alike (CUDA graphs on a GPU); compile time is reported apart")
    g.add_argument("--models", help="comma list of moe, dense_total, dense_active (default all three)")
    g.add_argument("--out", help="directory for the JSON results (default results/)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's settings, then the explicit flags over them."""
    cfg: dict[str, Any] = load_toml(args.config) if getattr(args, "config", None) else {}
    for k, v in vars(args).items():
        if v is not None and not k.startswith("_") and k not in ("command", "config"):
            cfg[k] = v
    return cfg


def resolve(args: argparse.Namespace) -> tuple[ModelSpec, RunOptions]:
    """Spec and options from a preset, then the --config file, then explicit flags."""
    return resolve_config(settings(args))


def add_power_arguments(p: argparse.ArgumentParser) -> None:
    """--power-limit, --cpu-power-limit, --carbon-intensity, --price-per-kwh (issue 15)."""
    g = p.add_argument_group("power caps, carbon and cost")
    g.add_argument("--power-limit", dest="power_limit",
                   help="GPU power cap(s) in W, W[,W...], or 'sweep' (the GPU's maximum down to its minimum in "
                        "25 W steps): every model measured at each cap, rows named MODEL@CAPW; needs root or "
                        "zeusd; the original limit is restored at the end")
    g.add_argument("--cpu-power-limit", type=float, dest="cpu_power_limit",
                   help="each CPU package's long-term RAPL limit in W for the whole run (root; restored)")
    g.add_argument("--carbon-intensity", type=float, dest="carbon_intensity",
                   help="your grid's g CO2e per kWh: adds estimated g CO2e per million inferences (tokens) "
                        "(env MOE_ENERGY_CARBON_INTENSITY)")
    g.add_argument("--price-per-kwh", type=float, dest="price_per_kwh",
                   help="your electricity price per kWh: adds estimated cost per million inferences (tokens) "
                        "(env MOE_ENERGY_PRICE_PER_KWH)")


def resolve_power(args: argparse.Namespace) -> tuple[PowerCaps, CarbonPrice]:
    """The caps and the carbon intensity and price from --config, then flags (carbon and price: the
    environment below both); checked as numbers, the hardware not yet asked."""
    cfg = settings(args)
    return resolve_caps(cfg), resolve_carbon(cfg)


def device_of(name: str) -> torch.device:
    """The device a command without run's options (calibrate, selfcheck) names by ``--device``, checked exactly
    as run checks its own: RunOptions' name check (config), then resolve_device (is it here?)."""
    from ..device import resolve_device

    return resolve_device(RunOptions(device=name).validate().device)


def declared_shape(args: argparse.Namespace) -> dict[str, int]:
    """``classes``/``input_dim`` the user gave by flag or --config: with --data the file must agree with them."""
    cfg = load_toml(args.config) if getattr(args, "config", None) else {}
    out = {}
    for k in ("classes", "input_dim"):
        v = getattr(args, k, None)
        v = v if v is not None else cfg.get(k)
        if v is not None:
            out[k] = v
    return out


def check_data(spec: ModelSpec, opts: RunOptions, declared: dict[str, int]) -> ModelSpec:
    """The data checks `run` makes (pipeline.start's make_dataset), for a command that trains nothing (plan).

    With --data the file is loaded exactly as a run loads it and decides the shape (the spec returned).
    Synthetic data is made on few samples: its split leaves no training data only below
    0.5 / (1 - test_fraction) samples, so that many (or fewer) give every verdict the full run would.
    """
    from ..data import make_dataset

    if opts.data:
        data = make_dataset(opts.samples, spec.input_dim, spec.classes, opts.seed, opts.test_fraction, opts.data,
                            declared=declared)
        return replace(spec, input_dim=data.input_dim, classes=data.classes).validate()
    enough = int(0.5 / (1 - opts.test_fraction)) + 2
    make_dataset(min(opts.samples, enough), spec.input_dim, spec.classes, opts.seed, opts.test_fraction)
    return spec


def add_energy_arguments(p: argparse.ArgumentParser) -> None:
    """--meter, --idle-seconds, --repeats, --cooldown, --cpu-tdp-watts (issue 3)."""
    from ..energy.select import METER_NAMES

    g = p.add_argument_group("energy measurement")
    g.add_argument("--meter", choices=METER_NAMES, default="auto",
                   help="energy source: auto = every real counter covering the devices in use "
                        "(GPU counter + RAPL), else a labelled estimate; see 'moe-energy meters'")
    g.add_argument("--idle-seconds", type=float, dest="idle_seconds",
                   help="seconds of idle power measured before the windows; 0 skips it (default 5)")
    g.add_argument("--repeats", type=int, help="measurement windows per model, models interleaved (default 3)")
    g.add_argument("--cooldown", type=float, help="seconds of rest between windows (default 2)")
    g.add_argument("--cpu-tdp-watts", type=float, dest="cpu_tdp_watts",
                   help="CPU TDP for --meter estimate (default 5 W per logical CPU)")


def meter_from_args(args: argparse.Namespace, device: torch.device,
                    notice: Callable[[str], None] | None = None) -> Meter:
    """The Meter that ``--meter`` and ``--cpu-tdp-watts`` ask for, on ``device`` (a torch.device).

    ``notice(msg)`` receives auto's one-line notice (estimate fallback, partial coverage).
    """
    from ..energy.select import auto_meter, make_meter

    name = getattr(args, "meter", None) or "auto"
    tdp = getattr(args, "cpu_tdp_watts", None)
    if name == "auto":
        if tdp is not None:
            from ..energy.estimate import check_tdp_watts

            check_tdp_watts(tdp)  # the one rule (finite, > 0), as make_meter applies it to a named meter
        return auto_meter(device, cpu_tdp_watts=tdp, notice=notice)
    return make_meter(name, device, cpu_tdp_watts=tdp)
