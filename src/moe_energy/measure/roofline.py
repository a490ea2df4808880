"""Roofline: this host's attainable GEMM FLOP/s (per dtype) and memory bandwidth, measured once and cached.

A batch cannot finish faster than max(FLOPs / attainable FLOP/s, bytes / attainable bandwidth); the
fraction of that bound a model reaches says how much of the hardware its implementation leaves unused, and
which of the two is the larger ("memory" or "compute") says which limit the batch hits (``figures``).
"Attainable" means measured here (the best of a few large matmuls, the best of a few large copies), not
a datasheet peak. The cache lives in $MOE_ENERGY_CACHE_DIR (default ~/.cache/moe-energy)/roofline.json,
one entry per device name.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..device import device_sync
from ..dtypes import dtype_of
from ..errors import ConfigError
from ..models import quant
from ..models.kernels import linear
from ..storage.fileio import now_utc, replace_atomic
from .environment import cpu_model
from .timing import time_one

CACHE_ENV = "MOE_ENERGY_CACHE_DIR"
CACHE_FILE = "roofline.json"
BUSY_LOAD = 0.5  # a 1-minute load average over this share of the CPUs: other work shares the measured cores


@dataclass(frozen=True)
class Roofline:
    device_name: str
    gemm_flops_per_s: dict[str, float]  # dtype name (or w8a8, fp8: its kernel) -> best FLOP/s of a large square matmul
    bandwidth_bytes_per_s: float  # best measured (read + write) bytes/s of a large tensor copy
    gemm_size: int
    copy_bytes: int
    measured_utc: str
    method: str = ("measured: best of repeated large matmuls (2n^3 FLOPs; torch.mm or oneDNN's linear, the faster) "
                   "and large copies (2 x size bytes)")
    busy: str | None = None  # '1-minute load 3.5 on 2 CPUs' when other work shared a CPU's cores as it was measured

    def as_dict(self) -> dict:
        return asdict(self)

    def bounds_s(self, flops: float, bytes_moved: float, dtype: str) -> tuple[float, float] | None:
        """(memory-bound, compute-bound) least seconds: ``bytes_moved`` at the copy bandwidth, ``flops`` at the
        GEMM rate; None when this dtype was not calibrated."""
        peak = self.gemm_flops_per_s.get(dtype)
        if peak is None or peak <= 0 or self.bandwidth_bytes_per_s <= 0:
            return None
        return bytes_moved / self.bandwidth_bytes_per_s, flops / peak

    def bound_s(self, flops: float, bytes_moved: float, dtype: str) -> float | None:
        """Least seconds for ``flops`` and ``bytes_moved``; None when this dtype was not calibrated."""
        both = self.bounds_s(flops, bytes_moved, dtype)
        return max(both) if both is not None else None

    def fraction_of_bound(self, seconds: float, flops: float, bytes_moved: float, dtype: str) -> float | None:
        """bound / measured, in (0, 1] for a sane measurement; None when not computable."""
        bound = self.bound_s(flops, bytes_moved, dtype)
        return bound / seconds if bound is not None and seconds > 0 else None


def figures(roof: Roofline | None, seconds_per_batch: float, flops_per_batch: float, weight_bytes_per_batch: float,
            dtype: str) -> dict:
    """The roofline columns of a result row: both bounds in ms, which one applies ("memory" | "compute": the
    slower), and the fraction of it reached (None when the device or dtype was never calibrated: never 0 or inf)."""
    both = roof.bounds_s(flops_per_batch, weight_bytes_per_batch, dtype) if roof else None
    memory_s, compute_s = both if both is not None else (None, None)
    bound = max(both) if both is not None else None
    return {
        "flops_per_batch": flops_per_batch,
        "weight_bytes_per_batch": weight_bytes_per_batch,
        "memory_bound_ms": memory_s * 1e3 if memory_s is not None else None,
        "compute_bound_ms": compute_s * 1e3 if compute_s is not None else None,
        "bound": None if both is None else ("memory" if both[0] >= both[1] else "compute"),
        "roofline_bound_ms": bound * 1e3 if bound is not None else None,
        "fraction_of_roofline": bound / seconds_per_batch if bound is not None and seconds_per_batch > 0 else None,
    }


def cache_path() -> Path:
    """$MOE_ENERGY_CACHE_DIR/roofline.json, else under ~/.cache; a ConfigError when there is no home to use."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / CACHE_FILE
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no password entry
        home = Path()
    if not home.is_absolute():  # never a cache that silently moves with the working directory
        raise ConfigError(f"no home directory to keep the roofline cache in; set {CACHE_ENV} to a directory")
    return home / ".cache" / "moe-energy" / CACHE_FILE


