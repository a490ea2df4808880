"""The measured job of ``run --arch X --parallel expert``: run_llm's phases on every rank of a torchrun job,
with the seed job's collectives (``job.py``) keeping the ranks in step.

Each rank checks and builds every model as ``run_llm`` does (seeded random weights, the routing's
``BenchRouter``); then rank 0's weights are broadcast: the MoE layer sharded (``ExpertParallelMoE``: its own
router, this rank's E/W experts, the shared experts whole on every rank), each dense FFN whole on every rank
(data-parallel, as the seed job runs its dense models). ``--tokens T`` is what each rank feeds one forward:
rank r's hidden states are the (r+1)-th [max T, d] block of the run's fixed-seed normal stream (rank 0's
are a single-process run's), so one forward of the job holds W*T tokens, and a window's inferences are
every rank's tokens. The experts' load is every rank's pairs summed after the window (one all-reduce), so
``experts_touched`` and the weight bytes read are the job's forward's (W*T tokens). Idle power, the shuffled
schedule and the windows of an agreed batch count are the seed job's; a fixed routing (balanced, skewed)
assigns the job's W*T tokens as run_llm assigns W*T (``JobRouter``); the records are run_llm's per-token
records over the job's windows, plus the job's ``parallel`` block. No roofline: one device's bound says
nothing of a job over W of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import memory
from ..config import RunOptions
from ..device import free
from ..energy.idle import IdlePower
from ..energy.meter import Meter, NullMeter
from ..errors import ConfigError
from ..llm_pipeline import (
    LayerPlan,
    LayerRun,
    arrange,
    bench_router,
    build_one,
    check_tokens,
    layer_plans,
    layer_stem,
    load_fields,
    start_layer_run,
    token_figures,
)
from ..measure.records import measured_record, skipped_record
from ..memory import OutOfMemory
from ..models.archs import Arch
from ..models.llm import MoELayer
from ..models.routing import BenchRouter, RoutingMode, assignment, parse_routing
from ..pipeline import UI, Measured, SilentUI, Variant
from ..results import check_writable, run_stem, write_atomic
from .expert_parallel import EP_STRATEGY, ExpertParallelMoE
from .group import Group, agree_on_start, barrier, check_divisible, collective, job_config, set_stage
from .job import (
    agreed_reasons,
    check_options,
    idle_phase,
    job_block,
    job_label,
    measure_all,
    parallel_median,
    place_model,
    rank_meter,
)

NOTE = ("MoE layer: routed experts sharded, tokens moved by all-to-all, router and shared experts on every rank; "
        "dense FFNs: data-parallel; each rank feeds its own tokens_per_forward tokens (the job's forward: "
        "tokens_per_forward_job), rank 0's weights broadcast")


def layer_label(plan: LayerPlan, tokens: int) -> tuple[str, str | None]:
    """(label, strategy) of a row: ``moe[expert_parallel]@T=8``, ``dense_total@T=8``."""
    label, strategy = job_label(plan)
    return f"{label}@T={tokens}", strategy


class JobRouter(BenchRouter):
    """A ``BenchRouter`` on rank ``rank`` of ``world``: a fixed routing (balanced, skewed) assigns the job's
    forward of W*T tokens as run_llm assigns W*T, this rank's T tokens taking rows [rank*T, (rank+1)*T).
    Each rank alone would deal its T tokens to the very experts every other rank deals them to."""

    def __init__(self, bench: BenchRouter, rank: int, world: int) -> None:
        super().__init__(bench.router, bench.num_experts, bench.top_k, bench.mode, bench.seed)
        self.rank, self.world = rank, world
        self._rows: dict[tuple[int, str], Tensor] = {}  # (T, device) -> [T, k]

    def fixed_for(self, tokens: int, device: torch.device) -> Tensor | None:
        key = (tokens, str(device))
        if key not in self._rows:
            job = assignment(self.mode, self.world * tokens, self.num_experts, self.top_k, self.seed)  # [W*T, k]
            if job is None:
                return None
            self._rows[key] = job[self.rank * tokens:(self.rank + 1) * tokens].to(device)  # [T, k]
        return self._rows[key]


def rank_inputs(seed: int, rows: int, d_model: int, rank: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rank ``rank``'s hidden states [rows, d]: the (rank+1)-th block of run_llm's fixed-seed normal stream,
    drawn on the host one block at a time (rank 0's are a single-process run's inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_model, generator=g)
    for _ in range(rank):
        x = torch.randn(rows, d_model, generator=g)
    return x.to(device=device, dtype=dtype)  # [rows, d]


# ---------------------------------------------------------------------------------------------------------
# Start-up: every rank's checks, then one agreement


def start_layer_job(arch: Arch, opts: RunOptions, tokens: Any, routing: str | RoutingMode, g: Group,
                    meter_factory: Callable[[torch.device], Meter] | None, ui: UI, sleep: Callable[[float], None],
                    save: bool) -> tuple[LayerRun, dict[str, Any]]:
    """This rank's LayerRun (its own inputs) and the results document; every rank raises the first rank's
    error, or none does. The checks are run_llm's, on this rank's device, the MoE's strategy ``grouped``."""
    set_stage("start-up checks")
    meter: Meter = NullMeter("start-up failed")
    err: str | None = None
    started: tuple[LayerRun, dict[str, Any]] | None = None
    spec: dict[str, Any] = {"arch": asdict(arch), "tokens": tokens, "routing": str(routing)}
    try:
        check_options(opts)
        check_divisible(arch.experts, g.world_size)
        tokens = check_tokens(tokens)
        mode = routing if isinstance(routing, RoutingMode) else parse_routing(routing)
        spec.update(tokens=tokens, routing=mode.text)
        meter = (meter_factory or rank_meter)(g.device)
        here = replace(opts, device=str(g.device), strategies=(EP_STRATEGY,))
        started = start_layer_run(arch, here, tokens, mode, meter, ui, sleep)
        if g.is_main and save:
            check_writable(opts.out)
    except ConfigError as e:
        err = str(e)
    agree_on_start(g, job_config(spec, opts, "-", g.timeout_s), err)
    assert started is not None
    r, doc = started
    if g.rank:
        r.inputs = rank_inputs(opts.seed, max(r.tokens), arch.d_model, g.rank, g.device, r.dtype)
    doc["options"] = {k: v for k, v in opts.as_dict().items() if k in doc["options"]}  # as given, not per rank
    doc["parallel"] = job_block(g, meter, doc["environment"]["device_name"], NOTE)
    return r, doc


