"""One run: train each model alone, park it in host memory, then measure all in shuffled repeated windows."""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .bench import device_sync, measure, summarize
from .config import ConfigError, ModelSpec, RunOptions
from .data import Dataset, make_dataset
from .energy.idle import measure_idle
from .energy.meter import Meter, meter_info
from .environment import describe
from .models.counting import dense_flops, mlp_params, moe_active_params, moe_flops, moe_params
from .models.dense import DenseMLP, dense_width
from .models.moe import MoE
from .results import new_document, write_atomic
from .train import TrainResult, evaluate, train

# Training runs the padded strategy: differentiable everywhere (grouped_mm's backward needs 16-byte
# aligned strides, which a [E, 10, H] output layer does not have). Weights are shared, so any
# strategy can then run inference on them.
TRAIN_STRATEGY = "padded"

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UI(Protocol):
    """What the runner tells the user; the CLI draws it with rich, tests pass a silent one."""

    def training(self, name: str, total_steps: int) -> AbstractContextManager[Callable[[int, int], None]]: ...

    def measuring(self, name: str, seconds: float) -> AbstractContextManager[Callable[[float], None]]: ...

    def info(self, msg: str) -> None: ...


class SilentUI:
    def training(self, name: str, total_steps: int) -> AbstractContextManager[Callable[[int, int], None]]:
        return nullcontext(lambda e, b: None)

    def measuring(self, name: str, seconds: float) -> AbstractContextManager[Callable[[float], None]]:
        return nullcontext(lambda t: None)

    def info(self, msg: str) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda > mps > cpu; asking for an absent device is the user's error to fix."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def bench_batch(data: Dataset, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The one batch the window repeats: held-out rows, repeated if the test set is smaller."""
    x = data.x_test
    reps = -(-batch_size // len(x))
    return x.repeat(reps, 1)[:batch_size].to(device=device, dtype=dtype).contiguous()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_plan(spec: ModelSpec, opts: RunOptions) -> Iterator[tuple[str, dict]]:
    """(name, description) of each model the run builds, in order, without allocating any."""
    for kind in opts.models:
        if kind == "moe":
            yield "moe", {
                "kind": "moe", "params": moe_params(spec), "active_params": moe_active_params(spec),
                "flops_per_inference": moe_flops(spec), "width": spec.hidden,
            }
        else:
            match = kind.split("_")[1]
            w = dense_width(spec, match)  # type: ignore[arg-type]
            p = mlp_params(spec.input_dim, w, spec.layers, spec.classes)
            yield kind, {
                "kind": "dense", "match": match, "params": p, "active_params": p, "width": w,
                "flops_per_inference": dense_flops(spec.input_dim, w, spec.layers, spec.classes),
            }


@dataclass
class Trained:
    """A trained model parked (in host memory when the run uses an accelerator) until its windows."""

    name: str
    desc: dict
    model: nn.Module
    train: TrainResult
    accuracy_bench_dtype: float | None


def prepare_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """THE point where a trained model becomes the thing the windows measure (dtype now; compile later)."""
    for p in model.parameters():
        p.grad = None  # the optimizer's gradients would otherwise travel with the parked model
        p.requires_grad_(False)
    if dtype != torch.float32:
        model.to(dtype)
    return model


def window_schedule(labels: list[str], repeats: int, seed: int) -> list[tuple[int, str]]:
    """(repeat, label) for every window: each round holds every model once, rounds shuffled apart, so drift
    (heat, clocks, other load) spreads over all models instead of landing on whichever ran last."""
    rng = random.Random(seed)
    out: list[tuple[int, str]] = []
    for r in range(repeats):
        order = list(labels)
        rng.shuffle(order)
        out += [(r, lab) for lab in order]
    return out


def run(spec: ModelSpec, opts: RunOptions, meter: Meter, ui: UI | None = None, save: bool = True,
        sleep: Callable[[float], None] = time.sleep) -> tuple[dict, Path | None]:
    """Train every model of ``opts.models`` one at a time, then measure them in shuffled, repeated windows.

    Memory: each model is built, trained and converted alone on the device, then parked in host memory
    (accelerator runs only), and each window moves exactly one model onto the device, outside the window,
    so the largest preset needs one model's worth of device memory at a time.
    """
    ui = ui or SilentUI()
    device = resolve_device(opts.device)
    dtype = DTYPE[opts.dtype]
    park = torch.device("cpu")
    data = make_dataset(opts.samples, spec.input_dim, spec.classes, opts.seed, opts.test_fraction, opts.data)
    if opts.data:  # the file decides the task's shape
        spec = replace(spec, input_dim=data.input_dim, classes=data.classes).validate()
    doc = new_document(
        spec=asdict(spec),
        options=opts.as_dict(),
        environment=describe(device),
        dataset={"source": data.source, "train_samples": len(data.x_train), "test_samples": len(data.x_test),
                 "input_dim": data.input_dim, "classes": data.classes, "chance_accuracy": data.chance_accuracy},
    )
    info = meter_info(meter)
    info["notice"] = getattr(meter, "notice", None)
    doc["energy_meter"] = info
    batch = bench_batch(data, opts.batch_size, device, dtype)
    steps = opts.epochs * -(-len(data.x_train) // opts.batch_size)
    sync = device_sync(device)

    # 1. Train, one model at a time.
    trained: list[Trained] = []
    for name, desc in model_plan(spec, opts):
        torch.manual_seed(opts.seed)
        model: nn.Module
        if desc["kind"] == "moe":
            model = MoE.from_spec(spec, strategy=TRAIN_STRATEGY)
        else:
            model = DenseMLP(spec.input_dim, desc["width"], spec.layers, spec.classes)
        model.to(device)
        with ui.training(name, steps) as step:
            tr: TrainResult = train(model, data, opts.epochs, opts.lr, opts.batch_size, device, opts.seed, step)
        model = prepare_for_inference(model, dtype)
        acc_bench = tr.test_accuracy
        if dtype != torch.float32:
            acc_bench = evaluate(model, data.x_test, data.y_test, opts.batch_size, device, dtype)
        if device != park:
            model.to(park)
            _free(device)
        trained.append(Trained(name, desc, model, tr, acc_bench))

    # 2. Idle power of the metered devices, rested first so training's heat does not count as idle.
    idle = None
    if opts.idle_seconds > 0:
        sleep(opts.cooldown)
        idle = measure_idle(meter, opts.idle_seconds, sync)
    doc["idle"] = idle.as_dict() if idle is not None else None

    # 3. Windows: every model (and MoE strategy) once per round, rounds shuffled, a rest between windows.
    variants: dict[str, tuple[Trained, str | None]] = {}
    for t in trained:
        if t.desc["kind"] == "moe":
            for s in opts.strategies:
                variants[f"moe[{s}]"] = (t, s)
        else:
            variants[t.name] = (t, None)
    windows: dict[str, list[dict]] = {label: [] for label in variants}
    on_device: Trained | None = None
    schedule = window_schedule(list(variants), opts.repeats, opts.seed)
    for order, (rep, label) in enumerate(schedule):
        t, strategy = variants[label]
        if device != park and on_device is not t:
            if on_device is not None:
                on_device.model.to(park)
                _free(device)
            t.model.to(device)
            on_device = t
        if strategy is not None:
            t.model.strategy = strategy  # type: ignore[union-attr]
        if order > 0:
            sleep(opts.cooldown)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with ui.measuring(f"{label} ({rep + 1}/{opts.repeats})", opts.duration) as tick:
            res = measure(t.model, batch, opts.duration, meter, t.desc["flops_per_inference"], opts.warmup,
                          on_tick=tick, idle=idle, sync=sync)
        windows[label].append({"repeat": rep, "order": order, "started_utc": started, **res.metrics()})
    if on_device is not None:
        on_device.model.to(park)
        _free(device)

    for label, (t, strategy) in variants.items():
        rec = {"name": label, **t.desc, "strategy": strategy, "dtype": opts.dtype,
               "accuracy": t.train.test_accuracy, "accuracy_bench_dtype": t.accuracy_bench_dtype,
               "diverged": t.train.diverged, "train": t.train.as_dict(),
               "idle_power_w": idle.power_w if idle is not None else None,
               "idle_power_by_device_w": idle.power_by_device_w if idle is not None else None,
               **summarize(windows[label])}
        doc["models"].append(rec)
        ui.info(label)
    del trained, variants

    path = None
    if save:
        tag = "custom" if opts.extra.get("preset") is None else opts.extra["preset"]
        stem = f"run-{doc['created_utc'].replace(':', '').replace('-', '')[:15]}-{tag}"
        path = write_atomic(doc, opts.out, stem)
    return doc, path
