"""The Python API for whole LLMs (issue 23): ``me.models()``, ``me.build_model`` (the models.whole builder) and
``me.benchmark_generate`` (prefill and decode figures from models.generate's steps through ``benchmark``'s own
window loop and records); bad input as one-line TypeErrors and ConfigErrors. Tiny models, short windows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import raises_one_line

import moe_energy as me
from moe_energy import api
from moe_energy.config import ConfigError
from moe_energy.models.whole import models, param_counts, tiny
from moe_energy.runner.model import phase_figures

B, L = 2, 8


@pytest.fixture(scope="module")
def tiny_llm():
    return me.build_model("olmoe-1b-7b", tiny=True)


@pytest.fixture(scope="module")
def measured(tiny_llm):
    return me.benchmark_generate(tiny_llm, batch=B, context=L, duration=0.2, repeats=2, warmup=0,
                                 meter=me.make_meter("estimate"))


def test_models_are_the_whole_model_presets():
    assert me.models() == models() and "qwen3-30b-a3b" in me.models() and "qwen3-32b" in me.models()
    assert me.models()["qwen3-30b-a3b"].siblings == ("qwen3-32b", "qwen3-14b", "qwen3-4b")
    assert {"models", "build_model", "benchmark_generate", "GenerateResult"} <= set(me.__all__)


def test_build_model_builds_the_first_n_layers_in_the_dtype_asked():
    m = me.build_model("qwen3-30b-a3b", layers=1, dtype="bfloat16", tiny=True, seed=3)
    assert type(m).__name__ == "Qwen3MoeForCausalLM" and not m.training
    assert m.config.num_hidden_layers == 1 and next(m.parameters()).dtype == torch.bfloat16
    assert sum(p.numel() for p in m.parameters()) == param_counts(tiny("qwen3-30b-a3b"), 1)[0]
    again = me.build_model("qwen3-30b-a3b", layers=1, dtype="bfloat16", tiny=True, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))  # seeded


def test_benchmark_generate_gives_prefill_and_decode_per_token(measured):
    r = measured
    assert (r.batch, r.context) == (B, L) and r.prefill.repeats == r.decode.repeats == 2
    assert r.prefill.batch_size == B * L and r.decode.batch_size == B  # tokens per call: prompt, output tokens
    assert all(w["inferences"] % (B * L) == 0 for w in r.prefill.windows)
    assert all(w["inferences"] % B == 0 for w in r.decode.windows)
    pre, dec = r.figures("prefill"), r.figures("decode")
    assert pre == phase_figures("prefill", r.prefill.summary) and dec == phase_figures("decode", r.decode.summary)
    for f, res in ((pre, r.prefill), (dec, r.decode)):
        assert f["tokens_per_second"] == res.inferences_per_second > 0
        assert f["tokens_per_joule"] == res.inferences_per_joule > 0
        assert f["joules_per_token"] == pytest.approx(1 / res.inferences_per_joule)
    assert r.ttft_ms == pre["ttft_ms"] == r.prefill.latency_p50_ms > 0 and pre["itl_p50_ms"] is None
    assert r.itl_p50_ms == r.decode.latency_p50_ms and r.itl_p90_ms == r.decode.summary["latency_p90_ms"]
    assert r.itl_p90_ms >= r.itl_p50_ms > 0 and dec["ttft_ms"] is None
    assert r.decode.is_estimate and "ESTIMATE" in repr(r) and "J/token" in repr(r)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["schema"] == "moe-energy/generate" and d["decode"]["itl_p90_ms"] == r.itl_p90_ms
    assert d["prefill"]["result"]["energy_note"] and len(d["decode"]["result"]["windows"]) == 2
    with pytest.raises(ValueError, match="phase='train'"):
        r.figures("train")


def test_benchmark_generate_runs_benchmarks_one_window_loop(tiny_llm, monkeypatch):
    """No second loop: both phases go through ``api._windows``, as ``benchmark`` does, and idle power is read once."""
    calls: list[tuple[int, int]] = []
    idles: list[float] = []
    loop, idle = api._windows, api.measure_idle
    monkeypatch.setattr(api, "_windows", lambda fn, batch, how, flops, n: calls.append((n, how.repeats))
                        or loop(fn, batch, how, flops, n))
    monkeypatch.setattr(api, "measure_idle", lambda meter, s, sync: idles.append(s) or idle(meter, s, sync))
    r = me.benchmark_generate(tiny_llm, batch=1, context=4, duration=0.05, repeats=1, warmup=0,
                              meter=me.make_meter("none"))
    assert calls == [(4, 1), (1, 1)] and idles == [0.0]
    assert r.figures("decode")["joules_per_token"] is None and r.decode.inferences_per_joule is None  # no meter
    me.benchmark(torch.nn.Linear(4, 4), torch.zeros(2, 4), duration=0.05, repeats=1, warmup=0,
                 meter=me.make_meter("none"))
    assert calls[-1] == (2, 1)


def test_bad_input_is_one_line(tiny_llm):
    raises_one_line(TypeError, lambda: me.benchmark_generate(torch.nn.Linear(2, 2), batch=1, context=4),
                    "benchmark_generate: model is", "a transformers causal LM")
    raises_one_line(TypeError, lambda: me.benchmark_generate(tiny_llm, batch="2", context=4), "batch='2'")
    raises_one_line(TypeError, lambda: me.benchmark_generate(tiny_llm, batch=1, context=4.0), "context=4.0")
    raises_one_line(ConfigError, lambda: me.benchmark_generate(tiny_llm, batch=1, context=4096),
                    "context=4096 must be a whole number from 1 to 4095")
    raises_one_line(ConfigError, lambda: me.benchmark_generate(tiny_llm, batch=0, context=4), "batch=0")
    raises_one_line(ConfigError, lambda: me.benchmark_generate(tiny_llm, batch=1, context=4, duration=-1),
                    "duration=-1")
    raises_one_line(TypeError, lambda: me.benchmark_generate(tiny_llm, batch=1, context=4, meter="rapl"),
                    "meter='rapl'")
    raises_one_line(ConfigError, lambda: me.build_model("qwen4-1t"), "model 'qwen4-1t' is unknown")
    raises_one_line(ConfigError, lambda: me.build_model("olmoe-1b-7b", layers=0, tiny=True), "layers=0")
    raises_one_line(TypeError, lambda: me.build_model("olmoe-1b-7b", tiny="yes"), "tiny='yes'")


def test_readme_whole_model_example_runs(monkeypatch):
    """The README's whole-model Python example on a tiny copy on the CPU, its windows shortened."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Sweeps of whole models, and their report", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code and "me.benchmark_generate(" in code.group(1)
    src = code.group(1).replace('layers=4, dtype="bfloat16", device="cuda"', "layers=1, tiny=True")
    assert "tiny=True)" in src
    real, calls = me.benchmark_generate, []

    def short(model, batch, context, duration=10.0, repeats=3, **kw):
        calls.append((batch, context, duration, repeats))
        return real(model, batch=batch, context=context, duration=0.05, repeats=1, warmup=0,
                    meter=me.make_meter("none"))

    monkeypatch.setattr(me, "benchmark_generate", short)
    scope: dict = {}
    exec(compile(src, "README whole-model example", "exec"), scope)
    assert calls == [(8, 512, 10, 3)] and scope["r"].decode.batch_size == 8
