"""Expert parallelism on torch.distributed: experts sharded over ranks, tokens moved by all-to-all.

Launched by ``torchrun`` (one process per device; NCCL on GPUs, gloo on CPUs). Every rank holds the gate
and E/W experts; each forward exchanges pair counts, sends every (token, expert) pair to the rank owning
the expert, runs the local experts with the grouped strategy's machinery, and sends the results back.
Beside it runs a data-parallel dense baseline on the same ranks, so MoE and dense compare equal hardware.

Every rank measures its own devices over the same window; rank 0 gathers the measurements, the time spent
in all-to-all and the bytes moved, and writes the job's results. A rank that dies or hangs makes the others
fail their next collective within ``--collective-timeout`` seconds: they exit with a one-line message.
"""

from __future__ import annotations

import copy
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .config import ConfigError, ModelSpec, RunOptions
from .data import Dataset, make_dataset
from .device import DTYPES as DTYPE
from .device import device_sync, resolve_device
from .energy.meter import Measurement, Meter, NullMeter, weakest, window
from .environment import describe
from .measure.window import MIN_TRUSTED_SECONDS
from .models.dense import DenseMLP
from .models.moe import MoE
from .models.plan import TRAIN_STRATEGY, plans
from .models.strategies import ExpertStack, combine, sort_by_expert
from .pipeline import UI, SilentUI
from .results import check_writable, new_document, run_stem, write_atomic
from .train import TrainResult, evaluate, train

DEFAULT_TIMEOUT_S = 300.0
EP_STRATEGY = "grouped"  # the local experts' strategy: no loop over experts, no host sync of its own
MOE_LABEL = "moe[expert_parallel]"


class PeerLost(ConfigError):
    """A collective failed: another rank died, hung past the timeout or became unreachable."""


# ---------------------------------------------------------------------------------------------------------
# Process group


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
    if experts % world_size:
        fits = [w for w in range(1, experts + 1) if experts % w == 0]
        raise ConfigError(
            f"experts={experts} cannot be split evenly over {world_size} ranks; use a world size in "
            f"{fits} (torchrun --nproc-per-node x --nnodes) or --experts a multiple of {world_size}"
        )


def init_group(device_opt: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the job torchrun started (env://) with a timeout on every collective; pick the device and backend."""
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ConfigError(f"--collective-timeout {timeout_s} must be a finite number of seconds > 0")
    rank, world, local_rank = launch_env()
    device = resolve_device(device_opt)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ConfigError(f"LOCAL_RANK={local_rank} but this machine shows {n} GPU(s); "
                              f"launch at most {n} processes per node (torchrun --nproc-per-node {n})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend_for(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict = {"backend": backend, "timeout": timeout}
    if device.type == "cuda":
        kwargs["device_id"] = device
    try:
        if "MASTER_ADDR" in os.environ or world > 1:
            dist.init_process_group(init_method="env://", rank=rank, world_size=world, **kwargs)
        else:  # a lone process outside torchrun: a private store, no network
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    except (RuntimeError, ValueError) as e:
        raise PeerLost(f"rank {rank} of {world}: could not join the job ({_first_line(e)}); check MASTER_ADDR, "
                       "MASTER_PORT (or torchrun's --rdzv-endpoint) and that every rank was started") from None
    return Group(rank, world, local_rank, backend, device, timeout_s, dist.group.WORLD)


def shutdown() -> None:
    """Leave the process group; never raises (the peers may already be gone)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer can make teardown fail; we are exiting anyway
            pass


def _first_line(e: BaseException) -> str:
    """The useful part of a backend error: its first sentence, without gloo's source-file prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:200]


_stage = ["start-up"]


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
            f"{g.where()}: a collective failed during {where}: {_first_line(e)}; another rank "
            f"died, hung or is unreachable (timeout {g.timeout_s:g} s); no result written"
        ) from None


def set_stage(name: str) -> None:
    _stage[0] = name


def _scalar(g: Group, value: float, op: dist.ReduceOp) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=g.device)
    with collective(g):
        dist.all_reduce(t, op=op, group=g.pg)
    return float(t.item())


def agree_max(g: Group, value: float) -> float:
    """The largest of every rank's value, known to all ranks."""
    return _scalar(g, value, dist.ReduceOp.MAX)


def all_gather_object(g: Group, obj: object) -> list:
    out: list = [None] * g.world_size
    with collective(g):
        dist.all_gather_object(out, obj, group=g.pg)
    return out


def barrier(g: Group) -> None:
    with collective(g):
        dist.barrier(group=g.pg)


# ---------------------------------------------------------------------------------------------------------
# Start-up agreement: every rank checks the same things, then all raise the same error or none does


def job_config(spec: ModelSpec, opts: RunOptions, data_fingerprint: str, timeout_s: float) -> dict:
    """What must be identical on every rank; ``out`` is not (only rank 0 writes)."""
    o = opts.as_dict()
    o.pop("out", None)
    return {"spec": asdict(spec), "options": o, "data": data_fingerprint, "collective_timeout_s": timeout_s,
            "tool_version": __version__, "torch": torch.__version__}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k} ({vb!r} vs {va!r})")
    return out


