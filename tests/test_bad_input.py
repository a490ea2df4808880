"""Bad CLI flags and TOML configs for run, plan and sweep: exit 2, one line naming the field, the value and
what is allowed, never a traceback; the sweep's grid TOML is fuzzed like test_config_fuzz fuzzes `run`'s."""

from __future__ import annotations

import pytest
from conftest import one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_config_fuzz import toml_value  # tests/ is on sys.path (rootdir import mode)

from moe_energy.cli import main
from moe_energy.config import CONFIG_KEYS
from moe_energy.runner.sweep import AXES, GRID_KEYS

# (flags, what the one line must say); each is tried with run, plan and sweep --dry-run
COMMON = [
    (["--experts", "0"], "experts=0 must be a positive integer"),
    (["--layers", "-3"], "layers=-3 must be a positive integer"),
    (["--input-dim", "0"], "input_dim=0 must be a positive integer"),
    (["--classes", "1"], "classes=1 must be at least 2"),
    (["--top-k", "9"], "top_k=9 exceeds experts=8; choose top_k between 1 and 8"),
    (["--batch-size", "0"], "batch_size=0 must be a finite number > 0"),
    (["--samples", "0"], "samples=0 must be a finite number > 0"),
    (["--samples", "1000000000"], "samples=1000000000 is too large; give at most 1e+08"),
    (["--duration", "0"], "duration=0.0 must be a finite number > 0"),
    (["--duration", "-2"], "duration=-2.0 must be a finite number > 0"),
    (["--duration", "nan"], "duration=nan must be a finite number > 0"),
    (["--duration", "inf"], "duration=inf must be a finite number > 0"),
    (["--duration", "1e9"], "duration=1000000000.0 is too long; give at most 86400 seconds"),
    (["--warmup", "-1"], "warmup=-1.0 must be a finite number >= 0"),
    (["--lr", "nan"], "lr=nan must be a finite number > 0"),
    (["--lr=-inf"], "lr=-inf must be a finite number > 0"),
    (["--lr", "1e300"], "lr=1e+300 is too large; give at most 1e+30"),  # was a traceback from Adam's step
    (["--seed", "-1"], "seed=-1 must be a whole number between 0 and 4294967295"),
    (["--epochs", "-1"], "epochs=-1 must be a whole number >= 0"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["--dtype", "float64"], "dtype='float64' is unknown; choose one of float32, bfloat16, float16"),
    (["--device", "tpu"], "--device 'tpu' is unknown; choose auto, cpu, cuda, cuda:N or mps"),
    (["--moe-strategy", "nope"], "moe-strategy='nope' is unknown; choose from"),
    (["--models", "moe,nope"], "model='nope' is unknown; choose from moe, dense_total, dense_active"),
    (["--hidden", "1000000000000"], "hidden=1000000000000, layers=3, input_dim=784, classes=10 make 1.6e+25 "
                                    "parameters, more than the 1e+13 this tool accepts"),
    (["--experts", "4000000000000000000"], "experts=4000000000000000000, hidden=256"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]
RUN_AND_SWEEP = [
    (["--repeats", "0"], "repeats=0 must be a whole number between 1 and 1000"),
    (["--cooldown", "inf"], "cooldown=inf must be a finite number of seconds >= 0"),
    (["--idle-seconds", "-1"], "idle-seconds=-1.0 must be a finite number of seconds >= 0"),
    (["--cpu-tdp-watts", "nan"], "--cpu-tdp-watts nan must be a finite number of watts > 0"),
]
SWEEP_ONLY = [
    (["--hidden", "16,abc"], "--hidden: 'abc' is not a whole number; give a comma list such as 8,16"),
    (["--hidden", "16.5"], "--hidden: '16.5' is not a whole number"),
    (["--hidden", ","], "--hidden: empty list; give at least one value"),
    (["--batch-size", "32,0"], "batch_size=0 must be a finite number > 0"),
    (["--dtype", "float32,int8"], "dtype='int8' is unknown"),
    (["--experts", "2,4", "--top-k", "5"], "top_k=5 exceeds experts=2"),  # no valid point at all
    (["--grid", "scale", "--per-decade", "0"], "--per-decade 0 must be a whole number between 1 and 100"),
    (["--grid", "scale", "--per-decade", "1000000000"], "--per-decade 1000000000 must be a whole number between"),
    (["--grid", "seed", "--per-decade", "8"], "--per-decade: only with --grid scale (sizes per decade"),
    (["--max-params", "nan"], "--max-params nan must be a positive number such as 5e7"),
    (["--max-params", "-1"], "--max-params -1.0 must be a positive number"),
    (["--shard", "3/2"], "--shard 3/2: I must be between 1 and N"),
]


def invoke(cmd: str, flags: list[str], tmp_path) -> int:
    extra = ["--dry-run", "--db", str(tmp_path / "s.db"), "--meter", "none"] if cmd == "sweep" else []
    extra += ["--out", str(tmp_path / "out")] if cmd == "run" else []
    return main([cmd, *flags, *extra])


@pytest.mark.parametrize("flags, needle", COMMON, ids=[" ".join(f) for f, _ in COMMON])
@pytest.mark.parametrize("cmd", ["run", "plan", "sweep"])
def test_bad_flag_exits_2_in_one_line(cmd, flags, needle, tmp_path, capsys):
    one_line_error(invoke(cmd, flags, tmp_path), capsys.readouterr().err, needle)
    assert not (tmp_path / "s.db").exists()  # nothing created on the way to the error


@pytest.mark.parametrize("flags, needle", RUN_AND_SWEEP + SWEEP_ONLY)
def test_bad_sweep_flag_exits_2_in_one_line(flags, needle, tmp_path, capsys):
    one_line_error(invoke("sweep", flags, tmp_path), capsys.readouterr().err, needle)


@pytest.mark.parametrize("flags, needle", RUN_AND_SWEEP)
def test_bad_run_flag_exits_2_in_one_line(flags, needle, tmp_path, capsys):
    one_line_error(invoke("run", flags, tmp_path), capsys.readouterr().err, needle)
    assert not list((tmp_path / "out").glob("*.json"))


CONFIGS = [
    ('epochs = "ten"', "epochs='ten' must be a whole number >= 0"),
    ("duration = nan", "duration=nan must be a finite number > 0"),
    ("duration = -inf", "duration=-inf must be a finite number > 0"),
    ("batch_size = 0", "batch_size=0 must be a finite number > 0"),
    ("top_k = 99", "top_k=99 exceeds experts=8"),
    ("hidden = 1e400", "hidden"),  # run/plan: "hidden=inf is not a whole number"; sweep: "--hidden: inf is ..."
    ("hidden = 1e400", "inf is not a whole number"),
    ("hidden = 1000000000000000", "make 1.6e+31 parameters, more than the 1e+13 this tool accepts"),
    ("experts = true", "True is not a whole number"),
    ("seed = 1.5", "seed=1.5 must be a whole number between 0 and 4294967295"),
    ('warmup = "1"', "warmup='1' must be a finite number >= 0"),
    ("test_fraction = nan", "test_fraction=nan must be between 0 and 1"),
    ("idle_seconds = 1e300", "idle-seconds=1e+300 is too long; give at most 86400 seconds"),
    ("samples = 9223372036854775807", "samples=9223372036854775807 is too large"),
    ("strategies = []", "strategies=() must be a non-empty list of names"),
    ('models = ["moe", 5]', "models=('moe', 5) must be a non-empty list of names"),
    ('preset = "huge"', "'huge' is unknown; choose"),
    ("whatever = 1", "unknown key(s) ['whatever']; allowed: ["),
    ("[table]\nx = 1", "unknown key(s) ['table']"),
    ("experts = = 4", "not valid TOML"),
]


@pytest.mark.parametrize("text, needle", CONFIGS, ids=[t for t, _ in CONFIGS])
@pytest.mark.parametrize("cmd", ["run", "plan", "sweep"])
def test_bad_config_exits_2_in_one_line(cmd, text, needle, tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text(text + "\n")
    one_line_error(invoke(cmd, ["--config", str(p), "--device", "cpu"], tmp_path), capsys.readouterr().err,
                   needle)


GRID_CONFIGS = [
    ('hidden = [16, "x"]', "--hidden: 'x' is not a whole number"),
    ("hidden = [[16]]", "--hidden: [16] is not a whole number"),
    ("experts = [nan]", "--experts: nan is not a whole number"),
    ("experts = []", "--experts: empty list; give at least one value"),
    ("experts = [1e30]", "make 3.36e+35 parameters, more than the 1e+13"),
    ("grid = 5", "--grid 5 is unknown; choose seed, scale or llm"),
    ('grid = "seed"\nhidden = [16]', "--grid seed fixes the shapes"),
    ('max_params = "lots"', "--max-params 'lots' is not a number"),
    ('grid = "scale"\nper_decade = 1000', "--per-decade 1000 must be a whole number between 1 and 100"),
    ("per_decade = 8", "--per-decade: only with --grid scale"),  # was silently ignored by the other grids
    ("dtype = [5]", "dtype='5' is unknown"),
    ("sweep = 5", "unknown key(s) ['sweep']"),
    ("[sweep]\nbogus = 1", "unknown key(s) ['bogus']"),
    ('data = "/nonexistent/d.npz"', "--data /nonexistent/d.npz: no such file"),
]


@pytest.mark.parametrize("text, needle", GRID_CONFIGS, ids=[t for t, _ in GRID_CONFIGS])
def test_bad_grid_toml_exits_2_in_one_line(text, needle, tmp_path, capsys):
    p = tmp_path / "g.toml"
    p.write_text(text + "\n")
    one_line_error(invoke("sweep", ["--config", str(p), "--device", "cpu"], tmp_path), capsys.readouterr().err,
                   needle)


def test_grid_toml_lists_of_names_are_accepted(tmp_path, capsys):
    p = tmp_path / "g.toml"
    p.write_text('experts = [4]\nhidden = [16, 32]\nmodels = ["moe", "dense_total"]\nstrategies = ["grouped"]\n'
                 "[sweep]\ntop_k = [1, 2]\n")
    assert invoke("sweep", ["--config", str(p), "--device", "cpu"], tmp_path) == 0
    out = capsys.readouterr().out
    assert "sweep points (4)" in out


def test_dtype_the_device_cannot_run_is_refused_before_work(tmp_path, capsys, monkeypatch):
    """Honest dtype support: a dtype is accepted where a real forward pass in it works (float16 and bfloat16
    do on this CPU), and refused in one line where it fails (here the CPU kernel is made to fail, as
    PyTorch's did for float16 before 2.1: "addmm_impl_cpu_" not implemented for 'Half')."""
    import torch

    from moe_energy.runner.core import check_dtype

    for dt in ("float16", "bfloat16"):
        check_dtype(torch.device("cpu"), dt, ("grouped", "padded"))  # runs for real: no error
    real = torch.nn.functional.linear

    def linear(x, w, b=None):
        if x.dtype == torch.float16 and x.device.type == "cpu":
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    for cmd in ("run", "plan", "sweep"):
        code = invoke(cmd, ["--dtype", "float16", "--device", "cpu"], tmp_path)
        one_line_error(code, capsys.readouterr().err,
                       "dtype=float16 does not run on cpu (a dense layer failed: \"addmm_impl_cpu_\" not "
                       "implemented for 'Half'); choose float32")
    assert not (tmp_path / "s.db").exists()


# -- fuzz: the sweep's grid TOML -------------------------------------------------------------------------
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["seed", "scale", "small", "xl", "cpu", "float32", "bfloat16", "grouped", "moe", "", "x",
                     "1,2", "16, 32"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=6),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))
