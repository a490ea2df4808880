"""The CLI under hostile conditions: streams that fail, user text that looks like markup, Ctrl-C during start-up,
side commands given what `run` refuses, paths the OS refuses. The README's promise: a mistake the user can fix
is one `error:` line and exit 2, never a traceback; nothing is lost; nothing is silently wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, TINY_SHAPE, TINY_TASK, one_line_error

from moe_energy.cli import main
from moe_energy.measure import roofline

TINY = [*TINY_SHAPE, *TINY_TASK, *QUICK, "--meter", "none"]
SHAPE = [*TINY_SHAPE, *TINY_TASK]  # the shape flags alone, for plan
FAST_CAL = ["calibrate", "--device", "cpu", "--dtype", "float32", "--seconds", "0.05"]


def cli(*args: str, stdout: int | object = subprocess.PIPE, env: dict | None = None,
        code: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a child process (``code``: a script run instead of ``-m moe_energy``, given ``args``)."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "moe_energy", *args]
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


def results(d: Path) -> list[Path]:
    return sorted(d.glob("run-*.json")) if d.is_dir() else []


# -- class 7: output streams ------------------------------------------------------------------------------
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this OS")


@pytest.mark.slow
@needs_dev_full
@pytest.mark.parametrize("args", [["presets"], ["plan", *SHAPE, "--device", "cpu"]])
def test_a_full_stdout_is_one_error_line_and_exit_2(args):
    with open("/dev/full", "w") as full:
        r = cli(*args, stdout=full)
    assert r.returncode == 2
    one_line_error(None, r.stderr, "cannot write to standard output (No space left on device)")


@pytest.mark.slow
@needs_dev_full
def test_a_run_whose_stdout_is_full_still_saves_its_results_and_names_them(tmp_path):
    with open("/dev/full", "w") as full:
        r = cli("run", *TINY, "--out", str(tmp_path), stdout=full)
    assert r.returncode == 2
    [saved] = results(tmp_path)
    one_line_error(None, r.stderr, "cannot write to standard output", f"results saved to {saved}")
    assert json.loads(saved.read_text())["models"]  # a whole document, measured


def _with_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """The CLI writing into a pipe whose reader is already gone (``| head`` that has quit)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return cli(*args, stdout=w)
    finally:
        os.close(w)


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly_with_141():
    r = _with_closed_pipe("--help")
    assert r.returncode == 141 and r.stderr == ""


@pytest.mark.slow
def test_a_run_into_a_closed_pipe_is_measured_and_saved_all_the_same(tmp_path):
    r = _with_closed_pipe("run", *TINY, "--out", str(tmp_path))
    assert r.returncode == 141 and r.stderr == ""
    [saved] = results(tmp_path)
    assert {m["status"] for m in json.loads(saved.read_text())["models"]} == {"measured"}


class _Failing:
    """A stdout that refuses every write with ``errno`` (as a full disk, a dead terminal or a gone reader do)."""

    def __init__(self, errno_: int) -> None:
        self.errno = errno_

    def write(self, text: str) -> int:
        raise OSError(self.errno, os.strerror(self.errno))

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("errno_, code, needle", [(28, 2, "No space left on device"), (5, 2, "Input/output error"),
                                                  (32, 141, None)])
def test_every_write_error_on_stdout_has_its_exit_status(monkeypatch, capsys, errno_, code, needle):
    monkeypatch.setattr(sys, "stdout", _Failing(errno_))
    assert main(["presets"]) == code
    err = capsys.readouterr().err
    if needle is None:
        assert err == ""
    else:
        one_line_error(None, err, f"cannot write to standard output ({needle})")


def test_a_mistake_found_before_any_output_is_the_mistake_even_with_a_dead_stdout(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _Failing(32))
    assert main(["plan", "--hidden", "0"]) == 2  # the mistake, not the pipe
    one_line_error(None, capsys.readouterr().err, "hidden=0")


# -- class 8: user text is never markup --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["[/x]", "res [old]", "[bold]b[/bold]"])
def test_an_out_directory_that_looks_like_markup_is_used_and_printed_as_given(tmp_path, capsys, name):
    out = tmp_path / name
    assert main(["run", *TINY, "--out", str(out)]) == 0
    [saved] = results(out)
    captured = capsys.readouterr()
    assert f"results written to {saved}\n" in captured.out and "Traceback" not in captured.err


