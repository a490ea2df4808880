"""The one run skeleton, for every workload: start -> arrange -> build (train) -> idle -> windows -> records.

A workload (``Workload``: the seed's trained classifiers in ``seed.py``, an LLM MoE layer in ``layer.py``) says
what it builds, its inputs and what its records add; this module owns everything else, once. A ``Team`` says
where the skeleton runs: one process (``Team`` itself) or the ranks of an expert-parallel job
(``distributed.job.Ranks``), which agree on every check and skip, shard the MoE and measure fixed batch counts.

Faults stay local: a model that does not fit is skipped (before it is built when the estimate says so, or when
an allocation fails), a window whose meter fails is kept as failed with its reason, a variant whose strategy
breaks stops with its reason and the others go on. Everything else (Ctrl-C included) stops the run before
anything is written, so a results file is whole.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .. import memory
from ..config import ModelSpec, RunOptions
from ..device import device_sync, free, resolve_device
from ..dtypes import DTYPES
from ..energy.idle import IdlePower, measure_idle
from ..energy.meter import Meter, meter_info
from ..errors import ConfigError, described, one_line
from ..measure import roofline
from ..measure.environment import describe
from ..measure.guard import GuardedMeter, MeterFailed
from ..measure.records import (
    ModelRecord,
    WindowRecord,
    failed_window,
    measured_record,
    skipped_record,
    window_record,
)
from ..measure.window import measure, warm_up_for
from ..memory import OutOfMemory
from ..models.dense import DenseMLP
from ..models.moe import MoE
from ..models.plan import TRAIN_STRATEGY, ModelPlan
from ..storage.fileio import now_utc
from ..storage.results import new_document, run_stem, save_or_rescue
from ..train import TrainResult
from .prepare import prepare

PARK = torch.device("cpu")
# Up to this many bytes of weights, a user-named strategy is tried on the real widths before any work.
STRATEGY_PROBE_BYTES = 2**30


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


class Refused(ConfigError):
    """This shape or size cannot run here (a kernel's alignment rule, inputs larger than memory): refused up
    front. `run` and `plan` exit 2 with the reason; a sweep skips that point and measures the rest."""


# ---------------------------------------------------------------------------------------------------------
# Checks before any work


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


def check_named_strategies(strategies: Sequence[str], probe: Callable[[str], nn.Module], x: Tensor,
                           what: str) -> None:
    """Refuse a named strategy that cannot run ``what``: one forward of ``probe(strategy)`` (a model of the
    real widths with only k experts) on ``x`` must work. ``auto`` copes by itself and is not tried."""
    for s in [s for s in strategies if s != "auto"]:
        try:
            with torch.inference_mode():
                probe(s)(x)
        except Exception as e:  # noqa: BLE001 - any failure here means: this strategy cannot run this shape
            raise Refused(f"--moe-strategy {s} cannot run {what} on {x.device} in {str(x.dtype).split('.')[-1]} "
                          f"({one_line(e, 120)}); use --moe-strategy auto, which picks one that can, or another "
                          "strategy") from None


def check_fits(need: int, devices: Sequence[torch.device], what: str, fix: str) -> None:
    """Refuse, before allocating, inputs of ``need`` bytes that one of ``devices`` cannot hold."""
    for where in dict.fromkeys(devices):
        problem = memory.fit_problem(need, where, what)
        if problem is not None:
            raise Refused(f"{problem}; {fix}")


# ---------------------------------------------------------------------------------------------------------
# Typed values the phases pass on


@dataclass(frozen=True)
class Point:
    """One input the windows repeat: the seed's one bench batch, or one token count of an LLM layer."""

    rows: int  # inferences per forward: the batch size, or T tokens
    suffix: str = ""  # what the point adds to a row's label: "@T=16"
    head: dict[str, Any] = field(default_factory=dict)  # extra window fields: {"tokens_per_forward": 16}


@dataclass
class Built:
    """A model built (or trained) from its plan, waiting for its windows; a trained one keeps its training."""

    plan: ModelPlan
    model: nn.Module
    train: TrainResult | None = None
    accuracy_bench_dtype: float | None = None

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass
class Variant:
    """One measured row: a model on one point's inputs and, for an MoE, the strategy its windows run. The window
    phase reads only these, so every workload's rows take one path."""

    label: str  # "moe[grouped]", "dense_total"; an LLM layer's: "moe[auto]@T=16"
    model: nn.Module
    strategy: str | None  # None: a dense model
    batch: Tensor  # [rows, in]: what every forward of its windows gets
    flops_per_inference: int
    need_bytes: int  # device memory its windows need, for the reason when they run out of it
    parked: bool = True  # True: waits in host memory between windows (trained models); False: stays on the device
    head: dict[str, Any] = field(default_factory=dict)  # extra window fields, e.g. {"tokens_per_forward": T}
    auto_candidates: tuple[str, ...] | None = None  # auto's candidates for these inputs; None: the model's own
    before_window: Callable[[], None] | None = None  # e.g. zero the routing's load counters
    after_window: Callable[[], dict[str, Any]] | None = None  # read after the window (e.g. the expert load)
    rows: int | None = None  # inferences per call when ``batch`` does not say (a whole model's tokens)
    ready: bool = False  # ``model`` is the call itself, made ready by its workload (a whole model's step)
    call_s: float | None = None  # one call's seconds in its last window (window.warm_up_for)


@dataclass
class Measured:
    """The windows phase's outcome: every window per variant, why a variant stopped, what prepare did."""

    windows: dict[str, list[WindowRecord]]
    stopped: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, dict] = field(default_factory=dict)