def check_agreement(seen: list[tuple[str, dict, str | None]]) -> None:
    """Each rank's (config hash, config, start-up error), rank order: the first problem as a ConfigError."""
    for r, (_, _, err) in enumerate(seen):
        if err is not None:
            raise ConfigError(f"rank {r} of {len(seen)}: {err}")
    ref_hash, ref_cfg, _ = seen[0]

    def flags(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k != "data"}

    for r, (h, other, _) in enumerate(seen):
        if h != ref_hash:
            diffs = ", ".join(_diff(flags(ref_cfg), flags(other))[:4]) or \
                "the data (same flags, different contents: check the --data file on every machine)"
            raise ConfigError(f"rank {r}'s configuration differs from rank 0's in {diffs} (rank {r} vs rank 0); "
                              "launch every rank with the same flags, data and versions")


def agree_on_start(g: Group, cfg: dict, local_error: str | None) -> None:
    """Every rank checks every rank's config hash and start-up error: all raise the same error, or none does."""
    check_agreement(all_gather_object(g, (config_hash(cfg), cfg, local_error)))


def data_fingerprint(data: Dataset) -> str:
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# The expert-parallel MoE


@dataclass
class CommStats:
    """Time and bytes of this rank's all-to-alls since the last ``reset``.

    On CUDA each collective is bracketed by events, read only once they have completed (no host sync
    added); on CPU/gloo the collective blocks, so a perf_counter around it is exact.
    """

    seconds: float = 0.0
    bytes_sent: int = 0  # to other ranks: what crosses the interconnect
    bytes_local: int = 0  # this rank's own slice: a copy, not traffic
    calls: int = 0
    _pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def reset(self) -> None:
        self.seconds, self.bytes_sent, self.bytes_local, self.calls = 0.0, 0, 0, 0
        self._pending.clear()

    def harvest(self, wait: bool = False) -> None:
        """Add up the CUDA event pairs that have completed (all of them with ``wait``, after a sync)."""
        keep = []
        for a, b in self._pending:
            if wait or b.query():
                self.seconds += a.elapsed_time(b) / 1e3
            else:
                keep.append((a, b))
        self._pending[:] = keep

    def as_dict(self) -> dict:
        return {"all_to_all_seconds": self.seconds, "all_to_all_bytes": self.bytes_sent,
                "all_to_all_local_bytes": self.bytes_local, "all_to_all_calls": self.calls}


