"""Roofline: measured figures cached per device under MOE_ENERGY_CACHE_DIR, and the bound's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from moe_energy.measure import roofline
from moe_energy.measure.roofline import Roofline


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path))
    return tmp_path


def fake(**kw) -> Roofline:
    base = dict(device_name="cpu:test", gemm_flops_per_s={"float32": 1e11}, bandwidth_bytes_per_s=1e10,
                gemm_size=64, copy_bytes=2**20, measured_utc="2026-01-01T00:00:00+00:00")
    return Roofline(**{**base, **kw})


def test_calibrate_measures_caches_and_loads(cache_dir):
    cpu = torch.device("cpu")
    assert roofline.load(cpu) is None
    r = roofline.calibrate(cpu, ("float32",), seconds=0.01, gemm_size=64, copy_bytes=2**20)
    assert r.gemm_flops_per_s["float32"] > 1e6 and r.bandwidth_bytes_per_s > 1e6
    doc = json.loads((cache_dir / "roofline.json").read_text())
    assert list(doc) == [roofline.device_name(cpu)]
    assert roofline.load(cpu) == r
    assert not list(cache_dir.glob(".roofline-*"))  # no temp file left behind


def test_cache_keeps_other_devices(cache_dir):
    other = fake(device_name="cuda:Other GPU")
    (cache_dir / "roofline.json").write_text(json.dumps({other.device_name: other.as_dict()}))
    roofline.calibrate(torch.device("cpu"), ("float32",), seconds=0.01, gemm_size=32, copy_bytes=2**16)
    assert len(json.loads((cache_dir / "roofline.json").read_text())) == 2


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({"x": 1})])
def test_unreadable_cache_reads_as_uncalibrated(cache_dir, content):
    (cache_dir / "roofline.json").write_text(content)
    assert roofline.load(torch.device("cpu")) is None


def test_stale_entry_reads_as_uncalibrated(cache_dir):
    (cache_dir / "roofline.json").write_text(json.dumps({roofline.device_name(torch.device("cpu")): {"old": 1}}))
    assert roofline.load(torch.device("cpu")) is None


def test_bound_is_the_slower_of_compute_and_memory():
    r = fake()
    assert r.bound_s(1e11, 0, "float32") == pytest.approx(1.0)  # compute-bound: 1e11 FLOPs at 1e11/s
    assert r.bound_s(1e9, 3e10, "float32") == pytest.approx(3.0)  # memory-bound: 3e10 B at 1e10 B/s
    assert r.fraction_of_bound(4.0, 1e9, 3e10, "float32") == pytest.approx(0.75)
    assert r.bound_s(1e9, 1e9, "bfloat16") is None  # not calibrated for that dtype
    assert r.fraction_of_bound(0.0, 1e9, 1e9, "float32") is None


def test_figures_withhold_what_was_not_calibrated():
    got = roofline.figures(fake(), 4.0, 1e9, 3e10, "float32")
    assert got == {"flops_per_batch": 1e9, "weight_bytes_per_batch": 3e10, "roofline_bound_ms": pytest.approx(3000.0),
                   "memory_bound_ms": pytest.approx(3000.0), "compute_bound_ms": pytest.approx(10.0),
                   "bound": "memory", "fraction_of_roofline": pytest.approx(0.75)}
    none = roofline.figures(None, 0.004, 1e9, 3e10, "float32")
    assert none["roofline_bound_ms"] is None and none["fraction_of_roofline"] is None
    assert none["memory_bound_ms"] is None and none["compute_bound_ms"] is None and none["bound"] is None
    assert roofline.figures(fake(), 4.0, 1e9, 3e10, "bfloat16")["bound"] is None  # that dtype never calibrated


def test_figures_say_which_bound_applies_as_tokens_grow():
    """A layer reading 1e9 weight bytes per forward at 1e10 B/s (0.1 s) and 2e9 FLOPs per token at 1e11 FLOP/s:
    memory-bound until the arithmetic takes longer than the read, at 5 tokens, compute-bound after."""
    r = fake()
    got = {t: roofline.figures(r, 1.0, 2e9 * t, 1e9, "float32") for t in (1, 4, 6, 64)}
    assert [got[t]["bound"] for t in (1, 4, 6, 64)] == ["memory", "memory", "compute", "compute"]
    assert got[64]["compute_bound_ms"] == pytest.approx(1280.0) and got[64]["memory_bound_ms"] == pytest.approx(100.0)
    assert got[64]["roofline_bound_ms"] == got[64]["compute_bound_ms"]
    assert got[1]["fraction_of_roofline"] == pytest.approx(0.1)


@pytest.fixture
def load_of(monkeypatch):
    """Set the host's 1-minute load average (the OS figure host_busy reads) on a 2-CPU host."""
    monkeypatch.setattr(roofline.os, "cpu_count", lambda: 2)

    def set_load(load: float) -> None:
        monkeypatch.setattr(roofline.os, "getloadavg", lambda: (load, 0.0, 0.0))

    return set_load


def test_a_calibration_on_a_busy_host_is_kept_with_that_said(load_of):
    cpu = torch.device("cpu")
    load_of(0.9)  # under half the CPUs: idle enough
    assert roofline.calibrate(cpu, ("float32",), seconds=0.01, gemm_size=64, copy_bytes=2**20).busy is None
    assert roofline.host_busy(torch.device("cuda")) is None  # a GPU's figures do not share the host's cores
    load_of(3.0)
    r = roofline.calibrate(cpu, ("float32",), seconds=0.01, gemm_size=64, copy_bytes=2**20)
    assert r.busy == "1-minute load 3.0 on 2 CPUs"
    assert roofline.load(cpu) == r  # cached with the figures


def test_a_rate_added_on_a_busy_host_marks_the_cached_entry_busy(load_of):
    cpu = torch.device("cpu")
    load_of(0.9)
    roofline.calibrate(cpu, ("float32",), seconds=0.01, gemm_size=64, copy_bytes=2**20)
    load_of(3.0)  # the run that needs another rate finds the host busy
    r = roofline.load_or_calibrate(cpu, "float16", lambda m: None)
    assert set(r.gemm_flops_per_s) == {"float32", "float16"} and r.busy == "1-minute load 3.0 on 2 CPUs"
    assert roofline.load(cpu) == r


@pytest.mark.slow
def test_calibrate_shows_a_busy_measurement_in_its_table_and_nothing_on_stderr(load_of, capsys):
    from moe_energy.cli import main

    load_of(3.0)
    assert main(["calibrate", "--device", "cpu", "--dtype", "float32", "--seconds", "0.01", "--force"]) == 0
    out = capsys.readouterr()
    row = [ln for ln in out.out.splitlines() if "measured while" in ln]  # the table may wrap its cells
    assert len(row) == 1 and "3.0" in row[0] and "--force" in out.out
    assert roofline.load(torch.device("cpu")).busy == "1-minute load 3.0 on 2 CPUs"
    assert out.err == ""
    load_of(0.0)
    assert main(["calibrate", "--device", "cpu", "--dtype", "float32", "--seconds", "0.01", "--force"]) == 0
    assert "measured while" not in capsys.readouterr().out


def test_a_busy_field_that_is_not_a_text_is_a_damaged_entry(cache_dir):
    entry = {**fake().as_dict(), "busy": 5}
    assert "busy=5 is not a text" in roofline._entry_problem(entry)
    assert roofline._entry_problem({**fake().as_dict(), "busy": "1-minute load 3.0 on 2 CPUs"}) is None
