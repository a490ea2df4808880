"""The seed's workload: an MoE classifier and its two size-matched dense MLPs, trained on the seed's task (or the
user's .npz) and measured on one bench batch of held-out rows.

Each model is trained alone before the idle reading, converted to the bench dtype, parked in host memory (runs on
an accelerator) and measured in windows that move exactly one model onto the device at a time
(``core.Slot``); a diverged model is still measured and flagged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import memory
from ..config import ModelSpec, RunOptions
from ..data import Dataset, make_dataset
from ..device import free
from ..dtypes import DTYPES
from ..energy.meter import Meter
from ..errors import one_line
from ..memory import OutOfMemory
from ..models.moe import MoE
from ..models.plan import ModelPlan, plans
from ..train import evaluate, train
from .core import (
    PARK,
    STRATEGY_PROBE_BYTES,
    UI,
    Built,
    Point,
    Run,
    Team,
    Variant,
    check_fits,
    check_named_strategies,
)
from .core import run as run_workload


def check_inputs(spec: ModelSpec, opts: RunOptions, device: torch.device) -> None:
    """Refuse, before allocating, a data set or bench batch that cannot fit (the models are checked apart)."""
    host = torch.device("cpu")
    if not opts.data:
        need = memory.dataset_bytes(opts.samples, spec.input_dim, spec.classes)
        check_fits(need, [host], f"the synthetic data ({opts.samples:,} samples x {spec.input_dim} features)",
                   "lower --samples")
    check_fits(memory.batch_bytes(opts.batch_size, spec.input_dim, opts.dtype), [host, device],
               f"the bench batch ({opts.batch_size:,} rows)", "lower --batch-size")


def check_strategies(spec: ModelSpec, strategies: tuple[str, ...], device: torch.device, dtype: str) -> None:
    """Refuse, before training, a named strategy that cannot run this shape: one forward of an MoE with the
    real widths (top_k experts, at most 2 layers) must work."""
    probe = replace(spec, experts=spec.top_k, layers=min(spec.layers, 2))
    if ModelPlan.of("moe", probe).params * memory.BYTES[dtype] > STRATEGY_PROBE_BYTES:
        return  # too big to try cheaply: a failure then fails that model's windows, with the reason
    x = torch.zeros(4, spec.input_dim, device=device, dtype=DTYPES[dtype])
    check_named_strategies(strategies, lambda s: MoE.from_spec(probe, strategy=s).to(device=device,
                                                                                     dtype=DTYPES[dtype]),
                           x, "this shape")


def bench_batch(data: Dataset, batch_size: int, rank: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The one batch the windows repeat: held-out rows from offset rank*batch_size (each rank of a job its own),
    wrapping around when the test set is smaller. [B, in]"""
    x = data.x_test
    idx = (torch.arange(batch_size) + rank * batch_size) % len(x)
    return x[idx].to(device=device, dtype=dtype).contiguous()


@torch.inference_mode()
def experts_reached(model: MoE, batch: Tensor | None) -> int:
    """How many distinct experts ``model``'s gate routes ``batch`` [B, in] to (one sync; outside any window)."""
    assert batch is not None
    idx, _ = model.route(batch.to(device=next(model.parameters()).device))
    return int(idx.unique().numel())


def prepare_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """THE point where a trained model becomes the thing the windows measure (no gradients, its dtype)."""
    for p in model.parameters():
        p.grad = None  # the optimizer's gradients would otherwise travel with the parked model
        p.requires_grad_(False)
    if dtype != torch.float32:
        model.to(dtype)
    return model


def dataset_fields(data: Dataset) -> dict[str, Any]:
    """The results document's description of the data the models learned."""
    return {"source": data.source, "train_samples": len(data.x_train), "test_samples": len(data.x_test),
            "input_dim": data.input_dim, "classes": data.classes, "chance_accuracy": data.chance_accuracy,
            "ceiling_accuracy": data.ceiling_accuracy}