class ExpertParallelMoE(nn.Module):
    """x [T, in] -> logits [T, classes], same function as ``MoE``; rank r holds experts [r*E/W, (r+1)*E/W).

    Inference only (the collectives are not differentiated). Every rank must call ``forward`` the same
    number of times: each call is three collectives.
    """

    def __init__(self, gate: nn.Linear, weights: list[Tensor], biases: list[Tensor], experts: int, top_k: int,
                 g: Group) -> None:
        super().__init__()
        check_divisible(experts, g.world_size)
        self.g = g
        self.experts, self.top_k = experts, top_k
        self.local_experts = experts // g.world_size
        self.first_expert = g.rank * self.local_experts
        self.gate = gate
        # weights[l]: [E_local, out_l, in_l], biases[l]: [E_local, out_l]: slices of MoE's stacked layout
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)
        self.biases = nn.ParameterList(nn.Parameter(b, requires_grad=False) for b in biases)
        self.stats = CommStats()
        self.last_received_pairs = 0  # (token, expert) pairs this rank's experts ran in the last forward

    @classmethod
    @torch.no_grad()
    def from_moe(cls, moe: MoE, g: Group) -> ExpertParallelMoE:
        """Rank 0's weights on every rank (broadcast), each rank keeping its own experts' slice."""
        gate = broadcast_module(copy.deepcopy(moe.gate), g)
        check_divisible(moe.experts, g.world_size)
        El = moe.experts // g.world_size
        lo, hi = g.rank * El, (g.rank + 1) * El
        ws, bs = [], []
        for w, b in zip(moe.weights, moe.biases):
            full_w, full_b = w.detach().clone(), b.detach().clone()
            with collective(g, "broadcast"):
                dist.broadcast(full_w, src=0, group=g.pg)
                dist.broadcast(full_b, src=0, group=g.pg)
            ws.append(full_w[lo:hi].clone())  # [E_local, out, in]: own storage, 16-byte aligned for grouped_mm
            bs.append(full_b[lo:hi].clone())  # [E_local, out]
            del full_w, full_b
        return cls(gate.requires_grad_(False), ws, bs, moe.experts, moe.top_k, g)

    def local_stack(self) -> ExpertStack:
        return ExpertStack(tuple(self.weights), tuple(self.biases))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, in] -> expert_idx [T, k], gate_w [T, k]: exactly MoE.route."""
        top, idx = self.gate(x).topk(self.top_k, dim=-1)  # [T, k], [T, k]
        return idx, top.float().softmax(dim=-1).to(x.dtype)

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int] | None = None,
                    in_splits: list[int] | None = None) -> None:
        """One timed all_to_all_single; bytes counted from the host-side split sizes."""
        g, st = self.g, self.stats
        row = math.prod(inp.shape[1:]) * inp.element_size()  # bytes per row (an empty input has no row 0)
        sent = in_splits if in_splits is not None else [inp.shape[0] // g.world_size] * g.world_size
        st.bytes_local += sent[g.rank] * row
        st.bytes_sent += (sum(sent) - sent[g.rank]) * row
        st.calls += 1
        with collective(g, "all-to-all"):
            if inp.is_cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=g.pg)
                b.record()
                st._pending.append((a, b))
            else:
                t0 = time.perf_counter()
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=g.pg)
                st.seconds += time.perf_counter() - t0

    def _run_local(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [R, in] in arrival order (by source rank, then local expert); counts [W, E_local] -> [R, out]."""
        W, El, R = self.g.world_size, self.local_experts, rows.shape[0]
        ids = torch.arange(El, device=rows.device).repeat(W)  # [W*E_local] local expert of each count
        local = ids.repeat_interleave(counts.reshape(-1), output_size=R)  # [R], sizes known: no sync
        r = sort_by_expert(local[:, None], rows.new_ones(R, 1), El)  # regroup rows by local expert
        h = rows[r.token]  # [R, in]
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = F.grouped_mm(h, w.transpose(-2, -1), offs=r.ends) + b[r.expert]  # [R, out_l]
            if layer < last:
                h = F.relu(h)
        out = torch.empty_like(h)
        out[r.token] = h  # back to arrival order
        return out

    def forward(self, x: Tensor) -> Tensor:
        W, El = self.g.world_size, self.local_experts
        if x.is_cuda:
            self.stats.harvest()
        idx, gate_w = self.route(x)  # [T, k], [T, k]
        r = sort_by_expert(idx, gate_w, self.experts)  # pairs sorted by expert, hence by owning rank
        send_counts = (r.ends.long() - r.starts)  # [E] pairs for each global expert
        recv_counts = torch.empty_like(send_counts)  # [W*E_local]: [s*El + j] = pairs from rank s for my expert j
        self._all_to_all(recv_counts, send_counts)
        # the one host sync: all_to_all_single needs the split sizes as Python ints
        send_splits, recv_splits = torch.stack(
            [send_counts.view(W, El).sum(1), recv_counts.view(W, El).sum(1)]).tolist()
        h = x[r.token]  # [P, in] pairs in send order
        self.last_received_pairs = sum(recv_splits)
        rows = x.new_empty(self.last_received_pairs, x.shape[1])  # [R, in]
        self._all_to_all(rows, h, recv_splits, send_splits)
        y = self._run_local(rows, recv_counts.view(W, El))  # [R, out]
        back = y.new_empty(h.shape[0], y.shape[1])  # [P, out] in send order
        self._all_to_all(back, y, send_splits, recv_splits)
        return combine(back, r, x.shape[0])  # [T, out]

    def extra_repr(self) -> str:
        return (f"experts={self.experts} ({self.local_experts} on rank {self.g.rank}: "
                f"{self.first_expert}..{self.first_expert + self.local_experts - 1}), top_k={self.top_k}, "
                f"world_size={self.g.world_size}")


