"""One run: train each model alone, park it in host memory, then measure all in shuffled repeated windows.

Faults stay local: a model that does not fit in memory is skipped (before it is built when the estimate
says so, or when an allocation fails), a window whose meter fails is kept as failed with its reason, and
a diverged model is still measured and flagged. Everything else (Ctrl-C included) stops the run before
anything is written, so a results file is always whole.
"""

from __future__ import annotations

import gc
import math
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

from . import memory, roofline
from .bench import device_sync, measure, summarize
from .config import ConfigError, ModelSpec, RunOptions
from .data import Dataset, make_dataset
from .energy.idle import IdlePower, measure_idle
from .energy.meter import Measurement, Meter, abort, meter_info
from .environment import describe
from .memory import OutOfMemory
from .models.counting import dense_flops, mlp_params, moe_active_params, moe_flops, moe_params, moe_weight_params_read
from .models.dense import DenseMLP, dense_width
from .models.moe import MoE
from .optimize import prepare
from .results import new_document, run_stem, save_or_rescue
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


def _roofline(roof: roofline.Roofline | None, rec: dict, desc: dict, spec: ModelSpec, opts: RunOptions) -> dict:
    """The roofline columns of a model record: None (with the bound unknown) until `moe-energy calibrate` ran."""
    ips = rec.get("inferences_per_second")
    if not ips:
        return {}
    per_param = memory.BYTES[opts.dtype]
    params_read = moe_weight_params_read(spec) if desc["kind"] == "moe" else desc["params"]
    return roofline.figures(roof, opts.batch_size / ips, desc["flops_per_inference"] * opts.batch_size,
                            params_read * per_param, opts.dtype)


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


