"""The measured job of ``run --parallel expert``: the one run skeleton (``runner.core``) on every rank of a
torchrun job, for any workload whose MoE shards its experts (the seed's classifier, an LLM layer), with the
collectives that keep the ranks in step (``Ranks``, the skeleton's ``Team``).

Each rank checks and builds (trains) every model exactly as a single process does; the ranks agree on every
check and skip, so what any rank cannot run is left out on all of them. Then rank 0's weights are broadcast: the
MoE sharded over the ranks (``ExpertParallelMoE``), each dense baseline whole on every rank (data-parallel, each
rank its own inputs). Idle power is read on every rank at once; the windows follow the skeleton's shuffled
schedule (the same on every rank: it comes from the agreed seed), a rest between them. An expert-parallel
forward is a collective, so a window is a fixed batch count agreed at the model's first window (the slowest
rank's pace) instead of a time. Rank 0 gathers each window's per-rank figures into one job window
(``measure.records.window_record`` over the job's distinct devices) and each model's record is the skeleton's
over those windows, its ``parallel`` block the medians of theirs. No roofline: one device's bound says nothing
of a job over W of them.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import RunOptions
from ..device import device_sync, free
from ..energy.idle import IdlePower
from ..energy.meter import Measurement, Meter, NullMeter, weakest
from ..errors import ConfigError
from ..measure.guard import MeterFailed
from ..measure.records import WindowRecord, window_record
from ..measure.window import (
    BenchResult,
    caller,
    counted_window,
    fixed_count,
    latency_budget,
    latency_pass,
    warm_up,
)
from ..models.plan import ModelPlan
from ..runner import core
from ..runner.core import Built, Measured, Run, Variant, Workload
from ..storage.fileio import now_utc
from ..storage.results import check_writable
from .expert_parallel import EP_STRATEGY, MOE_LABEL, CommStats, ExpertParallelMoE
from .group import (
    Group,
    agree_max,
    agree_on_start,
    all_gather_object,
    barrier,
    broadcast_module,
    check_divisible,
    collective,
    gather_object,
    job_config,
    set_stage,
)

SHARED_METHODS = ("counter", "sampled")  # readings of a device itself; an estimate is one process's own
NOTE = ("MoE: experts sharded (an LLM layer's router and shared experts on every rank), tokens moved by "
        "all-to-all; dense: data-parallel, each rank its own inputs (an LLM layer's: tokens_per_forward tokens, "
        "the job's forward tokens_per_forward_job); every rank built or trained identically, rank 0's weights "
        "broadcast")


def check_options(opts: RunOptions) -> None:
    """Refuse what --parallel expert cannot honour, before any rendezvous or training (every rank alike)."""
    if opts.compile:
        raise ConfigError("--compile is not supported with --parallel expert: the expert-parallel forward's "
                          "all-to-alls and host-side split sizes break any captured graph, and --compile must "
                          "treat every model alike; drop --compile")
    if opts.strategies not in ((EP_STRATEGY,), ("auto",)):  # auto (the default) means: the fast one
        raise ConfigError(f"--parallel expert runs the local experts with the {EP_STRATEGY} strategy; "
                          f"drop --moe-strategy {','.join(opts.strategies)}")


def rank_meter(device: torch.device) -> Meter:
    """This rank's default meter: every real counter covering its own device (the estimate if none)."""
    from ..energy.select import auto_meter  # the meters' hardware libraries load only where a job runs

    return auto_meter(device)


def job_block(g: Group, meter: Meter, device_name: str, note: str) -> dict[str, Any]:
    """The results document's ``parallel`` block: the job's ranks, hosts and backend (a collective: every
    rank calls it)."""
    hosts = all_gather_object(g, {"rank": g.rank, "hostname": platform.node(), "device": str(g.device),
                                  "device_name": device_name, "meter": meter.name})
    return {"mode": "expert", "world_size": g.world_size, "backend": g.backend, "collective_timeout_s": g.timeout_s,
            "ranks": hosts, "nodes": len({h["hostname"] for h in hosts}), "note": note}