def arrange_agreed(r: LayerRun, g: Group, todo: list[LayerPlan]) -> tuple[list[list[LayerPlan]], dict[str, str],
                                                                         list[str]]:
    """run_llm's ``arrange`` on every rank, agreed: a model any rank cannot fit is skipped on all, and if any
    rank must measure the models one at a time, all do."""
    _, skipped, notices = arrange(r, todo)
    skipped = agreed_reasons(g, skipped)
    split = agreed_reasons(g, {"split": notices[0]} if notices else {})
    fits = [p for p in todo if p.name not in skipped]
    if split:
        return [[p] for p in fits], skipped, list(split.values())
    return ([fits] if fits else []), skipped, []


# ---------------------------------------------------------------------------------------------------------
# Build, place, and the rows of one model


def build_agreed(r: LayerRun, g: Group, plan: LayerPlan) -> nn.Module | str:
    """``plan``'s model built on every rank as run_llm builds it (its router a ``JobRouter``), or on every rank
    why not, when any rank ran out of memory building it."""
    set_stage(f"building {plan.name}")
    model: nn.Module | None = None
    mine: dict[str, str] = {}
    try:
        model = build_one(r, plan)
        if isinstance(model, MoELayer) and isinstance(model.router, BenchRouter):
            model.router = JobRouter(model.router, g.rank, g.world_size).to(r.device)
    except OutOfMemory as e:
        mine[plan.name] = e.reason
    why = agreed_reasons(g, mine).get(plan.name)
    if why is None and model is not None:
        return model
    model = None
    free(r.device)
    return why or "not built"


def job_load(router: BenchRouter, plan: LayerPlan, dtype: str, g: Group, tokens: int) -> dict[str, Any]:
    """run_llm's load fields over the job: every rank's pairs per expert summed (a collective, after the
    window), read as forwards of ``tokens`` = W*T tokens."""
    with collective(g, "all-reduce"):
        dist.all_reduce(router.expert_pairs, group=g.pg)  # [E] in place: reset before the next window
    return load_fields(router, plan, dtype, tokens)


