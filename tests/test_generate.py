"""prefill_step and decode_step on tiny whole models: repeatable calls, the right tokens per call, a decode cache
that stays at L + 1, the logits a full forward gives, and no host sync inside a call."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[test]')")

from moe_energy.errors import ConfigError  # noqa: E402
from moe_energy.models.generate import decode_step, prefill_step  # noqa: E402
from moe_energy.models.swap import swap_moe_blocks  # noqa: E402
from moe_energy.models.whole import build_model, memory_bytes, tiny  # noqa: E402

B, L, SEED = 2, 6, 3
# (preset, swap the MoE blocks for moe-energy's): dense, MoE, MLA, sliding windows (tiny's are 8 tokens)
CASES = [("qwen3-8b", False), ("qwen3-30b-a3b", False), ("qwen3-30b-a3b", True), ("deepseek-v2-lite", False),
         ("deepseek-v2-lite", True), ("gpt-oss-20b", False), ("gpt-oss-20b", True), ("mistral-7b", False)]


def _model(name: str, swap: bool) -> tuple[torch.nn.Module, object]:
    m = tiny(name, layers=3)
    model = build_model(m, seed=1)
    if swap:
        assert swap_moe_blocks(model, strategy="grouped") > 0
    return model, m


def _ids(vocab: int, context: int, rows: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt [rows, L] and new token [B, 1] the steps draw for SEED (one generator, in that order)."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (rows, context), generator=g), torch.randint(0, vocab, (B, 1), generator=g)


@pytest.mark.parametrize(("name", "swap"), CASES[:3])
def test_prefill_is_a_forward_over_b_prompts_of_l_tokens(name, swap):
    model, m = _model(name, swap)
    fn, tokens = prefill_step(model, B, L, seed=SEED)
    assert tokens == B * L
    outs = [fn() for _ in range(3)]
    assert outs[0].shape == (B, 1, m.vocab) and all(torch.equal(o, outs[0]) for o in outs)
    prompt, _ = _ids(m.vocab, L)
    with torch.inference_mode():
        full = model(input_ids=prompt).logits  # [B, L, V]
    torch.testing.assert_close(outs[0][:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "swap"), CASES)
@pytest.mark.parametrize("context", [L, 12])  # 12: past the tiny sliding windows (8), which then roll
def test_decode_steps_at_position_l_against_a_cache_of_l_plus_1(name, swap, context):
    model, m = _model(name, swap)
    fn, tokens = decode_step(model, B, context, seed=SEED)
    assert tokens == B
    outs = [fn().clone() for _ in range(3)]
    cache = fn.cache
    windows = [getattr(layer, "is_sliding", False) for layer in cache.layers]
    for layer, sliding in zip(cache.layers, windows):
        want = min(8, context + 1) if sliding else context + 1
        assert layer.max_cache_len == want and layer.keys.shape[-2] == want
        assert layer.keys.shape[0] == layer.values.shape[0] == B  # the one prompt's cache, a copy per sequence
    assert int(cache.get_seq_length()) == context + 1  # one token written past L, rewound before each call
    prompt, new = _ids(m.vocab, context, rows=1)  # one prompt, held by every sequence; B new tokens
    assert not torch.equal(new[0], new[1])
    with torch.inference_mode():
        full = model(input_ids=torch.cat([prompt.expand(B, -1), new], dim=1)).logits  # [B, L+1, V]
    assert outs[0].shape == (B, 1, m.vocab)
    torch.testing.assert_close(outs[0][:, 0], full[:, context], atol=1e-5, rtol=1e-5)
    if not any(windows) or context + 1 <= 8:  # a full window rolls each call: same cost, drifting values
        assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b", "mistral-7b"])
def test_decode_cache_holds_what_memory_bytes_says(name):
    model, m = _model(name, False)
    fn, _ = decode_step(model, B, 12, seed=SEED)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in fn.cache.layers)
    assert held == memory_bytes(m, None, "float32", B, 12)["kv_cache"]


class HostReads(TorchDispatchMode):
    """Records what reads a device value back to the host: aten._local_scalar_dense (.item(), bool(), int())
    and Tensor.tolist / cpu / numpy, which do not go through the dispatcher."""

    NAMES = ("tolist", "cpu", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, lambda t, *a, _n=n, _f=f, **k: (self.reads.append(_n), _f(t, *a, **k))[1])
        return super().__enter__()

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        return super().__exit__(*exc)


def test_the_detector_sees_host_reads():
    with HostReads() as h:
        torch.ones(2).tolist()
        torch.ones(1).item()
    assert h.reads == ["tolist", "aten._local_scalar_dense.default"]


@pytest.mark.parametrize(("name", "swap"), CASES)
def test_no_host_sync_inside_a_call(name, swap):
    model, _ = _model(name, swap)
    prefill, _ = prefill_step(model, B, 12, seed=SEED)
    decode, _ = decode_step(model, B, 12, seed=SEED)
    for fn in (prefill, decode):
        fn()
        with HostReads() as h:
            fn()
        assert h.reads == []


@pytest.mark.parametrize(("call", "needle"), [
    (lambda mdl: decode_step(mdl, 1, 40960), "context=40960 must be a whole number from 1 to 40959"),
    (lambda mdl: prefill_step(mdl, 1, 40961), "context=40961 must be a whole number from 1 to 40960"),
    (lambda mdl: prefill_step(mdl, 0, 8), "batch=0"),
    (lambda mdl: decode_step(mdl, 1, 8, seed=-1), "seed=-1"),
])
def test_mistakes_are_one_line_config_errors(call, needle):
    model = build_model(tiny("qwen3-8b", layers=1), seed=0)
    with pytest.raises(ConfigError) as e:
        call(model)
    assert needle in str(e.value) and "\n" not in str(e.value)
