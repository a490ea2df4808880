"""Expert parallelism on real torch.distributed process groups (gloo, 2 CPU processes).

Multi-process tests launch real ranks: torchrun (``python -m torch.distributed.run``) where a whole job is
wanted, plain processes with torchrun's environment variables where a test must kill one of them (torchrun
would tear the survivor down itself and hide our own timeout handling).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SHAPE, TINY_TASK, one_line_error

from moe_energy import cli
from moe_energy.config import ConfigError
from moe_energy.distributed.group import check_agreement, check_divisible, config_hash
from moe_energy.distributed.job import job_energy, job_idle, job_record, median_of
from moe_energy.errors import PeerLost

TINY = [*TINY_SHAPE, *TINY_TASK, "--samples", "300", "--epochs", "1", "--warmup", "0", "--device", "cpu"]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moe_energy_cmd(tmp_path: Path) -> list[str]:
    """How to start `moe-energy` as a module for torchrun or python."""
    return ["-m", "moe_energy"]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def start_rank(rank: int, world: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One rank as torchrun would start it, without torchrun's supervision."""
    e = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = open(log, "w")
    return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, text=True, env=e)


# ---------------------------------------------------------------------------------------------------------
# In one process: the arithmetic and the checks


def test_experts_must_divide_world_size():
    check_divisible(8, 4)
    with pytest.raises(ConfigError, match=r"experts=6 cannot be split evenly over 4 ranks; use a world size in "
                                          r"\[1, 2, 3, 6\]"):
        check_divisible(6, 4)


def test_mismatched_config_names_the_field_and_rank():
    a = {"spec": {"hidden": 16, "experts": 4}, "options": {"seed": 0}}
    b = {"spec": {"hidden": 32, "experts": 4}, "options": {"seed": 0}}
    check_agreement([(config_hash(a), a, None), (config_hash(a), a, None)])
    with pytest.raises(ConfigError, match=r"rank 1's configuration differs from rank 0's in spec.hidden \(32 vs 16\)"):
        check_agreement([(config_hash(a), a, None), (config_hash(b), b, None)])
    c = dict(a, data="f00d")
    with pytest.raises(ConfigError, match=r"differs from rank 0's in the data \(same flags, different contents"):
        check_agreement([(config_hash(a), a, None), (config_hash(c), c, None)])
    with pytest.raises(ConfigError, match=r"^rank 1 of 2: --data x: no such file"):
        check_agreement([(config_hash(a), a, None), (config_hash(a), a, "--data x: no such file")])


def _rank(rank: int, host: str, joules: dict | None, method: str, a2a_s: float = 0.5, a2a_b: int = 1000) -> dict:
    return {"rank": rank, "hostname": host, "device": f"cpu:{rank}", "batch_size": 10, "batches": 20 + rank,
            "seconds": 2.0 + rank, "latency_ms": [1.0, 2.0, 3.0], "flags": [],
            "comm": {"all_to_all_seconds": a2a_s, "all_to_all_bytes": a2a_b, "all_to_all_local_bytes": 7,
                     "all_to_all_calls": 60},
            "energy": {"energy_j": None if joules is None else sum(joules.values()), "joules_by_device": joules,
                       "method": method, "meter": "m", "devices_covered": list(joules or {}), "flags": [],
                       "method_by_device": {d: method for d in joules or {}}}}