@dataclass
class Run:
    """What every phase reads: the validated options, the device, the meter, the UI; ``team`` says where."""

    opts: RunOptions
    device: torch.device
    dtype: torch.dtype
    meter: GuardedMeter
    ui: UI
    sleep: Callable[[float], None]
    oom: str  # "skip": a model out of memory is skipped with its reason; "raise": OutOfMemory ends the run
    team: Team
    strategies: tuple[str, ...]  # what the MoE's rows run: the options', or the team's (expert parallelism)
    roof: roofline.Roofline | None = None


class Workload(Protocol):
    """One family of models on the one skeleton: what it builds, its inputs, what its records add.

    Adding a workload is a module with one such class and its registration (``commands.run``); the skeleton,
    the tables, the store and the report read only these."""

    family: str | None  # the results document's "family" (None: the seed's documents, which never had one)
    trains: bool  # its models are trained: every one built before the idle reading, then parked in host memory

    @property
    def experts(self) -> int:
        """The MoE's routed experts (expert parallelism shards them over the ranks)."""

    def check(self, opts: RunOptions, device: torch.device, strategies: tuple[str, ...]) -> None:
        """What only the device can tell, refused before any work: inputs that cannot fit, a strategy that
        cannot run the shape (``Refused``)."""

    def load(self, opts: RunOptions, device: torch.device, dtype: torch.dtype, rank: int) -> None:
        """Make this rank's inputs (rank 0's are a single process's)."""

    def identity(self) -> tuple[dict[str, Any], str]:
        """(what the ranks of a job must agree on besides the options, a fingerprint of its data)."""

    def document(self, opts: RunOptions) -> dict[str, Any]:
        """The results document's spec, options, dataset and the workload's own header fields."""

    def plans(self, models: Sequence[str]) -> list[ModelPlan]: ...

    def points(self) -> list[Point]: ...

    def row_strategies(self, plan: ModelPlan, strategies: tuple[str, ...]) -> tuple[str | None, ...]:
        """The strategies ``plan``'s rows run, one row each (None: one row, no strategy of its own)."""

    def fit_problem(self, plan: ModelPlan, opts: RunOptions, device: torch.device) -> str | None:
        """Why ``plan`` cannot be built (or trained) here even alone, or None; nothing allocated."""

    def together_problem(self, plans: list[ModelPlan], opts: RunOptions, device: torch.device) -> str | None:
        """Why ``plans`` cannot all be held on the device at once, or None."""

    def build(self, r: Run, plan: ModelPlan) -> Built:
        """``plan``'s model ready for its windows (trained, converted); OutOfMemory, released, if it cannot fit."""

    def variant(self, r: Run, built: Built, point: Point, label: str, strategy: str | None) -> tuple[Variant,
                                                                                                    str | None]:
        """The row of ``built`` at ``point``, and why it is stopped before its first window (or None)."""

    def record(self, r: Run, plan: ModelPlan, point: Point, rec: dict[str, Any]) -> dict[str, Any]:
        """The record's own fields, added to a measured or skipped model record."""

    def bytes_read(self, plan: ModelPlan, point: Point, rec: dict[str, Any], dtype: str) -> float | None:
        """Weight bytes one forward of this row read (the roofline's memory traffic); None: no bound applies."""

    def stem(self) -> str | None:
        """The results file's name part (a preset or arch name), or None for a custom shape."""

    # -- what a sweep reads of a point of this workload, before it runs (runner/sweep.py) -------------------
    sweep_oom: str  # "raise": a model out of memory skips the whole point; "skip": that model's record says so

    def options(self, opts: RunOptions) -> dict[str, Any]:
        """The options its documents and sweep keys hold (not another workload's)."""

    def key_fields(self) -> dict[str, Any]:
        """A sweep point's key fields besides its shape and options."""

    def work_flops(self, opts: RunOptions) -> float:
        """FLOPs whose time comes on top of the windows' fixed seconds (training; forwards of seconds)."""

    def seconds_floor(self, opts: RunOptions, roof: roofline.Roofline | None) -> float | None:
        """Least seconds a run of it takes here, or None when that has no bound."""

    def point_problem(self, opts: RunOptions, device: torch.device) -> str | None:
        """Why a run of it cannot fit here at all (a sweep skips the point), or None."""

    def need_bytes(self, opts: RunOptions) -> int:
        """The largest model's need: a sweep's skip reason when an allocation failed."""