@torch.no_grad()
def broadcast_module(m: nn.Module, g: Group, src: int = 0) -> nn.Module:
    """Every parameter and buffer of ``m`` replaced by rank ``src``'s, in place."""
    with collective(g, "broadcast"):
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, src=src, group=g.pg)
    return m


# ---------------------------------------------------------------------------------------------------------
# The measurement: the same number of batches on every rank, inside simultaneous windows


@dataclass
class RankResult:
    """One rank's figures for one model."""

    rank: int
    hostname: str
    device: str
    batch_size: int
    batches: int
    seconds: float
    latency_ms: list[float]
    energy: Measurement
    comm: dict | None
    flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["energy"] = self.energy.as_dict()
        return d


@torch.inference_mode()
def measure_ranks(model: nn.Module, batch: Tensor, duration: float, warmup: float, meter: Meter, g: Group,
                  on_tick: Callable[[float], None] | None = None) -> RankResult:
    """Warm up, agree on a batch count that fills ``duration`` on the slowest rank, run it in one window.

    A time-bound loop cannot work here: an expert-parallel forward is a collective, so every rank must run
    exactly as many as the others. The count comes from timed warm-up batches, maxed over ranks.
    """
    model.eval()
    sync = device_sync(batch.device)
    stats: CommStats | None = getattr(model, "stats", None)

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            model(batch)
        sync()
        return time.perf_counter() - t0

    run(3)  # cold: allocator, first kernel launches
    # Calibrate: batches doubling until a timed run is long enough to trust (all ranks see the same max).
    n, target = 2, min(0.5, 0.1 * duration)
    while True:
        took = agree_max(g, run(n))
        if took >= target or n >= 4096:
            break
        n *= 4
    per_batch = took / n
    if warmup > 0:
        n_warm = max(1, math.ceil(warmup / per_batch))
        per_batch = agree_max(g, run(n_warm) / n_warm) if n_warm >= 5 else per_batch
    n = max(1, math.ceil(duration / max(per_batch, 1e-9)))
    barrier(g)
    if stats is not None:
        stats.reset()
    last_tick = 0.0
    with window(meter, "bench", sync) as w:
        start = time.perf_counter()
        for _ in range(n):
            model(batch)
            elapsed = time.perf_counter() - start
            if on_tick is not None and elapsed - last_tick >= 0.2:
                on_tick(elapsed)
                last_tick = elapsed
    seconds = time.perf_counter() - start
    comm = None
    if stats is not None:
        stats.harvest(wait=True)  # after the window's closing sync: every event has completed
        comm = stats.as_dict()
    assert w.result is not None
    flags: list[str] = []
    if seconds < MIN_TRUSTED_SECONDS:
        flags.append(f"window of {seconds:.2f} s is shorter than {MIN_TRUSTED_SECONDS} s: energy unreliable")
    # Latency, outside the counted window; every rank runs the same count (collectives again).
    n_lat = min(200, max(10, math.ceil(min(2.0, 0.1 * duration) / max(per_batch, 1e-9))))
    lat = []
    for _ in range(n_lat):
        lat.append(run(1) * 1e3)
    return RankResult(g.rank, platform.node(), str(batch.device), batch.shape[0], n, seconds, lat, w.result, comm,
                      flags)


