"""Expert parallelism for LLM MoE layers (run --arch X --parallel expert) on real gloo process groups.

Two CPU ranks, tiny custom shapes, started as users start them (``python -m moe_energy run --parallel expert
--arch ...``): run.py hands the pair to ``distributed.job.run_job``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_distributed import env, free_port, moe_energy_cmd, torchrun  # tests/ is on sys.path (rootdir import mode)

from moe_energy.models.archs import custom_arch
from moe_energy.models.counting import expected_experts_touched, layer_weight_bytes

D, FFN, E, K = 16, 32, 4, 2  # d_model, expert width I, experts, top-k: grouped_mm's alignment holds in fp32
TINY = ["--arch", "custom", "--d-model", str(D), "--ffn-dim", str(FFN), "--experts", str(E), "--top-k", str(K),
        "--device", "cpu", "--warmup", "0", "--dtype", "float32"]  # any host: not its native bf16


# ---------------------------------------------------------------------------------------------------------
# In one process


def test_each_rank_feeds_its_own_block_of_the_fixed_seed_stream():
    import torch

    from moe_energy.runner.layer import rank_inputs

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(7)
    blocks = [torch.randn(5, D, generator=g) for _ in range(3)]  # what run_llm draws first, then the next two
    for rank in range(3):
        x = rank_inputs(7, 5, D, rank, cpu, torch.float64)
        assert x.shape == (5, D) and x.dtype == torch.float64
        assert torch.equal(x, blocks[rank].double())
    assert not torch.equal(blocks[0], blocks[1])


@pytest.mark.parametrize("routing", ["balanced", "skewed:1.5", "random"])
def test_a_fixed_routing_deals_the_jobs_tokens_once(routing):
    import torch

    from moe_energy.models.routers import SoftmaxTopKRouter
    from moe_energy.models.routing import BenchRouter, assignment, parse_routing

    mode, world, T, experts = parse_routing(routing), 4, 3, 8
    cpu = torch.device("cpu")
    ranks = [BenchRouter(SoftmaxTopKRouter(D, experts, K), experts, K, mode, seed=5, rank=r, world=world)
             for r in range(world)]
    job = assignment(mode, world * T, experts, K, seed=5)  # what run_llm deals one forward of W*T tokens
    if job is None:  # random: the router's own choice on each rank's tokens
        assert all(r.fixed_for(T, cpu) is None for r in ranks)
        return
    rows = [r.fixed_for(T, cpu) for r in ranks]
    assert all(x.shape == (T, K) for x in rows)
    assert torch.equal(torch.cat(rows), job) and not torch.equal(rows[0], rows[1])
    idx, _ = ranks[2](torch.randn(T, D))  # the forward routes by the rank's rows and counts them
    assert torch.equal(idx, rows[2]) and int(ranks[2].expert_pairs.sum()) == T * K


def test_only_moe_modules_are_sharded():
    from moe_energy.distributed.expert_parallel import parts_of
    from moe_energy.models.dense import DenseSwiGLU
    from moe_energy.models.llm import MoELayer

    layer = MoELayer.from_arch(custom_arch(D, FFN, E, K, shared_experts=1))
    parts = parts_of(layer)
    assert (parts.num_experts, parts.top_k, parts.stacked) == (E, K, ("experts",))
    with pytest.raises(TypeError, match="expert parallelism runs an MoE or an MoELayer, not DenseSwiGLU"):
        parts_of(DenseSwiGLU(D, FFN))


def test_a_jobs_bytes_read_count_every_ranks_copy_of_what_it_holds_whole():
    # the job's forward (W*T tokens) reads each routed expert once, on its rank, but every rank reads its own
    # router, shared experts and (data-parallel) dense FFN: counted once, a 2-rank job's MoE read 19,456 B per
    # forward instead of 20,480 (d 32, I 16, 3 of 8 experts touched: the router's 1,024 B twice) and its dense
    # FFN one rank's copy
    from types import SimpleNamespace

    from moe_energy.models.counting import llm_expert_params, router_params, shared_params
    from moe_energy.runner.layer import Layer

    arch = custom_arch(D, FFN, E, K, shared_experts=1, shared_width=24)
    layer = Layer.of(arch, [4], "random")
    point = layer.points()[0]
    plans = {p.name: p for p in layer.plans(["moe", "dense_total"])}
    replicated, expert = router_params(arch) + shared_params(arch), llm_expert_params(arch)
    for world in (1, 2, 4):
        r = SimpleNamespace(team=SimpleNamespace(world=world), opts=SimpleNamespace(dtype="float32"))
        moe = layer.record(r, plans["moe"], point, {"status": "measured", "windows": [{"experts_touched": 3}]})
        assert moe["weight_bytes_read_per_forward"] == (world * replicated + 3 * expert) * 4
        dense = layer.record(r, plans["dense_total"], point, {"status": "measured", "windows": []})
        assert dense["weight_bytes_read_per_forward"] == world * plans["dense_total"].params * 4


# ---------------------------------------------------------------------------------------------------------
# Two ranks: the expert-parallel layer computes what the single-process MoELayer computes

EQUALITY = """\
import torch
from moe_energy.distributed.expert_parallel import ExpertParallelMoE
from moe_energy.distributed.group import init_group, shutdown
from moe_energy.models.archs import Arch, RouterSpec, custom_arch
from moe_energy.models.llm import MoELayer

