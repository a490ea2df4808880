"""The two phases of serving a batch, as callables a timing loop calls again and again: a prefill of B prompts
of L tokens, and a decode step of B sequences, one new token each, against a KV cache holding L.

Everything a call needs (token ids, the cache, positions) is made once, before the first call; a call only
queues device work (no host read of a device value), so a loop can sync at its window's edges
only. The calls run under ``torch.inference_mode``. Written against transformers 5.24.0's cache API (read
from its source): ``forward(input_ids, cache=, position_ids=, use_cache=, logits_to_keep=)``, a StaticLayer's
write position being its ``cumulative_length`` tensor (no ``cache_position`` argument in 5.x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .archs import whole

Step = Callable[[], Tensor]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check(model: nn.Module, batch: int, context: int, decode: bool) -> None:
    """batch >= 1 and the positions the phase writes exist: 0 .. L-1 for a prefill, L too for a decode step."""
    where = type(model).__name__
    whole(where, "batch", batch)
    top = model.config.max_position_embeddings - (1 if decode else 0)
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= top:
        raise ConfigError(f"{where}: context={context!r} must be a whole number from 1 to {top} "
                          f"(max_position_embeddings {model.config.max_position_embeddings}"
                          f"{', one left to decode' if decode else ''})")


def random_token_ids(vocab: int, shapes: list[tuple[int, int]], seed: int) -> list[Tensor]:
    """Uniform ids on the CPU from one generator seeded with ``seed``: the same prompts on any device and for
    any engine (transformers here, vLLM in ``vllm_engine``), so the engines measure the same inputs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, s, generator=g) for s in shapes]


def _token_ids(model: nn.Module, shapes: list[tuple[int, int]], seed: int) -> list[Tensor]:
    """``random_token_ids`` for ``model``'s vocabulary, each moved once to its device."""
    return [t.to(_device(model)) for t in random_token_ids(model.config.vocab_size, shapes, seed)]


def prefill_step(model: nn.Module, batch: int, context: int, seed: int = 0) -> tuple[Step, int]:
    """(fn, B x L): fn runs one forward over B random prompts of L tokens, as serving does: it writes every
    layer's keys and values to a fresh cache (``use_cache``; without a cache, transformers 5.24 reads the
    position ids back to look for packed sequences: a host sync) and returns the last position's logits
    [B, 1, V] only (``logits_to_keep=1``: the L x V logits serving never computes are left out)."""
    _check(model, batch, context, decode=False)
    whole(type(model).__name__, "seed", seed, least=0)
    (ids,) = _token_ids(model, [(batch, context)], seed)  # [B, L]

    def fn() -> Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits  # [B, 1, V]

    return fn, batch * context


def decode_step(model: nn.Module, batch: int, context: int, seed: int = 0) -> tuple[Step, int]:
    """(fn, B): fn decodes one new token for each of B sequences whose KV cache holds L tokens.

    The cache is a transformers StaticCache of L + 1 slots, filled once here by a prefill of one prompt of L random
    tokens whose keys and values every sequence of the batch then holds (a copy per row): a step costs what it costs
    whatever the cache holds (its shapes decide), the weights are random, so B different prompts would be no truer,
    and a B x L prefill the window never measures would cost B times the time (minutes for a dense 7B at B 16 on a
    CPU). Each sequence decodes its own new token. Every call then writes its token at position L, the same slot
    each time (the write position is rewound to L first: one fill of a [layers] counter on the device), so every
    call costs exactly what a step at context L costs, however many times a loop repeats it, and the cache never
    grows past L + 1. A sliding-window layer whose window L fills (gpt-oss's 128 tokens, Mistral-7B's 4096) rolls
    its window by one each call as a real step does: the cost is the same, its contents drift after the first call.
    Returns the new tokens' logits [B, 1, V].
    """
    from transformers import StaticCache

    _check(model, batch, context, decode=True)
    whole(type(model).__name__, "seed", seed, least=0)
    prompt, new = _token_ids(model, [(1, context), (batch, 1)], seed)  # [1, L], [B, 1]
    cache = StaticCache(config=model.config, max_cache_len=context + 1)
    positions = torch.full((batch, 1), context, dtype=torch.long, device=new.device)  # [B, 1]
    with torch.inference_mode():
        model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        _widen(cache, batch)
        rewind = _rewinder(cache, context)
    return DecodeStep(model, new, positions, cache, rewind), batch


class DecodeStep:
    """decode_step's callable: the call is the step; ``cache`` is there for checks (its layers and bytes)."""

    def __init__(self, model: nn.Module, new: Tensor, positions: Tensor, cache: object,
                 rewind: Callable[[], None]) -> None:
        self.model, self.new, self.positions, self.cache, self.rewind = model, new, positions, cache, rewind

    def __call__(self) -> Tensor:
        with torch.inference_mode():
            self.rewind()
            out = self.model(input_ids=self.new, cache=self.cache, position_ids=self.positions, use_cache=True)
            return out.logits  # [B, 1, V]


def _widen(cache: object, batch: int) -> None:
    """Every layer's keys and values [1, H, S, D] copied to [B, H, S, D]: B sequences holding the one prompt."""
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1).contiguous()
        layer.values = layer.values.expand(batch, -1, -1, -1).contiguous()
        layer.batch_size = batch
        torch._dynamo.mark_static_address(layer.keys)  # as the layer's own allocation marks them (compile)
        torch._dynamo.mark_static_address(layer.values)


def _rewinder(cache: object, context: int) -> Callable[[], None]:
    """A call that sets every layer's write position back to ``context`` with one device op: each StaticLayer's
    ``cumulative_length`` (the tensor its ``update`` adds to in place) becomes a view into one [layers] counter;
    sliding layers also keep a host int, set by assignment."""
    from transformers.cache_utils import StaticLayer

    layers = [layer for layer in cache.layers if isinstance(layer, StaticLayer)]
    device = layers[0].keys.device
    counters = torch.full((len(layers),), context, dtype=torch.long, device=device)  # [layers]
    sliding = [layer for layer in layers if hasattr(layer, "cumulative_length_int")]
    for i, layer in enumerate(layers):
        layer.cumulative_length = counters[i]  # 0-d view: the layer's add_ lands in counters[i]

    def rewind() -> None:
        counters.fill_(context)
        for layer in sliding:
            layer.cumulative_length_int = context

    return rewind
