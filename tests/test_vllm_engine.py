"""run --model --engine vllm without vLLM or a GPU (issue 23, item 5): the refusals, in one line and before anything
is built; the engine module against a stand-in ``vllm`` package (a real file on sys.path that records what it is
asked: LLM's arguments, the config.json it is handed, every generate call) and, above it, the Whole workload's
run through the one skeleton: prefill and decode records with engine=vllm and B x L, B x T tokens per call."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from conftest import one_line_error

from moe_energy.cli import build_parser, main
from moe_energy.commands.options import resolve_workload
from moe_energy.config import RunOptions
from moe_energy.energy.select import make_meter
from moe_energy.models import vllm_engine
from moe_energy.models.whole import get_model, tiny
from moe_energy.runner.core import Team
from moe_energy.runner.core import run as run_workload
from moe_energy.runner.model import Whole

T = vllm_engine.DECODE_TOKENS

# A stand-in for vLLM's offline API: LLM(model, **engine args) reads the model folder's config.json as vLLM does;
# generate() takes token-id prompts and returns RequestOutput-shaped objects (outputs[0].token_ids,
# num_cached_tokens: a prompt seen before is a prefix-cache hit of all but its last token).
FAKE_VLLM = '''
import json, weakref

CALLS = []
LIVE = weakref.WeakSet()


class SamplingParams:
    def __init__(self, *, max_tokens=16, min_tokens=0, ignore_eos=False, detokenize=True):
        self.kw = dict(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=ignore_eos, detokenize=detokenize)


class CompletionOutput:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class RequestOutput:
    def __init__(self, prompt_token_ids, made, cached):
        self.prompt_token_ids, self.outputs, self.num_cached_tokens = prompt_token_ids, [CompletionOutput(made)], cached


class _Config:  # what LLMEngine.vllm_config.cache_config reports: 10 blocks of 10 tokens
    num_gpu_blocks, block_size = 10, 10


class _Engine:
    class vllm_config:
        cache_config = _Config()


class LLM:
    llm_engine = _Engine()

    def __init__(self, model, **kw):
        with open(model + "/config.json") as f:
            config = json.load(f)
        CALLS.append(("LLM", kw, config, len(LIVE)))
        LIVE.add(self)
        self.seen = set()

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        ids = [tuple(p["prompt_token_ids"]) for p in prompts]
        CALLS.append(("generate", [len(i) for i in ids], sampling_params.kw, use_tqdm, [i[0] for i in ids]))
        out = [RequestOutput(list(i), list(range(sampling_params.kw["max_tokens"])),
                             len(i) - 1 if i in self.seen else 0) for i in ids]
        self.seen.update(ids)
        return out
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """The stand-in importable as ``vllm`` (a package on sys.path), its record of calls returned."""
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    yield vllm.CALLS
    sys.modules.pop("vllm", None)


RUN = ["run", "--model", "qwen3-30b-a3b", "--vs", "qwen3-32b", "--engine", "vllm", "--batch", "1,64,256",
       "--context", "512"]


def test_vllm_missing_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable, even where it is installed
    code = main([*RUN, "--out", str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, "--engine vllm: vLLM is not installed here",
                   "pip install -e '.[vllm]' on a CUDA host")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_no_cuda_gpu_is_one_line_and_nothing_is_built(tmp_path, capsys, monkeypatch, fake_vllm, device):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code = main([*RUN, "--device", device, "--out", str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, "--engine vllm needs a CUDA GPU (the device here is cpu)")
    assert fake_vllm == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["--moe-impl", "moe-energy"], "--moe-impl: no meaning with --engine vllm"),
    (["--layers", "2"], "--layers: no meaning with --engine vllm (vLLM builds the whole model)"),
    (["--tiny"], "--tiny: no meaning with --engine vllm"),
    (["--compile"], "--compile: no meaning with --engine vllm"),
    (["--parallel", "expert"], "--parallel expert: no meaning with --engine vllm"),
    (["--context", "40900"], "--engine vllm: context 40900 + the 64 tokens"),
])
def test_flags_vllm_cannot_honour_are_refused_before_anything(tmp_path, capsys, fake_vllm, args, needle):
    code = main([*RUN, *args, "--out", str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, needle)
    assert fake_vllm == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["run", "--engine", "vllm"], "--engine: only with --model"),
    (["run", "--arch", "olmoe-1b-7b", "--engine", "vllm"], "--engine: no meaning with --arch"),
    (["run", "--model", "olmoe-1b-7b", "--engine", "tgi"], "--engine 'tgi' is unknown; choose from transformers, vllm"),
])
def test_engine_outside_whole_models_or_unknown_is_refused(tmp_path, capsys, args, needle):
    one_line_error(main([*args, "--out", str(tmp_path / "out")]), capsys.readouterr().err, needle)


def test_a_cuda_host_with_vllm_resolves_to_the_vllm_engine(monkeypatch, fake_vllm):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    args = build_parser().parse_args([*RUN, "--dtype", "bfloat16"])
    w, opts = resolve_workload(args)
    assert isinstance(w, Whole) and w.engine == "vllm" and w.vllm and opts.dtype == "bfloat16"
    assert [m.name for m in w.models] == ["qwen3-30b-a3b", "qwen3-32b"] and w.batches == [1, 64, 256]
    assert [(p.head["phase"], p.head["batch"], p.rows) for p in w.points()] == [
        ("prefill", 1, 512), ("prefill", 64, 64 * 512), ("prefill", 256, 256 * 512),
        ("decode", 1, T), ("decode", 64, 64 * T), ("decode", 256, 256 * T)]
    assert w.identity()[0]["engine"] == "vllm" and "engine" not in Whole(w.models, [1], [8]).identity()[0]
    assert fake_vllm == []  # resolving builds nothing


def test_the_engine_builds_from_the_presets_config_and_measures_both_phases(fake_vllm):
    m = get_model("qwen3-30b-a3b")
    engine = vllm_engine.build_engine(m, "bfloat16", max_batch=4, max_context=32, seed=0)
    [(what, kw, config, live)] = fake_vllm
    assert what == "LLM" and kw["load_format"] == "dummy" and kw["dtype"] == "bfloat16"
    assert kw["skip_tokenizer_init"] is True and kw["enable_prefix_caching"] is True
    assert kw["max_model_len"] == 32 + T and kw["max_num_seqs"] == 4 and kw["seed"] == 0
    assert (config["model_type"], config["architectures"], config["hidden_size"], config["num_hidden_layers"],
            config["num_experts"], config["num_local_experts"], config["num_experts_per_tok"],
            config["moe_intermediate_size"], config["vocab_size"], config["rope_theta"]) == \
        ("qwen3_moe", ["Qwen3MoeForCausalLM"], 2048, 48, 128, 128, 8, 768, 151936, 1e6)

    prefill, rows = vllm_engine.prefill_step(engine, 3, 20, seed=0)
    assert rows == 3 * 20
    prefill(), prefill()
    calls = fake_vllm[1:]
    assert [c[1] for c in calls] == [[20, 20, 20]] * 2 and all(c[2]["max_tokens"] == 1 for c in calls)
    assert calls[0][4] != calls[1][4]  # fresh prompts each call: never a prefix-cache hit
    assert prefill.facts() == {"prompt_tokens_cached": [0, 0], "output_tokens": [1, 1]}
    one, rows = vllm_engine.prefill_step(engine, 1, 20, seed=0)  # its prompt is the first row of (3, 20)'s
    one()
    assert rows == 20 and one.facts()["prompt_tokens_cached"] == [0, 0]  # still no hit: calls count per engine

    decode, rows = vllm_engine.decode_step(engine, 3, 20, seed=0)
    assert rows == 3 * T
    warm = fake_vllm[-1]
    assert warm[1] == [20, 20, 20] and warm[2]["max_tokens"] == 1  # the prompts cached once, before any window
    decode()
    call = fake_vllm[-1]
    assert call[2] == {"max_tokens": T, "min_tokens": T, "ignore_eos": True, "detokenize": False}
    assert call[3] is False and call[4] == warm[4]
    assert decode.facts() == {"prompt_tokens_cached": [19, 19], "output_tokens": [T, T]}


class NoRoofline(Team):
    def roofline(self, r, notices):  # noqa: ANN001, ANN201 - no calibration in a unit test
        return None


@pytest.mark.slow
def test_a_run_through_the_vllm_engine_records_both_phases_per_token(fake_vllm, tmp_path):
    """The real workload and skeleton above the stand-in: models served one at a time, every record engine=vllm,
    B x L prompt tokens per prefill call, B x T output tokens per decode call, ITL per decoded token."""
    w = Whole([tiny("qwen3-30b-a3b"), tiny("qwen3-4b")], [1, 2], [16], engine="vllm")
    opts = RunOptions(duration=0.05, warmup=0.0, repeats=1, cooldown=0.0, idle_seconds=0.0, device="cpu",
                      out=str(tmp_path)).validate()
    w.check_inputs()
    doc, _ = run_workload(w, opts, NoRoofline(make_meter("none", "cpu")), save=False)
    assert doc["engine"] == "vllm" and doc["moe_impl"] == "vllm" and doc["engine_method"]["decode_tokens_per_call"] == T
    assert any("one model is served at a time" in n for n in doc["notices"])
    built = [c for c in fake_vllm if c[0] == "LLM"]
    assert [(c[2]["hidden_size"], c[2].get("num_experts"), c[3]) for c in built] == [(64, 8, 0), (64, None, 0)]
    recs = doc["models"]
    assert len(recs) == 2 * 2 * 2 and all(r["status"] == "measured" and r["engine"] == "vllm" for r in recs)
    for r in recs:
        win = r["windows"][0]
        if r["phase"] == "prefill":
            assert r["tokens_per_call"] == r["batch"] * 16 and r["itl_p50_ms"] is None and r["ttft_ms"] > 0
            assert win["prompt_tokens_cached"] == [0, 0] and win["output_tokens"] == [1, 1]
        else:
            assert r["tokens_per_call"] == r["batch"] * T and r["ttft_ms"] is None
            assert r["itl_p50_ms"] == pytest.approx(r["latency_p50_ms"] / T)
            assert win["prompt_tokens_cached"] == [15, 15] and win["output_tokens"] == [T, T]
        shrank = [f for f in r["flags"] if f.startswith("batch shrank")]  # the cache holds 100 tokens: 1 of 80 fits
        assert shrank == ([] if r["phase"] == "prefill" or r["batch"] == 1 else [
            "batch shrank: vLLM's KV cache holds 100 tokens, 2 sequences of up to 80 need 160; at most 1 ran at once"])
        assert win["inferences"] % r["tokens_per_call"] == 0
        assert r["moe_impl"] == ("vllm" if r["model"].startswith("qwen3-30b") else None)
    json.dumps(doc)  # the document saves as it is


def test_plan_shows_vllm_sizing_its_own_cache_not_transformers_tables(capsys):
    """plan's table for --engine vllm: the whole model's weights, vLLM's own KV cache and activations (no static
    cache of transformers' to count), and why the models are served one at a time."""
    import torch

    from moe_energy.commands.plan import _show_whole

    w = Whole([tiny("qwen3-30b-a3b"), tiny("qwen3-4b")], [1, 2], [16], engine="vllm")
    opts = RunOptions(device="cpu").validate()
    w.choose_layers(opts, torch.device("cpu"))
    _show_whole(w, opts, torch.device("cpu"))
    text = " ".join(capsys.readouterr().out.split())
    assert "MoE blocks: vllm, engine: vllm" in text and text.count("vLLM's") == 4  # two cells a model
    assert "qwen3-30b-a3b-tiny: 2 of 2 layers: vLLM serves the whole model" in text
    assert "one model is served at a time; it sizes its KV cache and activations from what its weights leave" in text


