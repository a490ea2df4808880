"""The process group: joining torchrun's job, collectives that fail as one line, and the start-up agreement.

Every collective runs inside ``collective``: a dead, hung or unreachable peer makes it raise ``PeerLost``
(another rank's fault, not the user's: the CLI gives it its own exit code), naming the stage the job was in.
At start-up every rank gathers every rank's configuration hash and local error, so that all ranks refuse
alike (same error, same exit code) or none does, before any rank waits on a collective the others skip.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from ..config import MAX_SECONDS, RunOptions
from ..device import resolve_device
from ..errors import ConfigError, PeerLost, one_line

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class Group:
    """This process's place in the job and the device it drives."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float
    pg: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def where(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPUs; anything else has no collective backend here."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise ConfigError(f"--parallel expert supports cuda (NCCL) and cpu (gloo) devices, not {device.type}; "
                      "use --device cuda or --device cpu")


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; a lone process is a world of one."""
    def num(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None

    world = num("WORLD_SIZE", 1)
    rank = num("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; launch with torchrun")
    return rank, world, num("LOCAL_RANK", 0)


def check_divisible(experts: int, world_size: int) -> None:
    """Experts shard evenly or not at all: each rank holds E/W of them."""
    if experts % world_size:
        fits = [w for w in range(1, experts + 1) if experts % w == 0]
        raise ConfigError(
            f"experts={experts} cannot be split evenly over {world_size} ranks; use a world size in "
            f"{fits} (torchrun --nproc-per-node x --nnodes) or --experts a multiple of {world_size}"
        )


def rank_device(device_opt: str, local_rank: int) -> torch.device:
    """The device this rank drives: ``cuda:LOCAL_RANK`` on GPUs (one process per GPU), else the named one."""
    device = resolve_device(device_opt)
    if device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this machine shows {n} GPU(s); "
                          f"launch at most {n} processes per node (torchrun --nproc-per-node {n})")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def check_timeout(timeout_s: float) -> float:
    """The one rule for --collective-timeout: a finite number of seconds > 0 and at most MAX_SECONDS (a day; more
    overflows the timedelta torch.distributed takes)."""
    if not math.isfinite(timeout_s) or not 0 < timeout_s <= MAX_SECONDS:
        raise ConfigError(f"--collective-timeout {timeout_s} must be a number of seconds > 0 and <= {MAX_SECONDS:.0f}")
    return timeout_s


def init_group(device_opt: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the job torchrun started (env://) with a timeout on every collective; pick the device and backend."""
    check_timeout(timeout_s)
    rank, world, local_rank = launch_env()
    device = rank_device(device_opt, local_rank)
    backend = backend_for(device)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    try:
        if "MASTER_ADDR" in os.environ or world > 1:
            dist.init_process_group(init_method="env://", rank=rank, world_size=world, **kwargs)
        else:  # a lone process outside torchrun: a private store, no network
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    except (RuntimeError, ValueError) as e:
        raise PeerLost(f"rank {rank} of {world}: could not join the job ({one_line(e, 200)}); check MASTER_ADDR, "
                       "MASTER_PORT (or torchrun's --rdzv-endpoint) and that every rank was started") from None
    return Group(rank, world, local_rank, backend, device, timeout_s, dist.group.WORLD)


def shutdown() -> None:
    """Leave the process group; never raises (the peers may already be gone)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a dead peer can make teardown fail; we are exiting anyway
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Collectives: each one a PeerLost (one line, the job's stage) when a peer is gone

_stage = ["start-up"]


def set_stage(name: str) -> None:
    """What the job is doing, for the message of a collective that fails from now on."""
    _stage[0] = name


@contextmanager
def collective(g: Group, op: str | None = None) -> Iterator[None]:
    """Turn a failed collective (dead, hung or unreachable peer) into a one-line PeerLost."""
    try:
        yield
    except PeerLost:
        raise
    except RuntimeError as e:  # gloo raises RuntimeError; NCCL's DistBackendError is one too
        where = f"{_stage[0]} ({op})" if op else _stage[0]
        raise PeerLost(
            f"{g.where()}: a collective failed during {where}: {one_line(e, 200)}; another rank "
            f"died, hung or is unreachable (timeout {g.timeout_s:g} s); no result written"
        ) from None


def agree_max(g: Group, value: float) -> float:
    """The largest of every rank's value, known to all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=g.device)
    with collective(g):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g.pg)
    return float(t.item())


