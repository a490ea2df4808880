"""Argument groups shared by commands and their merge (preset < --config < flags), and the one resolver of the
workload a command runs: the seed's classifiers, or with --arch an LLM MoE layer (each refusing the other's flags,
from config.WORKLOAD_KEYS)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config import (
    PRESETS,
    WORKLOAD_KEYS,
    CarbonPrice,
    ModelSpec,
    PowerCaps,
    RunOptions,
    flag,
    load_toml,
    resolve_caps,
    resolve_carbon,
    resolve_config,
    split_list,
)
from ..device import llm_default_dtype, resolve_device
from ..distributed.group import DEFAULT_TIMEOUT_S, check_timeout
from ..errors import ConfigError, check_choice
from ..models.archs import PRESETS as ARCH_PRESETS
from ..models.archs import ROUTER_KINDS, Arch, RouterSpec, custom_arch, get_arch
from ..models.routing import ROUTING_HELP, parse_routing
from ..models.strategies import STRATEGIES
from ..models.vllm_engine import INSTALL
from ..runner.core import Workload
from ..runner.layer import DEFAULT_TOKENS, Layer, check_tokens
from ..runner.model import ENGINES, MOE_IMPLS, WHOLE_PROTOCOL, Whole, check_strategies, check_vllm, model_set
from ..runner.seed import Seed

if TYPE_CHECKING:
    import torch

    from ..energy.meter import Meter


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model shape (a preset, then any field overridden)")
    g.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default small)")
    g.add_argument("--experts", type=int, help="number of experts E")
    g.add_argument("--hidden", type=int, help="expert hidden width H")
    g.add_argument("--layers", type=int, help="hidden layers per expert L (--model: the model's first N layers)")
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
    g.add_argument("--samples", type=int, help="synthetic samples (default 10000; not with --data)")
    g.add_argument("--duration", type=float, help="seconds per measurement window (default 30; "
                   f"--model: {WHOLE_PROTOCOL['duration']:g})")
    g.add_argument("--warmup", type=float, help="untimed warm-up seconds before each window "
                   f"(default 2; --model: {WHOLE_PROTOCOL['warmup']:g})")
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
    cfg.update({k: v for k, v in vars(args).items() if v is not None and not k.startswith("_")
                and k not in ("command", "config")})
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
    return resolve_device(RunOptions(device=name).validate().device)


def declared_shape(args: argparse.Namespace) -> dict[str, int]:
    """``classes``/``input_dim`` the user gave by flag or --config: with --data the file must agree with them."""
    given = settings(args)
    return {k: given[k] for k in ("classes", "input_dim") if given.get(k) is not None}


def add_energy_arguments(p: argparse.ArgumentParser) -> None:
    """--meter, --idle-seconds, --repeats, --cooldown, --cpu-tdp-watts (issue 3)."""
    from ..energy.select import METER_NAMES

    g = p.add_argument_group("energy measurement")
    g.add_argument("--meter", choices=METER_NAMES, default="auto",
                   help="energy source: auto = every real counter covering the devices in use "
                        "(GPU counter + RAPL), else a labelled estimate; see 'moe-energy meters'")
    g.add_argument("--idle-seconds", type=float, dest="idle_seconds",
                   help="seconds of idle power measured before the windows; 0 skips it (default 5)")
    g.add_argument("--repeats", type=int, help="measurement windows per model, models interleaved "
                   f"(default 3; --model: {WHOLE_PROTOCOL['repeats']})")
    g.add_argument("--cooldown", type=float, help="seconds of rest between windows (default 2; --model: "
                   f"{WHOLE_PROTOCOL['cooldown']:g})")
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


# ---------------------------------------------------------------------------------------------------------
# LLM MoE layers (--arch) and expert parallelism


def add_llm_arguments(p: argparse.ArgumentParser) -> None:
    """--arch, --tokens, --routing and the custom-shape flags; --experts/--top-k only if not there already."""
    g = p.add_argument_group("LLM MoE layer (--arch: nothing trained; inputs are hidden states [tokens, d_model])")
    g.add_argument("--arch", help=f"a layer preset ({', '.join(ARCH_PRESETS)}; see 'moe-energy archs') or 'custom' "
                                  "(with --d-model, --ffn-dim, --experts, --top-k)")
    g.add_argument("--tokens", help="comma list of tokens per forward, from a decoding batch to a prefill chunk "
                                    f"(default {','.join(map(str, DEFAULT_TOKENS))})")
    g.add_argument("--routing", help=f"{ROUTING_HELP} (default random: the router's own choice, random weights)")
    g.add_argument("--d-model", type=int, dest="d_model", help="hidden size d (custom, or overrides the preset)")
    g.add_argument("--ffn-dim", type=int, dest="ffn_dim", help="each routed expert's SwiGLU width I")
    g.add_argument("--shared-experts", type=int, dest="shared_experts", help="always-on experts (0 for none)")
    g.add_argument("--router", help=f"router kind: {', '.join(ROUTER_KINDS)} (default the preset's)")
    g.add_argument("--weights", help="int8: every model's weights stored int8 weight-only (per-channel fp32 "
                                     "scales; the MoE's router kept in the dtype), the activations in --dtype; "
                                     "w8a8: the same weights, and each row of activations rounded to int8 before "
                                     "each projection (fbgemm's int8 GEMM on a CPU); fp8: e4m3 weights and rows "
                                     "(a CUDA GPU of compute capability 8.9+ only); default: the weights in --dtype")
    have = set(p._option_string_actions)  # the seed's shape group may hold them already
    if "--experts" not in have:
        g.add_argument("--experts", type=int, help="routed experts E")
    if "--top-k" not in have:
        g.add_argument("--top-k", type=int, dest="top_k", help="experts per token k")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model and its axes (whole LLMs, issue 23); --layers is the shape group's, read as the model's layers."""
    g = p.add_argument_group("whole LLMs (--model: prefill and decode per token, an MoE against its dense siblings; "
                             "see 'moe-energy models')")
    g.add_argument("--model", help="a whole-model preset (see 'moe-energy models'); with --layers N, its first N "
                                   "layers (default: the largest N that fits), whole-model figures extrapolated")
    g.add_argument("--vs", help="comma list of models to compare it with (default its dense siblings)")
    g.add_argument("--batch", help="comma list of batch sizes: sequences per step (default 1,8)")
    g.add_argument("--context", help="comma list of context lengths: prompt tokens, and the KV cache's length at "
                                     "each decode step (default 512)")
    g.add_argument("--moe-impl", dest="moe_impl", help=f"how the MoE blocks run: {', '.join(MOE_IMPLS)} "
                   "(transformers: its own default; moe-energy: this tool's layer on the same weights, "
                   "--moe-strategy inside it; default transformers)")
    g.add_argument("--engine", help="what serves the models: transformers (default; any device) or vllm (vLLM's "
                                    f"offline API with its own batching; a CUDA GPU and {INSTALL.split(' on ')[0]})")
    g.add_argument("--tiny", action="store_true", default=None,
                   help="every model shrunk to a few-KB copy of its shape (router, shared experts, layer pattern "
                        "kept): tries the command in seconds; the figures are not the model's")