# -- sweep --engine: an axis of whole-model grids ---------------------------------------------------------------
SWEEP = ["sweep", "--model", "qwen3-30b-a3b", "--vs", "qwen3-32b", "--batch", "1,64", "--context", "512"]


def test_sweep_engine_is_an_axis_and_keeps_transformers_points_keys(fake_vllm, monkeypatch):
    from moe_energy.runner import sweep as sw

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = {"model": "qwen3-30b-a3b", "vs": "qwen3-32b", "batch": "1,64", "context": "512"}
    g = sw.build_grid({**cfg, "engine": "transformers,vllm"})
    assert [(p.label, p.engine, p.workload.engine, p.workload.impl) for p in g.points] == [
        ("qwen3-30b-a3b transformers", "transformers", "transformers", "transformers"),
        ("qwen3-30b-a3b vllm", "vllm", "vllm", "vllm")]
    assert g.source["engine"] == ["transformers", "vllm"]
    plain = sw.build_grid(dict(cfg)).points
    assert len(plain) == 1 and "engine" not in sw.build_grid(dict(cfg)).source
    assert g.points[0].key("none") == plain[0].key("none")  # a store's transformers points are still complete
    c = g.points[1].config("none")
    assert (c["engine"], c["moe_impl"], c["models"]) == ("vllm", "vllm", ["qwen3-30b-a3b", "qwen3-32b"])
    assert g.points[1].key("none") != plain[0].key("none")