def device_name(device: torch.device) -> str:
    """The cache key: what the figures belong to (CPU model and thread count, or the GPU's name)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_properties(device).name}"
    if device.type == "mps":
        return "mps:Apple MPS"
    return f"cpu:{cpu_model()} x{torch.get_num_threads()} threads"


def _best_rate(fn: Callable[[], object], work: float, device: torch.device, seconds: float, min_reps: int = 3) -> float:
    """Best work/s over repeated synced calls for about ``seconds`` (after one untimed call): the attainable rate."""
    best_ms = time_one(fn, sync=device_sync(device), min_rounds=min_reps, budget_s=seconds).best_ms
    return work / (best_ms / 1e3) if best_ms > 0 else 0.0


def measure_gemm(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """The faster of torch.mm and ``kernels.linear`` (oneDNN on a CPU): the bound is what the host can do, and
    the models run through ``kernels``, so a rate from the slower library would put them over 100%."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    with torch.inference_mode():
        return max(_best_rate(lambda: torch.mm(a, b), 2.0 * n**3, device, seconds / 2),
                   _best_rate(lambda: linear(a, b), 2.0 * n**3, device, seconds / 2))


def measure_rate(device: torch.device, key: str, n: int, seconds: float) -> float:
    """The GEMM rate a roofline keeps under ``key``: a dtype's (measure_gemm), or a format's whose activations are
    rounded too (w8a8: int8 rows through fbgemm on a CPU; fp8: e4m3 rows through torch._scaled_mm on a GPU), the
    work such a layer's FLOPs are done with."""
    if key not in quant.ACTIVATION_FORMATS:
        return measure_gemm(device, dtype_of(key), n, seconds)
    dt = torch.bfloat16 if key == "fp8" else torch.float32  # the rows fp8 runs with on the GPUs it runs on
    a = torch.randn(n, n, device=device).to(dt)
    q = quant.with_acts(quant.quantize(torch.randn(n, n, device=device), key))
    with torch.inference_mode():
        return _best_rate(lambda: quant.linear(a, q), 2.0 * n**3, device, seconds)


def rate_keys(dtype: str, weights: str | None = None) -> tuple[str, ...]:
    """The GEMM rates a run's bounds need: its dtype's (the routers, transformers' blocks), and its models'
    (quant.rate_key)."""
    return tuple(dict.fromkeys((dtype, quant.rate_key(weights, dtype))))


def measure_bandwidth(device: torch.device, nbytes: int, seconds: float) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4, device, seconds)


def default_sizes(device: torch.device) -> tuple[int, int]:
    """(matmul n, copy bytes): big enough to leave caches and launch overhead behind, short on a CPU."""
    return (1536, 256 * 2**20) if device.type == "cpu" else (8192, 2 * 2**30)


def host_busy(device: torch.device) -> str | None:
    """The load other work put on the CPUs a CPU calibration is about to measure, when it is high enough to make
    the figures low (and every fraction judged by them high); None when idle enough, or on a GPU. Kept with the
    figures: a calibration is cached and judges every later run."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    return f"1-minute load {load:.1f} on {cpus} CPUs" if load > BUSY_LOAD * cpus else None


def calibrate(
    device: torch.device,
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16"),
    seconds: float = 0.6,
    gemm_size: int | None = None,
    copy_bytes: int | None = None,
    save: bool = True,
) -> Roofline:
    """Measure and (``save``) cache this device's roofline; about ``seconds`` per figure."""
    n, nbytes = default_sizes(device)
    n, nbytes = gemm_size or n, copy_bytes or nbytes
    busy = host_busy(device)
    flops = {name: measure_rate(device, name, n, seconds) for name in dtypes}
    bw = measure_bandwidth(device, nbytes, seconds)
    roof = Roofline(device_name(device), flops, bw, n, nbytes, now_utc(), busy=busy)
    if save:
        _store(roof)
    return roof