def add_forward_limit(p: argparse.ArgumentParser) -> None:
    """--max-forward-s, for the commands that measure windows (run; sweep has its own, a grid option)."""
    p.add_argument("--max-forward-s", type=float, dest="max_forward_s", metavar="S",
                   help="--arch: skip a (model, token count) whose one forward takes longer than S seconds at this "
                        "host's roofline bound (calibrated once if needed), with the reason; default: no limit. "
                        "--model: the largest N of layers whose longest call is within S at that bound is built "
                        "(without --layers); default --duration")


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (launch every rank with torchrun)")
    g.add_argument("--parallel", choices=("none", "expert"), default="none",
                   help="expert: shard the experts over torchrun's ranks (all-to-all), dense baselines "
                        "data-parallel on the same ranks")
    g.add_argument("--collective-timeout", type=float, dest="collective_timeout", metavar="SECONDS",
                   help="a rank waiting longer than this on another (dead or hung) exits with a message and status 3 "
                        f"(--parallel expert; default {DEFAULT_TIMEOUT_S:.0f})")


def collective_timeout(args: argparse.Namespace) -> float:
    """--collective-timeout, checked (``check_timeout``) before any work; given without --parallel expert it would
    mean nothing: refused, never silently ignored."""
    given = getattr(args, "collective_timeout", None)
    if given is None:
        return DEFAULT_TIMEOUT_S
    if getattr(args, "parallel", None) != "expert":
        raise ConfigError("--collective-timeout: only with --parallel expert (a torchrun job); add it or drop the "
                          "flag")
    return check_timeout(given)


