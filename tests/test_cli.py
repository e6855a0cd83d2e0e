"""The command line and the safe expression parser."""

import shutil
import subprocess

import pytest

import patterngen as pg
from patterngen import backends, cli
from patterngen.parse import parse, parse_grid
from patterngen.errors import PatternError
from fakes import register_fake_backend


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text", [
    "window(7)", "window((7, 5), dilation=(2, 1), border='pad', causal=(True, False))",
    "block(7, offset=3)", "area(4, axis=1)", "axis(-1)", "stripe(0, width=2)", "criss_cross()",
    "global_tokens([0, 5])", "causal()", "full()", "(window(7) | axis(0))",
    "((window(3) | axis(0)) & causal())", "heads(axis(0), axis(1))", "block(M)",
    "window(k, dilation=d)",
])
def test_parse_round_trips_every_constructor(text):
    pattern = parse(text)
    assert isinstance(pattern, pg.Pattern)
    assert parse(repr(pattern)) == pattern


def test_parse_names_become_symbols():
    assert parse("block(M)") == pg.block("M")
    assert pg.cost(parse("block(M)"), grid=("H", "W")).symbols.keys() >= {"M", "H", "W"}


@pytest.mark.parametrize("text, message", [
    ('__import__("os").system("x")', r"Unknown pattern .*\(column 1 of"),
    ("window(7).size", r"Unsupported '\.size'.* \(column 10 of"),
    ("__import__('os')", r"Unknown pattern '__import__'.*\(column 1 of"),
    ("window(7) + axis(0)", r"Unsupported '\+'.* \(column 11 of"),
    ("window(7) | 3", r"'\|' and '&' combine patterns, not 3 \(column 13 of"),
    ("window(7", r"Syntax error: '\(' was never closed \(column 7 of"),
    ("window(0)", r"Invalid size size=0; expected an integer >= 1 \(column 1 of"),
    ("window(7, foo=1)", r"Bad arguments to window: .*unexpected keyword argument 'foo'"),
    ("window", r"window is a constructor; call it as window\(\.\.\.\) \(column 1 of"),
    ("[window(3)]", r"Expected a pattern such as window\(7\), got \[window\(3\)\]"),
    ("lambda: 0", r"Unsupported 'lambda: 0'"),
    ("window(**{'size': 3})", r"'\*\*' arguments are not allowed \(column 10 of"),
    ("", r"Invalid pattern expression ''"),
])
def test_parse_rejects_with_the_column(text, message):
    with pytest.raises(PatternError, match=message):
        parse(text)


def test_parse_grid():
    assert parse_grid("64x64") == (64, 64)
    assert parse_grid("H,W") == ("H", "W")
    assert parse_grid("8x32x32") == (8, 32, 32)
    assert parse_grid("4096") == (4096,)
    with pytest.raises(PatternError, match=r"Invalid grid '64x-1': part '-1' is neither"):
        parse_grid("64x-1")


def test_show(capsys):
    code, out, err = run(capsys, "show", "window(7) | axis(0)", "--grid", "14x14",
                         "--query", "0,0")
    assert code == 0 and not err
    assert out.splitlines()[0] == ("(window(7) | axis(0)) on grid 14x14, query (0, 0): 56 keys; "
                                   "pattern density 28.6%")
    assert out.splitlines()[1] == "Q # # # # # # . . . . . . ."


def test_cost_symbolic_and_substituted(capsys):
    code, out, _ = run(capsys, "cost", "window(7)", "--grid", "H,W", "--head-dim", "C",
                       "--subs", "H=56", "W=56", "C=32")
    assert code == 0
    assert "Cost of window(7) on grid HxW (head_dim=C, heads=1, batch=1)" in out
    assert "49*H*W" in out and "196*C*H*W" in out
    assert "Cost of window(7) on grid 56x56 (head_dim=32" in out and "153664" in out


def test_plan_explains_the_choice(capsys):
    code, out, err = run(capsys, "plan", "criss_cross()", "--grid", "64x64", "--backward")
    assert code == 0 and not err
    assert out.startswith("Plan for criss_cross() on grid 64x64 (batch=1, heads=4, "
                          "head_dim=32, float32 on cpu, forward+backward)")
    assert "term (All(), Eq()): dense (batch 64 x 64q x 64k)" in out


