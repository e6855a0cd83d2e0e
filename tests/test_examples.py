"""Every example runs on CPU, checks itself against the dense oracle, and says ok."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


#: sdpa needs no JIT compilation, so every example runs in seconds
QUICK = ["--backend", "sdpa"]


def run(script, *options):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *options],
                          capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("ok")
    assert "MISMATCH" not in done.stderr
    return done.stdout


def test_the_documented_examples_exist():
    assert {"swin_block.py", "ccnet.py", "axial.py", "yolov12_area.py", "natten_dilated.py",
            "lm_window.py", "video_3d.py", "upsample_attention.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_checks_itself(script):
    out = run(script, *QUICK)
    assert "matches the dense oracle" in out


def test_an_example_with_the_default_backend():
    run("ccnet.py")


def test_a_failed_check_exits_nonzero(capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _common
    finally:
        sys.path.remove(str(EXAMPLES))
    with pytest.raises(SystemExit) as e:
        _common.expect(False, "outputs differ")
    assert e.value.code == 1
    assert capsys.readouterr().err == "MISMATCH: outputs differ\n"


def test_swin_blocks_with_relative_position_bias_match_swin_s_own_formulation():
    """W-MSA and SW-MSA blocks, timm-layout bias tables, against roll + partition + mask."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import swin_block
    finally:
        sys.path.remove(str(EXAMPLES))
    out_error, grad_error = swin_block.check_swin_blocks("sdpa")
    assert out_error < 1e-9 and grad_error < 1e-9