def agreed_reasons(g: Group, mine: dict[str, str]) -> dict[str, str]:
    """Every rank's (name -> why it cannot run here) united, each with the first rank that said so: what any
    rank cannot run is left out on all of them, or they would wait on its collectives."""
    out: dict[str, str] = {}
    for rank, theirs in enumerate(all_gather_object(g, mine)):
        for name, why in theirs.items():
            out.setdefault(name, f"rank {rank}: {why}")
    return out


def place_model(model: nn.Module, kind: str, g: Group) -> nn.Module:
    """What every rank measures, on its device with rank 0's weights: an MoE sharded, a dense model whole."""
    if kind == "moe":
        return ExpertParallelMoE.from_moe(model, g)
    return broadcast_module(model.to(g.device), g)


# ---------------------------------------------------------------------------------------------------------
# Idle power: every rank at once, summed over the job's distinct devices


def per_device(parts: list[tuple[int, str, dict[str, float], dict[str, str], str]],
               keys: dict[tuple[int, str], str | None] | None = None
               ) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """(value by ``host:device``, method by ``host:device``, flags) from each rank's (rank, host, values by
    device, method by device, method). A device two ranks on one host both read with a counter (the CPU
    package under RAPL) counts once; a per-process estimate is each rank's own, so both are kept (the later
    rank's as ``host:device@rankN``). ``keys``, when given, gets each (rank, device)'s key (None: counted once
    under the first rank's), so that what else a rank says of its devices lands under the same key."""
    values: dict[str, float] = {}
    methods: dict[str, str] = {}
    seen: dict[str, int] = {}
    flags: list[str] = []
    keys = {} if keys is None else keys
    for rank, host, by_device, method_by_device, method in parts:
        for dev, v in by_device.items():
            how = method_by_device.get(dev, method)
            key = f"{host}:{dev}"
            if key in seen and how in SHARED_METHODS:
                flags.append(f"{dev} on {host} read by ranks {seen[key]} and {rank}: counted once")
                keys[(rank, dev)] = None
                continue
            key = f"{key}@rank{rank}" if key in seen else key
            seen[key], values[key], methods[key] = rank, v, how
            keys[(rank, dev)] = key
    return values, methods, flags


def job_idle(ranks: list[dict[str, Any]]) -> IdlePower:
    """The job's idle power over its distinct devices, keyed as its windows' energy (``host:device``)."""
    idles = [r["idle"] or {} for r in ranks]
    power, _, flags = per_device([(r["rank"], r["hostname"], i.get("power_by_device_w") or {}, {},
                                   i.get("method", "none")) for r, i in zip(ranks, idles)])
    missing = [r["rank"] for r, i in zip(ranks, idles) if i.get("power_by_device_w") is None]
    if missing:
        flags = [f"idle power not measured on rank(s) {missing}: no dynamic energy"]
    flags += sorted({f for i in idles for f in i.get("flags", [])})
    return IdlePower(seconds=max(i.get("seconds", 0.0) for i in idles),
                     method=weakest([i.get("method", "none") for i in idles]),
                     power_by_device_w=None if missing else power, flags=flags)


def idle_phase(r: Run, g: Group) -> tuple[IdlePower | None, dict[str, Any] | None]:
    """Idle power read by every rank at once, after run's rest; rank 0 gets the job's (None elsewhere, and
    everywhere with --idle-seconds 0)."""
    if r.opts.idle_seconds <= 0:
        return None, None
    set_stage("reading idle power")
    barrier(g)  # every rank rests and reads together: no rank's training inside another's idle reading
    _, mine = core.idle_phase(r)
    ranks = gather_object(g, {"rank": g.rank, "hostname": platform.node(), "idle": mine})
    if ranks is None:
        return None, None
    idle = job_idle(ranks)
    return idle, {**idle.as_dict(), "per_rank": ranks}


# ---------------------------------------------------------------------------------------------------------
# One rank's window: a fixed batch count, the same on every rank