def test_a_cache_path_that_looks_like_markup_is_printed_as_given(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "[red]c[/red] [/x]"
    monkeypatch.setenv(roofline.CACHE_ENV, str(cache))
    assert main(FAST_CAL) == 0
    assert f"cache: {cache / 'roofline.json'}\n" in capsys.readouterr().out
    assert (cache / "roofline.json").is_file()


def test_cached_text_that_looks_like_markup_is_printed_as_given(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path))
    name = roofline.device_name(torch.device("cpu"))
    entry = {"device_name": name, "gemm_flops_per_s": {"float32": 1e11}, "bandwidth_bytes_per_s": 1e10,
             "gemm_size": 64, "copy_bytes": 2**20, "measured_utc": "[/when]"}
    (tmp_path / "roofline.json").write_text(json.dumps({name: entry}))
    assert main(["calibrate", "--device", "cpu", "--dtype", "float32"]) == 0
    assert "measured [/when]" in " ".join(capsys.readouterr().out.split())  # the title wraps with the CPU's name


# -- class 12: Ctrl-C at any moment, start-up included ---------------------------------------------------
STARTUP_SIGINT = """
import importlib, os, signal, sys
real = importlib.import_module
def loading(name, *a, **k):
    if name.startswith("moe_energy.commands."):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the command modules load
    return real(name, *a, **k)
importlib.import_module = loading
from moe_energy.cli import main
sys.argv = ["moe-energy", *sys.argv[1:]]
main()
"""

