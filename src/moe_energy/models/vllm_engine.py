"""vLLM as the whole-model workload's engine (``run --model ... --engine vllm``): the same two phases as
``generate.py`` (a callable and the tokens one call produces), served by vLLM's offline API with its own
batching, scheduler, paged KV cache, fused MoE kernels and CUDA graphs: what ML.ENERGY's benchmark measures.

Nothing is downloaded: the model directory is a temporary folder holding only the preset's ``config.json``
(``whole.config_for``, written with ``save_pretrained``), vLLM makes random weights (``load_format="dummy"``),
and the prompts are token ids (``skip_tokenizer_init``: no tokenizer exists). vLLM is imported only here and only
when an engine is built: the rest of moe-energy runs without it (it is the ``vllm`` extra, CUDA hosts only).

What a call measures:
- prefill: ``generate`` of B prompts of L tokens with ``max_tokens=1``: B x L prompt tokens. Each call changes
  its prompts' first tokens (a call counter), so no call finds a prompt in the prefix cache.
- decode: ``generate`` of B prompts whose L tokens are already in the prefix cache (one warm call when the step
  is made, outside any window; the window's warm-up refreshes it), ``max_tokens=min_tokens=T`` with
  ``ignore_eos``: B x T output tokens. vLLM recomputes at most the prompt's last KV block (it needs the last
  prompt token's logits), so nearly all of a call's energy is its T decode steps, at contexts L to L + T - 1.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generate import random_token_ids
from .whole import WholeModel, config_for

# Output tokens per sequence in one decode call. 64 steps make the one recomputed prompt block (16 tokens per
# sequence at vLLM's default block size) and the call's scheduling a few per cent of its work, while the
# context moves only from L to L + 63 (about 6 % past L at L = 512 and 1.5 % at 4096); ITL is the call / T.
DECODE_TOKENS = 64
# The share of the GPU vLLM takes for weights, activations and its KV cache (vLLM's own default, stated).
GPU_MEMORY_UTILIZATION = 0.9
INSTALL = "pip install -e '.[vllm]' on a CUDA host"
METHOD = {
    "prefill": "generate(B prompts of L random token ids, max_tokens=1): B x L prompt tokens per call; each call "
               "changes the prompts' first tokens, so nothing is served from the prefix cache",
    "decode": f"generate(the same B prompts, max_tokens=min_tokens={DECODE_TOKENS}, ignore_eos) with the L prompt "
              "tokens already in vLLM's prefix cache (warmed outside the windows): B x T output tokens per call, "
              "at contexts L to L + T - 1; vLLM recomputes at most the prompt's last KV block per sequence; "
              "inter-token latency = the call's latency / T",
}


def missing() -> str | None:
    """Why ``--engine vllm`` cannot run here for want of vLLM (None: it is importable), found without importing
    it (an import takes seconds and initialises CUDA)."""
    if sys.modules.get("vllm") is not None:
        return None
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"--engine vllm: vLLM is not installed here; {INSTALL}"


def version() -> str | None:
    """The installed vLLM's version, for the results document (None: not known, e.g. a test's stand-in)."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Engine:
    """One model served by vLLM: the ``vllm.LLM`` and the folder holding its config (removed with the engine)."""

    model: WholeModel
    llm: Any
    folder: tempfile.TemporaryDirectory = field(repr=False)
    # prefill calls numbered over the engine's life: the same seed makes (1, L)'s prompt the first row of (B, L)'s
    # and the start of (1, 2L)'s, so a count per step would repeat another step's prompts (a cache hit)
    prefills: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def kv_cache_tokens(self) -> int | None:
        """Tokens vLLM's KV cache holds (blocks x block size), when this vLLM reports it to the caller."""
        cache = getattr(getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
        blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
        return blocks * size if isinstance(blocks, int) and isinstance(size, int) else None


def build_engine(model: WholeModel, dtype: str, max_batch: int, max_context: int, seed: int) -> Engine:
    """``model`` in vLLM with random weights, sized for every point: sequences of up to ``max_context`` prompt
    tokens and ``DECODE_TOKENS`` more, ``max_batch`` of them scheduled at once; prefix caching on (decode needs
    it; prefill's prompts never hit it)."""
    from vllm import LLM

    folder = tempfile.TemporaryDirectory(prefix=f"moe-energy-vllm-{model.name}-")
    write_config(model, Path(folder.name))
    llm = LLM(model=folder.name, load_format="dummy", dtype=dtype, skip_tokenizer_init=True, seed=seed,
              enable_prefix_caching=True, max_model_len=max_context + DECODE_TOKENS, max_num_seqs=max_batch,
              gpu_memory_utilization=GPU_MEMORY_UTILIZATION, generation_config="vllm")
    return Engine(model, llm, folder)


def write_config(model: WholeModel, folder: Path) -> dict[str, Any]:
    """The preset's ``config.json`` in ``folder`` as vLLM reads it: ``save_pretrained``'s file plus what a reader
    with another transformers needs (vLLM pins its own): ``architectures`` (vLLM picks its model class by it),
    every ``attribute_map`` alias (5.x writes ``num_local_experts`` where 4.x reads ``num_experts``) and 4.x's
    ``rope_theta`` / ``rope_scaling`` beside 5.x's ``rope_parameters``. Returns what it wrote."""
    config = config_for(model)
    config.save_pretrained(str(folder))
    path = folder / "config.json"
    out = json.loads(path.read_text())
    out["architectures"] = [model.model_class]
    for alias, name in getattr(config, "attribute_map", {}).items():
        if name in out:
            out.setdefault(alias, out[name])
    rope = out.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", {**rope, "type": rope["rope_type"]})
    path.write_text(json.dumps(out, indent=2))
    return out


class Step:
    """One phase's call (``generate`` of its prompts), keeping its last outputs for ``after_window``: how many
    prompt tokens vLLM found cached and how many it generated, per request, read after the window."""

    def __init__(self, llm: Any, prompts: Callable[[], list[dict[str, Any]]], params: Any) -> None:
        self.llm, self.prompts, self.params = llm, prompts, params
        self.last: list[Any] = []

    def __call__(self) -> list[Any]:
        self.last = self.llm.generate(self.prompts(), self.params, use_tqdm=False)
        return self.last

    def facts(self) -> dict[str, Any]:
        """[least, most] prompt tokens found cached and output tokens, over the last call's requests."""
        cached = [getattr(o, "num_cached_tokens", None) for o in self.last]
        made = [len(o.outputs[0].token_ids) for o in self.last]
        known = [c for c in cached if isinstance(c, int)]
        return {"prompt_tokens_cached": [min(known), max(known)] if known and len(known) == len(cached) else None,
                "output_tokens": [min(made), max(made)] if made else None}


def _params(tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, detokenize=False)


def _rows(engine: Engine, batch: int, context: int, seed: int) -> list[list[int]]:
    """B rows of L random ids: the transformers engine's prompts at this (B, L, seed)."""
    (ids,) = random_token_ids(engine.model.vocab, [(batch, context)], seed)  # [B, L]
    return ids.tolist()


def prefill_step(engine: Engine, batch: int, context: int, seed: int = 0) -> tuple[Step, int]:
    """(fn, B x L): fn prefills B prompts of L tokens and samples one token each; call n's prompts have their
    first two tokens shifted by n's two digits in base V (the vocabulary; V^2 calls before one repeats), n
    counting every prefill call of the engine, so no call's blocks are in the prefix cache (a hit would measure
    a lookup, not a prefill). The decode step's prompts are the unshifted ones (n = 0 never comes)."""
    rows, vocab = _rows(engine, batch, context, seed), engine.model.vocab

    def prompts() -> list[dict[str, Any]]:
        n = next(engine.prefills)
        low, high = n % vocab, n // vocab % vocab
        return [{"prompt_token_ids": [(row[0] + low) % vocab, *[(t + high) % vocab for t in row[1:2]], *row[2:]]}
                for row in rows]

    return Step(engine.llm, prompts, _params(1)), batch * context


def decode_step(engine: Engine, batch: int, context: int, seed: int = 0,
                tokens: int = DECODE_TOKENS) -> tuple[Step, int]:
    """(fn, B x T): fn generates T tokens for each of B prompts of L tokens already in the prefix cache (one
    warm call here, outside any window), so its work is T decode steps at contexts L .. L + T - 1 and at most
    one recomputed prompt block per sequence (see the module's docstring)."""
    rows = _rows(engine, batch, context, seed)
    prompts = [{"prompt_token_ids": row} for row in rows]
    engine.llm.generate(prompts, _params(1), use_tqdm=False)  # fills the prefix cache with the L-token prompts
    return Step(engine.llm, lambda: prompts, _params(tokens)), batch * tokens
