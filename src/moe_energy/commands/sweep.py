"""`moe-energy sweep`, `report`, `export` and `merge`: the grid, its store, and the answer drawn from it."""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import sqlite3
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import CAP_KEYS, CARBON_KEYS, ConfigError, resolve_caps, resolve_carbon
from ..storage.fileio import check_named, check_new_file, create_atomic, os_reason, path_exists
from ..storage.store import DEFAULT_DB, Store, damaged
from . import command, console, err_console, interruptible, record_saved
from .options import (
    add_energy_arguments,
    add_power_arguments,
    add_run_arguments,
    add_shape_arguments,
    meter_from_args,
)
from .power import restore_status

# Flags of the sweep itself, not run options: kept out of the grid's config.
SWEEP_FLAGS = {"command", "config", "db", "resume", "shard", "dry_run", "meter", "cpu_tdp_watts"}


def _db_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A database that turns out damaged part-way through a read: one line and exit 2, never a traceback."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except sqlite3.DatabaseError as e:
            raise ConfigError(damaged(db_path(args), e)) from None

    return wrapped


def db_path(args: argparse.Namespace) -> Path:
    """The one answer to "which database": ``--db``, else (a sweep's) under ``--out``, else the default; a name
    the OS cannot use is refused in one line now. (report's --out is the report's folder, not the store's.)"""
    out = getattr(args, "out", None) if args.command == "sweep" else None
    check_named(getattr(args, "db", None), "--db", DEFAULT_DB)
    db = Path(args.db) if getattr(args, "db", None) else Path(out) / "moe-energy.db" if out else Path(DEFAULT_DB)
    path_exists(db, f"--db {db}")  # only to refuse a name the OS cannot use, now
    return db


