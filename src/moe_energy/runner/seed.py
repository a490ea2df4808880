"""One run: train all -> idle -> windows -> records, each a short function over typed values.

Each model is trained alone, parked in host memory (accelerator runs), and measured in shuffled, repeated
windows that move exactly one model onto the device at a time. Faults stay local: a model that does not
fit is skipped (before it is built when the estimate says so, or when an allocation fails), a window whose
meter fails is kept as failed with its reason, and a diverged model is still measured and flagged.
Everything else (Ctrl-C included) stops the run before anything is written, so a results file is whole.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import memory, roofline
from .config import ModelSpec, RunOptions
from .data import Dataset, make_dataset
from .device import DTYPES, device_sync, free, resolve_device
from .energy.idle import IdlePower, measure_idle
from .energy.meter import Meter, meter_info
from .environment import describe
from .errors import ConfigError, described, one_line
from .fileio import now_utc
from .measure.guard import GuardedMeter, MeterFailed
from .measure.records import ModelRecord, WindowRecord, failed_window, measured_record, skipped_record
from .measure.window import measure
from .memory import OutOfMemory
from .models.dense import DenseMLP
from .models.moe import MoE
from .models.plan import TRAIN_STRATEGY, ModelPlan, plans
from .optimize import prepare
from .results import new_document, run_stem, save_or_rescue
from .train import TrainResult, evaluate, train

PARK = torch.device("cpu")


class UI(Protocol):
    """What the run tells the user; the CLI draws it with rich, tests pass a silent one."""

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
        x = torch.zeros(4, tiny.input_dim, device=device, dtype=DTYPES[dtype])
        DenseMLP(tiny.input_dim, 8, 1, tiny.classes).to(device=device, dtype=DTYPES[dtype])(x)
        for s in [s for s in strategies if s != "auto"] or [TRAIN_STRATEGY]:
            what = f"the MoE with moe-strategy {s}"
            MoE.from_spec(tiny, strategy=s).to(device=device, dtype=DTYPES[dtype])(x)
    except Exception as e:  # noqa: BLE001 - any failure here means: this dtype does not run here
        raise ConfigError(f"dtype={dtype} does not run on {device} ({what} failed: {one_line(e, 160)}); "
                          "choose float32") from None


class Refused(ConfigError):
    """This shape or size cannot run here (a kernel's alignment rule, inputs larger than memory): refused up
    front. `run` and `plan` exit 2 with the reason; a sweep skips that point and measures the rest."""


def check_inputs(spec: ModelSpec, opts: RunOptions, device: torch.device) -> None:
    """Refuse, before allocating, a data set or bench batch that cannot fit (the models are checked apart)."""
    host = torch.device("cpu")
    if not opts.data:
        need = memory.dataset_bytes(opts.samples, spec.input_dim, spec.classes)
        problem = memory.fit_problem(need, host, f"the synthetic data ({opts.samples:,} samples x {spec.input_dim} "
                                                 "features)")
        if problem is not None:
            raise Refused(f"{problem}; lower --samples")
    need = memory.batch_bytes(opts.batch_size, spec.input_dim, opts.dtype)
    for where in dict.fromkeys((host, device)):
        problem = memory.fit_problem(need, where, f"the bench batch ({opts.batch_size:,} rows)")
        if problem is not None:
            raise Refused(f"{problem}; lower --batch-size")


# Up to this many bytes of weights, a user-named strategy is tried on the real widths before any training.
STRATEGY_PROBE_BYTES = 2**30


def check_strategies(spec: ModelSpec, strategies: tuple[str, ...], device: torch.device, dtype: str) -> None:
    """Refuse, before training, a named strategy that cannot run this shape: one forward of an MoE with the
    real widths (top_k experts, at most 2 layers) must work. ``auto`` copes by itself and is not tried."""
    named = [s for s in strategies if s != "auto"]
    probe = replace(spec, experts=spec.top_k, layers=min(spec.layers, 2))
    if not named or ModelPlan.of("moe", probe).params * memory.BYTES[dtype] > STRATEGY_PROBE_BYTES:
        return  # too big to try cheaply: a failure then fails that model's windows, with the reason
    x = torch.zeros(4, spec.input_dim, device=device, dtype=DTYPES[dtype])
    for s in named:
        try:
            with torch.inference_mode():
                MoE.from_spec(probe, strategy=s).to(device=device, dtype=DTYPES[dtype])(x)
        except Exception as e:  # noqa: BLE001 - any failure here means: this strategy cannot run this shape
            raise Refused(f"--moe-strategy {s} cannot run this shape on {device} in {dtype} "
                                  f"({one_line(e, 120)}); use --moe-strategy auto, which picks one that can, or "
                                  "another strategy") from None


def bench_batch(data: Dataset, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The one batch the window repeats: held-out rows, repeated if the test set is smaller."""
    x = data.x_test
    reps = -(-batch_size // len(x))
    return x.repeat(reps, 1)[:batch_size].to(device=device, dtype=dtype).contiguous()


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


def prepare_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """THE point where a trained model becomes the thing the windows measure (no gradients, its dtype)."""
    for p in model.parameters():
        p.grad = None  # the optimizer's gradients would otherwise travel with the parked model
        p.requires_grad_(False)
    if dtype != torch.float32:
        model.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------------------
# Typed values the phases pass on


@dataclass
class Run:
    """What every phase reads: the validated inputs, the device, the data and the one bench batch."""

    spec: ModelSpec
    opts: RunOptions
    device: torch.device
    dtype: torch.dtype
    data: Dataset
    batch: torch.Tensor
    meter: GuardedMeter
    ui: UI
    sleep: Callable[[float], None]
    oom: str

    @property
    def steps(self) -> int:
        return self.opts.epochs * -(-len(self.data.x_train) // self.opts.batch_size)


@dataclass
class Trained:
    """A trained model parked (in host memory when the run uses an accelerator) until its windows."""

    plan: ModelPlan
    model: nn.Module
    train: TrainResult
    accuracy_bench_dtype: float | None

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass
class Variant:
    """One measured row of either family: a model on its own inputs and, for an MoE, the strategy its windows
    run. The window phase reads only these, so a trained classifier and a built LLM layer share one path."""

    label: str  # "moe[grouped]", "dense_total"; the LLM family: "moe[auto]@T=16"
    model: nn.Module
    strategy: str | None  # None: a dense model
    batch: torch.Tensor  # [B, in]: what every forward of its windows gets (the LLM family: [T, d], B = T)
    flops_per_inference: int
    need_bytes: int  # device memory its windows need, for the reason when they run out of it
    parked: bool = True  # True: waits in host memory between windows (the seed); False: stays on the device
    head: dict[str, Any] = field(default_factory=dict)  # extra window fields, e.g. {"tokens_per_forward": T}
    auto_candidates: tuple[str, ...] | None = None  # auto's candidates for these inputs; None: the model's own
    before_window: Callable[[], None] | None = None  # e.g. zero the routing's load counters
    after_window: Callable[[], dict[str, Any]] | None = None  # read after the window (e.g. the expert load)


@dataclass
class Measured:
    """The windows phase's outcome: every window per variant, why a variant stopped, what prepare did."""

    windows: dict[str, list[WindowRecord]]
    stopped: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, dict] = field(default_factory=dict)


class Host(Protocol):
    """What the idle phase reads of a run; both families' run values have these fields."""

    opts: RunOptions
    device: torch.device
    meter: GuardedMeter
    sleep: Callable[[float], None]


class Bench(Host, Protocol):
    """What the windows phase reads of a run (pipeline.Run and llm_pipeline.LayerRun)."""

    dtype: torch.dtype
    ui: UI
    oom: str  # "skip": a variant out of memory stops with its reason; "raise": OutOfMemory ends the run


class Kinded(Protocol):
    """Any plan the rows are labelled from (models.plan.ModelPlan, llm_pipeline.LayerPlan)."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...


def labels(plan: Kinded, strategies: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(label, strategy) of each row a model gives: one per MoE strategy, one for a dense model."""
    if plan.kind == "moe":
        return [(f"moe[{s}]", s) for s in strategies]
    return [(plan.name, None)]


def trained_variants(r: Run, trained: list[Trained]) -> dict[str, Variant]:
    """The seed's rows: each trained model on the one bench batch, once per MoE strategy."""
    o = r.opts
    return {label: Variant(label, t.model, s, r.batch, t.plan.flops_per_inference,
                           t.plan.memory_bytes(o.batch_size, o.dtype, training=False))
            for t in trained for label, s in labels(t.plan, o.strategies)}


# ---------------------------------------------------------------------------------------------------------
# Phase 1: train


def fit_check(plan: ModelPlan, opts: RunOptions, device: torch.device) -> str | None:
    """Why ``plan`` cannot be trained (or built) and parked here, or None: checked before allocating."""
    need = plan.memory_bytes(opts.batch_size, opts.dtype, training=opts.epochs > 0)
    problem = memory.fit_problem(need, device, f"{'training' if opts.epochs else 'building'} {plan.name}")
    if problem is None and device != PARK:
        problem = memory.fit_problem(4 * plan.params, PARK, f"parking {plan.name} in host memory")
    return problem


def train_one(r: Run, plan: ModelPlan) -> Trained:
    """Build, train, convert and park one model; OutOfMemory (memory already released) if it cannot fit."""
    problem = fit_check(plan, r.opts, r.device)
    if problem is not None:
        raise OutOfMemory(problem)  # nothing was allocated
    o = r.opts
    failure: tuple[str, int | None] | None = None
    try:
        torch.manual_seed(o.seed)
        model = plan.build().to(r.device)
        with r.ui.training(plan.name, r.steps) as step:
            tr = train(model, r.data, o.epochs, o.lr, o.batch_size, r.device, o.seed, step)
        model = prepare_for_inference(model, r.dtype)
        acc = tr.test_accuracy
        if r.dtype != torch.float32:
            acc = evaluate(model, r.data.x_test, r.data.y_test, o.batch_size, r.device, r.dtype)
        if r.device != PARK:
            model.to(PARK)
            free(r.device)
        return Trained(plan, model, tr, acc)
    except Exception as e:
        if not memory.is_oom(e):
            raise
        failure = (one_line(e), memory.requested_bytes(e))
    # Outside the except block the traceback (and every tensor its frames held) is gone: free, then report.
    model = None
    free(r.device)
    need = plan.memory_bytes(o.batch_size, o.dtype, training=o.epochs > 0)
    what = f"{'training' if o.epochs else 'building'} {plan.name}"
    raise OutOfMemory(memory.describe_need(max(need, failure[1] or 0), r.device, what))


def train_all(r: Run, todo: list[ModelPlan]) -> tuple[list[Trained], dict[str, str]]:
    """Every model trained one at a time; one that cannot fit is skipped (name -> reason), the others go on."""
    trained: list[Trained] = []
    skipped: dict[str, str] = {}
    for plan in todo:
        try:
            trained.append(train_one(r, plan))
        except OutOfMemory as e:
            if r.oom == "raise":
                raise
            skipped[plan.name] = e.reason
            r.ui.info(f"{plan.name}: skipped, {e.reason}")
    return trained, skipped


# ---------------------------------------------------------------------------------------------------------
# Phase 2: idle power


def idle_phase(r: Host) -> tuple[IdlePower | None, dict | None]:
    """Idle power of the metered devices, rested first so training's heat does not count as idle."""
    if r.opts.idle_seconds <= 0:
        return None, None
    r.sleep(r.opts.cooldown)
    try:
        idle = measure_idle(r.meter, r.opts.idle_seconds, device_sync(r.device))
    except MeterFailed as e:
        return None, {"failed": str(e), "power_w": None, "power_by_device_w": None, "seconds": r.opts.idle_seconds,
                      "method": "none", "flags": [f"idle reading failed: {e}"]}
    return idle, idle.as_dict() if idle is not None else None


# ---------------------------------------------------------------------------------------------------------
# Phase 3: windows


class Slot:
    """The device's model slot: a parked model comes onto it alone, and each variant is prepared once per stay
    of its model (auto's probe, weight layout, --compile); later windows only select the strategy it runs."""

    def __init__(self, r: Bench) -> None:
        self.r = r
        self.on_device: nn.Module | None = None  # the parked model now on the device
        self.ready: dict[str, tuple[nn.Module, nn.Module, str | None]] = {}  # label -> (model, fn, strategy)
        self.laid_out: set[nn.Module] = set()  # models whose weight layout was chosen (by measuring, once)

    def load(self, v: Variant, prepared: dict[str, dict]) -> nn.Module:
        """``v``'s module on the device, ready to call; prepared outside any window."""
        if v.parked and self.r.device != PARK and self.on_device is not v.model:
            self.release()
            self.on_device = v.model
            v.model.to(self.r.device)
        if v.label not in self.ready:
            self.ready[v.label] = (v.model, *self.prepare(v, prepared))
        _, fn, strategy = self.ready[v.label]
        if strategy is not None:
            v.model.strategy = strategy  # type: ignore[union-attr]  # one model serves all its strategies
        return fn

    def prepare(self, v: Variant, prepared: dict[str, dict]) -> tuple[nn.Module, str | None]:
        """(module to call, strategy it runs: auto's choice once compiled); the facts go to ``prepared``."""
        r, model = self.r, v.model
        if v.strategy is not None:
            model.strategy = v.strategy  # type: ignore[union-attr]
        if v.auto_candidates is not None:
            model.auto_candidates = v.auto_candidates  # type: ignore[union-attr]
        layout = "keep" if model in self.laid_out else "auto"
        self.laid_out.add(model)
        fn, prepared[v.label] = prepare(model, dtype=r.dtype, compile=r.opts.compile, device=r.device,
                                        example=v.batch, layout=layout)
        return fn, model.strategy if v.strategy is not None else None  # type: ignore[return-value]

    def release(self) -> None:
        """Park the model on the device; its prepared modules go (a captured graph holds its addresses)."""
        if self.on_device is not None:
            gone = self.on_device
            self.ready = {k: v for k, v in self.ready.items() if v[0] is not gone}
            gone.to(PARK)
            self.on_device = None
            free(self.r.device)


def one_window(r: Bench, slot: Slot, v: Variant, rep: int, order: int, idle: IdlePower | None,
               prepared: dict[str, dict]) -> WindowRecord:
    """One window of ``v``; a meter failure gives a failed window, an allocation failure propagates."""
    started = now_utc()
    head: dict[str, Any] = {"repeat": rep, "order": order, "started_utc": started, **v.head}
    try:
        fn = slot.load(v, prepared)
        if v.before_window is not None:
            v.before_window()
        with r.ui.measuring(f"{v.label} ({rep + 1}/{r.opts.repeats})", r.opts.duration) as tick:
            res = measure(fn, v.batch, r.opts.duration, r.meter, v.flops_per_inference, r.opts.warmup,
                          on_tick=tick, idle=idle, sync=device_sync(r.device))
        rec: dict[str, Any] = {**head, **res.metrics()}
    except MeterFailed as e:
        rec = {**head, **failed_window(str(e), v.batch.shape[0], v.flops_per_inference, r.meter.name)}
    if v.after_window is not None:
        rec.update(v.after_window())  # one sync, after the window
    return rec  # type: ignore[return-value]


def measure_all(r: Bench, variants: dict[str, Variant], idle: IdlePower | None, out: Measured | None = None,
                first_order: int = 0) -> Measured:
    """Every variant once per round, rounds shuffled, a rest between windows; orders count on from
    ``first_order`` into ``out``, so groups measured one after another share one sequence.

    A variant that fails (out of memory, or any error of its strategy or preparation) stops with its
    reason; the others go on, and every window already measured is kept.
    """
    out = out if out is not None else Measured({})
    for label in variants:
        out.windows.setdefault(label, [])
    slot = Slot(r)
    schedule = window_schedule(list(variants), r.opts.repeats, r.opts.seed)
    for order, (rep, label) in enumerate(schedule, start=first_order):
        if label in out.stopped:
            continue
        if order > 0:
            r.sleep(r.opts.cooldown)
        failure: BaseException | None = None
        try:
            out.windows[label].append(one_window(r, slot, variants[label], rep, order, idle, out.prepared))
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others' windows
            failure = e
        if failure is not None:  # outside the except block: the traceback's tensors are gone
            out.stopped[label] = stop_reason(r, slot, variants[label], failure)
            del failure
            r.ui.info(f"{label}: {out.stopped[label]}")
    slot.release()
    return out


def stop_reason(r: Bench, slot: Slot, v: Variant, e: BaseException) -> str:
    """Why ``v``'s remaining windows are not run, its memory released; OutOfMemory ends a sweep's run."""
    slot.release()
    free(r.device)
    if memory.is_oom(e):
        reason = memory.describe_need(v.need_bytes, r.device, f"measuring {v.label}")
        if r.oom == "raise":
            raise OutOfMemory(reason)
        return reason
    if isinstance(e, ConfigError):  # a user-facing refusal (e.g. --compile cannot run here): not a failure
        raise e
    return f"failed: {described(e, 200)}"


# ---------------------------------------------------------------------------------------------------------
# Phase 4: records


def roofline_fields(roof: roofline.Roofline | None, rec: ModelRecord, plan: ModelPlan, opts: RunOptions) -> dict:
    """The roofline columns of a model record: None (with the bound unknown) until `moe-energy calibrate` ran."""
    ips = rec.get("inferences_per_second")
    if not ips:
        return {}
    return roofline.figures(roof, opts.batch_size / ips, plan.flops_per_inference * opts.batch_size,
                            plan.weight_bytes(opts.dtype), opts.dtype)


def variant_record(r: Run, t: Trained, label: str, strategy: str | None, m: Measured, idle: IdlePower | None,
                   roof: roofline.Roofline | None) -> ModelRecord:
    """A variant's record: skipped if out of memory stopped it before any window, measured otherwise."""
    o = r.opts
    if not m.windows[label]:
        reason = m.stopped[label]
        return skipped_record(label, t.plan.fields(), strategy, o.dtype, reason,
                              status="failed" if reason.startswith("failed:") else "skipped")
    rec = measured_record(label, t.plan.fields(), strategy, o.dtype, t.train, t.accuracy_bench_dtype, idle,
                          m.windows[label], m.prepared.get(label))
    rec.update(roofline_fields(roof, rec, t.plan, o))  # type: ignore[typeddict-item]
    if label in m.stopped:
        rec["flags"] = [f"stopped after {len(m.windows[label])} of {o.repeats} windows: {m.stopped[label]}"] \
            + rec["flags"]
    return rec


def records(r: Run, todo: list[ModelPlan], trained: dict[str, Trained], skipped: dict[str, str],
            m: Measured, idle: IdlePower | None, notices: list[str]) -> list[ModelRecord]:
    """Every row in plan order: the skipped models' shape and reason, the measured ones' figures."""
    roof = roofline.load(r.device, notice=notices.append)
    out: list[ModelRecord] = []
    for plan in todo:
        for label, strategy in labels(plan, r.opts.strategies):
            if plan.name in skipped:
                out.append(skipped_record(label, plan.fields(), strategy, r.opts.dtype, skipped[plan.name]))
                continue
            out.append(variant_record(r, trained[plan.name], label, strategy, m, idle, roof))
            if out[-1]["status"] == "measured":
                r.ui.info(label)
    return out


# ---------------------------------------------------------------------------------------------------------
# The run


def start(spec: ModelSpec, opts: RunOptions, meter: Meter, ui: UI, sleep: Callable[[float], None],
          oom: str) -> tuple[Run, dict]:
    """Validate what only the device can tell, make the data, and open the results document."""
    if oom not in ("skip", "raise"):
        raise ValueError(f"oom must be 'skip' or 'raise', not {oom!r}")
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype, opts.strategies)
    check_inputs(spec, opts, device)
    if "moe" in opts.models:
        check_strategies(spec, opts.strategies, device, opts.dtype)
    dtype = DTYPES[opts.dtype]
    data = make_dataset(opts.samples, spec.input_dim, spec.classes, opts.seed, opts.test_fraction, opts.data,
                        declared=opts.extra.get("declared_shape") or {})
    if opts.data:  # the file decides the task's shape
        spec = replace(spec, input_dim=data.input_dim, classes=data.classes).validate()
    doc = new_document(spec=asdict(spec), options=opts.as_dict(), environment=describe(device),
                       dataset=dataset_fields(data))
    doc["energy_meter"] = {**meter_info(meter), "notice": getattr(meter, "notice", None)}
    batch = bench_batch(data, opts.batch_size, device, dtype)
    return Run(spec, opts, device, dtype, data, batch, GuardedMeter(meter), ui, sleep, oom), doc


def dataset_fields(data: Dataset) -> dict[str, Any]:
    """The results document's description of the data the models learned."""
    return {"source": data.source, "train_samples": len(data.x_train), "test_samples": len(data.x_test),
            "input_dim": data.input_dim, "classes": data.classes, "chance_accuracy": data.chance_accuracy}


def run(spec: ModelSpec, opts: RunOptions, meter: Meter, ui: UI | None = None, save: bool = True,
        sleep: Callable[[float], None] = time.sleep, oom: str = "skip") -> tuple[dict, Path | None]:
    """Train every model of ``opts.models`` one at a time, then measure them in shuffled, repeated windows.

    ``oom="skip"``: a model that does not fit is recorded as skipped and the others are measured (the
    ``run`` command); ``oom="raise"``: memory.OutOfMemory ends the run (a sweep skips the whole point).
    With ``save``, a failed final write raises results.NotSaved after rescuing the document elsewhere.
    """
    r, doc = start(spec, opts, meter, ui or SilentUI(), sleep, oom)
    todo = list(plans(r.spec, opts.models))
    trained, skipped = train_all(r, todo)
    idle, doc["idle"] = idle_phase(r) if trained else (None, None)
    variants = trained_variants(r, trained)
    measured = measure_all(r, variants, idle)
    doc["notices"] = []  # what the user should know about the figures, printed under the table
    doc["models"] = records(r, todo, {t.name: t for t in trained}, skipped, measured, idle, doc["notices"])
    del trained, variants
    path = save_or_rescue(doc, opts.out, run_stem(doc, opts.extra.get("preset"))) if save else None
    return doc, path