# ---------------------------------------------------------------------------------------------------------
# Phase 0: start


def start(w: Workload, opts: RunOptions, team: Team, ui: UI, sleep: Callable[[float], None], oom: str
          ) -> tuple[Run, dict]:
    """Validate what only the device can tell, make the inputs, and open the results document."""
    if oom not in ("skip", "raise"):
        raise ValueError(f"oom must be 'skip' or 'raise', not {oom!r}")
    strategies = team.strategies(opts)
    dtype = DTYPES[opts.dtype]

    def checks() -> torch.device:
        device = resolve_device(opts.device)
        check_dtype(device, opts.dtype, strategies if w.trains else ())
        w.check(opts, device, strategies)
        w.load(opts, device, dtype, team.rank)
        return device

    device = team.start(w, checks, opts)
    meter = team.meter()
    r = Run(opts, device, dtype, GuardedMeter(meter), ui, sleep, oom, team, strategies)
    head = w.document(opts)
    doc = new_document(spec=head.pop("spec"), options=head.pop("options"), environment=describe(device),
                       dataset=head.pop("dataset"))
    doc.update(head)
    doc["dtype"] = {"name": opts.dtype, "why": opts.extra.get("dtype_why") or "given"}
    doc["energy_meter"] = {**meter_info(meter), "notice": getattr(meter, "notice", None)}
    team.header(doc)
    return r, doc


# ---------------------------------------------------------------------------------------------------------
# Phase 1: which models fit, and which together


def unwrapped(problem: str) -> str:
    """'out of memory (X needs ~A GiB, B GiB free on D)' -> 'X needs ~A GiB, B GiB free on D'."""
    return problem.removeprefix("out of memory (").removesuffix(")")


def arrange(w: Workload, r: Run, todo: list[ModelPlan]) -> tuple[list[list[ModelPlan]], dict[str, str], list[str]]:
    """(groups built and measured together, skipped name -> reason, notices): checked, nothing allocated; the
    ranks of a job agree (what any rank cannot fit is skipped on all, and all split if any must)."""
    mine = {p.name: why for p in todo if (why := w.fit_problem(p, r.opts, r.device)) is not None}
    skipped = r.team.agree(mine)
    for name, why in skipped.items():
        r.ui.info(f"{name}: skipped, {why}")
    fits = [p for p in todo if p.name not in skipped]
    problem = w.together_problem(fits, r.opts, r.device) if len(fits) > 1 else None
    split = r.team.agree({} if problem is None else {"split": problem})
    if not split:
        return ([fits] if fits else []), skipped, []
    note = (f"measured one at a time: {unwrapped(split['split'])}; each model's windows interleave over its "
            "token counts only")
    r.ui.info(note)
    return [[p] for p in fits], skipped, [note]


# ---------------------------------------------------------------------------------------------------------
# Phase 2: build (or train) and place


def build_agreed(w: Workload, r: Run, plan: ModelPlan, skipped: dict[str, str]) -> Built | None:
    """``plan``'s model, placed where the team measures it; None (with the reason in ``skipped``, agreed by every
    rank) when it ran out of memory on any rank."""
    built: Built | None = None
    mine: dict[str, str] = {}
    try:
        built = w.build(r, plan)
    except OutOfMemory as e:
        if r.oom == "raise":
            raise
        mine[plan.name] = e.reason
    why = r.team.agree(mine).get(plan.name)
    if why is None and built is not None:
        return r.team.place(built)
    built = None
    free(r.device)
    skipped[plan.name] = why or "not built"
    r.ui.info(f"{plan.name}: skipped, {skipped[plan.name]}")
    return None