SHAPE_FLAGS = (("d_model", "--d-model"), ("ffn_dim", "--ffn-dim"), ("experts", "--experts"), ("top_k", "--top-k"),
               ("shared_experts", "--shared-experts"))


CHOOSERS = {"llm_layer": ("--arch", "an LLM MoE layer"), "whole_model": ("--model", "a whole LLM")}
WHY_NOT = {"llm_layer": "an LLM layer is built, not trained, and its shape is --d-model, --ffn-dim, --experts, --top-k",
           "whole_model": "a whole LLM is built from its preset, not trained; its inputs are --batch and --context"}


def refuse_others(args: argparse.Namespace, family: str) -> None:
    """One line for flags of another workload than ``family`` (config.WORKLOAD_KEYS), never silently ignored."""
    mine = WORKLOAD_KEYS[family]
    for other, keys in WORKLOAD_KEYS.items():
        # --experts/--top-k are in neither row (the seed's shape and a custom layer's alike) but a whole model's
        # shape is its preset's: refused there as `sweep --model` refuses them (runner.sweep.MODEL_REFUSED)
        keys = (*keys, "experts", "top_k") if family == "whole_model" and other == "seed" else keys
        stray = [flag(k) for k in keys if other != family and k not in mine and getattr(args, k, None) is not None]
        if not stray:
            continue
        if family == "seed":
            chooser, what = CHOOSERS[other]
            raise ConfigError(f"{', '.join(stray)}: only with {chooser} ({what}); add {chooser} or drop them")
        raise ConfigError(f"{', '.join(stray)}: no meaning with {CHOOSERS[family][0]} ({WHY_NOT[family]}); drop "
                          f"{'it' if len(stray) == 1 else 'them'}")


def parse_tokens(text: str | None) -> list[int]:
    """'1,16,128' -> [1, 16, 128], checked (the one check of a command's token counts); one-line ConfigError."""
    if text is None:
        return list(DEFAULT_TOKENS)
    vals: list[int] = []
    for part in split_list(text) or ():
        try:
            vals.append(int(part))
        except ValueError:
            raise ConfigError(f"--tokens {text!r}: {part!r} is not a whole number; give a comma list such as "
                              "1,16,128,1024") from None
    return check_tokens(vals, "--tokens")


def arch_from_args(args: argparse.Namespace) -> Arch:
    """A preset, a preset with some fields replaced (named NAME-custom), or a custom shape."""
    over = {k: getattr(args, k) for k, _ in SHAPE_FLAGS if getattr(args, k, None) is not None}
    router = getattr(args, "router", None)
    if args.arch == "custom":
        missing = [f for k, f in SHAPE_FLAGS[:4] if k not in over]
        if missing:
            raise ConfigError(f"--arch custom needs {', '.join(missing)} (and optionally --shared-experts, --router)")
        return custom_arch(over["d_model"], over["ffn_dim"], over["experts"], over["top_k"],
                           over.get("shared_experts", 0), router or "softmax_topk")
    base = get_arch(args.arch)
    if not over and router is None:
        return base
    fields: dict[str, Any] = dict(over)
    if "shared_experts" in fields:  # new shared experts take the routed width (DeepSeek's convention)
        n = fields["shared_experts"]
        fields["shared_width"] = (base.shared_width or fields.get("ffn_dim", base.ffn_dim)) if n else 0
        fields["shared_gate"] = base.shared_gate and bool(n)
    if router is not None:
        fields["router"] = RouterSpec(kind=router)
    what = ", ".join(f"{k}={v}" for k, v in {**over, **({"router": router} if router else {})}.items())
    return replace(base, name=f"{base.name}-custom", source=f"{base.name} with {what} (from {base.source})",
                   **fields)


def with_dtype(args: argparse.Namespace, opts: RunOptions, llm: bool) -> RunOptions:
    """``opts`` with its dtype and why in ``extra["dtype_why"]``: --dtype (or the --config file's) when given; else an
    LLM's (layer or whole model) is bfloat16 where the device runs it natively, float32 elsewhere, and the seed's
    classifiers keep the seed's float32."""
    if "dtype" in settings(args):
        dtype, why = opts.dtype, "given (--dtype)"
    elif llm:
        dtype, why = llm_default_dtype(resolve_device(opts.device))
    else:
        dtype, why = opts.dtype, "the seed's default"
    return replace(opts, dtype=dtype, extra={**opts.extra, "dtype_why": why})


