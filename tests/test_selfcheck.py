"""`moe-energy selfcheck`: passes on an estimate-only host and on a live fake RAPL tree, fails when a check does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from moe_energy.bench import selfcheck
from moe_energy.cli import main
from moe_energy.energy.rapl import ENV_ROOT
from moe_energy.models.strategies import STRATEGIES

FAST = ["--device", "cpu", "--seconds", "1", "--idle-seconds", "1"]




def report(out: Path) -> dict:
    [f] = list(out.glob("selfcheck-cpu-*.json"))
    return json.loads(f.read_text())


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


@pytest.mark.slow
def test_passes_with_the_estimate_meter_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-powercap"))
    out = tmp_path / "out"
    assert main(["selfcheck", *FAST, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1] == "OK"
    doc = report(out)
    assert doc["schema"] == "moe-energy/selfcheck" and doc["passed"] is True and doc["verdict"] == "OK"
    checks = by_name(doc)
    assert checks["auto meter"]["status"] == "ok" and "ESTIMATE" in checks["auto meter"]["detail"]
    assert doc["energy_meter"]["name"] == "estimate"
    for name in STRATEGIES:  # every registered strategy, in fp32 and bf16
        c = checks[f"strategy {name}"]
        assert c["status"] == "ok" and set(c["data"]["max_abs_error"]) == {"float32", "bfloat16"}
        assert c["data"]["max_abs_error"]["float32"] <= selfcheck.FP32_ATOL
    for label in ("window dense_total (small)", "window moe[auto] (small)"):
        w = checks[label]
        assert w["status"] == "ok" and w["data"]["energy_method"] == "estimate" and "(ESTIMATE)" in w["detail"]
        [win] = w["data"]["windows"]
        assert win["window_s"] >= 0.5 and win["energy_j"] > 0 and win["batch_size"] == selfcheck.WINDOW_BATCH
    assert checks["idle window"]["status"] == "ok" and checks["idle window"]["data"]["seconds"] >= 0.3
    assert checks["trace vs counter"]["status"] == "ok"
    assert "; ESTIMATE: cpu:estimate: no power sensor, the trace is the counter's own reads" in \
        checks["trace vs counter"]["detail"]
    assert checks["meter estimate"]["status"] == "info"


@pytest.mark.slow
def test_passes_on_a_live_fake_rapl_tree(live_rapl, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["selfcheck", *FAST, "--seconds", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
    checks = by_name(report(out))
    assert "auto picks rapl (counter)" in checks["auto meter"]["detail"]
    assert checks["idle window"]["data"]["power_w"] == pytest.approx(40.0, rel=0.10)
    for label in ("window dense_total (small)", "window moe[auto] (small)"):
        [win] = checks[label]["data"]["windows"]
        assert win["energy_method"] == "counter"
        assert win["energy_by_device_j"]["cpu:package-0"] == pytest.approx(40.0 * win["window_s"], rel=0.10)
    diffs = checks["trace vs counter"]["data"]["relative_difference"]
    assert len(diffs) == 2 and all(abs(d) <= selfcheck.TRACE_AGREEMENT for d in diffs.values())
    assert checks["trace vs counter"]["data"]["counter_traced"] == ["cpu:package-0"]  # no power sensor: said so


def _wrong(x, expert_idx, gate_w, ex):  # a strategy that forgets the gate weights
    return STRATEGIES["grouped"](x, expert_idx, torch.ones_like(gate_w), ex)


def test_a_wrong_strategy_fails_the_check_and_the_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(STRATEGIES, "wrong", _wrong)
    monkeypatch.setattr(selfcheck, "check_energy", lambda *a, **k: [])  # the energy part is tested above
    out = tmp_path / "out"
    assert main(["selfcheck", *FAST, "--out", str(out)]) == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "PROBLEMS: strategy wrong"
    doc = report(out)
    checks = by_name(doc)
    assert doc["passed"] is False and checks["strategy wrong"]["status"] == "FAIL"
    assert "over tolerance" in checks["strategy wrong"]["detail"]
    assert checks["strategy grouped"]["status"] == "ok"


def test_a_crashing_strategy_is_a_failed_check_not_a_crash(monkeypatch):
    def boom(*a):
        raise RuntimeError("no kernel for this device\nsecond line")

    monkeypatch.setitem(STRATEGIES, "boom", boom)
    checks = {c.name: c for c in selfcheck.check_strategies(torch.device("cpu"))}
    assert checks["strategy boom"].status == "FAIL"
    assert checks["strategy boom"].detail == "raised RuntimeError: no kernel for this device"


def _window(name: str, counter_j: float, trace_j: float, method: str = "counter") -> selfcheck.Check:
    win = {"energy_by_device_j": {"gpu:0": counter_j}, "trace_energy_j": {"gpu:0": trace_j},
           "method_by_device": {"gpu:0": method}, "energy_method": method}
    return selfcheck.Check("energy", name, "ok", "", {"windows": [win]})


def test_trace_disagreeing_with_the_counter_fails():
    assert selfcheck.check_trace([_window("a", 100.0, 108.0)]).status == "ok"
    bad = selfcheck.check_trace([_window("a", 100.0, 104.0), _window("b", 100.0, 85.0)])
    assert bad.status == "FAIL" and "b gpu:0 -15.0%" in bad.detail
    assert selfcheck.check_trace([]).status == "skip"


def test_a_cuda_run_without_a_gpu_counter_fails_the_meter_check():
    from moe_energy.energy import EstimateMeter

    [auto] = [c for c in selfcheck.check_meters(torch.device("cuda"), EstimateMeter(), []) if c.name == "auto meter"]
    assert auto.status == "FAIL" and "no GPU energy counter" in auto.detail
    [auto] = [c for c in selfcheck.check_meters(torch.device("cpu"), EstimateMeter(), []) if c.name == "auto meter"]
    assert auto.status == "ok"


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert main(["selfcheck", "--seconds", "0", "--out", str(tmp_path)]) == 2
    assert main(["selfcheck", "--device", "tpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--seconds 0.0 must be" in err and "--device 'tpu' is unknown" in err


@pytest.mark.parametrize("flags, needle", [
    (["--seconds", "1e-9"], "--seconds 1e-09 is too short"),
    (["--seconds", "0.5"], "--seconds 0.5 is too short"),
    (["--idle-seconds", "0.2"], "--idle-seconds 0.2 is too short"),
])
def test_windows_too_short_to_trust_are_refused_so_the_verdict_is_stable(tmp_path, capsys, flags, needle):
    for _ in range(2):  # the same answer every time, before anything is measured
        assert main(["selfcheck", "--device", "cpu", *flags, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "at least 1 s" in err[0]
    assert not list(tmp_path.iterdir())


def test_a_crash_detail_is_errors_one_line(monkeypatch):
    def boom(*a):
        raise RuntimeError("[../gloo/transport.cc:42] peer closed\nstack")

    monkeypatch.setitem(STRATEGIES, "boom", boom)
    [c] = [c for c in selfcheck.check_strategies(torch.device("cpu")) if c.name == "strategy boom"]
    assert c.detail == "raised RuntimeError: peer closed"


def test_energy_windows_run_the_models_their_plans_build(monkeypatch):
    from moe_energy.config import PRESETS
    from moe_energy.energy import EstimateMeter
    from moe_energy.models.plan import ModelPlan

    seen: dict[str, torch.nn.Module] = {}

    def window(label, model, x, meter, seconds, sync):
        seen[label] = model
        return selfcheck.Check("energy", label, "ok", "")

    monkeypatch.setattr(selfcheck, "check_window", window)
    checks = selfcheck.check_energy(torch.device("cpu"), EstimateMeter(), 0.1, 0.0, lambda msg: None)
    assert [c.name for c in checks] == ["idle window", "window dense_total (small)", "window moe[auto] (small)",
                                        "trace vs counter"]
    dense, moe = seen["window dense_total (small)"], seen["window moe[auto] (small)"]
    small = PRESETS["small"]
    assert dense.width == ModelPlan.of("dense_total", small).width and moe.strategy == "auto"
    for name, model in (("dense_total", dense), ("moe", moe)):
        assert sum(p.numel() for p in model.parameters()) == ModelPlan.of(name, small).params


def _rapl_window(zone: Path, meter, gap: tuple[float, float] | None = None, burst_j: float = 0.0) -> selfcheck.Check:
    """One 1 s window of a real RaplMeter over a fake tree whose package counter this thread advances at 40 W.

    ``gap``: from its first to its second second energy_uj is gone (every read of it fails) and the counter
    takes ``burst_j`` more than its 40 W: the sampler loses its reads exactly while power changes."""
    def write(uj: float) -> None:
        tmp = zone / ".energy_uj.tmp"
        tmp.write_text(f"{int(uj)}\n")
        os.replace(tmp, zone / "energy_uj")

    start = int((zone / "energy_uj").read_text())
    t0 = time.perf_counter()
    with meter.window(sync=lambda: None) as w:
        while (t := time.perf_counter() - t0) < 1.0:
            if gap and gap[0] <= t < gap[1]:
                (zone / "energy_uj").unlink(missing_ok=True)
            else:
                write(start + 40e6 * t + (burst_j * 1e6 if gap and t >= gap[1] else 0))
            time.sleep(0.005)
    m = w.result
    assert m is not None
    win = {"energy_by_device_j": m.joules_by_device, "trace_energy_j": m.trace_energy_j(),
           "method_by_device": m.method_by_device, "energy_method": m.method, "flags": m.flags}
    return selfcheck.Check("energy", "window", "ok", "", {"windows": [win]})


def test_trace_vs_counter_on_rapl_says_it_checks_the_sampler_and_fails_when_the_sampler_lost_reads(tmp_path):
    # RAPL has no power sensor: its trace is the counter's own reads, so their integral meets the edges' difference
    # by construction. The check said 'ok' as if a trace had confirmed the counter (as a GPU's power sensor does);
    # what it can catch is a sampler that lost reads while the power changed, and it must say which it is.
    from test_energy_rapl import write_zone

    from moe_energy.energy.meter import counter_traced
    from moe_energy.energy.rapl import RaplMeter

    zone = write_zone(tmp_path, "intel-rapl:0", "package-0", 10**9)
    meter = RaplMeter(tmp_path, trace_period_s=0.05)
    assert counter_traced(meter) == ["cpu:package-0"]
    good = selfcheck.check_trace([_rapl_window(zone, meter)], counter_traced(meter))
    assert good.status == "ok"
    assert abs(good.data["relative_difference"]["window cpu:package-0"]) <= 0.05
    assert good.detail.endswith("; cpu:package-0: no power sensor, the trace is the counter's own reads: this checks "
                                "the sampler's reads against the window's edges, not the counter")
    lost = _rapl_window(zone, meter, gap=(0.3, 0.8), burst_j=40.0)  # 80 J counted; the trace sees ~60
    [win] = lost.data["windows"]
    assert win["energy_by_device_j"]["cpu:package-0"] == pytest.approx(80.0, rel=0.05)
    assert any(f.startswith("power trace sample failed: RAPL: cannot read") for f in win["flags"])
    bad = selfcheck.check_trace([lost], counter_traced(meter))
    assert bad.status == "FAIL" and bad.data["relative_difference"]["window cpu:package-0"] < -0.15
    assert "not the counter" in bad.detail