@dataclass(frozen=True)
class Count:
    """Forwards each rank runs for one model, agreed once at the slowest rank's pace: collectives need the
    same count on every rank, so no loop here may run by the clock."""

    batches: int  # in each counted window: --duration on the slowest rank
    warm: int  # before each later window: --warmup (at least 3)
    latency: int  # single synced forwards after each window


@dataclass
class RankResult:
    """One rank's figures for one window."""

    rank: int
    hostname: str
    device: str
    batch_size: int
    batches: int
    seconds: float
    latency_ms: list[float]
    energy: Measurement
    comm: dict[str, Any] | None
    flags: list[str] = field(default_factory=list)
    failed: str | None = None  # the meter's failure: the window ran, its energy was not read

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "energy": self.energy.as_dict()}


def timed(forward: Callable[[], Any], sync: Callable[[], None], n: int) -> float:
    """Seconds of ``n`` forwards, synced at both ends."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        forward()
    sync()
    return time.perf_counter() - t0


def calibrate(forward: Callable[[], Any], sync: Callable[[], None], duration: float, warmup: float,
              g: Group) -> Count:
    """Batches quadrupling until a timed run is long enough to trust (every rank taking the slowest time),
    then --warmup seconds of them, timed for a better figure: the model's counts, the same on every rank."""
    warm_up(forward, sync, 0.0)  # cold: allocator, first kernel launches (a fixed 3: no clock)
    n, target = 2, min(0.5, 0.1 * duration)
    took = agree_max(g, timed(forward, sync, n))
    while took < target and n < 4096:
        n *= 4
        took = agree_max(g, timed(forward, sync, n))
    per_batch = took / n
    warm = fixed_count(per_batch, warmup) if warmup > 0 else 0
    if warm >= 5:
        per_batch = agree_max(g, timed(forward, sync, warm) / warm)
    latency = max(10, fixed_count(per_batch, latency_budget(duration), at_most=200))
    return Count(fixed_count(per_batch, duration), max(3, warm), latency)


def fixed_window(forward: Callable[[], Any], meter: Meter, sync: Callable[[], None], n: int,
                 on_tick: Callable[[float], None] | None) -> tuple[float, Measurement, list[str], str | None]:
    """(seconds, energy, flags, failure) of ``counted_window`` over exactly ``n`` forwards. A meter that
    fails still runs all ``n`` (the other ranks wait on each one's collectives); the failure says why."""
    ran = [0]

    def counted() -> None:
        forward()
        ran[0] += 1

    t0 = time.perf_counter()
    try:
        # the other ranks on this host are the job's own work, not contention
        _, seconds, energy, flags = counted_window(counted, meter, sync, 0.0, batches=n, on_tick=on_tick,
                                                   others=False)
        return seconds, energy, flags, None
    except MeterFailed as e:
        for _ in range(n - ran[0]):
            forward()
        sync()
        seconds = time.perf_counter() - t0
        return seconds, Measurement(seconds, "none", meter.name, flags=[f"window failed: {e}"]), [], str(e)


@torch.inference_mode()
def measure_ranks(model: nn.Module, batch: Tensor, duration: float, warmup: float, meter: Meter, g: Group,
                  count: Count | None = None, on_tick: Callable[[float], None] | None = None
                  ) -> tuple[RankResult, Count]:
    """One window on this rank: ``count.batches`` forwards after a barrier, so that every rank's window
    holds the same work; the model's first window agrees on the count (``calibrate``) and warms up with it."""
    model.eval()
    forward, sync = caller(model, batch), device_sync(batch.device)
    if count is None:
        count = calibrate(forward, sync, duration, warmup, g)
    else:
        warm_up(forward, sync, 0.0, at_least=count.warm)  # a fixed count: every forward may be a collective
    stats: CommStats | None = getattr(model, "stats", None)
    barrier(g)
    if stats is not None:
        stats.reset()
    seconds, energy, flags, failed = fixed_window(forward, meter, sync, count.batches, on_tick)
    comm = None
    if stats is not None:
        stats.harvest(wait=True)  # after the window's closing sync: every event has completed
        comm = stats.as_dict()
    lat = latency_pass(forward, sync, 0.0, at_least=count.latency, at_most=count.latency)
    return RankResult(g.rank, platform.node(), str(batch.device), batch.shape[0], count.batches, seconds, lat,
                      energy, comm, flags, failed), count