def test_job_energy_counts_a_shared_counter_once_and_sums_estimates():
    # two ranks on one host both read the same CPU package counter, each its own GPU
    ranks = [_rank(0, "h", {"gpu:0": 100.0, "cpu:package-0": 50.0}, "counter"),
             _rank(1, "h", {"gpu:1": 120.0, "cpu:package-0": 52.0}, "counter")]
    j, method, flags = job_energy(ranks)
    assert j == pytest.approx(270.0) and method == "counter"
    assert any("cpu:package-0 on h read by ranks 0 and 1: counted once" in f for f in flags)
    # per-process estimates are never shared, and on different hosts nothing is shared
    est = [_rank(0, "h", {"cpu:estimate": 3.0}, "estimate"), _rank(1, "h", {"cpu:estimate": 4.0}, "estimate")]
    assert job_energy(est)[:2] == (pytest.approx(7.0), "estimate")
    two_hosts = [_rank(0, "a", {"cpu:package-0": 5.0}, "counter"), _rank(1, "b", {"cpu:package-0": 6.0}, "counter")]
    assert job_energy(two_hosts)[0] == pytest.approx(11.0)
    # one rank unmeasured: no job total (never a partial sum passed off as the whole)
    j, _, flags = job_energy([_rank(0, "a", {"gpu:0": 5.0}, "counter"), _rank(1, "b", None, "none")])
    assert j is None and "rank(s) [1]" in flags[0]


def test_job_record_aggregates_every_rank():
    ranks = [_rank(0, "a", {"gpu:0": 40.0}, "counter", 0.5, 1000), _rank(1, "b", {"gpu:0": 60.0}, "counter", 0.9, 3000)]
    rec = job_record(ranks, flops_per_inference=100)
    assert rec["inferences"] == 10 * 20 + 10 * 21
    assert rec["window_s"] == 3.0  # the slower rank's window
    assert rec["inferences_per_second"] == pytest.approx(410 / 3.0)
    assert rec["energy_j"] == pytest.approx(100.0)
    assert rec["inferences_per_joule"] == pytest.approx(4.1)
    p = rec["parallel"]
    assert p["per_rank_joules"] == [40.0, 60.0]
    assert p["all_to_all_seconds_by_rank"] == [0.5, 0.9] and p["all_to_all_seconds"] == 0.9
    assert p["all_to_all_share_of_window"] == pytest.approx(max(0.5 / 2.0, 0.9 / 3.0))
    assert p["all_to_all_bytes"] == 4000 and p["all_to_all_bytes_per_inference"] == pytest.approx(4000 / 410)
    # a data-parallel model has no all-to-all figures at all (not zeros)
    for r in ranks:
        r["comm"] = None
    assert "all_to_all_seconds" not in job_record(ranks, 100)["parallel"]
    # a rank whose meter failed: the job's window is failed (run's medians leave it out), naming the rank
    ranks[1]["failed"] = "meter m could not read the window: gone"
    assert job_record(ranks, 100)["failed"] == "rank 1: meter m could not read the window: gone"


def test_job_record_keeps_each_ranks_trace_under_its_own_energy_key():
    # two ranks on one host, each its own per-process estimate: joules were kept apart (host:cpu:estimate and
    # ...@rank1) but the traces were keyed host:device alone, so rank 1's trace overwrote rank 0's and the job's
    # trace_energy_j under rank 0's key was rank 1's energy
    def traced(rank: int, joules: dict, method: str, watts: float) -> dict:
        r = _rank(rank, "h", joules, method)
        r["seconds"] = 2.0
        r["energy"]["trace"] = {d: [[0.0, watts], [2.0, watts]] for d in joules}
        r["energy"]["trace_period_s"] = 0.1
        r["energy"]["state_begin"] = {d: {"rank": rank} for d in joules}
        return r

    rec = job_record([traced(0, {"cpu:estimate": 2.0}, "estimate", 1.0),
                      traced(1, {"cpu:estimate": 8.0}, "estimate", 4.0)], 100)
    assert rec["energy_by_device_j"] == {"h:cpu:estimate": 2.0, "h:cpu:estimate@rank1": 8.0}
    assert rec["trace_energy_j"] == pytest.approx({"h:cpu:estimate": 2.0, "h:cpu:estimate@rank1": 8.0})
    assert rec["state_begin"] == {"h:cpu:estimate": {"rank": 0}, "h:cpu:estimate@rank1": {"rank": 1}}
    # one package counter read by both: counted once, with the trace of the rank whose joules count
    rec = job_record([traced(0, {"cpu:package-0": 2.0}, "counter", 1.0),
                      traced(1, {"cpu:package-0": 2.2}, "counter", 1.1)], 100)
    assert rec["energy_by_device_j"] == {"h:cpu:package-0": 2.0}
    assert rec["trace_energy_j"] == pytest.approx({"h:cpu:package-0": 2.0})
    assert rec["state_begin"] == {"h:cpu:package-0": {"rank": 0}}