def _read_cache() -> dict:
    """The cache's table of devices; {} when it is absent, unreadable or has no place (as if never calibrated)."""
    try:
        doc = json.loads(cache_path().read_text())
    except (OSError, ValueError, ConfigError):  # ConfigError: no home for it; ValueError: not JSON, not UTF-8
        return {}
    return doc if isinstance(doc, dict) else {}


def _store(roof: Roofline) -> None:
    """Add ``roof`` to the cache; a path the OS refuses (a file where a directory should be, no permission,
    a name too long) is a one-line ConfigError naming the path and the reason."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = _read_cache()
        doc[roof.device_name] = roof.as_dict()
        replace_atomic(path, json.dumps(doc, indent=2).encode())  # a cache: replacing the old calibration is the point
    except OSError as e:
        why = e.strerror or type(e).__name__
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            why += ": the path, or a part of it, is a file, not a directory"
        raise ConfigError(f"roofline cache {path}: cannot write it ({why}); set {CACHE_ENV} to a writable "
                          "directory") from None


def _entry_problem(entry: object) -> str | None:
    """Why a cache entry cannot be trusted (a hand edit, another version, a torn file), or None."""
    def positive(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not isinstance(entry, dict):
        return f"not a table but {type(entry).__name__}"
    flops = entry.get("gemm_flops_per_s")
    if not isinstance(flops, dict) or not all(isinstance(k, str) and positive(v) for k, v in flops.items()):
        return f"gemm_flops_per_s={flops!r:.60} is not a table of positive FLOP/s per dtype"
    for key in ("bandwidth_bytes_per_s", "gemm_size", "copy_bytes"):
        if not positive(entry.get(key)):
            return f"{key}={entry.get(key)!r:.40} is not a positive number"
    unknown = set(entry) - set(Roofline.__dataclass_fields__)
    if unknown or not isinstance(entry.get("measured_utc"), str):
        return f"fields {sorted(unknown) or ['measured_utc']} are not this version's"
    if not isinstance(entry.get("busy"), (str, type(None))):
        return f"busy={entry.get('busy')!r:.40} is not a text"
    return None


def load(device: torch.device, notice: Callable[[str], None] | None = None) -> Roofline | None:
    """The cached roofline of this device, or None if it was never calibrated (run `moe-energy calibrate`).

    A damaged entry is ignored (``notice`` says so and how to rebuild it): a bound from it would be a wrong
    figure, and a run must never fail after measuring because of a cache.
    """
    name = device_name(device)
    cache = _read_cache()
    if name not in cache:
        return None
    problem = _entry_problem(cache[name])
    if problem is not None:
        if notice is not None:
            notice(f"roofline cache {cache_path()}: the entry for {name} is damaged ({problem}); ignored, so no "
                   "roofline figures; run `moe-energy calibrate` to rebuild it")
        return None
    return Roofline(**cache[name])


def load_or_calibrate(device: torch.device, dtype: str, notice: Callable[[str], None],
                      say: Callable[[str], None] | None = None, weights: str | None = None) -> Roofline:
    """The cached roofline of this device with the GEMM rates a run in ``dtype`` (and ``weights``) needs
    (rate_keys), measured first when it lacks them (a few seconds; ``say`` tells it): the whole calibration when
    none is cached, the missing rates beside a cached bandwidth otherwise. A cache that cannot be written is a
    ``notice``, not the end of the run."""
    roof = load(device, notice=notice)
    missing = [k for k in rate_keys(dtype, weights) if roof is None or k not in roof.gemm_flops_per_s]
    if not missing:
        assert roof is not None
        return roof
    (say or notice)(f"no {' or '.join(missing)} roofline cached for {device_name(device)}: calibrating it (once, "
                    "a few seconds)")
    if roof is None:  # the rates in use only: bf16 where the CPU emulates it takes minutes, not seconds
        roof = calibrate(device, tuple(missing), save=False)
    else:
        busy = host_busy(device)  # rates added on a busy host mark the entry busy, as a whole calibration would
        rates = {k: measure_rate(device, k, roof.gemm_size, 0.6) for k in missing}
        roof = dataclasses.replace(roof, gemm_flops_per_s={**roof.gemm_flops_per_s, **rates}, busy=roof.busy or busy)
    try:
        _store(roof)
    except ConfigError as e:
        notice(f"{e}; calibrated for this run only")
    return roof
