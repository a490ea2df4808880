"""run --model: whole LLMs on the one runner (issue 23), prefill and decode per token, the MoE against its dense
siblings; `moe-energy models`; `plan --model`; bad input in one line. Tiny copies of the presets (--tiny)."""

from __future__ import annotations

import json

import pytest
from conftest import one_line_error

from moe_energy import memory
from moe_energy.cli import main
from moe_energy.models.whole import forward_flops, models, tiny

QUICK = ["--duration", "0.2", "--warmup", "0", "--repeats", "1", "--cooldown", "0", "--idle-seconds", "0",
         "--device", "cpu", "--meter", "none"]


def _doc(out) -> dict:
    [path] = out.glob("run-*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_prefill_and_decode_of_the_moe_and_its_siblings_per_token(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--model", "olmoe-1b-7b", "--tiny", "--batch", "1,2", "--context", "8", *QUICK,
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    doc = _doc(out)
    assert doc["family"] == "whole_model" and doc["moe_impl"] == "transformers"
    names = ["olmoe-1b-7b-tiny", "olmo-2-7b-tiny", "olmo-2-1b-tiny"]  # the MoE first, then its dense siblings
    assert doc["layers_built"] == dict.fromkeys(names, 2)
    recs = doc["models"]
    assert len(recs) == 2 * 2 * 1 * 3  # phases x batches x contexts x models
    assert {(m["model"], m["phase"], m["batch"], m["context"]) for m in recs} == \
        {(n, ph, b, 8) for n in names for ph in ("prefill", "decode") for b in (1, 2)}
    for m in recs:
        assert m["status"] == "measured" and m["layers_measured"] == m["layers_total"] == 2
        assert m["tokens_per_call"] == (m["batch"] * 8 if m["phase"] == "prefill" else m["batch"])
        assert m["tokens_per_second"] > 0 and m["windows"][0]["inferences"] % m["tokens_per_call"] == 0
        assert m["moe_impl"] == ("transformers" if m["kind"] == "moe" else None)
        assert (m["ttft_ms"] is None) == (m["phase"] == "decode") and (m["itl_p90_ms"] is None) == \
            (m["phase"] == "prefill")
        assert m["whole_model_extrapolated"] is None  # every layer built
        # FLOPs per token are the call's matrix work (forward_flops: no FLOPs for the embedding's lookup, the LM head
        # at the B kept positions only) over its tokens, not 2 x active params (embeddings and a head per token)
        tm = tiny(m["model"].removesuffix("-tiny"))
        want = forward_flops(tm, 2, m["phase"], m["batch"], 8) / m["tokens_per_call"]
        assert m["flops_per_inference"] == m["windows"][0]["flops_per_inference"] == pytest.approx(want, abs=1)
        assert m["flops_per_inference"] < 2 * m["active_params"]
    assert "olmoe-1b-7b-tiny / olmo-2-7b-tiny J per token" not in text  # no meter: no energy, no ratio
    assert "prefill" in text and "decode" in text and "results written to" in text


@pytest.mark.slow
def test_moe_energy_blocks_a_layer_count_and_the_extrapolation_are_recorded(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--model", "qwen3-30b-a3b", "--vs", "qwen3-4b", "--tiny", "--layers", "1", "--batch", "1",
                 "--context", "4", "--moe-impl", "moe-energy", "--moe-strategy", "grouped", *QUICK[:-2],
                 "--meter", "estimate", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    doc = _doc(out)
    recs = {(m["model"], m["phase"]): m for m in doc["models"]}
    moe = recs[("qwen3-30b-a3b-tiny", "decode")]
    assert moe["moe_impl"] == "moe-energy" and moe["layers_measured"] == 1 and moe["layers_total"] == 2
    x = moe["whole_model_extrapolated"]
    assert x["label"].startswith("EXTRAPOLATED from the first 1 of 2 layers")
    assert x["joules_per_token"] > moe["joules_per_token"] and x["tokens_per_second"] < moe["tokens_per_second"]
    assert "qwen3-30b-a3b-tiny / qwen3-4b-tiny J per token =" in " ".join(text.split())
    assert "EXTRAPOLATED from the first 1 of 2 layers" in " ".join(text.split())


def test_models_lists_every_preset_with_its_counts(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in models():
        assert name in text
    assert "30.532 B" in text and "3.353 B" in text  # qwen3-30b-a3b's total and active, counted
    # beside a publisher's active figure without the input embedding, the count made the same way: gpt-oss-20b's
    # 4.187 B less its 201,088 x 2,880 embedding is the 3.6B published, DeepSeek-V2-Lite's 2.661 B less 102,400 x 2,048
    # the 2.4B
    flat = " ".join(text.split())
    assert "4.187 B" in flat and "3.608 B" in flat and "2.661 B" in flat and "2.451 B" in flat


def test_plan_shows_the_layers_each_model_builds_and_whether_it_fits(capsys):
    assert main(["plan", "--model", "olmoe-1b-7b", "--tiny", "--batch", "1,4", "--context", "16", "--device",
                 "cpu"]) == 0
    text = capsys.readouterr().out
    assert "olmoe-1b-7b-tiny" in text and "2 of 2" in text and "yes" in text


@pytest.mark.parametrize("args, needle", [
    (["--model", "qwen4-1t"], "model 'qwen4-1t' is unknown; choose from olmoe-1b-7b"),
    (["--model", "olmoe-1b-7b", "--vs", "mixtral-8x7b"], "--vs mixtral-8x7b: an MoE model"),
    (["--model", "olmoe-1b-7b", "--context", "5000"], "context=5000 must be a whole number from 1 to 4095"),
    (["--model", "olmoe-1b-7b", "--batch", "0"], "--batch '0': '0' is not a whole number >= 1"),
    # was accepted, then every row skipped for memory: exit 1 after the meter was chosen, not 2
    (["--model", "olmoe-1b-7b", "--tiny", "--batch", "99999999999"], "batch=99999999999 is too large; give at most"),
    (["--model", "olmoe-1b-7b", "--layers", "0"], "--layers 0: give a whole number >= 1"),
    (["--model", "olmoe-1b-7b", "--tokens", "1"], "--tokens: no meaning with --model"),
    (["--model", "olmoe-1b-7b", "--models", "moe"], "--models: no meaning with --model"),
    # --arch and the seed's/custom layer's --experts/--top-k were silently dropped here (sweep refused them)
    (["--model", "olmoe-1b-7b", "--arch", "mixtral-8x7b"], "--arch: no meaning with --model"),
    (["--model", "olmoe-1b-7b", "--experts", "3", "--top-k", "1"], "--experts, --top-k: no meaning with --model"),
    (["--model", "olmoe-1b-7b", "--moe-impl", "fast"], "--moe-impl 'fast' is unknown"),
    (["--batch", "1"], "--batch: only with --model (a whole LLM); add --model or drop them"),
    (["--model", "olmoe-1b-7b", "--parallel", "expert"], "--parallel expert does not run whole models yet"),
    # one row per model and point: a second strategy never ran, and only moe-energy's blocks read one
    (["--model", "olmoe-1b-7b", "--moe-impl", "moe-energy", "--moe-strategy", "grouped,active_loop"],
     "--moe-strategy grouped,active_loop: whole models run one strategy"),
    (["--model", "olmoe-1b-7b", "--moe-strategy", "grouped"],
     "--moe-strategy: no meaning with --moe-impl transformers"),
    (["--model", "olmoe-1b-7b", "--moe-impl", "grouped_mm", "--moe-strategy", "grouped"],
     "--moe-strategy: no meaning with --moe-impl grouped_mm"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_model_is_built(tmp_path, capsys, args, needle):
    code = main(["run", *args, "--device", "cpu", "--out", str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, needle)
    assert not list(tmp_path.glob("out/*.json"))


def _roofline_cache(tmp_path, monkeypatch, gemm_flops_per_s: float) -> None:
    """A roofline cache (a real file in $MOE_ENERGY_CACHE_DIR) saying this CPU multiplies at ``gemm_flops_per_s``."""
    import torch

    from moe_energy.measure import roofline

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "cache"))
    roofline._store(roofline.Roofline(roofline.device_name(torch.device("cpu")), {"float32": gemm_flops_per_s},
                                      1e10, 1536, 2**28, "2026-12-07T00:00:00Z"))


def _plan_lines(capsys, *extra: str) -> dict[str, str]:
    assert main(["plan", "--model", "qwen3-30b-a3b", "--vs", "qwen3-4b", "--tiny", "--batch", "1,4", "--context", "8",
                 "--device", "cpu", "--dtype", "float32", *extra]) == 0
    text = capsys.readouterr().out
    return {line.split(":")[0]: line for line in text.splitlines() if " layers: " in line}


def test_the_default_layers_keep_the_longest_call_within_the_time_limit(tmp_path, monkeypatch, capsys):
    """Memory alone would build every layer; at 1 MFLOP/s a layer of the 4 x 8-token prefill takes seconds, so the
    default builds the N whose longest call's bound is within --max-forward-s (default --duration), 1 at least."""
    from moe_energy.models.whole import forward_flops, tiny

    _roofline_cache(tmp_path, monkeypatch, 1e6)
    moe, dense = tiny("qwen3-30b-a3b"), tiny("qwen3-4b")
    per_layer = [forward_flops(m, 2, "prefill", 4, 8) - forward_flops(m, 1, "prefill", 4, 8) for m in (moe, dense)]
    one = [forward_flops(m, 1, "prefill", 4, 8) / 1e6 for m in (moe, dense)]  # seconds of one layer's longest call
    lines = _plan_lines(capsys, "--max-forward-s", f"{max(one) * 1.01 + max(per_layer) / 1e6 * 0.5:.6g}")
    assert "1 of 2 layers: all fit in free memory; 1 keep the longest call under" in lines["qwen3-30b-a3b-tiny"]
    assert "1 of 2 layers" in lines["qwen3-4b-tiny"]
    lines = _plan_lines(capsys, "--max-forward-s", "86400")
    assert all(line.endswith("2 of 2 layers: all fit in free memory") for line in lines.values())
    lines = _plan_lines(capsys, "--duration", f"{max(one) / 2:.6g}")  # under even one layer: 1, the least
    # not "1 keep the longest call under": one layer's call is over the limit (olmo-2-7b: 15.4 s against 10 s)
    assert all("1 of 2 layers" in line and "1, the least: its longest call takes" in line and "keep" not in line
               for line in lines.values())
    lines = _plan_lines(capsys, "--layers", "2", "--max-forward-s", "0.001")
    assert all(line.endswith("2 of 2 layers: --layers") for line in lines.values())


def test_a_whole_model_run_takes_its_own_protocol_unless_told(tmp_path, monkeypatch):
    from moe_energy.cli import build_parser
    from moe_energy.commands.options import WHOLE_PROTOCOL, resolve_whole

    base = ["run", "--model", "olmoe-1b-7b", "--tiny", "--device", "cpu"]
    _w, opts = resolve_whole(build_parser().parse_args(base))
    assert (opts.duration, opts.repeats, opts.warmup, opts.cooldown) == (10.0, 2, 0.5, 0.0) == \
        tuple(WHOLE_PROTOCOL.values())
    _w, opts = resolve_whole(build_parser().parse_args([*base, "--duration", "3", "--repeats", "4"]))
    assert (opts.duration, opts.repeats, opts.warmup, opts.cooldown) == (3.0, 4, 0.5, 0.0)
    cfg = tmp_path / "c.toml"
    cfg.write_text("warmup = 1.5\n")
    _w, opts = resolve_whole(build_parser().parse_args([*base, "--config", str(cfg)]))
    assert (opts.duration, opts.warmup) == (10.0, 1.5)


def test_the_ratio_under_the_table_compares_whole_models_when_built_in_part():
    from moe_energy.commands.tables import whole_lines

    def row(name: str, kind: str, j: float, x: float | None) -> dict:
        return {"status": "measured", "kind": kind, "model": name, "phase": "decode", "batch": 1, "context": 8,
                "joules_per_token": j, "layers_measured": 1, "layers_total": 4 if x else 1,
                "whole_model_extrapolated": {"joules_per_token": x, "label": "EXTRAPOLATED x"} if x else None}

    [line, label] = whole_lines({"models": [row("moe", "moe", 2.0, 5.0), row("dense", "dense", 1.0, None)]})
    assert "moe / dense J per token = 5 (whole models, EXTRAPOLATED: 1 of 4 and 1 of 1 layers measured)" in line
    assert label == "moe: EXTRAPOLATED x"


@pytest.mark.slow
def test_a_roofline_calibrated_to_choose_the_layers_is_a_notice_in_the_document(tmp_path, monkeypatch):
    """Choosing N needs the dtype's roofline; with none cached it is calibrated then, and the document says so
    (the run's own notices follow it)."""
    from moe_energy.measure import roofline

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "empty-cache"))
    out = tmp_path / "out"
    assert main(["run", "--model", "olmoe-1b-7b", "--tiny", "--batch", "1", "--context", "4", *QUICK,
                 "--dtype", "float32", "--out", str(out)]) == 0
    notices = _doc(out)["notices"]
    assert notices[0].startswith("no float32 roofline cached for cpu") and "calibrating it" in notices[0]
    assert (tmp_path / "empty-cache" / roofline.CACHE_FILE).exists()


def test_a_decode_rows_memory_is_the_decode_steps_own():
    """A decode row's need (the out-of-memory reason's figure) was its context's B x L prefill allowance; it is
    the decode step's. What a model's rows hold at once (``held_bytes``: `plan` shows it, `run` checks it, so
    both pick one N) still takes the largest row's activations: the prefill's."""
    from types import SimpleNamespace

    import torch

    from moe_energy.config import RunOptions
    from moe_energy.models.whole import build_model, memory_bytes
    from moe_energy.runner.core import Built
    from moe_energy.runner.model import Whole, held_bytes, inputs_bytes

    m = tiny("olmo-2-1b")
    w = Whole([m], [4], [16])
    w.chosen[m.name] = 2
    [plan] = w.plans(())
    r = SimpleNamespace(opts=RunOptions(device="cpu"), device=torch.device("cpu"))
    built = Built(plan, build_model(m, 2, seed=0))
    need = {p.head["phase"]: w.variant(r, built, p, "x", None)[0].need_bytes for p in w.points()}
    assert need == {ph: memory_bytes(m, 2, "float32", 4, 16, ph)["activations"] for ph in ("prefill", "decode")}
    assert need["decode"] < need["prefill"] / 3
    held = held_bytes(m, 2, "float32", w.points())
    assert held["activations"] == need["prefill"] and held["kv_caches"] == memory_bytes(m, 2, "float32", 4, 16)[
        "kv_cache"]
    assert inputs_bytes(m, 2, "float32", w.points()) == sum(held.values()) + memory.OVERHEAD_BYTES