def test_job_idle_sums_distinct_devices_and_job_record_subtracts_it():
    def reading(rank: int, watts: dict) -> dict:
        return {"rank": rank, "hostname": "h",
                "idle": {"seconds": 1.0, "method": "counter", "flags": [], "power_by_device_w": watts}}

    idle_ranks = [reading(0, {"gpu:0": 30.0, "cpu:package-0": 10.0}),
                  reading(1, {"gpu:1": 32.0, "cpu:package-0": 11.0})]
    idle = job_idle(idle_ranks)
    assert idle.power_by_device_w == {"h:gpu:0": 30.0, "h:cpu:package-0": 10.0, "h:gpu:1": 32.0}
    assert idle.power_w == pytest.approx(72.0)
    assert any("cpu:package-0 on h read by ranks 0 and 1: counted once" in f for f in idle.flags)
    # a window of 2 s on the same devices: dynamic = raw minus idle power x the window's seconds, per device
    ranks = [_rank(0, "h", {"gpu:0": 100.0, "cpu:package-0": 50.0}, "counter"),
             _rank(1, "h", {"gpu:1": 120.0, "cpu:package-0": 52.0}, "counter")]
    for r in ranks:
        r["seconds"] = 2.0
    rec = job_record(ranks, 100, idle)
    assert rec["energy_j"] == pytest.approx(270.0)
    assert rec["dynamic_energy_j"] == pytest.approx(270.0 - 72.0 * 2.0)
    # one rank without an idle reading: no job idle power (never a partial sum)
    idle_ranks[1]["idle"] = None
    assert job_idle(idle_ranks).power_w is None


def test_each_rank_is_judged_over_its_own_window_seconds():
    """The job's window is its slowest rank's; a faster rank's idle share and trace integral are over its own
    seconds (over the job's, its idle was subtracted, and its trace held flat, for time it did not measure)."""
    idle = job_idle([{"rank": r, "hostname": h, "idle": {"seconds": 1.0, "method": "counter", "flags": [],
                                                         "power_by_device_w": {"gpu:0": 30.0}}}
                     for r, h in ((0, "a"), (1, "b"))])
    ranks = [_rank(0, "a", {"gpu:0": 100.0}, "counter"), _rank(1, "b", {"gpu:0": 300.0}, "counter")]
    for r, secs, watts in zip(ranks, (1.0, 3.0), (100.0, 100.0)):
        r["seconds"] = secs
        r["energy"]["trace"] = {"gpu:0": [[0.0, watts], [secs, watts]]}
    rec = job_record(ranks, 100, idle)
    assert rec["window_s"] == 3.0
    assert rec["dynamic_energy_by_device_j"] == pytest.approx({"a:gpu:0": 100.0 - 30.0 * 1.0,
                                                               "b:gpu:0": 300.0 - 30.0 * 3.0})
    assert rec["trace_energy_j"] == pytest.approx({"a:gpu:0": 100.0, "b:gpu:0": 300.0})


def test_parallel_block_is_the_median_of_the_windows():
    a = {"per_rank": [{"rank": 0, "hostname": "h", "batches": 5, "energy_j": 1.0}], "all_to_all_seconds": 0.2}
    b = {"per_rank": [{"rank": 0, "hostname": "h", "batches": 5, "energy_j": 3.0}], "all_to_all_seconds": 0.4}
    c = {"per_rank": [{"rank": 0, "hostname": "h", "batches": 5, "energy_j": None}], "all_to_all_seconds": 0.9}
    m = median_of([a, b, c])
    assert m["per_rank"] == [{"rank": 0, "hostname": "h", "batches": 5, "energy_j": 2.0}]
    assert m["all_to_all_seconds"] == 0.4
    assert median_of([a]) == a