# ---------------------------------------------------------------------------------------------------------
# The job's window: every rank's figures in one record


def _by_host(ranks: list[dict[str, Any]], key: str, keys: dict[tuple[int, str], str | None]) -> dict[str, Any]:
    """Each rank's per-device ``energy[key]`` (trace, device state) under its device's key in the job's energy
    (``per_device``'s ``keys``): two ranks' readings of one device never overwrite each other, and a device
    counted once keeps the reading of the rank whose joules count."""
    out: dict[str, Any] = {}
    for r in ranks:
        for d, v in (r["energy"].get(key) or {}).items():
            k = keys.get((r["rank"], d), f"{r['hostname']}:{d}")
            if k is None:
                continue
            out[f"{k}@rank{r['rank']}" if k in out else k] = v
    return out


def job_measurement(ranks: list[dict[str, Any]]) -> Measurement:
    """The job's window as one Measurement over its distinct devices (``host:device``): the longest rank's
    seconds (each device keeps its rank's own, for its idle share and its trace), the weakest method; no joules at
    all if any rank measured nothing (never a partial sum)."""
    es = [r["energy"] for r in ranks]
    keys: dict[tuple[int, str], str | None] = {}
    joules, methods, flags = per_device([(r["rank"], r["hostname"], e["joules_by_device"] or {},
                                          e.get("method_by_device") or {}, e["method"]) for r, e in zip(ranks, es)],
                                        keys)
    missing = [r["rank"] for r, e in zip(ranks, es) if e["joules_by_device"] is None]
    if missing:
        flags = [f"energy not measured on rank(s) {missing}: job total withheld"]
    seconds = {r["rank"]: r["seconds"] for r in ranks}
    return Measurement(
        seconds=max(r["seconds"] for r in ranks), method=weakest([e["method"] for e in es]),
        meter="+".join(sorted({e["meter"] for e in es})), joules_by_device=None if missing else joules,
        devices_covered=sorted({f"{r['hostname']}:{d}" for r, e in zip(ranks, es) for d in e["devices_covered"]}),
        flags=flags + sorted({f for e in es for f in e["flags"]}), trace=_by_host(ranks, "trace", keys) or None,
        trace_period_s=es[0].get("trace_period_s"), method_by_device=methods,
        state_begin=_by_host(ranks, "state_begin", keys), state_end=_by_host(ranks, "state_end", keys),
        seconds_by_device={k: seconds[rank] for (rank, _d), k in keys.items() if k is not None})


def job_energy(ranks: list[dict[str, Any]]) -> tuple[float | None, str, list[str]]:
    """(total J, method, flags) over every rank's devices, each distinct device once (``job_measurement``)."""
    m = job_measurement(ranks)
    return m.joules, m.method, m.flags


def parallel_block(ranks: list[dict[str, Any]], inferences: int) -> dict[str, Any]:
    """Each rank's share of one window and, for the MoE, the all-to-all's time, calls and bytes."""
    comm = [r["comm"] for r in ranks]
    par: dict[str, Any] = {
        "per_rank": [{"rank": r["rank"], "hostname": r["hostname"], "device": r["device"], "batches": r["batches"],
                      "window_s": r["seconds"], "energy_j": r["energy"]["energy_j"],
                      "energy_by_device_j": r["energy"]["joules_by_device"],
                      "energy_method": r["energy"]["method"], "energy_devices": r["energy"]["devices_covered"],
                      **(r["comm"] or {})} for r in ranks],
        "per_rank_joules": [r["energy"]["energy_j"] for r in ranks],
    }
    if all(c is not None for c in comm):
        sent = sum(c["all_to_all_bytes"] for c in comm)
        par.update(
            all_to_all_seconds_by_rank=[c["all_to_all_seconds"] for c in comm],
            all_to_all_seconds=max(c["all_to_all_seconds"] for c in comm),
            all_to_all_share_of_window=max(c["all_to_all_seconds"] / r["seconds"] for c, r in zip(comm, ranks)),
            all_to_all_bytes_by_rank=[c["all_to_all_bytes"] for c in comm],
            all_to_all_bytes=sent,
            all_to_all_bytes_per_inference=sent / inferences,
            all_to_all_calls=sum(c["all_to_all_calls"] for c in comm),
        )
    return par