def gather_results(g: Group, res: RankResult) -> list[dict] | None:
    """Every rank's result on rank 0 (None elsewhere)."""
    out: list | None = [None] * g.world_size if g.is_main else None
    with collective(g, "gather"):
        dist.gather_object(res.as_dict(), out, dst=0, group=g.pg)
    return out


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def job_energy(ranks: list[dict]) -> tuple[float | None, str, list[str]]:
    """(total J, method, flags) over every rank; a device two ranks both read (e.g. one CPU package under
    RAPL on a shared host) counts once; any rank not measured makes the total None."""
    flags: list[str] = []
    method = weakest([r["energy"]["method"] for r in ranks])
    missing = [r["rank"] for r in ranks if r["energy"]["joules_by_device"] is None]
    if missing:
        return None, method, [f"energy not measured on rank(s) {missing}: job total withheld"]
    seen: dict[tuple[str, str], int] = {}
    total = 0.0
    for r in ranks:
        e = r["energy"]
        for dev, j in e["joules_by_device"].items():
            key = (r["hostname"], dev)
            shared = e.get("method_by_device", {}).get(dev, e["method"]) in ("counter", "sampled")
            if shared and key in seen:  # a per-process estimate is never shared
                flags.append(f"{dev} on {r['hostname']} read by ranks {seen[key]} and {r['rank']}: counted once")
                continue
            seen[key] = r["rank"]
            total += j
    return total, method, flags