def test_a_failed_collective_is_a_lost_peer_not_a_user_mistake():
    import torch

    from moe_energy.distributed.group import Group, collective, set_stage

    assert not issubclass(PeerLost, ConfigError)
    g = Group(0, 2, 0, "gloo", torch.device("cpu"), 10.0)
    set_stage("measuring moe[expert_parallel]")
    with pytest.raises(PeerLost) as e:
        with collective(g, "all-to-all"):
            raise RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore")
    assert str(e.value) == ("rank 0 of 2: a collective failed during measuring moe[expert_parallel] (all-to-all): "
                            "Connection closed by peer; another rank died, hung or is unreachable (timeout 10 s); "
                            "no result written")


def test_cli_exits_3_on_a_lost_peer_with_one_line(monkeypatch, capsys):
    from moe_energy import cli
    from moe_energy.commands import run as parallel

    def lost(*args, **kwargs):
        raise PeerLost("rank 0 of 2: could not join the job (connection refused); check MASTER_ADDR")

    monkeypatch.setattr(parallel, "init_group", lost)
    assert cli.main(["run", "--parallel", "expert", *TINY, "--duration", "0.3"]) == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: rank 0 of 2: could not join the job (connection refused); "
                                        "check MASTER_ADDR"]


@pytest.mark.parametrize("flags, needle", [
    # 1e300 overflowed torch's timedelta: a traceback
    (["--parallel", "expert", "--collective-timeout", "1e300"], "--collective-timeout 1e+300 must be a number of "
                                                                "seconds > 0 and <= 86400"),
    (["--parallel", "expert", "--collective-timeout", "nan"], "--collective-timeout nan must be"),
    # without --parallel expert a bad (or any) timeout was silently ignored
    (["--collective-timeout", "-1"], "--collective-timeout: only with --parallel expert"),
])
def test_a_bad_collective_timeout_is_one_line_before_any_work(monkeypatch, tmp_path, capsys, flags, needle):
    from moe_energy.commands import run as parallel

    monkeypatch.setattr(parallel, "init_group", lambda *a, **k: pytest.fail("joined a job"))
    code = cli.main(["run", *flags, *TINY, "--duration", "0.3", "--out", str(tmp_path)])
    one_line_error(code, capsys.readouterr().err, needle)
    assert not list(tmp_path.glob("run-*.json"))