def layer_rows(r: LayerRun, g: Group, plan: LayerPlan, model: nn.Module, stopped: dict[str, str]
               ) -> dict[str, Variant]:
    """``model``'s row at each token count; a token count whose activations any rank cannot fit now goes to
    ``stopped`` (a skipped record) on every rank. The MoE's worst case holds every rank's pairs at once."""
    router = bench_router(model.moe) if isinstance(model, ExpertParallelMoE) else None
    W = g.world_size
    rows: dict[str, Variant] = {}
    for T in r.tokens:
        label, strategy = layer_label(plan, T)
        need = plan.activation_bytes(W * T if router is not None else T)
        rows[label] = Variant(label, model, strategy, r.batch(T), plan.flops_per_token, need, parked=False,
                              head={"tokens_per_forward": T},
                              before_window=router.reset_load if router is not None else None,
                              after_window=partial(job_load, router, plan, r.opts.dtype, g, W * T)
                              if router is not None else None)
    mine = {label: why for label, v in rows.items()
            if (why := memory.fit_problem(v.need_bytes, r.device, f"measuring {label}")) is not None}
    stopped.update(agreed_reasons(g, mine))
    return {label: v for label, v in rows.items() if label not in stopped}


def measure_layer_groups(r: LayerRun, g: Group, groups: list[list[LayerPlan]], idle: IdlePower | None,
                         skipped: dict[str, str], log: Callable[[str], None]) -> Measured:
    """Each group built, placed (the full MoE dropped once its shard exists), measured and released in turn;
    rank 0 gets every row's windows (empty lists elsewhere)."""
    out = Measured({})
    order = 0
    for group in groups:
        rows: dict[str, Variant] = {}
        for plan in group:
            model = build_agreed(r, g, plan)
            if isinstance(model, str):
                skipped[plan.name] = model
                r.ui.info(f"{plan.name}: skipped, {model}")
                continue
            set_stage(f"broadcasting {plan.name}")
            placed = place_model(model, plan.kind, g)
            del model
            free(r.device)
            rows.update(layer_rows(r, g, plan, placed, out.stopped))
        out.windows.update(measure_all(r, g, rows, idle, log, first_order=order))
        order += r.opts.repeats * len(rows)
        del rows
        free(r.device)
    return out


# ---------------------------------------------------------------------------------------------------------
# Records and the job


def layer_job_records(r: LayerRun, g: Group, todo: list[LayerPlan], skipped: dict[str, str], m: Measured,
                      idle: IdlePower | None) -> list[dict[str, Any]]:
    """run_llm's rows (token count by token count, models in plan order) over the job's windows: the
    per-token fields of the job's forward (W*T tokens), ``tokens_per_forward`` each rank's T."""
    W, dtype = g.world_size, r.opts.dtype
    out: list[dict[str, Any]] = []
    for T in r.tokens:
        for plan in todo:
            label, strategy = layer_label(plan, T)
            ws = m.windows.get(label) or []
            if ws:
                rec = dict(measured_record(label, plan.fields(), strategy, dtype, None, None, idle, ws))  # type: ignore[arg-type]
                rec["parallel"] = parallel_median(ws)
            else:
                why = skipped.get(plan.name) or m.stopped.get(label) or "not measured"
                rec = dict(skipped_record(label, plan.fields(), strategy, dtype, why))
                rec["parallel"] = {}
            rec.update(token_figures(r, plan, W * T, rec))
            rec["tokens_per_forward"] = T
            rec["parallel"]["tokens_per_forward_job"] = W * T
            out.append(rec)
            if rec["status"] == "measured":
                r.ui.info(label)
    return out


def run_layer_job(arch: Arch, opts: RunOptions, tokens: Any, routing: str | RoutingMode, g: Group,
                  meter_factory: Callable[[torch.device], Meter] | None = None, ui: UI | None = None,
                  log: Callable[[str], None] | None = None, save: bool = True,
                  sleep: Callable[[float], None] = time.sleep) -> tuple[dict[str, Any] | None, Path | None]:
    """Every rank calls this; rank 0 returns the job's document (and its path when saved), others (None, None).

    ``meter_factory(device)`` gives this rank's meter over its own devices (default: ``rank_meter``).
    """
    ui = ui if g.is_main and ui is not None else SilentUI()
    log = log or (lambda s: None)
    r, doc = start_layer_job(arch, opts, tokens, routing, g, meter_factory, ui, sleep, save)
    todo = layer_plans(arch, opts.models)
    groups, skipped, doc["notices"] = arrange_agreed(r, g, todo)
    idle, doc["idle"] = idle_phase(r, g) if groups else (None, None)
    measured = measure_layer_groups(r, g, groups, idle, skipped, log)
    if g.is_main:
        doc["models"] = layer_job_records(r, g, todo, skipped, measured, idle)
    free(g.device)
    set_stage("finishing")
    barrier(g)
    if not g.is_main:
        return None, None
    path = write_atomic(doc, opts.out, run_stem(doc, layer_stem(arch.name), f"-ep{g.world_size}")) if save else None
    return doc, path