known = st.sampled_from(sorted((CONFIG_KEYS | GRID_KEYS | set(AXES)) - {"data", "out", "device"}))
keys = st.one_of(known, known, known, st.from_regex(r"[a-z_]{1,8}", fullmatch=True))  # mostly real keys
small = st.lists(st.integers(min_value=-1, max_value=40), min_size=1, max_size=3)
# Mostly-sensible grids (so that many examples get past validation and expand), each field still able to be wrong.
plausible = st.fixed_dictionaries({}, optional={
    "experts": small, "hidden": small, "top_k": small, "layers": st.lists(st.integers(0, 4), min_size=1, max_size=2),
    "batch_size": st.lists(st.integers(0, 1024), min_size=1, max_size=2),
    "dtype": st.lists(st.sampled_from(["float32", "bfloat16", "float16", "int8"]), min_size=1, max_size=2),
    "repeats": st.lists(st.integers(0, 3), min_size=1, max_size=2), "grid": st.sampled_from(["seed", "scale", "x"]),
    "max_params": st.one_of(st.floats(), st.integers(0, 10**9)), "per_decade": st.integers(-1, 200),
    "preset": st.sampled_from(["small", "large", "huge"]), "input_dim": st.integers(-1, 1000),
    "classes": st.integers(0, 20), "epochs": st.integers(-1, 3), "duration": st.floats(-1, 100),
})
OUTCOMES: dict[int, int] = {}


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=st.one_of(st.dictionaries(keys, values, max_size=6), plausible), table=st.booleans())
def test_any_grid_toml_dry_runs_or_exits_2(cfg, table, tmp_path, capsys):
    p = tmp_path / "grid.toml"
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.items())
    p.write_text(("[sweep]\n" if table else "") + body, encoding="utf-8")
    code = invoke("sweep", ["--config", str(p), "--device", "cpu"], tmp_path)
    out = capsys.readouterr()
    OUTCOMES[code] = OUTCOMES.get(code, 0) + 1
    assert code in (0, 2), (cfg, out.err)
    if code == 2:
        assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    else:
        assert "sweep points (" in out.out
    assert "Traceback" not in out.err
    assert not (tmp_path / "s.db").exists()  # a dry run never creates the database