TORCH_SIGINT = """
import os, signal, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while torch is being imported
        return None
sys.meta_path.insert(0, CtrlC())
from moe_energy.cli import main
sys.argv = ["moe-energy", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("code", [STARTUP_SIGINT, TORCH_SIGINT], ids=["command-modules", "torch"])
def test_ctrl_c_during_start_up_is_exit_130_and_one_line(code):
    r = cli("presets", code=code)
    assert (r.returncode, r.stderr, r.stdout) == (130, "interrupted\n", "")


def test_ctrl_c_anywhere_in_main_is_exit_130_in_process(monkeypatch, capsys):
    import importlib

    from moe_energy.commands import COMMANDS, Command

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(importlib, "import_module", interrupted)
        assert main(["presets"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    main(["--version"])  # every command module is loaded now
    capsys.readouterr()
    c = COMMANDS["presets"]
    monkeypatch.setitem(COMMANDS, "presets", Command(c.name, c.help, c.add_arguments, interrupted))
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# -- class 2: side commands refuse what run refuses, with run's words ----------------------------------------
def _npz(path: Path, features: int = 7, classes: int = 3) -> Path:
    np.savez(path, x=np.random.default_rng(0).standard_normal((50, features)).astype("float32"),
             y=np.arange(50) % classes)
    return path


@pytest.mark.parametrize("extra", [
    ["--data", "/nonexistent.npz"],
    ["--data", "{good}", "--input-dim", "8"],
    ["--data", "{good}", "--classes", "2"],
    ["--data", "{bad}"],
    ["--input-dim", "5", "--classes", "10"],
    ["--samples", "1"],
    ["--data", "{good}", "--samples", "50"],  # the file's own 50 rows: still refused, never silently ignored
    ["--device", "tpu"],
    ["--device", "cuda:x"],
], ids=["missing", "features", "labels", "not-npz", "input-dim", "samples", "samples-with-data", "tpu", "cuda-x"])
def test_plan_refuses_what_run_refuses_in_the_same_words(tmp_path, capsys, extra):
    good = _npz(tmp_path / "good.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    extra = [a.format(good=good, bad=bad) for a in extra]
    shape = ["--experts", "4", "--hidden", "16", "--layers", "2", "--top-k", "2"]
    assert main(["run", *TINY[:8], *TINY[14:], *extra, "--out", str(tmp_path / "r")]) == 2
    run_err = one_line_error(None, capsys.readouterr().err)
    assert main(["plan", *shape, *extra]) == 2
    assert one_line_error(None, capsys.readouterr().err) == run_err
    assert not results(tmp_path / "r")


def test_plan_with_a_data_file_shows_the_shape_the_run_would_train(tmp_path, capsys):
    assert main(["plan", *SHAPE[:8], "--data", str(_npz(tmp_path / "d.npz", features=7, classes=3))]) == 0
    assert "input_dim=7, classes=3" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["calibrate"], ["selfcheck"], ["bench-strategies", *SHAPE], ["plan", *SHAPE],
                                 ["run", *TINY[:-2]]])
@pytest.mark.parametrize("device, needle", [("tpu", "'tpu' is unknown"), ("cuda:x", "'cuda:x' is unknown"),
                                            ("cuda:7", "--device cuda:7: ")])
def test_every_device_flag_is_checked_alike(tmp_path, capsys, cmd, device, needle):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this host has 8 GPUs")
    out = [] if cmd[0] in ("calibrate", "plan") else ["--out", str(tmp_path)]
    assert main([*cmd, "--device", device, *out]) == 2
    err = one_line_error(None, capsys.readouterr().err, needle)
    if device != "cuda:7":
        assert "auto, cpu, cuda" in err  # the choices are listed
    assert list(tmp_path.iterdir()) == []


def test_cuda_0_is_accepted_where_cuda_has_a_device_0(monkeypatch):
    from moe_energy.commands.options import device_of
    from moe_energy.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_of("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="--device cuda:1: "):
        device_of("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_0_is_accepted_where_there_is_one(capsys):
    assert main(["plan", *SHAPE, "--device", "cuda:0"]) == 0
    assert "on cuda" in capsys.readouterr().out


# -- class 6: paths the OS refuses -----------------------------------------------------------------------
def _fake_calibrate(device: torch.device, dtypes: tuple[str, ...] = ("float32",), seconds: float = 0.6,
                    save: bool = True, **_: object) -> roofline.Roofline:
    """A calibration in no time: what these tests judge is where it is cached."""
    roof = roofline.Roofline(roofline.device_name(device), {d: 1e11 for d in dtypes}, 1e10, 64, 2**20,
                             "2026-01-01T00:00:00+00:00")
    if save:
        roofline._store(roof)
    return roof


@pytest.mark.parametrize("where", ["file", "under-file", "too-long", "proc", "home-is-file"])
def test_a_cache_the_os_refuses_is_one_line_after_the_figures(tmp_path, monkeypatch, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(roofline, "calibrate", _fake_calibrate)
    cache = {"file": blocker, "under-file": blocker / "sub", "too-long": tmp_path / ("c" * 300),
             "proc": Path("/proc/self/no-such-dir"), "home-is-file": None}[where]
    if cache is None:
        monkeypatch.delenv(roofline.CACHE_ENV, raising=False)
        monkeypatch.setenv("HOME", str(blocker))
        cache = blocker / ".cache" / "moe-energy"
    else:
        monkeypatch.setenv(roofline.CACHE_ENV, str(cache))
    assert main(FAST_CAL) == 2
    captured = capsys.readouterr()
    one_line_error(None, captured.err, f"roofline cache {cache / 'roofline.json'}: cannot write it (", "set "
                   f"{roofline.CACHE_ENV}")
    assert "GEMM float32" in captured.out and "100.0 GFLOP/s" in captured.out  # the figures are shown all the same
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_bench_strategies_goes_on_when_its_cache_cannot_be_written(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(roofline, "calibrate", _fake_calibrate)
    monkeypatch.setenv(roofline.CACHE_ENV, str(blocker))
    args = ["bench-strategies", *SHAPE, "--device", "cpu", "--batch-size", "16", "--seconds", "0.05",
            "--moe-strategy", "active_loop", "--out", str(tmp_path / "[b]")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "notice: roofline cache" in captured.err and "calibrated for this run only" in captured.err
    [saved] = (tmp_path / "[b]").glob("strategies-*.json")
    assert f"results written to {saved}\n" in captured.out


@pytest.mark.parametrize("where", ["too-long", "under-file", "is-file", "proc", "nul", "read-only"])
def test_an_out_the_os_refuses_is_one_line_naming_it_before_any_work(tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["run", *TINY]
    if where == "nul":  # only a --config file can carry a NUL byte
        cfg = tmp_path / "c.toml"
        cfg.write_text('out = "a\\u0000b"\n')
        args += ["--config", str(cfg)]
        needle = "out"  # refused as a path by the options, or by the OS: one line either way
    else:
        if where == "read-only":
            if os.geteuid() == 0:
                pytest.skip("root ignores permission bits")
            (tmp_path / "ro").mkdir(mode=0o555)
        out = {"too-long": tmp_path / ("o" * 300), "under-file": blocker / "sub", "is-file": blocker,
               "proc": Path("/proc/self/no-such-dir"), "read-only": tmp_path / "ro" / "sub"}[where]
        args += ["--out", str(out)]
        needle = f"--out {out}: cannot write results there ("
    assert main(args) == 2
    one_line_error(None, capsys.readouterr().err, needle)
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) in (["file"], ["c.toml", "file"], ["file", "ro"])


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "SIGTERM"), ("SIGHUP", 129, "SIGHUP")])
def test_a_signal_mid_command_unwinds_it_like_ctrl_c(tmp_path, sig, code, word):
    """Every command (here selfcheck, which has no handler of its own) exits 128 + N with one line and no
    traceback, its files cleaned up, when a scheduler or a closing terminal signals it."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "moe_energy", "selfcheck", "--device", "cpu", "--seconds", "60",
                             "--idle-seconds", "0", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # Past the imports, into the command: its handlers are installed before --out is probed (created), and the
    # 60 s checks are still running. A fixed sleep is no proof: the imports alone took 25 s on a loaded 2-core host,
    # and a SIGTERM before the handler kills the process outright (-15, no line).
    deadline = time.monotonic() + 240
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None and out.exists(), "selfcheck never reached its checks"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == f"interrupted ({word})" and "Traceback" not in err
    assert not out.exists() or not list(out.iterdir())