def job_record(ranks: list[dict], flops_per_inference: int) -> dict:
    """The whole job's figures for one model, named as the single-process runner names them."""
    inferences = sum(r["batches"] * r["batch_size"] for r in ranks)
    window_s = max(r["seconds"] for r in ranks)  # ranks ran side by side: the job took the longest
    joules, method, eflags = job_energy(ranks)
    lat = [x for r in ranks for x in r["latency_ms"]]
    ipj = inferences / joules if joules is not None and math.isfinite(joules) and joules > 0 else None
    flags = sorted({f for r in ranks for f in r["flags"] + r["energy"]["flags"]}) + eflags
    if joules is not None and joules <= 0:
        flags.append("zero-joule reading: inferences_per_joule withheld")
    comm = [r["comm"] for r in ranks]
    par: dict = {
        "per_rank": [{"rank": r["rank"], "hostname": r["hostname"], "device": r["device"], "batches": r["batches"],
                      "window_s": r["seconds"], "energy_j": r["energy"]["energy_j"],
                      "energy_by_device_j": r["energy"]["joules_by_device"],
                      "energy_method": r["energy"]["method"], "energy_devices": r["energy"]["devices_covered"],
                      **(r["comm"] or {})} for r in ranks],
        "per_rank_joules": [r["energy"]["energy_j"] for r in ranks],
    }
    if all(c is not None for c in comm):
        par.update(
            all_to_all_seconds_by_rank=[c["all_to_all_seconds"] for c in comm],
            all_to_all_seconds=max(c["all_to_all_seconds"] for c in comm),
            all_to_all_share_of_window=max(c["all_to_all_seconds"] / r["seconds"] for c, r in zip(comm, ranks)),
            all_to_all_bytes_by_rank=[c["all_to_all_bytes"] for c in comm],
            all_to_all_bytes=sum(c["all_to_all_bytes"] for c in comm),
            all_to_all_bytes_per_inference=sum(c["all_to_all_bytes"] for c in comm) / inferences,
            all_to_all_calls=sum(c["all_to_all_calls"] for c in comm),
        )
    return {
        "batch_size": ranks[0]["batch_size"],
        "batches": sum(r["batches"] for r in ranks),
        "inferences": inferences,
        "window_s": window_s,
        "inferences_per_second": inferences / window_s,
        "latency_p50_ms": _pct(lat, 50),
        "latency_p95_ms": _pct(lat, 95),
        "latency_mean_ms": statistics.fmean(lat) if lat else None,
        "flops_per_inference": flops_per_inference,
        "achieved_gflops": inferences * flops_per_inference / window_s / 1e9,
        "energy_j": joules,
        "average_power_w": joules / window_s if joules is not None else None,
        "inferences_per_joule": ipj,
        "energy_method": method,
        "energy_meter": "+".join(sorted({r["energy"]["meter"] for r in ranks})),
        "energy_devices": sorted({f"{r['hostname']}:{d}" for r in ranks for d in r["energy"]["devices_covered"]}),
        "flags": flags,
        "parallel": par,
    }


# ---------------------------------------------------------------------------------------------------------
# The run: train (each rank identically), broadcast, measure MoE (expert-parallel) and dense (data-parallel)


def rank_meter(device: torch.device) -> Meter:
    """This rank's default meter: every real counter covering its own device (the estimate if none)."""
    from .energy.select import auto_meter

    return auto_meter(device)


