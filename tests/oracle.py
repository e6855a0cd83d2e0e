"""The one backend-vs-oracle check: forward and the three gradients of a compiled backend
against the dense float64 oracle (``pg.materialize`` + ``pg.dense_attention``)."""

import torch

import patterngen as pg


def reference(pattern, grid, q, k, v, **options):
    """The dense oracle (``pg.materialize`` + ``pg.dense_attention``) of ``pattern`` on
    ``grid``; ``q, k, v`` as ``(batch, heads, *grid, dim)`` or ``(batch, heads, tokens, dim)``
    (k and v may have fewer heads), the output in ``q``'s layout. ``options`` go to
    ``pg.dense_attention`` (scale, softcap, rel_bias, additional keys and values)."""
    b, d = q.shape[0], q.shape[-1]
    flat = [t.reshape(b, t.shape[1], -1, d) for t in (q, k, v)]
    out = pg.dense_attention(*flat, pg.materialize(pattern, grid), grid=grid, **options)
    return out.reshape(*q.shape[:-1], v.shape[-1])


def check_against_oracle(backend, spec, grid, q, k, v, scale=None, atol=1e-10, **options):
    """Compile ``spec`` on ``grid`` with ``backend`` and assert its output, and the gradients of
    ``q, k, v`` (when they require grad), equal the oracle's within ``atol`` (also rtol),
    compared in float64. Returns the compiled attention.

    Inputs may be ``(batch, heads, *grid, dim)`` or ``(batch, heads, tokens, dim)``.
    """
    attn = pg.compile(spec, grid, backend=backend, **options)
    out = attn(q, k, v) if scale is None else attn(q, k, v, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    flat = [t.detach().double().reshape(b, h, -1, d).requires_grad_() for t in (q, k, v)]
    ref = reference(spec, grid, *flat, scale=scale)
    torch.testing.assert_close(out.double().reshape(ref.shape), ref, atol=atol, rtol=atol)
    if not q.requires_grad:
        return attn
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype).reshape(out.shape))
    want = torch.autograd.grad(ref, flat, grad_out)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == q.shape and g.dtype == q.dtype, name
        torch.testing.assert_close(g.double().reshape(w.shape), w, atol=atol, rtol=atol,
                                   msg=lambda m, name=name: f"d{name}: {m}")
    return attn


def assert_gradients_equal(out, want, inputs, generator, names="q k v ak av".split()):
    """The gradients of ``inputs`` through ``out`` and through the oracle's ``want`` equal,
    for one random cotangent drawn from ``generator``."""
    dout = torch.randn(want.shape, generator=generator, dtype=want.dtype)
    for name, g, w in zip(names, torch.autograd.grad(out, inputs, dout.reshape(out.shape)),
                          torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"d{name}: {m}")