def variants_of(w: Workload, r: Run, built: Built, out: Measured) -> dict[str, Variant]:
    """``built``'s rows at every point; a row stopped before its first window (its activations cannot fit now,
    --max-forward-s) is kept in ``out.stopped`` with the reason, agreed by every rank."""
    rows: dict[str, Variant] = {}
    mine: dict[str, str] = {}
    for point in w.points():
        for strategy in w.row_strategies(built.plan, r.strategies):
            label, strategy = r.team.label(built.plan, strategy)
            label += point.suffix
            out.windows.setdefault(label, [])
            rows[label], why = w.variant(r, built, point, label, strategy)
            if why is not None:
                mine[label] = why
    out.stopped.update(r.team.agree(mine))
    return {label: v for label, v in rows.items() if label not in out.stopped}


# ---------------------------------------------------------------------------------------------------------
# Phase 3: idle power


def idle_phase(r: Run) -> tuple[IdlePower | None, dict | None]:
    """Idle power of the metered devices, rested first so a build's or training's heat does not count as idle."""
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
# Phase 4: windows (one process)


def window_schedule(labels: list[str], repeats: int, seed: int) -> list[tuple[int, str]]:
    """(repeat, label) for every window: each round holds every model once, rounds shuffled apart, so drift
    (heat, clocks, other load) spreads over all models instead of landing on whichever ran last."""
    rng = random.Random(seed)
    out: list[tuple[int, str]] = []
    for rep in range(repeats):
        order = list(labels)
        rng.shuffle(order)
        out += [(rep, lab) for lab in order]
    return out


class Slot:
    """The device's model slot: a parked model comes onto it alone, and each variant is prepared once per stay
    of its model (auto's probe, weight layout, --compile); later windows only select the strategy it runs."""

    def __init__(self, r: Run) -> None:
        self.r = r
        self.on_device: nn.Module | None = None  # the parked model now on the device
        self.ready: dict[str, tuple[nn.Module, nn.Module, str | None]] = {}  # label -> (model, fn, strategy)
        self.laid_out: set[nn.Module] = set()  # models whose weight layout was chosen (by measuring, once)

    def load(self, v: Variant, prepared: dict[str, dict]) -> nn.Module:
        """``v``'s module on the device, ready to call; prepared outside any window."""
        if v.ready:
            return v.model
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


def one_window(r: Run, slot: Slot, v: Variant, rep: int, order: int, idle: IdlePower | None,
               prepared: dict[str, dict]) -> WindowRecord:
    """One window of ``v``; a meter failure gives a failed window, an allocation failure propagates."""
    head: dict[str, Any] = {"repeat": rep, "order": order, "started_utc": now_utc(), **v.head}
    try:
        fn = slot.load(v, prepared)
        if v.before_window is not None:
            v.before_window()
        with r.ui.measuring(f"{v.label} ({rep + 1}/{r.opts.repeats})", r.opts.duration) as tick:
            res = measure(fn, v.batch, r.opts.duration, r.meter, v.flops_per_inference,
                          warm_up_for(r.opts.warmup, v.call_s), on_tick=tick, idle=idle, sync=device_sync(r.device),
                          batch_size=v.rows)
        v.call_s = res.seconds / res.batches
        rec: dict[str, Any] = {**head, **window_record(res)}
    except MeterFailed as e:
        rec = {**head, **failed_window(str(e), v.rows or v.batch.shape[0], v.flops_per_inference, r.meter.name)}
    if v.after_window is not None:
        rec.update(v.after_window())  # one sync, after the window
    return rec  # type: ignore[return-value]


Window = Callable[[Variant, int, int], "WindowRecord | None"]  # (variant, repeat, order) -> its record (rank 0's)


def measure_all(r: Run, variants: dict[str, Variant], out: Measured, first_order: int, window: Window,
                stop: Callable[[Variant, BaseException], str] | None = None) -> None:
    """Every variant once per round, rounds shuffled (by the seed: every rank of a job alike), a rest between
    windows; orders count on from ``first_order`` into ``out``, so groups measured one after another share one
    sequence. ``window`` measures one (None: another rank's, kept by rank 0).

    With ``stop``, a variant that fails (out of memory, or any error of its strategy or preparation) stops with
    ``stop``'s reason, the others go on and every window already measured is kept; without, a failure ends the
    run (a job's ranks must stay in step).
    """
    for label in variants:
        out.windows.setdefault(label, [])
    schedule = window_schedule(list(variants), r.opts.repeats, r.opts.seed)
    for order, (rep, label) in enumerate(schedule, start=first_order):
        if label in out.stopped:
            continue
        if order > 0:
            r.sleep(r.opts.cooldown)
        failure: BaseException | None = None
        try:
            rec = window(variants[label], rep, order)
            if rec is not None:
                out.windows[label].append(rec)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others' windows
            if stop is None:
                raise
            failure = e
        if failure is not None:  # outside the except block: the traceback's tensors are gone
            out.stopped[label] = stop(variants[label], failure)
            del failure
            r.ui.info(f"{label}: {out.stopped[label]}")