def test_reach(capsys):
    code, out, _ = run(capsys, "reach", "criss_cross()", "--grid", "33x33")
    assert (code, out) == (0, "[criss_cross()] on grid 33x33: every token reaches every other "
                              "after 2 layers\n")
    code, out, _ = run(capsys, "reach", "block(7)", "--grid", "14x14", "--layers", "2")
    assert "never global" in out and "after 2 layers [block(7) x 2]" in out


@pytest.mark.parametrize("argv, message", [
    (["show", "window(7) +", "--grid", "14x14"], "patterngen: error: Syntax error"),
    (["show", "os.system('x')", "--grid", "14x14"], "patterngen: error: Unknown pattern"),
    (["show", "window(7)", "--grid", "4x4"], "patterngen: error: The product of size and"),
    (["show", "window(3)", "--grid", "H,W"], "patterngen: error: show needs a numeric grid"),
    (["codegen", "window(3)", "--grid", "8x8", "--backend", "nope"],
     "patterngen: error: Unknown backend 'nope'"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and not out
    assert err.startswith(message) and err.count("\n") == 1


def test_bad_grid_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["show", "window(3)", "--grid", "8x-8"])
    assert e.value.code == 2
    assert "part '-8' is neither a number nor a name" in capsys.readouterr().err


def test_codegen_unavailable_backend_exits_1(capsys, monkeypatch):
    def refuse(cls, ir, device="cpu", dtype="float32"):
        return ["device='cpu' not in ('cuda',)"]

    name = register_fake_backend()
    monkeypatch.setattr(backends.get_backend(name), "not_supported_reasons", classmethod(refuse))
    code, out, err = run(capsys, "codegen", "window(3)", "--grid", "8x8", "--backend", name)
    assert code == 1 and not out
    assert "cannot run window(3)" in err and "device='cpu' not in ('cuda',)" in err


@pytest.mark.parametrize("name", [n for n in backends.available() if not n.startswith("test_")])
def test_codegen_prints_the_artefact(capsys, name):
    code, out, err = run(capsys, "codegen", "criss_cross()", "--grid", "8x8", "--backend", name)
    assert code == 0 and out.strip(), err
    if name == "numba":
        assert out.startswith("# criss_cross() runs this module")


def test_profile_command(capsys, tmp_path):
    name = register_fake_backend()
    plot = tmp_path / "out.png"
    code, out, _ = run(capsys, "profile", "window(3)", "--sizes", "6x6", "8x8", "--backend",
                       name, "--head-dim", "4", "--heads", "1", "--repeats", "1", "--warmup", "0",
                       "--plot", str(plot))
    assert code == 0 and plot.exists()
    assert out.startswith(f"Profile of window(3) with {name} on cpu (head_dim=4, heads=1")
    assert " 6x6 " in out and " 8x8 " in out
    code, out, _ = run(capsys, "profile", "window(3)", "--grid", "8x8", "--key-grid", "4x4",
                       "--backend", "sdpa", "--head-dim", "4", "--heads", "1", "--repeats", "1",
                       "--warmup", "0")
    assert code == 0 and "keys on 4x4" in out


def test_demo_catalogue_measured_and_plotted(capsys, tmp_path, monkeypatch):
    from patterngen import catalogue

    monkeypatch.setattr(catalogue, "CATALOGUE", [
        e for e in catalogue.CATALOGUE if e.name in ("natten", "criss-cross")])
    plot = tmp_path / "demo.png"
    code, out, _ = run(capsys, "demo", "--backend", register_fake_backend(), "--plot", str(plot),
                       "--repeats", "1", "--warmup", "0", "--head-dim", "4", "--heads", "1")
    assert code == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "== natten" in out and "measured on cpu" in out and f"plot: {plot}" in out


def test_help_documents_every_command_with_an_example(capsys):
    parser = cli.build_parser()
    assert all(f"  patterngen {command} " in parser.format_help() for command in cli.COMMANDS)
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "examples:\n  patterngen " + command in capsys.readouterr().out


def test_console_script_exit_status():
    script = shutil.which("patterngen")
    if script is None:
        pytest.skip("the console script is not installed (pip install -e .)")
    ok = subprocess.run([script, "show", "window(3)", "--grid", "5"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("window(3) on grid 5")
    bad = subprocess.run([script, "show", "window(3) ^ 1", "--grid", "5"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("patterngen: error: Unsupported '^'")