def job_record(ranks: list[dict[str, Any]], flops_per_inference: int, idle: IdlePower | None = None
               ) -> dict[str, Any]:
    """One window of the whole job, as run's window record (``measure.records.window_record``): all ranks'
    inferences over the longest rank's seconds and the job's distinct devices' joules, plus ``parallel``."""
    energy = job_measurement(ranks)
    res = BenchResult(ranks[0]["batch_size"], sum(r["batches"] for r in ranks), energy.seconds, flops_per_inference,
                      [x for r in ranks for x in r["latency_ms"]], energy,
                      sorted({f for r in ranks for f in r["flags"]}), idle)
    rec: dict[str, Any] = {**window_record(res), "parallel": parallel_block(ranks, res.inferences)}
    failed = [f"rank {r['rank']}: {r['failed']}" for r in ranks if r.get("failed")]
    if failed:
        rec["failed"] = "; ".join(failed)
    return rec


# ---------------------------------------------------------------------------------------------------------
# Windows and records


def job_window(r: Run, g: Group, v: Variant, rep: int, order: int, counts: dict[str, Count],
               idle: IdlePower | None, log: Callable[[str], None]) -> dict[str, Any] | None:
    """One window of ``v`` on every rank; rank 0 gets the job's record of it (None elsewhere). ``v``'s
    before/after hooks run on every rank (the after hook may be a collective: the job's expert load)."""
    set_stage(f"measuring {v.label}")
    log(f"{g.where()}: measuring {v.label} (window {rep + 1} of {r.opts.repeats})")
    head = {"repeat": rep, "order": order, "started_utc": now_utc(), **v.head}
    if v.before_window is not None:
        v.before_window()
    with r.ui.measuring(f"{v.label} ({rep + 1}/{r.opts.repeats})", r.opts.duration) as tick:
        res, counts[v.label] = measure_ranks(v.model, v.batch, r.opts.duration, r.opts.warmup, r.meter, g,
                                             counts.get(v.label), tick)
    after = v.after_window() if v.after_window is not None else {}
    ranks = gather_object(g, res.as_dict())
    if ranks is None:
        return None
    return {**head, **job_record(ranks, v.flops_per_inference, idle), **after}


def median_of(values: list[Any]) -> Any:
    """Element-wise median of like-shaped values (dicts, lists, numbers) over windows; text: the first's."""
    first = values[0]
    if all(v == first for v in values):
        return first
    if all(isinstance(v, dict) for v in values):
        return {k: median_of([v.get(k) for v in values]) for k in first}
    if all(isinstance(v, list) and len(v) == len(first) for v in values):
        return [median_of(list(col)) for col in zip(*values)]
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if nums and len(nums) == sum(v is not None for v in values):
        return statistics.median(nums)
    return first