@dataclass
class Seed:
    """The seed's workload (``core.Workload``): trained classifiers on one bench batch."""

    spec: ModelSpec
    preset: str | None = None  # the results file's name part; None: a custom shape
    family = None
    trains = True
    data: Dataset | None = field(default=None, repr=False)
    batch: Tensor | None = field(default=None, repr=False)  # [B, in] on the device, in the bench dtype
    touched: dict[str, int] = field(default_factory=dict, repr=False)  # experts the MoE routes the bench batch to

    @property
    def experts(self) -> int:
        return self.spec.experts

    def check(self, opts: RunOptions, device: torch.device, strategies: tuple[str, ...]) -> None:
        check_inputs(self.spec, opts, device)
        if "moe" in opts.models:
            check_strategies(self.spec, strategies, device, opts.dtype)

    def load(self, opts: RunOptions, device: torch.device, dtype: torch.dtype, rank: int) -> None:
        """The task's data (the file decides its shape) and this rank's bench batch."""
        self.data = make_dataset(opts.samples, self.spec.input_dim, self.spec.classes, opts.seed, opts.test_fraction,
                                 opts.data, declared=opts.extra.get("declared_shape") or {})
        if opts.data:
            self.spec = replace(self.spec, input_dim=self.data.input_dim, classes=self.data.classes).validate()
        self.batch = bench_batch(self.data, opts.batch_size, rank, device, dtype)

    def identity(self) -> tuple[dict[str, Any], str]:
        assert self.data is not None
        return asdict(self.spec), self.data.fingerprint()

    def document(self, opts: RunOptions) -> dict[str, Any]:
        assert self.data is not None
        return {"spec": asdict(self.spec), "options": self.options(opts), "dataset": dataset_fields(self.data)}

    def plans(self, models: Sequence[str]) -> list[ModelPlan]:
        return plans(self.spec, models)

    def row_strategies(self, plan: ModelPlan, strategies: tuple[str, ...]) -> tuple[str | None, ...]:
        return strategies if plan.kind == "moe" else (None,)

    def points(self) -> list[Point]:
        assert self.batch is not None
        return [Point(self.batch.shape[0])]

    def fit_problem(self, plan: ModelPlan, opts: RunOptions, device: torch.device) -> str | None:
        """Why ``plan`` cannot be trained (or built) and parked here, or None: checked before allocating."""
        need = plan.memory_bytes(opts.batch_size, opts.dtype, training=opts.epochs > 0)
        problem = memory.fit_problem(need, device, f"{'training' if opts.epochs else 'building'} {plan.name}")
        if problem is None and device != PARK:
            problem = memory.fit_problem(4 * plan.params, PARK, f"parking {plan.name} in host memory")
        return problem

    def together_problem(self, plans: list[ModelPlan], opts: RunOptions, device: torch.device) -> str | None:
        return None  # parked in host memory: one model at a time on the device

    def build(self, r: Run, plan: ModelPlan) -> Built:
        """Build, train, convert and park one model; OutOfMemory (memory already released) if it cannot fit."""
        problem = self.fit_problem(plan, r.opts, r.device)
        if problem is not None:
            raise OutOfMemory(problem)  # nothing was allocated
        o = r.opts
        failure: tuple[str, int | None] | None = None
        try:
            model = plan.build(r.device, seed=o.seed)
            return self._trained(r, plan, model)
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

    def _trained(self, r: Run, plan: ModelPlan, model: nn.Module) -> Built:
        """``model`` trained, converted to the bench dtype and parked (when the run uses an accelerator)."""
        o, data = r.opts, self.data
        assert data is not None
        steps = o.epochs * -(-len(data.x_train) // o.batch_size)
        with r.ui.training(plan.name, steps) as step:
            tr = train(model, data, o.epochs, o.lr, o.batch_size, r.device, o.seed, step)
        model = prepare_for_inference(model, r.dtype)
        if isinstance(model, MoE):
            self.touched[plan.name] = experts_reached(model, self.batch)
        acc = tr.test_accuracy
        if r.dtype != torch.float32:
            acc = evaluate(model, data.x_test, data.y_test, o.batch_size, r.device, r.dtype)
        if r.device != PARK and r.team.parks:
            model.to(PARK)
            free(r.device)
        return Built(plan, model, tr, acc)

    def variant(self, r: Run, built: Built, point: Point, label: str, strategy: str | None
                ) -> tuple[Variant, str | None]:
        assert self.batch is not None
        plan = built.plan
        need = plan.memory_bytes(r.opts.batch_size, r.opts.dtype, training=False)
        return Variant(label, built.model, strategy, self.batch, plan.flops_per_inference, need,
                       parked=r.team.parks), None

    def record(self, r: Run, plan: ModelPlan, point: Point, rec: dict[str, Any]) -> dict[str, Any]:
        return {"experts_touched": self.touched[plan.name]} if plan.name in self.touched else {}

    # -- what a sweep reads of a point of this workload, before it runs --------------------------------------
    sweep_oom = "raise"  # a model out of memory skips the whole point: its crossover needs every model

    def options(self, opts: RunOptions) -> dict[str, Any]:
        return opts.as_dict()

    def key_fields(self) -> dict[str, Any]:
        return {}  # a seed point's key stays exactly what it always was

    def work_flops(self, opts: RunOptions) -> float:
        """FLOPs of training every model (forward + backward ~ 3 x forward, 2 FLOPs per MAC): time on top of
        the windows' fixed seconds."""
        train_rows = opts.samples * (1 - opts.test_fraction)
        return sum(3 * m.flops_per_inference * train_rows * opts.epochs for m in self.plans(opts.models))

    def seconds_floor(self, opts: RunOptions, roof: Any) -> float | None:
        return None  # training's time has no bound here

    def point_problem(self, opts: RunOptions, device: torch.device) -> str | None:
        """Why the point cannot fit: one model trains at a time and the trained ones are kept (parked in host
        memory, or on the CPU itself), so it needs every model's weights plus the largest one's training state."""
        weights = extra = 0
        for m in self.plans(opts.models):
            need = m.memory_bytes(opts.batch_size, opts.dtype, training=opts.epochs > 0)
            weights += 4 * m.params
            extra = max(extra, need - 4 * m.params)
        return memory.fit_problem(weights + extra, device, "training and keeping this point's models" if opts.epochs
                                  else "this point's models")

    def need_bytes(self, opts: RunOptions) -> int:
        return max(m.memory_bytes(opts.batch_size, opts.dtype, training=opts.epochs > 0)
                   for m in self.plans(opts.models))

    def bytes_read(self, plan: ModelPlan, point: Point, rec: dict[str, Any], dtype: str) -> float:
        """The weights the bench batch reads: the MoE's gate and the experts its trained gate routes that batch to
        (a batch of 1 reaches top_k of them, a collapsed gate fewer than all); every expert if not counted."""
        return plan.weight_bytes_read(dtype, rec.get("experts_touched")) or 0.0

    def stem(self) -> str | None:
        return self.preset


def run(spec: ModelSpec, opts: RunOptions, meter: Meter, ui: UI | None = None, save: bool = True,
        sleep: Callable[[float], None] | None = None, oom: str = "skip") -> tuple[dict, Path | None]:
    """Train every model of ``opts.models`` one at a time, then measure them in shuffled, repeated windows
    (``core.run`` on the seed's workload, in this process)."""
    w = Seed(spec, opts.extra.get("preset"))
    doc, path = run_workload(w, opts, Team(meter), ui, save, **({"sleep": sleep} if sleep else {}), oom=oom)
    assert doc is not None
    return doc, path