def stop_reason(r: Run, slot: Slot, v: Variant, e: BaseException) -> str:
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


def measure_groups(w: Workload, r: Run, groups: list[list[ModelPlan]], built: dict[str, Built],
                   idle: IdlePower | None, skipped: dict[str, str]) -> Measured:
    """Each group built (unless trained already), measured and released in turn: at most one group's models are
    held on the device at a time."""
    out = Measured({})
    order = 0
    for group in groups:
        rows: dict[str, Variant] = {}
        for plan in group:
            b = built.get(plan.name) or build_agreed(w, r, plan, skipped)
            if b is not None:
                rows.update(variants_of(w, r, b, out))
            b = None  # held by its variants only: the next group's build must not find it still here
        r.team.measure(r, rows, idle, out, order)
        order += r.opts.repeats * len(rows)  # the next group's windows count on
        del rows  # the group's models go with their variants
        free(r.device)
    return out


# ---------------------------------------------------------------------------------------------------------
# Phase 5: records


def model_record(w: Workload, r: Run, plan: ModelPlan, point: Point, label: str, strategy: str | None,
                 m: Measured, idle: IdlePower | None, built: Built | None, why: str | None) -> dict[str, Any]:
    """One row's record: skipped or failed before any window (``why``), measured otherwise (with its roofline)."""
    fields, dtype = plan.fields(), r.opts.dtype
    windows = m.windows.get(label) or []
    if not windows:
        why = why or m.stopped.get(label) or "not measured"
        rec: dict[str, Any] = dict(skipped_record(label, fields, strategy, dtype, why,
                                                  status="failed" if why.startswith("failed:") else "skipped"))
        rec.update(r.team.extra(windows))
        return {**rec, **w.record(r, plan, point, rec)}
    train = built.train if built is not None else None
    acc = built.accuracy_bench_dtype if built is not None else None
    rec = dict(measured_record(label, fields, strategy, dtype, train, acc, idle, windows, m.prepared.get(label)))
    rec.update(r.team.extra(windows))
    rec.update(w.record(r, plan, point, rec))
    ips = rec.get("inferences_per_second")
    nbytes = w.bytes_read(plan, point, rec, dtype) if ips and r.team.bounds else None
    if ips and nbytes is not None:
        rec.update(roofline.figures(r.roof, point.rows / ips, plan.flops_per_inference * point.rows, nbytes,
                                    plan.rate_key(dtype)))
    if label in m.stopped:
        rec["flags"] = [f"stopped after {len(windows)} of {r.opts.repeats} windows: {m.stopped[label]}"] \
            + rec["flags"]
    return rec


def records(w: Workload, r: Run, todo: list[ModelPlan], built: dict[str, Built], skipped: dict[str, str],
            m: Measured, idle: IdlePower | None) -> list[ModelRecord]:
    """Every row, point by point, models in plan order, each MoE strategy in turn: the skipped with their reason."""
    out: list[ModelRecord] = []
    for point in w.points():
        for plan in todo:
            for strategy in w.row_strategies(plan, r.strategies):
                label, strategy = r.team.label(plan, strategy)
                rec = model_record(w, r, plan, point, label + point.suffix, strategy, m, idle,
                                   built.get(plan.name), skipped.get(plan.name))
                out.append(rec)  # type: ignore[arg-type]
                if rec["status"] == "measured":
                    r.ui.info(rec["name"])
    return out


# ---------------------------------------------------------------------------------------------------------
# The run


def train_all(w: Workload, r: Run, groups: list[list[ModelPlan]], skipped: dict[str, str]) -> dict[str, Built]:
    """A training workload's models, every one built before the idle reading (one at a time, parked)."""
    if not w.trains:
        return {}
    built: dict[str, Built] = {}
    for plan in (p for g in groups for p in g):
        b = build_agreed(w, r, plan, skipped)
        if b is not None:
            built[plan.name] = b
    return built