@pytest.mark.parametrize("args, needle", [
    (["--engine", "vllm", "--tiny"], "--tiny: no meaning with --engine vllm"),
    (["--engine", "transformers,vllm", "--layers", "2"], "--layers: no meaning with --engine vllm"),
    (["--engine", "vllm", "--moe-impl", "transformers,moe-energy"], "--moe-impl: no meaning with --engine vllm"),
    (["--engine", "vllm", "--compile"], "--compile: no meaning with --engine vllm"),
    (["--engine", "vllm", "--device", "cpu"], "--engine vllm needs a CUDA GPU (the device here is cpu)"),
    (["--engine", "transformers,tgi"], "--engine 'tgi' is unknown; choose from transformers, vllm"),
    (["--engine", "vllm", "--context", "40900"], "--engine vllm: context 40900 + the 64 tokens"),
])
def test_sweep_engine_refusals_are_one_line_before_anything(tmp_path, capsys, fake_vllm, args, needle):
    code = main([*SWEEP[:-2], *(["--context", "512"] if "--context" not in args else []), *args,
                 "--db", str(tmp_path / "s.db")])
    one_line_error(code, capsys.readouterr().err, needle)
    assert fake_vllm == [] and not (tmp_path / "s.db").exists()


def test_sweep_engine_vllm_without_vllm_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    code = main([*SWEEP, "--engine", "vllm", "--db", str(tmp_path / "s.db")])
    one_line_error(code, capsys.readouterr().err, "--engine vllm: vLLM is not installed here")
    assert not (tmp_path / "s.db").exists()