def check_dtype(device: torch.device, dtype: str, strategies: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a dtype the device cannot run: a tiny dense and MoE forward must work.

    bfloat16 on a CUDA GPU without native support (before Ampere) is refused too: PyTorch emulates it
    there, and an emulated dtype's speed and energy would answer a question nobody asked.
    """
    if dtype == "float32":
        return
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"dtype=bfloat16 has no native support on {torch.cuda.get_device_name(device)} (only "
                          "emulated); choose float16 or float32")
    tiny = ModelSpec(experts=2, hidden=8, layers=1, top_k=1, input_dim=8, classes=2)
    what = "a dense layer"
    try:
        x = torch.zeros(4, tiny.input_dim, device=device, dtype=DTYPE[dtype])
        DenseMLP(tiny.input_dim, 8, 1, tiny.classes).to(device=device, dtype=DTYPE[dtype])(x)
        for s in [s for s in strategies if s != "auto"] or [TRAIN_STRATEGY]:
            what = f"the MoE with moe-strategy {s}"
            MoE.from_spec(tiny, strategy=s).to(device=device, dtype=DTYPE[dtype])(x)
    except Exception as e:  # noqa: BLE001 - any failure here means: this dtype does not run here
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"dtype={dtype} does not run on {device} ({what} failed: {msg}); choose float32") from None


class MeterFailed(RuntimeError):
    """The meter could not start or read a window; the message says why, in one line."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class GuardedMeter:
    """The run's meter, with every failure turned into MeterFailed and every bad reading withheld.

    A counter that cannot be read (file gone, permission revoked, driver error) fails that window only,
    and a reading that is not a positive, finite number of joules is never passed on as a figure.
    """

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.meters = [meter]  # energy.meter.abort() closes the real meter through this
        self.name, self.method = meter.name, meter.method
        self.devices = list(getattr(meter, "devices", []))

    def begin(self) -> None:
        try:
            self.meter.begin()
        except Exception as e:  # noqa: BLE001 - any meter error fails this window, not the run
            abort(self.meter)
            raise MeterFailed(f"meter {self.name} could not start the window: {_one_line(e)}") from None

    def end(self) -> Measurement:
        try:
            m = self.meter.end()
        except Exception as e:  # noqa: BLE001
            abort(self.meter)
            raise MeterFailed(f"meter {self.name} could not read the window: {_one_line(e)}") from None
        if m.joules_by_device is not None:
            values = list(m.joules_by_device.values())
            bad = [f"{d}={j!r}" for d, j in m.joules_by_device.items()
                   if not isinstance(j, (int, float)) or not math.isfinite(j) or j < 0]
            if bad or sum(values) <= 0:
                why = f"meter {self.name} read {', '.join(bad) if bad else f'{sum(values):g} J in total'}"
                raise MeterFailed(f"{why}: not a valid energy reading")
        return m


def failed_window(reason: str, batch_size: int, flops: int | None, meter_name: str) -> dict:
    """A window whose energy could not be measured: every figure None with the reason (never 0 J)."""
    return {"failed": reason, "batch_size": batch_size, "flops_per_inference": flops,
            "inferences_per_joule_reason": f"window failed: {reason}",
            "dynamic_inferences_per_joule_reason": f"window failed: {reason}",
            "energy_j": None, "inferences_per_joule": None, "energy_method": "none", "energy_meter": meter_name,
            "energy_devices": [], "energy_is_estimate": False, "flags": [f"window failed: {reason}"]}


def summarize_windows(windows: list[dict]) -> dict:
    """``bench.summarize`` over the windows that measured; failed ones are kept in order and counted."""
    ok = [w for w in windows if not w.get("failed")]
    out = summarize(ok or windows)
    failed = len(windows) - len(ok)
    out["windows"] = list(windows)
    out["failed_windows"] = failed
    out["repeats"] = len(ok)
    if failed:
        first = next(w["failed"] for w in windows if w.get("failed"))
        note = (f"{failed} of {len(windows)} windows failed ({first}); the figures are from the other {len(ok)}"
                if ok else f"every window failed ({first}): nothing measured")
        out["flags"] = [note] + [f for f in out["flags"] if not f.startswith("window failed")]
    return out


def memory_need(desc: dict, spec: ModelSpec, opts: RunOptions, training: bool) -> int:
    """Bytes one model needs on the device: training state (or inference weights) plus one batch."""
    widest = max(desc["width"] * (spec.top_k if desc["kind"] == "moe" else 1), spec.input_dim)
    if training:
        return memory.training_bytes(desc["params"], widest, opts.batch_size, spec.layers)
    return memory.inference_bytes(desc["params"], widest, opts.batch_size, opts.dtype)


def skipped_record(name: str, desc: dict, strategy: str | None, dtype: str, reason: str) -> dict:
    """A model that was not measured: its shape and the reason, every figure absent (not 0)."""
    return {"name": name, **desc, "strategy": strategy, "dtype": dtype, "status": "skipped", "skipped": reason,
            "accuracy": None, "diverged": None, "train": None, "repeats": 0, "windows": [], "flags": [reason],
            "inferences_per_second": None, "inferences_per_joule": None, "energy_j": None, "average_power_w": None,
            "inferences_per_joule_reason": reason, "energy_method": "none"}


def _train_one(name: str, desc: dict, spec: ModelSpec, opts: RunOptions, data: Dataset, device: torch.device,
               dtype: torch.dtype, steps: int, ui: UI) -> Trained:
    """Build, train, convert and park one model; OutOfMemory (memory already released) if it cannot fit."""
    park = torch.device("cpu")
    need = memory_need(desc, spec, opts, training=opts.epochs > 0)
    what = f"{'training' if opts.epochs else 'building'} {name}"
    problem = memory.fit_problem(need, device, what)
    if problem is None and device != park:
        problem = memory.fit_problem(4 * desc["params"], park, f"parking {name} in host memory")
    if problem is not None:
        raise OutOfMemory(problem)  # nothing was allocated
    failure: tuple[str, int | None] | None = None
    model: nn.Module | None = None
    try:
        torch.manual_seed(opts.seed)
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
        return Trained(name, desc, model, tr, acc_bench)
    except Exception as e:
        if not memory.is_oom(e):
            raise
        failure = (_one_line(e), memory.requested_bytes(e))
    # Outside the except block the traceback (and every tensor its frames held) is gone: free, then report.
    model = None
    _free(device)
    tried = failure[1] or 0
    raise OutOfMemory(memory.describe_need(max(need, tried), device, what))


def run(spec: ModelSpec, opts: RunOptions, meter: Meter, ui: UI | None = None, save: bool = True,
        sleep: Callable[[float], None] = time.sleep, oom: str = "skip") -> tuple[dict, Path | None]:
    """Train every model of ``opts.models`` one at a time, then measure them in shuffled, repeated windows.

    Memory: each model is built, trained and converted alone on the device, then parked in host memory
    (accelerator runs only), and each window moves exactly one model onto the device, outside the window,
    so the largest preset needs one model's worth of device memory at a time.

    ``oom="skip"``: a model that does not fit is recorded as skipped and the others are measured (the
    ``run`` command); ``oom="raise"``: memory.OutOfMemory ends the run (a sweep skips the whole point).
    With ``save``, a failed final write raises results.NotSaved after rescuing the document elsewhere.
    """
    if oom not in ("skip", "raise"):
        raise ValueError(f"oom must be 'skip' or 'raise', not {oom!r}")
    ui = ui or SilentUI()
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype, opts.strategies)
    dtype = DTYPE[opts.dtype]
    park = torch.device("cpu")
    declared = opts.extra.get("declared_shape") or {}
    data = make_dataset(opts.samples, spec.input_dim, spec.classes, opts.seed, opts.test_fraction, opts.data,
                        declared=declared)
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
    guarded = GuardedMeter(meter)
    batch = bench_batch(data, opts.batch_size, device, dtype)
    steps = opts.epochs * -(-len(data.x_train) // opts.batch_size)
    sync = device_sync(device)

    # 1. Train, one model at a time; a model that cannot fit is skipped, the others go on.
    trained: list[Trained] = []
    skipped: dict[str, tuple[dict, str]] = {}  # model name -> (description, reason)
    for name, desc in model_plan(spec, opts):
        try:
            trained.append(_train_one(name, desc, spec, opts, data, device, dtype, steps, ui))
        except OutOfMemory as e:
            if oom == "raise":
                raise
            skipped[name] = (desc, e.reason)
            ui.info(f"{name}: skipped, {e.reason}")

    # 2. Idle power of the metered devices, rested first so training's heat does not count as idle.
    idle: IdlePower | None = None
    doc["idle"] = None
    if opts.idle_seconds > 0 and trained:
        sleep(opts.cooldown)
        try:
            idle = measure_idle(guarded, opts.idle_seconds, sync)
            doc["idle"] = idle.as_dict() if idle is not None else None
        except MeterFailed as e:
            doc["idle"] = {"failed": str(e), "power_w": None, "power_by_device_w": None,
                           "seconds": opts.idle_seconds, "method": "none", "flags": [f"idle reading failed: {e}"]}

    # 3. Windows: every model (and MoE strategy) once per round, rounds shuffled, a rest between windows.
    variants: dict[str, tuple[Trained, str | None]] = {}
    for t in trained:
        if t.desc["kind"] == "moe":
            for s in opts.strategies:
                variants[f"moe[{s}]"] = (t, s)
        else:
            variants[t.name] = (t, None)
    windows: dict[str, list[dict]] = {label: [] for label in variants}
    stopped: dict[str, str] = {}  # variant -> why its remaining windows were not run (out of memory)
    on_device: Trained | None = None
    prepared: dict[str, dict] = {}  # variant -> what optimize.prepare did (strategy chosen, compile seconds)
    prepared_for: str | None = None
    laid_out: set[str] = set()
    fn: nn.Module | None = None
    schedule = window_schedule(list(variants), opts.repeats, opts.seed)
    for order, (rep, label) in enumerate(schedule):
        if label in stopped:
            continue
        t, strategy = variants[label]
        if order > 0:
            sleep(opts.cooldown)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        failure: str | None = None
        try:
            moved = False
            if device != park and on_device is not t:
                if on_device is not None:
                    on_device.model.to(park)
                    _free(device)
                on_device = t
                t.model.to(device)
                moved = True
            if strategy is not None:
                t.model.strategy = strategy  # type: ignore[union-attr]
            if moved or prepared_for != label:
                # Outside the window: auto's probe, the weight layout and (--compile) compilation and graph
                # capture. Re-done after a move, since a captured graph holds the old weights' addresses.
                layout = "keep" if t.name in laid_out else "auto"
                laid_out.add(t.name)
                fn, prepared[label] = prepare(t.model, dtype=dtype, compile=opts.compile, device=device,
                                              example=batch, layout=layout)
                prepared_for = label
            with ui.measuring(f"{label} ({rep + 1}/{opts.repeats})", opts.duration) as tick:
                res = measure(fn, batch, opts.duration, guarded, t.desc["flops_per_inference"], opts.warmup,
                              on_tick=tick, idle=idle, sync=sync)
            rec = {"repeat": rep, "order": order, "started_utc": started, **res.metrics()}
        except MeterFailed as e:
            rec = {"repeat": rep, "order": order, "started_utc": started,
                   **failed_window(str(e), opts.batch_size, t.desc["flops_per_inference"], meter.name)}
        except Exception as e:
            if not memory.is_oom(e):
                raise
            failure = _one_line(e)
        if failure is not None:  # out of memory measuring: this variant stops, the others go on
            if on_device is not None:
                on_device.model.to(park)
                on_device = None
            _free(device)
            need = memory_need(t.desc, spec, opts, training=False)
            stopped[label] = memory.describe_need(need, device, f"measuring {label}")
            if oom == "raise":
                raise OutOfMemory(stopped[label])
            ui.info(f"{label}: {stopped[label]}")
            continue
        windows[label].append(rec)
    if on_device is not None:
        on_device.model.to(park)
        _free(device)

    roof = roofline.load(device)
    for name, desc in model_plan(spec, opts):
        if name in skipped:
            reason = skipped[name][1]
            for s in (opts.strategies if desc["kind"] == "moe" else (None,)):
                label = f"moe[{s}]" if s is not None else name
                doc["models"].append(skipped_record(label, desc, s, opts.dtype, reason))
            continue
        for label, (t, strategy) in variants.items():
            if t.name != name:
                continue
            if not windows[label]:
                doc["models"].append(skipped_record(label, t.desc, strategy, opts.dtype, stopped[label]))
                continue
            rec = {"name": label, **t.desc, "strategy": strategy, "dtype": opts.dtype, "status": "measured",
                   "accuracy": t.train.test_accuracy, "accuracy_bench_dtype": t.accuracy_bench_dtype,
                   "diverged": t.train.diverged, "accuracy_meaningful": not t.train.diverged,
                   "train": t.train.as_dict(),
                   "idle_power_w": idle.power_w if idle is not None else None,
                   "idle_power_by_device_w": idle.power_by_device_w if idle is not None else None,
                   **summarize_windows(windows[label])}
            rec["optimize"] = prepared.get(label)
            rec.update(_roofline(roof, rec, t.desc, spec, opts))
            if t.train.diverged:
                rec["flags"] = [f"training diverged ({t.train.diverged_reason}): accuracy is meaningless; speed "
                                "and energy are valid"] + rec["flags"]
            if label in stopped:
                rec["flags"] = [f"stopped after {len(windows[label])} of {opts.repeats} windows: {stopped[label]}"] \
                    + rec["flags"]
            doc["models"].append(rec)
            ui.info(label)
    del trained, variants

    path = None
    if save:
        path = save_or_rescue(doc, opts.out, run_stem(doc, opts.extra.get("preset")))
    return doc, path