torch.set_num_threads(1)
g = init_group("cpu", 30)
SOFTMAX = custom_arch(16, 32, 4, 2, router=RouterSpec("softmax_topk", normalize=True))
SIGMOID = custom_arch(16, 32, 8, 2, shared_experts=1, shared_width=24, shared_gate=True,
                      router=RouterSpec("sigmoid_group", normalize=True, scaling=2.5, n_group=4, topk_group=2))
OSS = Arch(name="oss", d_model=16, ffn_dim=16, experts=4, top_k=2, router=RouterSpec("topk_softmax"),
           expert_bias=True, act="gpt_oss")


def layers(arch):
    ref = MoELayer.from_arch(arch, strategy="masked_loop", seed=0)  # the seed's loop as the reference
    bias = getattr(ref.router, "e_score_correction_bias", None)
    if bias is not None:  # DeepSeek-V3's selection bias: make it matter
        bias.copy_(torch.linspace(-0.3, 0.3, arch.experts))
    mine = MoELayer.from_arch(arch, seed=100 + g.rank)  # rank 1 starts from other weights: rank 0's are broadcast
    if g.rank == 0:
        mine.load_state_dict(ref.state_dict())
    return ref, mine


def check(name, arch, x):
    ref, mine = layers(arch)
    ep = ExpertParallelMoE.from_moe(mine, g)
    with torch.inference_mode():
        y, want = ep(x), ref(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    n, lo = arch.experts // 2, g.rank * (arch.experts // 2)
    ex = ep.moe.experts
    assert y.shape == x.shape and ep.local_experts == n
    assert ex.gate_up_proj.shape == (n, 2 * arch.ffn_dim, arch.d_model) and ex.down_proj.shape == (n, 16, arch.ffn_dim)
    assert torch.equal(ex.gate_up_proj, ref.experts.gate_up_proj[lo:lo + n])  # this rank's slice of rank 0's
    assert torch.equal(ex.down_proj, ref.experts.down_proj[lo:lo + n])
    if arch.expert_bias:
        assert torch.equal(ex.gate_up_proj_bias, ref.experts.gate_up_proj_bias[lo:lo + n])
        assert torch.equal(ex.down_proj_bias, ref.experts.down_proj_bias[lo:lo + n])
    if arch.shared_experts:  # replicated: every rank holds rank 0's shared expert whole
        assert torch.equal(ep.moe.shared.gate_proj.weight, ref.shared.gate_proj.weight)
        assert torch.equal(ep.moe.shared.gate.weight, ref.shared.gate.weight)
    err = float((y - want).abs().max()) if len(x) else 0.0
    print(f"rank {g.rank} {name} ok max_abs_err={err:.2e} received={ep.last_received_pairs}", flush=True)


torch.manual_seed(1 + g.rank)
check("softmax", SOFTMAX, torch.randn(13 + 6 * g.rank, 16))  # ranks hold different token counts
check("softmax, empty batch on rank 1", SOFTMAX, torch.randn(0 if g.rank else 9, 16))
check("sigmoid groups + shared", SIGMOID, torch.randn(21 - 4 * g.rank, 16))
check("gpt-oss biases + clamped swiglu", OSS, torch.randn(11, 16))
torch.distributed.barrier()  # leave together: gloo aborts a rank whose peer tears the group down under it
shutdown()
print(f"rank {g.rank} ALL OK", flush=True)
"""


@pytest.mark.slow
def test_two_rank_expert_parallel_layer_equals_single_process(tmp_path):
    script = tmp_path / "equality.py"
    script.write_text(EQUALITY)
    r = torchrun([str(script)])
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert f"rank {rank} ALL OK" in r.stdout
        for name in ("softmax", "sigmoid groups + shared", "gpt-oss biases + clamped swiglu"):
            assert f"rank {rank} {name} ok" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# Two ranks through the CLI: a whole run of an LLM layer per token count


@pytest.mark.slow
def test_two_rank_layer_run_records_every_token_count(tmp_path, live_rapl):
    # balanced routing: the job's 2T tokens dealt round-robin as one run_llm forward of 2T, so exact counts
    out = tmp_path / "results"
    r = torchrun([*moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY, "--tokens", "1,8", "--routing",
                  "balanced", "--duration", "0.3", "--repeats", "1", "--idle-seconds", "1", "--cooldown", "0",
                  "--carbon-intensity", "400", "--price-per-kwh", "0.15", "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    files = list(out.glob("run-*-custom-ep2.json"))
    assert len(files) == 1, list(out.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["family"] == "llm_layer" and doc["tokens"] == [1, 8] and doc["routing"]["mode"] == "balanced"
    assert doc["parallel"]["world_size"] == 2 and doc["parallel"]["backend"] == "gloo"
    # a 1 s idle reading (0.5 s left 75 ms): the fake's writer can lag a loaded 2-core host by tens of ms an edge
    assert doc["idle"]["power_w"] == pytest.approx(40.0, rel=0.15)  # one package, read by both, counted once
    names = [m["name"] for m in doc["models"]]
    assert names == [f"{n}@T={t}" for t in (1, 8) for n in ("moe[expert_parallel]", "dense_total", "dense_active")]
    for m in doc["models"]:
        T, p = m["tokens_per_forward"], m["parallel"]
        assert m["status"] == "measured" and m["arch"] == "custom" and m["routing"] == "balanced"
        assert p["tokens_per_forward_job"] == 2 * T and [x["rank"] for x in p["per_rank"]] == [0, 1]
        assert m["inferences"] == sum(x["batches"] for x in p["per_rank"]) * T  # every rank's tokens
        assert m["tokens_per_second"] == m["inferences_per_second"] == pytest.approx(m["inferences"] / m["window_s"])
        assert m["energy_j"] == pytest.approx(p["per_rank_joules"][0])  # rank 1's package reading dropped
        assert m["tokens_per_joule"] == pytest.approx(m["inferences"] / m["energy_j"])
        assert m["joules_per_1k_tokens"] == pytest.approx(1000 / m["tokens_per_joule"])
        assert m["idle_power_w"] == doc["idle"]["power_w"] and m["dynamic_energy_j"] is not None
        kwh_per_million = 1e6 / m["tokens_per_joule"] / 3.6e6  # carbon and cost per million tokens, as run adds them
        assert m["co2e_g_per_million"] == pytest.approx(400 * kwh_per_million)
        assert m["cost_per_million"] == pytest.approx(0.15 * kwh_per_million)
        assert m["carbon_basis"] == "estimate from measured energy"  # RAPL's counter: measured energy
    assert doc["carbon"]["per"] == "million tokens" and doc["carbon"]["carbon_intensity_g_per_kwh"] == 400
    arch = custom_arch(D, FFN, E, K)
    for m in doc["models"][::3]:  # the MoE at T = 1 and 8: the job's forward holds 2T tokens, 2TK pairs
        T, p = m["tokens_per_forward"], m["parallel"]
        touched = min(E, 2 * T * K)  # balanced: the job's 2TK pairs dealt round-robin over the E experts
        assert m["strategy"] == "grouped" and m["experts_touched"] == touched
        assert m["expert_load_max_over_mean"] == pytest.approx(1.0)  # 2TK is a multiple of E at T = 1 and 8
        assert m["experts_touched_if_uniform"] == pytest.approx(expected_experts_touched(E, K, 2 * T))
        router = layer_weight_bytes(arch, 0, 4)  # every rank reads its own router
        assert m["weight_bytes_read_per_forward"] == pytest.approx(layer_weight_bytes(arch, touched, 4) + router)
        assert [w["weight_bytes_read_per_forward"] for w in m["windows"]] == [m["weight_bytes_read_per_forward"]]
        assert p["all_to_all_calls"] == 3 * sum(x["batches"] for x in p["per_rank"])
        assert 0 < p["all_to_all_bytes"] and all(s > 0 for s in p["all_to_all_seconds_by_rank"])
    for m in doc["models"][1::3] + doc["models"][2::3]:
        assert m["experts_touched"] is None and "all_to_all_seconds" not in m["parallel"]  # data-parallel
        assert m["weight_bytes_read_per_forward"] == 2 * m["params"] * 4  # each rank its own copy
    assert "moe[expert_parallel]" in r.stdout and "all-to-all" in r.stdout and "results written to" in r.stdout
    assert "CO2e" in r.stdout and "(est.)" in r.stdout  # the table's columns (their headers fold)
    assert "carbon and cost per million tokens: ESTIMATES" in r.stdout
    assert "not computed" not in r.stderr


# ---------------------------------------------------------------------------------------------------------
# Bad combinations: exit 2 with one line, before any rank waits for another

BAD = {
    "experts": (["--experts", "3"], "error: experts=3 cannot be split evenly over 2 ranks"),
    "compile": (["--compile"], "error: --compile is not supported with --parallel expert: "),
    "strategy": (["--moe-strategy", "padded"], "error: --parallel expert runs the local experts with the grouped "
                                               "strategy; drop --moe-strategy padded"),
    "seed flag": (["--epochs", "2"], "error: --epochs: no meaning with --arch"),
    "tokens": (["--tokens", "0"], "error: --tokens: 0 must be a whole number from 1 to "),
    "routing": (["--routing", "skewed:x"], "error: --routing 'skewed:x': the Zipf exponent 'x' is not a number"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_combinations_are_refused_before_rendezvous(case, monkeypatch, capsys):
    from moe_energy import cli
    from moe_energy.commands import run as parallel

    def rendezvous(*args, **kwargs):
        raise AssertionError("reached the rendezvous")

    monkeypatch.setattr(parallel, "init_group", rendezvous)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    flags, message = BAD[case]
    assert cli.main(["run", "--parallel", "expert", *TINY, *flags]) == 2  # a repeated flag: the last one counts
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


@pytest.mark.slow
def test_indivisible_experts_exit_before_waiting_for_a_peer(tmp_path):
    # WORLD_SIZE=2 with nobody else started: a rendezvous would wait until the subprocess timeout
    r = subprocess.run([sys.executable, *moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY,
                        "--experts", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: experts=3 cannot be split evenly over 2 ranks; use a world size in [1, 3] (torchrun --nproc-per-node "
        "x --nnodes) or --experts a multiple of 2"]
    assert not list(tmp_path.glob("run-*.json"))