def all_gather_object(g: Group, obj: object) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * g.world_size
    with collective(g):
        dist.all_gather_object(out, obj, group=g.pg)
    return out


def gather_object(g: Group, obj: object, op: str = "gather") -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    out: list[Any] | None = [None] * g.world_size if g.is_main else None
    with collective(g, op):
        dist.gather_object(obj, out, dst=0, group=g.pg)
    return out


def barrier(g: Group) -> None:
    """Every rank here before any goes on (a window or an idle reading starts on all ranks at once)."""
    with collective(g):
        dist.barrier(group=g.pg)


@torch.no_grad()
def broadcast_module(m: nn.Module, g: Group, src: int = 0, skip: Set[int] = frozenset()) -> nn.Module:
    """Every parameter and buffer of ``m`` replaced by rank ``src``'s, in place; those whose ``id`` is in
    ``skip`` (a shard's own experts) are left alone."""
    with collective(g, "broadcast"):
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in skip:
                dist.broadcast(t.data, src=src, group=g.pg)
    return m


@torch.no_grad()
def broadcast_rows(t: torch.Tensor, g: Group, start: int, rows: int) -> torch.Tensor:
    """Rows [start, start+rows) of rank 0's ``t``, on this rank's device in their own storage.

    ``t`` [E, ...] may live in host memory (a parked model): it is copied to the device whole, broadcast,
    and all but the rows this rank keeps are dropped again.
    """
    full = t.detach().to(g.device, copy=True)  # [E, ...]
    with collective(g, "broadcast"):
        dist.broadcast(full, src=0, group=g.pg)
    return full[start:start + rows].clone()  # [rows, ...]: own, aligned storage (grouped_mm needs it)


# ---------------------------------------------------------------------------------------------------------
# Start-up agreement: every rank checks the same things, then all raise the same error or none does


def job_config(spec: dict[str, Any], opts: RunOptions, data_fingerprint: str, timeout_s: float) -> dict[str, Any]:
    """What must be identical on every rank: the models' shape (``asdict`` of a ModelSpec, or an LLM layer's
    arch, token counts and routing), the options, the data; ``out`` is not (only rank 0 writes)."""
    o = opts.as_dict()
    o.pop("out", None)
    return {"spec": spec, "options": o, "data": data_fingerprint, "collective_timeout_s": timeout_s,
            "tool_version": __version__, "torch": torch.__version__}


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k} ({vb!r} vs {va!r})")
    return out


def check_agreement(seen: list[tuple[str, dict[str, Any], str | None]]) -> None:
    """Each rank's (config hash, config, start-up error), rank order: the first problem as a ConfigError."""
    for r, (_, _, err) in enumerate(seen):
        if err is not None:
            raise ConfigError(f"rank {r} of {len(seen)}: {err}")
    ref_hash, ref_cfg, _ = seen[0]

    def flags(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if k != "data"}

    for r, (h, other, _) in enumerate(seen):
        if h != ref_hash:
            diffs = ", ".join(_diff(flags(ref_cfg), flags(other))[:4]) or \
                "the data (same flags, different contents: check the --data file on every machine)"
            raise ConfigError(f"rank {r}'s configuration differs from rank 0's in {diffs} (rank {r} vs rank 0); "
                              "launch every rank with the same flags, data and versions")


def agree_on_start(g: Group, cfg: dict[str, Any], local_error: str | None) -> None:
    """Every rank checks every rank's config hash and start-up error: all raise the same error, or none does."""
    check_agreement(all_gather_object(g, (config_hash(cfg), cfg, local_error)))
