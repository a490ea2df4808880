"""Inside a whole model: moe-energy's MoE blocks against transformers' own experts implementations, decode and
prefill, side by side in one process (issue 23's target: moe-energy's decode step >= 1.0x transformers' fastest
on a CPU, >= 1.2x on a GPU).

    PYTHONPATH=src python benchmarks/whole_moe_impls.py --model olmoe-1b-7b --layers 2 --batch 1,16 --seconds 20
        [--phases decode,prefill] [--dtype bfloat16] [--device cuda]

Two copies of the model's first N layers from one seed (the same weights): one keeps transformers' MoE blocks, in
three shells that share its weights, each set once to one experts implementation (eager, batched_mm, grouped_mm:
switching one model's before each call would time transformers' switch, ~0.1 ms of host work, with its step); the
other runs moe-energy's MoELayer on its tensors (``--moe-impl moe-energy``, strategy auto). Each phase's calls are
those ``run --model`` measures (models.generate); every candidate is timed round by round, interleaved (one round
per candidate in turn, the order rotating), so the host's drift falls on all alike. Printed per batch: the median
and best ms per call of each, and moe-energy's speed relative to transformers' fastest (its median ms over
moe-energy's: above 1.0x moe-energy is faster; the best-over-best ratio beside it bounds the noise).
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import Callable

import torch

import moe_energy.runner.prepare  # noqa: F401  (installs auto's timing probe, as run does)
from moe_energy.device import sync
from moe_energy.dtypes import dtype_of
from moe_energy.errors import ConfigError
from moe_energy.measure.timing import time_interleaved
from moe_energy.models.generate import decode_step, prefill_step
from moe_energy.models.swap import swap_moe_blocks
from moe_energy.models.whole import build_model, get_model, tiny

TRANSFORMERS = ("eager", "batched_mm", "grouped_mm")


def with_impl(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """A shell of ``model`` sharing its parameters and buffers (no second copy of the weights), with its own config
    set to the experts implementation ``impl`` once, outside any timed call."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shell = copy.deepcopy(model, memo=shared)
    shell.set_experts_implementation(impl)
    return shell


def candidates(hf: dict[str, torch.nn.Module], ours: torch.nn.Module, phase: str, batch: int, context: int
               ) -> dict[str, Callable[[], object]]:
    """Each transformers implementation's call (its own shell) and moe-energy's, on the same inputs."""
    make = decode_step if phase == "decode" else prefill_step
    return {**{impl: make(model, batch, context, 0)[0] for impl, model in hf.items()},
            "moe-energy": make(ours, batch, context, 0)[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="olmoe-1b-7b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", default="1,16")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--phases", default="decode")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="the model's few-KB copy: tries the script in seconds")
    a = p.parse_args()
    try:
        m = tiny(a.model) if a.tiny else get_model(a.model)
        dt = dtype_of(a.dtype)
        dev = torch.device(a.device)
    except (ConfigError, RuntimeError) as e:  # an unknown model, dtype or device string
        p.error(str(e))
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA device here (torch {torch.__version__})")
    base = build_model(m, a.layers, dt, dev, 0)
    hf = {impl: with_impl(base, impl) for impl in TRANSFORMERS}
    ours = build_model(m, a.layers, dt, dev, 0)
    swapped = swap_moe_blocks(ours, "moe-energy", "auto")
    print(f"{m.name}: first {a.layers} of {m.layers} layers ({swapped} MoE blocks swapped), {a.dtype}, context "
          f"{a.context}, {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call, "
          "median [best]")
    for phase in a.phases.split(","):
        for b in (int(x) for x in a.batch.split(",")):
            t = time_interleaved(candidates(hf, ours, phase, b, a.context), sync=lambda: sync(dev), min_rounds=3,
                                 budget_s=a.seconds, warmup=2)
            ref = t["moe-energy"]
            cells = [f"{k} {v.median_ms:.1f} [{v.best_ms:.1f}]" for k, v in t.items()]
            fastest = min(TRANSFORMERS, key=lambda k: t[k].median_ms)
            print(f"{phase} B={b}: " + ", ".join(cells))
            print(f"  moe-energy vs transformers' fastest ({fastest}): {t[fastest].median_ms / ref.median_ms:.2f}x "
                  f"median, {t[fastest].best_ms / ref.best_ms:.2f}x best, {len(ref.samples_ms)} rounds")


if __name__ == "__main__":
    main()