def rank_batch(data: Dataset, batch_size: int, rank: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Each rank its own batch: held-out rows from offset rank*batch_size, wrapping around. [B, in]"""
    x = data.x_test
    idx = (torch.arange(batch_size) + rank * batch_size) % len(x)
    return x[idx].to(device=device, dtype=dtype).contiguous()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_distributed(spec: ModelSpec, opts: RunOptions, g: Group,
                    meter_factory: Callable[[torch.device], Meter] | None = None, ui: UI | None = None,
                    log: Callable[[str], None] | None = None, save: bool = True) -> tuple[dict | None, Path | None]:
    """Every rank calls this; rank 0 returns the job's document (and its path when saved), others (None, None).

    ``meter_factory(device)`` gives this rank's meter over its own devices (default: ``rank_meter``).
    """
    ui = ui if g.is_main and ui is not None else SilentUI()
    log = log or (lambda s: None)
    meter: Meter = NullMeter("start-up failed")
    dtype = DTYPE[opts.dtype]
    set_stage("start-up checks")
    data: Dataset | None = None
    err = None
    try:
        if opts.strategies not in ((EP_STRATEGY,), ("auto",)):  # auto (the default) means: the fast one
            raise ConfigError(f"--parallel expert runs the local experts with the {EP_STRATEGY} strategy; "
                              f"drop --moe-strategy {','.join(opts.strategies)}")
        check_divisible(spec.experts, g.world_size)
        meter = (meter_factory or rank_meter)(g.device)
        data = make_dataset(opts.samples, spec.input_dim, spec.classes, opts.seed, opts.test_fraction, opts.data)
        if opts.data:
            spec = replace(spec, input_dim=data.input_dim, classes=data.classes).validate()
        if g.is_main and save:
            check_writable(opts.out)
    except ConfigError as e:
        err = str(e)
    agree_on_start(g, job_config(spec, opts, data_fingerprint(data) if data else "-", g.timeout_s), err)
    assert data is not None

    doc = new_document(
        spec=asdict(spec), options=opts.as_dict(), environment=describe(g.device),
        dataset={"source": data.source, "train_samples": len(data.x_train), "test_samples": len(data.x_test),
                 "input_dim": data.input_dim, "classes": data.classes, "chance_accuracy": data.chance_accuracy},
    )
    doc["energy_meter"] = {"name": meter.name, "method": meter.method}
    hosts = all_gather_object(g, {"rank": g.rank, "hostname": platform.node(), "device": str(g.device),
                                  "device_name": doc["environment"]["device_name"], "meter": meter.name})
    doc["parallel"] = {"mode": "expert", "world_size": g.world_size, "backend": g.backend,
                       "collective_timeout_s": g.timeout_s, "ranks": hosts,
                       "nodes": len({h["hostname"] for h in hosts}),
                       "note": "MoE: experts sharded, tokens moved by all-to-all; dense: data-parallel, "
                               "each rank its own batch; every rank trained identically, rank 0's weights broadcast"}
    batch = rank_batch(data, opts.batch_size, g.rank, g.device, dtype)
    steps = opts.epochs * -(-len(data.x_train) // opts.batch_size)

    for plan in plans(spec, opts.models):
        name, desc = plan.name, plan.fields()
        set_stage(f"training {name}")
        torch.manual_seed(opts.seed)
        model: nn.Module
        if desc["kind"] == "moe":
            model = MoE.from_spec(spec, strategy=TRAIN_STRATEGY)
        else:
            model = DenseMLP(spec.input_dim, desc["width"], spec.layers, spec.classes)
        model.to(g.device)
        log(f"{g.where()}: training {name} on {g.device}")
        # Training has no collectives, so a slow epoch cannot trip the timeout; rank 0's weights win below.
        with ui.training(name, steps) as step:
            tr: TrainResult = train(model, data, opts.epochs, opts.lr, opts.batch_size, g.device, opts.seed, step)
        set_stage(f"broadcasting {name}")
        if desc["kind"] == "moe":
            ep = ExpertParallelMoE.from_moe(model, g)  # type: ignore[arg-type]
            del model
            _free(g.device)
            model, label, strategy = ep, MOE_LABEL, EP_STRATEGY
        else:
            broadcast_module(model, g)
            label, strategy = name, None
        acc_bench = tr.test_accuracy
        if dtype != torch.float32:
            model.to(dtype)
            if desc["kind"] != "moe":
                acc_bench = evaluate(model, data.x_test, data.y_test, opts.batch_size, g.device, dtype)
            else:
                acc_bench = None  # held-out evaluation would need every rank in lock-step; not run
        set_stage(f"measuring {label}")
        log(f"{g.where()}: measuring {label}")
        with ui.measuring(label, opts.duration) as tick:
            res = measure_ranks(model, batch, opts.duration, opts.warmup, meter, g, on_tick=tick)
        ranks = gather_results(g, res)
        if g.is_main:
            assert ranks is not None
            rec = {"name": label, **desc, "strategy": strategy, "dtype": opts.dtype, "accuracy": tr.test_accuracy,
                   "accuracy_bench_dtype": acc_bench, "diverged": tr.diverged, "train": tr.as_dict(),
                   **job_record(ranks, desc["flops_per_inference"])}
            doc["models"].append(rec)
            ui.info(label)
        del model
        _free(g.device)

    set_stage("finishing")
    barrier(g)
    if not g.is_main:
        return None, None
    path = None
    if save:
        path = write_atomic(doc, opts.out, run_stem(doc, opts.extra.get("preset"), f"-ep{g.world_size}"))
    return doc, path
