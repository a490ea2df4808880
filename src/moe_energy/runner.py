"""One run: for each model build -> train -> measure -> free, so the largest preset fits one GPU."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .bench import measure
from .config import ConfigError, ModelSpec, RunOptions
from .data import Dataset, make_dataset
from .energy.meter import Meter
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


def run(spec: ModelSpec, opts: RunOptions, meter: Meter, ui: UI | None = None, save: bool = True) -> tuple[dict, Path | None]:
    """Train and measure every model of ``opts.models``; returns the results document and its path."""
    ui = ui or SilentUI()
    device = resolve_device(opts.device)
    dtype = DTYPE[opts.dtype]
    data = make_dataset(opts.samples, spec.input_dim, spec.classes, opts.seed, opts.test_fraction, opts.data)
    if opts.data:  # the file decides the task's shape
        from dataclasses import replace

        spec = replace(spec, input_dim=data.input_dim, classes=data.classes).validate()
    doc = new_document(
        spec=asdict(spec),
        options=opts.as_dict(),
        environment=describe(device),
        dataset={"source": data.source, "train_samples": len(data.x_train), "test_samples": len(data.x_test),
                 "input_dim": data.input_dim, "classes": data.classes, "chance_accuracy": data.chance_accuracy},
    )
    doc["energy_meter"] = {"name": meter.name, "method": meter.method}
    batch = bench_batch(data, opts.batch_size, device, dtype)
    steps = opts.epochs * -(-len(data.x_train) // opts.batch_size)

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
        acc_bench = tr.test_accuracy
        if dtype != torch.float32:
            model.to(dtype)
            acc_bench = evaluate(model, data.x_test, data.y_test, opts.batch_size, device, dtype)
        variants = [(f"moe[{s}]", s) for s in opts.strategies] if desc["kind"] == "moe" else [(name, None)]
        for label, strategy in variants:
            if strategy is not None:
                model.strategy = strategy  # type: ignore[union-attr]
            with ui.measuring(label, opts.duration) as tick:
                res = measure(model, batch, opts.duration, meter, desc["flops_per_inference"], opts.warmup,
                              on_tick=tick)
            rec = {"name": label, **desc, "strategy": strategy, "dtype": opts.dtype,
                   "accuracy": tr.test_accuracy, "accuracy_bench_dtype": acc_bench,
                   "diverged": tr.diverged, "train": tr.as_dict(), **res.metrics()}
            doc["models"].append(rec)
            ui.info(label)
        del model
        _free(device)

    path = None
    if save:
        tag = "custom" if opts.extra.get("preset") is None else opts.extra["preset"]
        stem = f"run-{doc['created_utc'].replace(':', '').replace('-', '')[:15]}-{tag}"
        path = write_atomic(doc, opts.out, stem)
    return doc, path