def parallel_median(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """A model's ``parallel`` block: the medians of its windows' (the failed ones only if all failed)."""
    return median_of([w["parallel"] for w in windows if not w.get("failed")] or [w["parallel"] for w in windows])


# ---------------------------------------------------------------------------------------------------------
# The team


class Ranks(core.Team):
    """The skeleton's team on the ranks of a torchrun job: every check and skip agreed, the MoE sharded, the
    windows a batch count agreed at the slowest rank's pace; rank 0 gathers the job's figures."""

    parks, bounds = False, False

    def __init__(self, g: Group, meter_factory: Callable[[torch.device], Meter] | None = None,
                 log: Callable[[str], None] | None = None, check_out: bool = True) -> None:
        self.g, self.factory, self.log = g, meter_factory or rank_meter, log or (lambda s: None)
        self.check_out = check_out  # rank 0 checks --out in the agreement: it saves, here or in its caller
        self.rank, self.world, self.is_main = g.rank, g.world_size, g.is_main
        self._meter: Meter = NullMeter("start-up failed")

    def strategies(self, opts: RunOptions) -> tuple[str, ...]:
        return (EP_STRATEGY,)

    def start(self, w: Workload, checks: Callable[[], torch.device], opts: RunOptions) -> torch.device:
        """Every rank's checks, then one agreement: every rank raises the first rank's error, or none does."""
        set_stage("start-up checks")
        err: str | None = None
        identity: tuple[dict[str, Any], str] = ({}, "-")
        try:
            check_options(opts)
            check_divisible(w.experts, self.world)
            self._meter = self.factory(self.g.device)
            checks()
            identity = w.identity()
            if self.is_main and self.check_out:
                check_writable(opts.out)
        except ConfigError as e:
            err = str(e)
        agree_on_start(self.g, job_config(identity[0], opts, identity[1], self.g.timeout_s), err)
        return self.g.device

    def meter(self) -> Meter:
        return self._meter

    def agree(self, reasons: dict[str, str]) -> dict[str, str]:
        return agreed_reasons(self.g, reasons)

    def label(self, plan: ModelPlan, strategy: str | None) -> tuple[str, str | None]:
        """(label, strategy) of a model's row: the MoE runs expert-parallel, a dense model data-parallel."""
        return (MOE_LABEL, EP_STRATEGY) if plan.kind == "moe" else (plan.name, None)

    def place(self, built: Built) -> Built:
        """``built``'s model placed (the full MoE dropped as soon as its shard exists)."""
        set_stage(f"broadcasting {built.name}")
        placed = replace(built, model=place_model(built.model, built.plan.kind, self.g))
        free(self.g.device)
        return placed

    def header(self, doc: dict[str, Any]) -> None:
        doc["parallel"] = job_block(self.g, self._meter, doc["environment"]["device_name"], NOTE)

    def roofline(self, r: Run, notices: list[str]) -> None:
        return None

    def idle(self, r: Run) -> tuple[IdlePower | None, dict[str, Any] | None]:
        return idle_phase(r, self.g)

    def measure(self, r: Run, variants: dict[str, Variant], idle: IdlePower | None, out: Measured,
                first_order: int) -> None:
        """Windows of a batch count agreed at each model's first window; any failure ends the job (in step)."""
        counts: dict[str, Count] = {}
        core.measure_all(r, variants, out, first_order,
                         lambda v, rep, order: job_window(r, self.g, v, rep, order, counts, idle, self.log))

    def extra(self, windows: list[WindowRecord]) -> dict[str, Any]:
        return {"parallel": parallel_median(windows) if windows else {}}  # type: ignore[arg-type]

    def sum_(self, t: Tensor) -> None:
        with collective(self.g, "all-reduce"):
            dist.all_reduce(t, group=self.g.pg)

    def stem_suffix(self) -> str:
        return f"-ep{self.world}"

    def finish(self) -> None:
        free(self.g.device)
        set_stage("finishing")
        barrier(self.g)


def run_job(w: Workload, opts: RunOptions, g: Group, meter_factory: Callable[[torch.device], Meter] | None = None,
            ui: core.UI | None = None, log: Callable[[str], None] | None = None, save: bool = True,
            sleep: Callable[[float], None] = time.sleep, check_out: bool | None = None
            ) -> tuple[dict[str, Any] | None, Path | None]:
    """Every rank calls this; rank 0 returns the job's document (and its path when saved), others (None, None).

    ``meter_factory(device)`` gives this rank's meter over its own devices (default: ``rank_meter``). Rank 0 checks
    --out in the start-up agreement when it saves, or with ``check_out`` (its caller saves the document)."""
    team = Ranks(g, meter_factory, log, save if check_out is None else check_out)
    return core.run(w, opts, team, ui if g.is_main else None, save, sleep)