def _interruptible(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """report, export, merge: a signal runs every ``finally`` (so their temp files go), then one line and 128 + N."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        return interruptible(lambda: handler(args), lambda: "no partial file was left behind; run the command again")

    return wrapped


# -- sweep -----------------------------------------------------------------------------------------------
def _sweep_args(p: argparse.ArgumentParser) -> None:
    from ..runner.model import WHOLE_PROTOCOL

    p.conflict_handler = "resolve"  # the grid flags below replace run's single-valued ones
    add_shape_arguments(p)
    add_run_arguments(p)
    add_energy_arguments(p)
    g = p.add_argument_group("sweep grid (comma lists: every combination is one point)")
    g.add_argument("--grid", help="built-in grid: seed (the blog's small, large, xl, xxl), scale (a geometric "
                   "ladder of total sizes through them at E/k = 4) or llm (every LLM layer preset x tokens 1, 4, "
                   "16, ..., 4096; unless set: --repeats 2 --warmup 0.5 --cooldown 0 --max-forward-s = --duration)")
    g.add_argument("--max-params", dest="max_params", help="leave out shapes above this many total parameters, "
                   "e.g. 5e7 (an LLM layer: the MoE layer's total)")
    g.add_argument("--per-decade", dest="per_decade", type=int, help="scale grid: sizes per decade (default 4)")
    g.add_argument("--preset", help="comma list of presets the shape axes start from (default small)")
    g.add_argument("--experts", help="comma list of expert counts E, e.g. 8,16")
    g.add_argument("--hidden", help="comma list of expert hidden widths H, e.g. 256,512,1024")
    g.add_argument("--layers", help="comma list of hidden layers per expert L (--model: one N, each model's first N "
                   "layers; default the largest N that fits)")
    g.add_argument("--top-k", dest="top_k", help="comma list of experts per token k, e.g. 1,2")
    g.add_argument("--batch-size", dest="batch_size", help="comma list of batch sizes (training and inference)")
    g.add_argument("--dtype", help="comma list of float32, bfloat16, float16 (benchmark dtype; default float32, "
                   "LLM layers bfloat16 on a GPU with native support)")
    g.add_argument("--repeats", help="comma list of measurement windows per model (default 3; --model: "
                   f"{WHOLE_PROTOCOL['repeats']}; --grid llm: 2)")
    g.add_argument("--config", help="TOML with run options and any axis as a list (flags override it)")
    _layer_args(p)
    _model_args(p)
    add_power_arguments(p)
    g = p.add_argument_group("power caps as a grid axis")  # replace run's cap flags (conflict: resolve)
    g.add_argument("--power-limit", dest="power_limit",
                   help="GPU power cap(s) in W, W[,W...], or 'sweep' (the GPU's maximum down to its minimum in 25 W "
                        "steps): a grid axis, every point measured at each cap (part of its key: --resume works "
                        "per cap); needs root or zeusd; the original limit is restored after every point")
    g.add_argument("--cpu-power-limit", dest="cpu_power_limit",
                   help="each CPU package's long-term RAPL limit in W, W[,W...]: a grid axis like --power-limit "
                        "(part of each point's key; root; restored after every point); several CPU caps go "
                        "without --power-limit, one CPU cap may hold under every GPU cap")
    s = p.add_argument_group("store")
    s.add_argument("--db", help=f"SQLite results database (default {DEFAULT_DB}, or OUT/moe-energy.db)")
    s.add_argument("--out", help="results directory holding the default database (default results/)")
    s.add_argument("--resume", action="store_true", help="skip points already complete in --db")
    s.add_argument("--shard", help="run only shard I of N (e.g. 1/4): a deterministic 1/N of the points; 'auto': I "
                   "and N from a Slurm array task (SLURM_ARRAY_TASK_ID, _MIN, _COUNT); 'auto/N': I from a Kubernetes "
                   "Indexed Job's JOB_COMPLETION_INDEX, N its completions")
    s.add_argument("--dry-run", dest="dry_run", action="store_true", help="list the points and exit")


def _layer_args(p: argparse.ArgumentParser) -> None:
    """The LLM-layer axes (issue 14): one point per arch x routing x dtype x weights x repeats, each measuring
    every token count; a custom shape also takes --experts and --top-k (comma lists, as above)."""
    from ..models.archs import PRESETS, ROUTER_KINDS
    from ..models.routing import ROUTING_HELP

    g = p.add_argument_group("LLM MoE layers (--arch or --grid llm: nothing trained; one record per model and "
                             "token count)")
    g.add_argument("--arch", help=f"comma list of layer presets ({', '.join(PRESETS)}) or custom (with --d-model, "
                   "--ffn-dim, --experts, --top-k)")
    g.add_argument("--tokens", help="comma list of tokens per forward (default 1,4,16,64,256,1024,4096)")
    g.add_argument("--routing", help=f"comma list of {ROUTING_HELP} (default random)")
    g.add_argument("--weights", help="comma list of dtype (the weights in the point's dtype: the default), int8 "
                   "(every model's weights int8 weight-only, per-channel fp32 scales) and w8a8 (int8 weights and "
                   "int8 activations, per row) and fp8 (e4m3 weights and rows; CUDA GPUs of compute capability "
                   "8.9+ only): one point each")
    g.add_argument("--max-forward-s", type=float, dest="max_forward_s", metavar="S",
                   help="skip a (model, token count) whose one forward takes longer than S seconds at this host's "
                        "roofline bound, with the reason (default: none; --grid llm: --duration)")
    g.add_argument("--d-model", dest="d_model", help="custom: comma list of hidden sizes d")
    g.add_argument("--ffn-dim", dest="ffn_dim", help="custom: comma list of routed expert widths I")
    g.add_argument("--shared-experts", dest="shared_experts", help="custom: comma list of shared-expert counts")
    g.add_argument("--router", help=f"custom: comma list of router kinds ({', '.join(ROUTER_KINDS)})")


def _model_args(p: argparse.ArgumentParser) -> None:
    """The whole-model axes (issue 23): one point per model set x --engine x --moe-impl x dtype x repeats, each
    measuring every batch x context in prefill and decode; --layers (one N) builds each model's first N layers."""
    from ..runner.model import MOE_IMPLS

    g = p.add_argument_group("whole LLMs (--model: prefill and decode per token, each MoE against its dense "
                             "siblings; one record per model, phase, batch and context)")
    g.add_argument("--model", help="comma list of MoE presets (see 'moe-energy models'): one point each")
    g.add_argument("--vs", help="comma list of dense models every --model is compared with (default each one's "
                   "dense siblings)")
    g.add_argument("--batch", help="comma list of batch sizes, sequences per step (default 1,8)")
    g.add_argument("--context", help="comma list of context lengths: prompt tokens, and the KV cache at each decode "
                   "step (default 512)")
    g.add_argument("--moe-impl", dest="moe_impl", help=f"comma list of {', '.join(MOE_IMPLS)} (default transformers)")
    g.add_argument("--engine", help="comma list of what serves the models: transformers (default), vllm (a CUDA GPU "
                   "and vLLM: one point each, the whole model in vLLM's offline API, --moe-impl transformers only)")
    g.add_argument("--tiny", action="store_true", default=None, help="every model shrunk to a few-KB copy of its "
                   "shape: tries the sweep in seconds; the figures are not the model's")


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA after the first point"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"ETA ~{h}h{m:02d}m" if h else f"ETA ~{m}m{s:02d}s"


class SweepProgress:
    """One rich display for the whole sweep: a points bar (done/total, current point, ETA) and, under it,
    the runner's training and measuring bars (one live display: rich cannot nest them)."""

    def __init__(self, total: int) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
        self.total = total
        self.task = self.progress.add_task("points", total=max(total, 1), info="")

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_point(self, i: int, point, eta_s: float | None) -> None:  # noqa: ANN001 - sweep.Point
        o = point.opts
        what = f"tokens {point.tokens[0]}-{point.tokens[-1]}" if point.is_layer else \
            f"batch {point.batches[0]}-{point.batches[-1]} x context {point.contexts[0]}-{point.contexts[-1]}" \
            if point.is_whole else f"batch {o.batch_size}"
        cap = "" if point.caps_text == "-" else f", cap {point.caps_text}"
        self.progress.update(self.task, completed=i, info=escape(
            f"now {point.label} ({point.total_params:,} params, {what}, {o.dtype}"
            f"{f', {o.weights} weights' if o.weights else ''}{cap}) | {_eta(eta_s)}"))

    def finish(self) -> None:
        self.progress.update(self.task, completed=self.total, info="done")

    @contextmanager
    def _sub(self, description: str, total: float, **fields) -> Iterator[int]:
        t = self.progress.add_task(escape(description), total=max(total, 1e-9), info="", **fields)
        try:
            yield t
        finally:
            self.progress.remove_task(t)

    @contextmanager
    def training(self, name: str, total_steps: int) -> Iterator[Callable[[int, int], None]]:
        with self._sub(f"  train {name}", max(total_steps, 1)) as t:
            yield lambda epoch, b: self.progress.update(t, advance=1, info=f"epoch {epoch + 1}")

    @contextmanager
    def measuring(self, name: str, seconds: float) -> Iterator[Callable[[float], None]]:
        with self._sub(f"  measure {name}", seconds) as t:
            yield lambda s: self.progress.update(t, completed=s, info=f"{s:.0f}/{seconds:.0f} s")

    def info(self, msg: str) -> None:
        pass


def _points_table(points, meter_name: str, done: set[str], device) -> Table:  # noqa: ANN001
    if points and points[0].is_layer:
        return _layer_points_table(points, meter_name, done, device)
    if points and points[0].is_whole:
        return _model_points_table(points, meter_name, done, device)
    capped = any(p.caps_text != "-" for p in points)
    t = Table(title=f"sweep points ({len(points)})")
    for col in ("#", "point", "E", "H", "L", "k", "total params", "batch", "dtype", "repeats",
                *(("power cap",) if capped else ()), "status"):
        t.add_column(col, justify="left" if col in ("point", "dtype", "status") else "right")
    for i, p in enumerate(points, 1):
        s = p.spec
        status = "invalid: " + p.error if p.error else ("complete" if p.key(meter_name) in done else
                                                         p.workload.point_problem(p.opts, device) or "to do")
        t.add_row(str(i), escape(p.label), str(s.experts), str(s.hidden), str(s.layers), str(s.top_k),
                  f"{p.total_params:,}", str(p.opts.batch_size), p.opts.dtype, str(p.opts.repeats),
                  *((p.caps_text,) if capped else ()), escape(status))
    return t


def _model_points_table(points, meter_name: str, done: set[str], device) -> Table:  # noqa: ANN001
    """The whole-model points: each model set, its batches x contexts, the layers each builds here."""
    from ..runner.sweep import measured_models

    capped = any(p.caps_text != "-" for p in points)
    t = Table(title=f"sweep points ({len(points)}): rows of each = models x prefill, decode x batches x contexts")
    for col in ("#", "point", "models (layers built here)", "MoE params", "batches", "contexts", "moe impl", "dtype",
                "repeats", "rows", *(("power cap",) if capped else ()), "status"):
        t.add_column(col, justify="right" if col in ("#", "MoE params", "repeats", "rows") else "left")
    for i, p in enumerate(points, 1):
        impl = str(p.moe_impl) if p.engine == "transformers" else f"{p.engine} engine"
        status = "complete" if p.key(meter_name) in done else p.workload.point_problem(p.opts, device) or "to do"
        built = p.workload.chosen  # point_problem chose each model's layers, as the run will
        names = ", ".join(f"{m.name} ({built.get(m.name, '?')} of {m.layers})" for m in p.workload.models)
        t.add_row(str(i), escape(p.label), escape(names), f"{p.total_params:,}", ",".join(map(str, p.batches)),
                  ",".join(map(str, p.contexts)), impl, p.opts.dtype, str(p.opts.repeats),
                  str(measured_models(p)), *((p.caps_text,) if capped else ()), escape(status))
    return t


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f">= {seconds / 60:,.1f} min"


def _layer_points_table(points, meter_name: str, done: set[str], device) -> Table:  # noqa: ANN001
    """The LLM points, each with the least time it can take here (fixed seconds + forwards at the roofline)."""
    from ..measure.roofline import load as load_roofline
    roof = load_roofline(device)
    floors = [p.workload.seconds_floor(p.opts, roof) for p in points]
    total = None if None in floors else sum(f for f in floors if f is not None)
    t = Table(title=f"sweep points ({len(points)}); least time here {_minutes(total)}"
              + ("" if roof else " (run `moe-energy calibrate` for the time)"))
    capped = any(p.caps_text != "-" for p in points)
    limited = roof is not None and any(p.opts.max_forward_s is not None for p in points)
    for col in ("#", "point", "d", "I", "E", "k", "MoE params", "tokens", "routing", "dtype", "repeats",
                *(("power cap",) if capped else ()), *(("over --max-forward-s",) if limited else ()), "least time",
                "status"):
        t.add_column(col, justify="left" if col in ("point", "tokens", "routing", "dtype", "status") else "right")
    for i, (p, floor) in enumerate(zip(points, floors), 1):
        a = p.spec
        status = "complete" if p.key(meter_name) in done else p.workload.point_problem(p.opts, device) or "to do"
        t.add_row(str(i), escape(p.label), str(a.d_model), str(a.ffn_dim), str(a.experts), str(a.top_k),
                  f"{p.total_params:,}", ",".join(map(str, p.tokens)), escape(p.routing),
                  p.opts.dtype + (f", {p.opts.weights} weights" if p.opts.weights else ""), str(p.opts.repeats),
                  *((p.caps_text,) if capped else ()),
                  *((_over_limit(p, roof),) if limited else ()), _minutes(floor), escape(status))
    return t


def _over_limit(p: Any, roof: Any) -> str:
    """'3 of 21': the point's (model, token count) rows that --max-forward-s will skip, by the roofline bound."""
    from ..runner.layer import forward_too_long

    rows = [(pl, t) for pl in p.workload.plans(p.opts.models) for t in p.tokens]
    over = sum(forward_too_long(roof, pl, t, p.opts) is not None for pl, t in rows)
    return f"{over} of {len(rows)}" if p.opts.max_forward_s is not None else "-"


def _llm_dtype(cfg: dict[str, Any]) -> None:
    """An LLM grid's (layers or whole models) default dtype, as `run --arch` and `run --model` pick it: bfloat16
    where the device runs it natively, else float32."""
    from ..device import llm_default_dtype, resolve_device

    if "dtype" in cfg or not (cfg.get("arch") or cfg.get("model") or cfg.get("grid") == "llm"):
        return
    cfg["dtype"] = llm_default_dtype(resolve_device(str(cfg.get("device") or "auto")))[0]


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the grid's settings, the power caps' and carbon figures'), each from --config, then the flags."""
    from ..runner import sweep as sw

    cfg = sw.load_grid_toml(args.config) if args.config else {}
    cfg.update({k: v for k, v in vars(args).items()
                if v is not None and not k.startswith("_") and k not in SWEEP_FLAGS})
    power = {k: cfg.pop(k) for k in (*CAP_KEYS, *CARBON_KEYS) if k in cfg}
    return cfg, power


def _grid(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
    """(grid, its settings, the power settings, device): every point validated, the dtypes checked now."""
    from ..device import resolve_device
    from ..runner import sweep as sw
    from ..runner.core import check_dtype
    from ..runner.layer import check_weights

    cfg, power = _settings(args)
    _llm_dtype(cfg)
    grid = sw.build_grid(cfg)
    sw.parse_shard(args.shard)  # a bad --shard is told before the hardware is asked anything
    device = resolve_device(grid.points[0].opts.device)
    for dtype in dict.fromkeys(p.opts.dtype for p in grid.points):
        check_dtype(device, dtype, grid.points[0].opts.strategies)
    for p in grid.points:  # a weights format the device has no fast kernel for: refused now, not point by point
        if p.is_layer and p.opts.weights:
            check_weights(p.spec, p.opts.weights, device)  # type: ignore[arg-type]
    return grid, cfg, power, device


def _points(args: argparse.Namespace, grid: Any, cfg: dict[str, Any]) -> tuple[list, tuple[int, int] | None]:
    """(this shard's points, shard) of the grid, caps already on it; --data checked now."""
    from ..data import load_npz
    from ..runner import sweep as sw

    which = sw.parse_shard(args.shard)
    points = sw.shard(grid.points, which)
    data = grid.points[0].opts.data
    if data:  # a bad file stops the sweep now, not at its first point
        declared = {k: cfg[k] for k in ("classes", "input_dim") if cfg.get(k) is not None}
        load_npz(data, declared.get("classes"), declared.get("input_dim"))
        points = [replace(p, opts=replace(p.opts, extra={**p.opts.extra, "declared_shape": declared}))
                  for p in points]
    return points, which


def _open_run(args: argparse.Namespace, store: Store, grid: Any, points: list, meter: Any, device: Any,
              shard_text: str | None) -> tuple[str, set[str]]:
    """(run id, keys to skip): the run to continue with --resume, or a new one."""
    from ..energy.meter import meter_info
    from ..measure.environment import describe
    from ..runner import sweep as sw

    grid_hash = grid.hash(meter.name) + (f"-{shard_text}" if shard_text else "")
    already = sw.complete_keys(points, store, meter.name)
    # finished, but with rows skipped under a lower --max-forward-s: measured again, in a new run (a run holds a key
    # once)
    again = {p.key(meter.name) for p in points} & store.completed_keys() - already
    run_id = store.latest_run(grid_hash) if args.resume and not again else None
    if again and args.resume:
        err_console.print(f"[yellow]{len(again)} of these points skipped rows under a lower --max-forward-s than "
                          "this sweep's; measuring them again, as a new run in the store[/yellow]")
    if already and not args.resume:
        err_console.print(f"[yellow]{len(already)} of these points are already complete in "
                          f"{escape(str(store.path))}; measuring them again (pass --resume to skip them)[/yellow]")
    if run_id is None:
        info = {**meter_info(meter), "notice": getattr(meter, "notice", None)}
        run_id = store.new_run(uuid.uuid4().hex, grid.source, describe(device), info,
                               command=" ".join(["moe-energy", *sys.argv[1:]]), grid_name=grid.name,
                               grid_hash=grid_hash, shard=shard_text)
    return run_id, already if args.resume else set()


def _measure(args: argparse.Namespace, store: Store, grid: Any, points: list, meter: Any, device: Any,
             shard_text: str | None, levers: Any) -> Any:
    """Every point of this shard measured into ``store``; the outcome, or an exit code when stopped."""
    from ..runner import sweep as sw

    run_id, skip = _open_run(args, store, grid, points, meter, device, shard_text)
    console.print(f"sweep {grid.name}: {len(points)} point(s)"
                  + (f" (shard {shard_text} of a {len(grid.points)}-point grid)" if shard_text else "")
                  + (f", {len(skip)} already complete" if skip else "")
                  + f"; meter {meter.name} ({meter.method}); database {store.path}", markup=False, highlight=False)
    def points_run() -> Any:
        with SweepProgress(len(points) - len(skip)) as ui:
            outcome = sw.run_points(points, store, run_id, meter, device, None, ui, ui.on_point, skip,
                                    resume=args.resume, levers=levers)
            ui.finish()
        return outcome

    def saved() -> str:
        n = store.con.execute("SELECT COUNT(*) FROM points WHERE run_id = ?", (run_id,)).fetchone()[0]
        again = shlex.join(["moe-energy", *sys.argv[1:]] + ([] if args.resume else ["--resume"]))
        return (f"{n} finished point(s) of this sweep are saved in {store.path}, the point in flight was discarded; "
                f"to continue run: {again}")

    try:
        return interruptible(points_run, saved)
    except sw.StoreWriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _summary(outcome: Any, db: Path, integrity: str) -> int:
    plain = {"markup": False, "highlight": False}  # user paths are text, never rich markup
    console.print(f"measured {outcome.done}, skipped {outcome.skipped}, failed {outcome.failed}, "
                  f"already complete {outcome.already}; database {db} (integrity {integrity})", **plain)
    if outcome.busy:
        console.print(f"{outcome.busy} point(s) were being measured by another sweep on {db} and were left to it; "
                      "rerun with --resume once it ends to pick up any it did not finish", **plain)
    for f in outcome.failures:
        err_console.print(f"[red]failed[/red] {escape(f)}")
    console.print(f"next: moe-energy report --db {db}", **plain)
    return 1 if outcome.failed else 0


@command("sweep", "Measure a grid of shapes x batch sizes x dtypes (or LLM layers x tokens per forward) into the "
         "SQLite store; resumable, shardable.",
         _sweep_args)
@_db_errors
def sweep(args: argparse.Namespace) -> int:
    from ..power.capped import plan_caps
    from ..runner import sweep as sw
    from ..storage.results import probe_write

    grid, cfg, power, device = _grid(args)
    caps, carbon = resolve_caps(power), resolve_carbon(power)
    db = db_path(args)
    meter = meter_from_args(args, device, notice=lambda n: err_console.print(f"[yellow]{escape(n)}[/yellow]"))
    plan = plan_caps(caps, meter, device)  # a cap the hardware refuses: exit 2 before any point runs
    grid = sw.with_caps(grid, plan.gpu_caps, plan.cpu_caps)
    points, which = _points(args, grid, cfg)
    if args.dry_run:
        done: set[str] = set()
        if db.exists():
            with Store(db, create=False) as st:
                done = sw.complete_keys(points, st, meter.name)
        console.print(_points_table(points, meter.name, done, device))
        return 0
    if not points:
        raise ConfigError(f"--shard {args.shard} holds no points of this {len(grid.points)}-point grid; use fewer "
                          "shards")
    # A full disk or read-only directory is found now, not when the first point is written an hour from now.
    probe_write(db.parent, f"--db {db}")
    shard_text = f"{which[0]}/{which[1]}" if which else None
    def in_store() -> tuple[Any, str]:
        with Store(db) as store:  # opening or migrating it may be interrupted too: before any point
            outcome = _measure(args, store, grid, points, plan.wrap(meter), device, shard_text,
                               sw.Levers(plan, carbon))
            return outcome, "" if isinstance(outcome, int) else store.integrity()

    done = interruptible(in_store, lambda: "before any point was measured; run the same command again")
    if isinstance(done, int):
        return done
    outcome, integrity = done
    if isinstance(outcome, int):  # interrupted, or the store refused a write: its own status
        restore_status(plan)
        return outcome
    code = _summary(outcome, db, integrity)
    return restore_status(plan) or code


# -- report, export, merge: reads of the store ------------------------------------------------------------
def _say(text: str) -> None:
    """A line on stdout printed as it is, never as markup: the paths in it are the user's (``--out '[/z]'``)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help=f"SQLite results database (default {DEFAULT_DB})")
    p.add_argument("--out", default="results/report", help="directory for report.html, report.md and plots/")
    p.add_argument("--itl-deadline-ms", dest="itl_deadline_ms", default="100,250", metavar="MS[,MS...]",
                   help="whole models: inter-token latency deadlines (ms) of the selection, the lowest J/token "
                        "configuration whose decode ITL p90 meets each (default 100,250, ML.ENERGY's)")


def deadlines(text: str) -> tuple[float, ...]:
    """'100,250' -> (100.0, 250.0): each a finite number of ms > 0, each once, ascending; one-line ConfigError."""
    vals = []
    for part in (x.strip() for x in str(text).split(",")):
        try:
            v = float(part)
        except ValueError:
            raise ConfigError(f"--itl-deadline-ms {text!r}: {part!r} is not a number of milliseconds; give e.g. "
                              "100,250") from None
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"--itl-deadline-ms {text!r}: {part} must be a finite number of milliseconds > 0")
        vals.append(v)
    return tuple(sorted(set(vals)))


@command("report", "Write the crossover answer with plots: one self-contained HTML file and a Markdown summary.",
         _report_args)
@_db_errors
@_interruptible
def report(args: argparse.Namespace) -> int:
    from ..report import write_report
    from ..report.analysis import load
    from ..report.html import answer_tables, earlier_report, window_warnings

    db = db_path(args)
    check_named(args.out, "--out", "results/report")
    itl = deadlines(args.itl_deadline_ms)  # a typo is told before the store is read
    earlier_report(args.out)  # and a report.html / report.md there that is not one of ours: never replaced
    with Store(db, create=False) as store:
        frame = load(store)
    if not frame.points and not frame.skipped:
        raise ConfigError(f"--db {db} holds no sweep points yet; run `moe-energy sweep --db {db}` first")
    note = frame.damage_note()
    if note:
        print(f"warning: --db {db}: {note}; the report is drawn from the rest", file=sys.stderr)
    flagged = window_warnings(frame)
    if flagged:  # the report's files say it at their top; the terminal, where the answer is read first, says it too
        print(f"warning: --db {db}: {flagged}", file=sys.stderr)
    try:
        files = write_report(frame, args.out, db, itl)  # each file written whole (fileio.replace_atomic) or not at all
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write the report there ({os_reason(e)}); choose another "
                          "directory") from None
    record_saved(files.html)
    record_saved(files.markdown)
    for title, head, rows in answer_tables(frame, itl):
        t = Table(title=escape(title))
        for h in head:
            t.add_column(escape(h), overflow="fold")
        for r in rows:
            t.add_row(*(escape(c) for c in r))
        console.print(t)
    _say(f"report: {files.html} (self-contained) and {files.markdown} with {len(files.images)} plot(s)")
    if files.replaced:
        stale = f"; {len(files.stale)} of its plot(s) this report does not draw removed" if files.stale else ""
        _say(f"replaced the earlier report in {args.out}{stale}")
    return 0


# -- export ------------------------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help=f"SQLite results database (default {DEFAULT_DB})")
    p.add_argument("--format", choices=("csv", "json"), default="csv",
                   help="csv: one table, flat (pandas.read_csv); json: everything nested, traces included")
    p.add_argument("--table", choices=("models", "windows", "points"),
                   help="csv: which table (default models; json holds them all)")
    p.add_argument("--out", help="file to write (default: standard output); an existing file is not replaced")


def _export_text(args: argparse.Namespace, db: Path) -> str:
    """The export as text; rows whose stored JSON is damaged are left out, said in one warning line."""
    import json

    damaged: Counter[str] = Counter()
    with Store(db, create=False) as store:
        if not store.point_count():  # not an error (a script may export what is there), but never a silent blank
            print(f"warning: --db {db} holds no sweep points yet: the export is empty", file=sys.stderr)
        text = store.export_csv(args.table or "models") if args.format == "csv" else \
            json.dumps(store.export_document(damaged), indent=1, allow_nan=False)
    if damaged:
        by_table = ", ".join(f"{k} {v}" for k, v in sorted(damaged.items()))
        print(f"warning: --db {db}: {sum(damaged.values())} stored row(s) with damaged JSON left out of the export "
              f"({by_table})", file=sys.stderr)
    return text if text.endswith("\n") else text + "\n"


def _write_new(out: Path, data: bytes) -> Path:
    """``data`` at the new file ``out``, whole or not at all (fileio.create_atomic: a temp file beside it, linked
    into place), never over a file that appeared meanwhile; a failed write leaves nothing behind."""

    def only(n: int) -> str:  # create_atomic's next free name: there is none, ``out`` is the only one
        if n:
            raise ConfigError(f"--out {out} already exists; choose a new file name")
        return out.name

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return create_atomic(out.parent, only, data)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write ({os_reason(e)}); choose a writable path") from None


@command("export", "Export the store as CSV (one row per model measurement) or nested JSON.", _export_args)
@_db_errors
@_interruptible
def export(args: argparse.Namespace) -> int:
    db = db_path(args)
    if args.table is not None and args.format != "csv":  # json nests every table: one would be silently ignored
        raise ConfigError(f"--table {args.table}: only with --format csv (json holds every table); drop it")
    check_named(args.out, "--out", "export.csv (or - for standard output)")
    to_stdout = not args.out or args.out == "-"
    if not to_stdout:
        check_new_file(Path(args.out), f"--out {args.out}", "choose a new file name")
    text = _export_text(args, db)
    if to_stdout:  # a reader gone (`| head`) or a full disk: cli.main's guard on stdout says so and sets the status
        sys.stdout.write(text)
        return 0
    out = _write_new(Path(args.out), text.encode("utf-8"))
    record_saved(out)
    err_console.print(f"exported {args.format} to {out}", markup=False, highlight=False, soft_wrap=True)
    return 0


# -- merge -------------------------------------------------------------------------------------------------
def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="DB", help="databases to combine (e.g. one per shard)")
    p.add_argument("--out", required=True, help="new database to write (must not exist)")


@command("merge", "Combine sweep databases (e.g. the shards of one sweep) into a new one.", _merge_args)
@_interruptible
def merge(args: argparse.Namespace) -> int:
    from ..storage.store import merge as merge_dbs

    counts = merge_dbs(args.inputs, args.out)  # its temp files are removed on every way out, signals included
    record_saved(args.out)
    _say(f"merged {len(args.inputs)} database(s) into {args.out}: {counts['points']} point(s), "
         f"{counts['models']} model(s), {counts['windows']} window(s), {counts['runs']} run(s); "
         f"{counts['duplicate_points']} duplicate point(s) kept once")
    return 0