def resolve_layer(args: argparse.Namespace) -> tuple[Layer, RunOptions]:
    """The LLM layer --arch asks for and its options, checked: one-line ConfigErrors, the seed's flags refused."""
    if not getattr(args, "arch", None):
        raise ConfigError(f"--arch is required here: one of {', '.join(ARCH_PRESETS)} or custom")
    refuse_others(args, "llm_layer")
    arch = arch_from_args(args)
    seedless = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("experts", "top_k")})
    _spec, opts = resolve(seedless)  # the shared options, checked as run checks them
    opts = with_dtype(args, opts, llm=True)
    routing = parse_routing(args.routing if getattr(args, "routing", None) is not None else "random")
    return Layer(arch, parse_tokens(getattr(args, "tokens", None)), routing, opts.weights), opts


def _whole_numbers(flag_name: str, text: str | None, default: tuple[int, ...]) -> list[int]:
    """'1,8' -> [1, 8] (duplicates dropped, order kept), each a whole number >= 1; one-line ConfigError."""
    if text is None:
        return list(default)
    vals: list[int] = []
    for part in split_list(text) or ():
        if not part.isdigit() or int(part) < 1:
            raise ConfigError(f"{flag_name} {text!r}: {part!r} is not a whole number >= 1; give a comma list such "
                              "as 1,8")
        vals.append(int(part))
    if not vals:
        raise ConfigError(f"{flag_name} {text!r}: give at least one value, e.g. 1,8")
    return list(dict.fromkeys(vals))


def resolve_whole(args: argparse.Namespace) -> tuple[Whole, RunOptions]:
    """The whole models --model and --vs name, at --batch x --context, and the options, checked: one-line
    ConfigErrors, the other workloads' flags refused (before any model is built)."""
    refuse_others(args, "whole_model")
    vs = split_list(args.vs) if getattr(args, "vs", None) is not None else None
    ms = model_set(args.model, vs, bool(getattr(args, "tiny", None)))
    impl = getattr(args, "moe_impl", None) or "transformers"
    check_choice("--moe-impl", impl, MOE_IMPLS)
    shapeless = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "layers"})
    _spec, opts = resolve(shapeless)
    given = settings(shapeless)
    opts = replace(opts, **{k: v for k, v in WHOLE_PROTOCOL.items() if k not in given})
    opts = with_dtype(args, opts, llm=True)
    engine = getattr(args, "engine", None) or "transformers"
    check_choice("--engine", engine, ENGINES)
    w = Whole(ms, _whole_numbers("--batch", getattr(args, "batch", None), (1, 8)),
              _whole_numbers("--context", getattr(args, "context", None), (512,)), getattr(args, "layers", None),
              impl, engine)
    if w.layers is not None and w.layers < 1:
        raise ConfigError(f"--layers {w.layers}: give a whole number >= 1 (each model builds min(N, its layers))")
    w.check_inputs()  # every context a position each model has: refused before anything is asked of the host
    check_strategies(opts.strategies, [impl], "strategies" in given)
    if w.vllm:
        check_vllm_flags(args, opts)
    return w, opts


def check_vllm_flags(args: argparse.Namespace, opts: RunOptions) -> None:
    """`run --model --engine vllm`'s refusals (``runner.model.check_vllm``), from the flags given."""
    given = {"moe_impl": getattr(args, "moe_impl", None) not in (None, "transformers"),
             "layers": getattr(args, "layers", None) is not None, "tiny": bool(getattr(args, "tiny", None)),
             "compile": opts.compile, "parallel": getattr(args, "parallel", None) == "expert"}
    check_vllm([k for k, v in given.items() if v], opts.device)


def resolve_workload(args: argparse.Namespace) -> tuple[Workload, RunOptions]:
    """The workload the flags ask for (an LLM layer with --arch, a whole model with --model, else the seed's
    classifiers) and its options, every flag checked and the other workloads' refused."""
    if getattr(args, "model", None) is not None:
        return resolve_whole(args)
    if getattr(args, "arch", None) is not None:
        return resolve_layer(args)
    refuse_others(args, "seed")
    spec, opts = resolve(args)
    opts = with_dtype(args, opts, llm=False)
    if opts.data:  # the file must agree with a shape the user also gave
        opts = replace(opts, extra={**opts.extra, "declared_shape": declared_shape(args)})
    return Seed(spec, opts.extra.get("preset")), opts