def run(w: Workload, opts: RunOptions, team: Team, ui: UI | None = None, save: bool = True,
        sleep: Callable[[float], None] = time.sleep, oom: str = "skip") -> tuple[dict | None, Path | None]:
    """Measure ``w``'s models in shuffled, repeated windows: its document (rank 0; None on other ranks) and,
    with ``save``, the file it was written to (a failed write raises results.NotSaved after rescuing it).

    ``oom="skip"``: a model that does not fit is recorded as skipped and the others are measured (the ``run``
    command); ``oom="raise"``: memory.OutOfMemory ends the run (a sweep skips the whole point).
    """
    r, doc = start(w, opts, team, ui or SilentUI(), sleep, oom)
    todo = w.plans(opts.models)
    groups, skipped, notices = arrange(w, r, todo)
    doc["notices"] = [*doc.pop("notices", []), *notices]  # a workload's own (from its checks) first
    built = train_all(w, r, groups, skipped)
    groups = [[p for p in g if p.name not in skipped] for g in groups]
    r.roof = team.roofline(r, doc["notices"])
    doc["roofline"] = r.roof.as_dict() if r.roof is not None else None
    idle, doc["idle"] = team.idle(r) if any(groups) else (None, None)
    measured = measure_groups(w, r, [g for g in groups if g], built, idle, skipped)
    if team.is_main:
        doc["models"] = records(w, r, todo, built, skipped, measured, idle)
    del built
    team.finish()
    if not team.is_main:
        return None, None
    path = save_or_rescue(doc, opts.out, run_stem(doc, w.stem(), team.stem_suffix())) if save else None
    return doc, path


class Team:
    """Where the skeleton runs: this base is one process (every check its own, trained models parked in host memory,
    windows by the clock); ``distributed.job.Ranks`` overrides it for the ranks of an expert-parallel job (every
    check and skip agreed, the MoE sharded, windows of an agreed batch count, rank 0 gathering)."""

    rank, world, is_main = 0, 1, True
    parks = True  # trained models wait in host memory between windows
    bounds = True  # a record's roofline bound applies (one device: a job over W of them has none)

    def __init__(self, meter: Meter) -> None:
        self._meter = meter

    def strategies(self, opts: RunOptions) -> tuple[str, ...]:
        return opts.strategies

    def start(self, w: Workload, checks: Callable[[], torch.device], opts: RunOptions) -> torch.device:
        """Run ``checks`` (their device; they make the inputs too); ranks agree on the first rank's error."""
        return checks()

    def meter(self) -> Meter:
        return self._meter

    def agree(self, reasons: dict[str, str]) -> dict[str, str]:
        return reasons

    def label(self, plan: ModelPlan, strategy: str | None) -> tuple[str, str | None]:
        """(label, strategy) of a row: one per MoE strategy, one for a dense model."""
        return (f"moe[{strategy}]", strategy) if plan.kind == "moe" and strategy else (plan.name, None)

    def place(self, built: Built) -> Built:
        return built

    def header(self, doc: dict[str, Any]) -> None:
        pass

    def roofline(self, r: Run, notices: list[str]) -> roofline.Roofline | None:
        """The roofline the records' bounds use, for the run's dtype: calibrated first (once, a few seconds, said
        in a notice) when the cache lacks it, so every run's records carry their bound without a manual step."""
        def told(msg: str) -> None:
            notices.append(msg)
            r.ui.info(msg)

        return roofline.load_or_calibrate(r.device, r.opts.dtype, notices.append, say=told, weights=r.opts.weights)

    def idle(self, r: Run) -> tuple[IdlePower | None, dict | None]:
        return idle_phase(r)

    def measure(self, r: Run, variants: dict[str, Variant], idle: IdlePower | None, out: Measured,
                first_order: int) -> None:
        """Windows by the clock, each variant prepared on the device's one slot; a failing variant stops alone."""
        slot = Slot(r)
        measure_all(r, variants, out, first_order, lambda v, rep, order: one_window(r, slot, v, rep, order, idle,
                                                                                    out.prepared),
                    lambda v, e: stop_reason(r, slot, v, e))
        slot.release()

    def extra(self, windows: list[WindowRecord]) -> dict[str, Any]:
        return {}

    def sum_(self, t: Tensor) -> None:
        """``t`` summed in place over the ranks (after a window: the experts' load)."""

    def stem_suffix(self) -> str:
        return ""

    def finish(self) -> None:
        pass
