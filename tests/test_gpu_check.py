"""scripts/gpu-check.sh, the one script a session runs on a lent GPU machine, is still in step with the CLI: its dry
mode (GPU_CHECK_DRY=1) runs every step's command on this CPU with tiny shapes appended, so a flag, a value, a path or
a JSON key the script uses that the code no longer has fails here, not in scarce GPU time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["install", "meters", "selfcheck", "small", "xl", "odd", "llm", "whole", "wholeimpls", "int8", "w8a8", "fp8",
         "caps", "llmcaps", "ep", "peers", "vllm", "vllmsweep"]
REFUSED_ON_CPU = {"fp8", "caps", "llmcaps", "vllm", "vllmsweep"}  # GPU-only features (vLLM is not in the test env)


def _gpu_check(tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """The script from the repo root, this interpreter first on PATH (it calls python3), $OUT under tmp_path."""
    full = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_RESULTS": str(tmp_path / "results"),
            "MOE_ENERGY_CACHE_DIR": str(tmp_path / "cache"),
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env}
    full.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def _summary(stdout: str) -> dict[str, str]:
    """The summary's rows: step name -> its result."""
    rows = stdout.split("=== summary", 1)[1].splitlines()[1:]
    found = (re.match(r"  (\S+)\s+(.*?)\s+\d+s$", r) for r in rows)
    return {m.group(1): m.group(2) for m in found if m}


def test_a_name_that_is_no_step_stops_before_anything_runs(tmp_path):
    r = _gpu_check(tmp_path, 30, GPU_CHECK_ONLY="meters whole-impls", GPU_CHECK_DRY="1")
    assert r.returncode == 2
    assert "'whole-impls', which is no step" in r.stderr
    assert not (tmp_path / "out").exists()


# One step of each kind of command (bench-strategies, run --arch / --model / --weights / --power-limit, torchrun,
# the vLLM engine and its sweep): about half the dry run's time. The whole dry run (~100 s here) is for a session
# about to spend device time: MOE_ENERGY_GPU_CHECK_ALL=1 pytest tests/test_gpu_check.py
EACH_KIND = ["install", "meters", "odd", "llm", "whole", "int8", "fp8", "caps", "ep", "peers", "vllm", "vllmsweep"]
ALL = os.environ.get("MOE_ENERGY_GPU_CHECK_ALL") == "1"


@pytest.mark.slow
def test_dry_run_takes_every_step_on_the_cpu(tmp_path):
    steps = STEPS if ALL else EACH_KIND
    only = {} if ALL else {"GPU_CHECK_ONLY": " ".join(n for n in EACH_KIND if n not in ("install", "vllmsweep"))}
    r = _gpu_check(tmp_path, 1000, GPU_CHECK_DRY="1", **only)  # past the dry run's 900 s budget: its summary says
    # which step ran long, where a timeout here would say nothing
    out = r.stdout
    assert r.returncode == 0, out[-6000:] + r.stderr[-2000:]
    summary = _summary(out)
    assert list(summary) == steps, summary
    for name, result in summary.items():
        want = "ok (refused on cpu, as expected)" if name in REFUSED_ON_CPU else "ok"
        assert result == want, (name, result, out[-6000:])
    assert "the summary could not read the results" not in out
    # only two files in $OUT (the device tool returns at most 8), every JSON inside the tar
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-check.log", "results.tar"]
    with tarfile.open(tmp_path / "out" / "results.tar") as tar:
        names = [Path(n).name for n in tar.getnames()]
    assert sum(n.startswith("selfcheck-") for n in names) == (1 if ALL else 0)
    assert sum(n.startswith("strategies-") for n in names) == (4 if ALL else 2)  # small, xl, odd, peers
    assert sum(n.startswith("run-") for n in names) == (5 if ALL else 4)  # llm, whole, int8, w8a8, ep
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "gpu-check: OK" in log