@pytest.mark.slow
def test_a_sweep_over_both_engines_stores_them_apart_and_the_report_never_mixes_them(fake_vllm, tmp_path):
    """One store, the same model set served by transformers and by vLLM (the stand-in): the points' moe_impl
    tells them apart, and so do the report's records (its crossovers and selections group by it)."""
    import torch

    from moe_energy.report import analysis
    from moe_energy.runner import sweep as sw
    from moe_energy.runner.core import SilentUI
    from moe_energy.storage.store import Store

    ms = (tiny("qwen3-30b-a3b"), tiny("qwen3-4b"))
    opts = RunOptions(duration=0.05, warmup=0.0, repeats=1, cooldown=0.0, idle_seconds=0.0, device="cpu").validate()
    points = [sw.Point(f"{ms[0].name} {e}", ms[0], opts, siblings=ms[1:], batches=(1, 2), contexts=(16,),
                       layers=None if e == "vllm" else 1, engine=e) for e in ("transformers", "vllm")]
    meter = make_meter("estimate", torch.device("cpu"))
    with Store(tmp_path / "s.db") as st:
        run_id = st.new_run("r", {"grid": "models"}, {"device": "cpu"}, {"name": meter.name})
        out = sw.run_points(points, st, run_id, meter, torch.device("cpu"), run=None, ui=SilentUI())
        assert (out.done, out.skipped, out.failed) == (2, 0, 0)
        assert sorted(p["moe_impl"] for p in st.points()) == ["transformers", "vllm"]
        frame = analysis.load(st)
    assert len(frame.wholes) == 2 * 2 * 2 * 2  # two points x two models x two phases x two batches
    assert {(m["impl"], m["engine"]) for m in frame.wholes} == {("transformers", "transformers"), ("vllm", "vllm")}
    (name, recs), = analysis.whole_sets(frame).items()  # one set; the report's answers group it by impl
    assert name == ms[0].name and sorted(m["impl"] for m in recs) == ["transformers"] * 8 + ["vllm"] * 8