@pytest.mark.slow
def test_compile_is_refused_with_one_line_before_any_rendezvous(tmp_path):
    # WORLD_SIZE=2 with nobody else started: the refusal must come before any wait for a peer
    r = subprocess.run([sys.executable, *moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY,
                        "--compile", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compile is not supported with --parallel expert: ")
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("run-*.json"))



@pytest.mark.parametrize("fails_at", ["begin", "end"])
def test_a_failed_meter_still_runs_every_batch_of_the_window(fails_at):
    # the other ranks wait on each forward's collectives: a rank whose meter fails must run them all the same
    from moe_energy.distributed.job import fixed_window
    from moe_energy.energy.meter import NullMeter
    from moe_energy.measure.guard import GuardedMeter

    class Broken(NullMeter):
        def begin(self) -> None:
            if fails_at == "begin":
                raise RuntimeError("counter gone")

        def end(self):
            raise RuntimeError("counter gone")

    calls = []
    seconds, energy, flags, failed = fixed_window(lambda: calls.append(1), GuardedMeter(Broken()), lambda: None, 7,
                                                  None)
    assert len(calls) == 7
    assert energy.joules is None and failed is not None and "counter gone" in failed
    assert seconds >= 0


# ---------------------------------------------------------------------------------------------------------
# Two ranks: the expert-parallel MoE computes what the single-process MoE computes

EQUALITY = """\
import copy, torch
from moe_energy.distributed.expert_parallel import ExpertParallelMoE
from moe_energy.distributed.group import init_group, shutdown
from moe_energy.models.moe import MoE

torch.set_num_threads(1)
g = init_group("cpu", 30)
torch.manual_seed(0)
ref = MoE(4, 32, 2, 2, input_dim=24, classes=8, strategy="masked_loop")  # the seed's loop as the reference
torch.manual_seed(100 + g.rank)
mine = MoE(4, 32, 2, 2, input_dim=24, classes=8)  # rank 1 starts from other weights: from_moe broadcasts rank 0's
if g.rank == 0:
    mine.load_state_dict(ref.state_dict())

def check(name, ref, mine, x, expect_received=None):
    ep = ExpertParallelMoE.from_moe(mine, g)
    with torch.inference_mode():
        y, want = ep(x), ref(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert y.shape == (x.shape[0], 8)
    assert ep.local_experts == 2 and ep.moe.weights[0].shape == (2, 32, 24) and ep.moe.biases[-1].shape == (2, 8)
    if expect_received is not None:
        assert ep.last_received_pairs == expect_received, (name, ep.last_received_pairs)
    print(f"rank {g.rank} {name} ok max_abs_err={float((y - want).abs().max()) if len(x) else 0:.2e} "
          f"received={ep.last_received_pairs} bytes_sent={ep.stats.bytes_sent}", flush=True)
    return ep

torch.manual_seed(1 + g.rank)
check("random", ref, mine, torch.randn(37 + 6 * g.rank, 24))  # ranks hold different token counts
check("empty batch on rank 1", ref, mine, torch.randn(0 if g.rank else 9, 24))

# every token routed to experts 0 and 1 (rank 0's): rank 1's experts get no token
to0, mine0 = copy.deepcopy(ref), copy.deepcopy(mine)
for m in (to0, mine0):
    with torch.no_grad():
        m.gate.bias[:2] += 1e4
x = torch.randn(11 + g.rank, 24)
ep = check("all to rank 0", to0, mine0, x, expect_received=None if g.rank == 0 else 0)
if g.rank == 1:  # counts (2 experts x int64 to rank 0) + every pair's 24 floats to rank 0; nothing comes back from here
    assert ep.stats.bytes_sent == 2 * 8 + 12 * 2 * 24 * 4, ep.stats.bytes_sent
    assert ep.stats.calls == 3
else:
    assert ep.last_received_pairs == (11 + 12) * 2

# and the mirror image: rank 0's experts idle
to1, mine1 = copy.deepcopy(ref), copy.deepcopy(mine)
for m in (to1, mine1):
    with torch.no_grad():
        m.gate.bias[2:] += 1e4
check("all to rank 1", to1, mine1, torch.randn(5, 24), expect_received=0 if g.rank == 0 else 20)
torch.distributed.barrier()  # leave together: gloo aborts a rank whose peer tears the group down under it
shutdown()
print(f"rank {g.rank} ALL OK", flush=True)
"""


@pytest.mark.slow
def test_two_rank_expert_parallel_equals_single_process(tmp_path):
    script = tmp_path / "equality.py"
    script.write_text(EQUALITY)
    r = torchrun([str(script)])
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert f"rank {rank} ALL OK" in r.stdout
    assert "rank 1 all to rank 0 ok" in r.stdout and "received=0" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# Two ranks through the CLI: a whole run, a dead rank, a hung rank, disagreeing ranks


@pytest.mark.slow
def test_two_rank_run_records_both_ranks_and_all_to_all(tmp_path):
    out = tmp_path / "results"
    r = torchrun([*moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY, "--duration", "0.3",
                  "--repeats", "1", "--idle-seconds", "0", "--cooldown", "0", "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    files = list(out.glob("run-*-ep2.json"))
    assert len(files) == 1, list(out.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == "moe-energy/run"
    par = doc["parallel"]
    assert par["world_size"] == 2 and par["backend"] == "gloo" and par["mode"] == "expert"
    assert [x["rank"] for x in par["ranks"]] == [0, 1]
    names = [m["name"] for m in doc["models"]]
    assert names == ["moe[expert_parallel]", "dense_total", "dense_active"]
    in_dim, out_dim, k, experts_per_rank = 40, 4, 2, 2
    for m in doc["models"]:
        p = m["parallel"]
        assert [x["rank"] for x in p["per_rank"]] == [0, 1]
        assert len(p["per_rank_joules"]) == 2
        for x in p["per_rank"]:
            assert x["batches"] >= 1 and x["window_s"] > 0
            assert x["energy_method"] and (x["energy_j"] is None or x["energy_j"] > 0)
        assert m["inferences"] == sum(x["batches"] for x in p["per_rank"]) * 128
        assert m["inferences_per_second"] == pytest.approx(m["inferences"] / m["window_s"])
        if m["energy_j"] is not None:
            assert m["energy_j"] == pytest.approx(sum(p["per_rank_joules"]))
            assert m["inferences_per_joule"] == pytest.approx(m["inferences"] / m["energy_j"])
    moe = doc["models"][0]["parallel"]
    assert all(s > 0 for s in moe["all_to_all_seconds_by_rank"])
    assert 0 < moe["all_to_all_share_of_window"] <= 1
    batches = [x["batches"] for x in moe["per_rank"]]
    assert moe["all_to_all_calls"] == 3 * sum(batches)  # counts, dispatch, combine per forward
    # every pair crosses at most once each way, plus the counts: an upper bound the bytes must respect
    most = sum(b * (128 * k * (in_dim + out_dim) * 4 + experts_per_rank * 8) for b in batches)
    assert 0 < moe["all_to_all_bytes"] <= most
    assert moe["all_to_all_bytes"] == sum(moe["all_to_all_bytes_by_rank"])
    assert "all_to_all_seconds" not in doc["models"][1]["parallel"]  # data-parallel: no all-to-all
    assert "moe[expert_parallel]" in r.stdout and "all-to-all" in r.stdout


@pytest.mark.slow
def test_two_rank_run_honours_repeats_idle_and_cooldown(tmp_path, live_rapl):
    # a fake RAPL package counter at 40 W that both ranks (one host) read: the job counts it once
    out = tmp_path / "results"
    r = torchrun([*moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY, "--duration", "0.3",
                  "--models", "moe,dense_active", "--repeats", "2", "--idle-seconds", "1", "--cooldown", "0",
                  "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(next(out.glob("run-*-ep2.json")).read_text())
    idle = doc["idle"]
    assert [x["rank"] for x in idle["per_rank"]] == [0, 1]
    for x in idle["per_rank"]:  # 1 s idle readings (0.5 s left 75 ms for the fake writer's lag at both edges)
        assert x["idle"]["power_w"] == pytest.approx(40.0, rel=0.15)
    assert idle["power_w"] == pytest.approx(40.0, rel=0.15)  # one package, read twice, counted once
    assert any("read by ranks 0 and 1: counted once" in f for f in idle["flags"])
    assert [m["name"] for m in doc["models"]] == ["moe[expert_parallel]", "dense_active"]
    for m in doc["models"]:
        ws = m["windows"]
        assert m["repeats"] == 2 and len(ws) == 2 and sorted(w["repeat"] for w in ws) == [0, 1]
        assert m["idle_power_w"] == idle["power_w"]
        assert {w["batches"] for w in ws} == {m["batches"]}  # one agreed count per model, every window
        for w in ws:
            p = w["parallel"]
            assert [x["rank"] for x in p["per_rank"]] == [0, 1]
            assert w["energy_j"] == pytest.approx(p["per_rank_joules"][0])  # rank 1's package reading dropped
            assert w["inferences"] == sum(x["batches"] for x in p["per_rank"]) * 128
            assert w["dynamic_energy_j"] is not None
    assert sorted(w["order"] for m in doc["models"] for w in m["windows"]) == [0, 1, 2, 3]
    for w in doc["models"][0]["windows"]:
        p = w["parallel"]
        assert p["all_to_all_calls"] == 3 * sum(x["batches"] for x in p["per_rank"])


def _wait_for(path: Path, needle: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if needle in path.read_text():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    raise AssertionError(f"never saw {needle!r}: {path.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_or_hung_rank_makes_the_other_exit_with_a_message(tmp_path, how):
    timeout = 10
    # the MoE alone, no idle reading: its first window starts at once and every batch is an all-to-all
    cmd = [*moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY, "--duration", "600", "--models", "moe",
           "--idle-seconds", "0", "--collective-timeout", str(timeout), "--out", str(tmp_path / "results")]
    port = free_port()
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = [start_rank(r, 2, port, cmd, logs[r]) for r in (0, 1)]
    try:
        # a wait for the line, not a time limit on the work: two ranks' imports alone took ~25 s each on a loaded
        # 2-core host, which left 60 s for imports, rendezvous and training little to spare
        _wait_for(logs[1], "rank 1 of 2: measuring moe[expert_parallel]", 240, procs)
        time.sleep(1.0)  # well inside calibration or the window: all-to-all on every batch
        procs[1].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=timeout + 30)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = logs[0].read_text()
    assert rc == 3, text[-3000:]  # a lost peer: its own exit code, not a user mistake's 2
    assert "error: rank 0 of 2: a collective failed during measuring moe[expert_parallel]" in text
    assert "another rank died, hung or is unreachable (timeout 10 s); no result written" in text
    assert "Traceback" not in text
    assert waited < timeout + 30
    if how == "hang":  # nothing closed the connection: only the collective timeout can have ended the wait
        assert "Timed out" in text or "timed out" in text.lower()
    assert not list((tmp_path / "results").glob("run-*.json"))


@pytest.mark.slow
def test_ranks_with_different_flags_refuse_to_start(tmp_path):
    port = free_port()
    base = [*moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY, "--duration", "0.3",
            "--collective-timeout", "30", "--out", str(tmp_path)]
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = [start_rank(0, 2, port, base, logs[0]), start_rank(1, 2, port, [*base, "--seed", "7"], logs[1])]
    rcs = [p.wait(timeout=90) for p in procs]
    for rc, log in zip(rcs, logs):
        text = log.read_text()
        assert rc == 2, text[-2000:]
        assert "rank 1's configuration differs from rank 0's in options.seed (7 vs 0)" in text


@pytest.mark.slow
def test_experts_not_divisible_fails_before_rendezvous(tmp_path):
    # WORLD_SIZE=3 with nobody else started: the check must come before any wait for peers
    r = subprocess.run([sys.executable, *moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY],
                       capture_output=True, text=True, timeout=60,
                       env=env(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert r.returncode == 2
    assert "error: experts=4 cannot be split evenly over 3 ranks" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_only_rank_0s_out_must_be_writable_and_all_ranks_agree_on_it(tmp_path, bad_rank):
    # --out is rank 0's alone (it writes the results): another rank's machine may lack the path. A check on every
    # rank before the rendezvous made rank 1 exit 2 alone on an --out it never writes, while rank 0 waited out
    # the collective timeout at the rendezvous and exited 3 ("could not join the job")
    port, bad, good = free_port(), "/proc/self/no-such-dir", tmp_path / "results"
    base = [*moe_energy_cmd(tmp_path), "run", "--parallel", "expert", *TINY, "--duration", "0.3", "--repeats", "1",
            "--models", "moe", "--idle-seconds", "0", "--cooldown", "0", "--collective-timeout", "30"]
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = [start_rank(r, 2, port, [*base, "--out", bad if r == bad_rank else str(good)], logs[r]) for r in (0, 1)]
    rcs = [p.wait(timeout=120) for p in procs]
    texts = [log.read_text() for log in logs]
    if bad_rank == 1:  # rank 1 never writes: the job runs and rank 0 saves
        assert rcs == [0, 0], texts
        assert len(list(good.glob("run-*-ep2.json"))) == 1
        return
    for rc, text in zip(rcs, texts):  # rank 0 cannot save: every rank refuses alike, before any work
        assert rc == 2, text[-2000:]
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert errors == [f"error: rank 0 of 2: --out {bad}: cannot write results there (No such file or directory); "
                          "choose a writable directory"], text[-2000:]
    assert not good.exists()
