"""Every registered backend against the dense oracle, on the same cases (a new backend is tested
automatically), plus the registry's own rules."""

import pytest
import torch

import patterngen as pg
from patterngen import backends
from fakes import register_fake_backend
from oracle import check_against_oracle

CASES = [
    (pg.window(3, causal=True) | pg.global_tokens([0]), (13,)),
    (pg.window((3, 5), dilation=(2, 1)), (7, 9)),
    (pg.window(3) | pg.axis(0), (6, 5)),
    (pg.block(3, offset=1) & pg.causal(), (5, 7)),
    (pg.heads(pg.criss_cross(), pg.window(3, border="pad")), (5, 6)),
    (pg.window((1, 3, 3)) | pg.area(2, axis=0), (2, 4, 5)),
]
# torch.compile of FlexAttention on CPU costs tens of seconds per shape; tests/test_flex.py covers
# it in depth, so here it runs the first cases only
FEW_CASES = {"flex": 2}


@pytest.mark.parametrize("name, case", [(name, case) for name in backends.available()
                                         for case in range(FEW_CASES.get(name, len(CASES)))])
def test_backend_matches_dense_oracle(name, case):
    # every backend shipped here imports and runs every case on the CPU: a refusal fails
    pattern, grid = CASES[case]
    cls = backends.get_backend(name)
    dtype = "float64" if "float64" in cls.SUPPORTED_DTYPES else "float32"
    assert cls.not_supported_reasons(pg.lower(pattern, grid), "cpu", dtype) == []
    torch.manual_seed(case)
    backward = "cpu" in cls.BACKWARD_DEVICES
    q, k, v = (torch.randn(2, 3, *grid, 8, dtype=getattr(torch, dtype), requires_grad=backward)
               for _ in range(3))
    check_against_oracle(name, pattern, grid, q, k, v, dtype=dtype,
                         atol=1e-9 if dtype == "float64" else 2e-5)


def test_registry_rejects_duplicates_and_lists_names():
    name = register_fake_backend()
    with pytest.raises(pg.PatternError, match=f"A backend named '{name}' is already registered"):
        backends.register_backend(name, object)
    with pytest.raises(pg.UnknownBackend, match=r"Unknown backend 'nope'; valid backends are \["):
        backends.get_backend("nope")
    with pytest.raises(pg.PatternError, match=r"Unknown backend 'nope'"):
        pg.compile(pg.window(3), (8, 8), backend="nope")


def test_selection_lists_every_refusal():
    lowered = pg.lower(pg.window(3), (8, 8))
    with pytest.raises(pg.BackendUnavailable) as info:
        backends.select(lowered, device="cpu", dtype="int8")
    message = str(info.value)
    assert message.startswith("No backend can run window(3) on device='cpu' with dtype='int8':")
    for name in backends.PRIORITY["cpu"]:
        assert f"  {name}: " in message


def test_compile_refuses_an_unsupported_dtype_up_front():
    name = register_fake_backend()
    with pytest.raises(pg.BackendUnavailable, match=rf"Backend '{name}' cannot run window\(3\)"):
        pg.compile(pg.window(3), (8, 8), backend=name, dtype="int8")
