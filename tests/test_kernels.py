"""Kernels: every fast form is held to its sequential reference (values, states, gradients)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.kernels import kernels_dispatch
from strata.kernels.kernels_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from strata.kernels.kernels_retention import (
    retention,
    retention_chunked,
    retention_parallel,
    retention_ref,
    retention_step,
)
from strata.kernels.kernels_selective_scan import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update,
)

F32, F64 = torch.float32, torch.float64


# ----------------------------------------------------------------------------- helpers


def assert_close(actual, expected, atol=1e-4, rel_rms=1e-4, what=""):
    """Max abs error <= atol, or (for large magnitudes) RMS error <= rel_rms * RMS(expected)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs()
    if diff.numel() == 0 or diff.max() <= atol:
        return
    rms = diff.pow(2).mean().sqrt()
    scale = expected.double().pow(2).mean().sqrt()
    assert rms <= rel_rms * scale, f"{what}: max err {diff.max():.3g}, rel RMS {rms / scale:.3g}"


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def grads_of(outputs, inputs, seed=0):
    """Gradients of a fixed random projection of ``outputs`` w.r.t. ``inputs`` (dict)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outputs)
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    values = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return dict(zip(names, values))


def compare(fast_fn, ref_fn, make_inputs, atol=1e-4, rel_rms=1e-4):
    """Run both forms on fresh copies of the same inputs; compare outputs and gradients."""
    ins_ref, ins_fast = make_inputs(), make_inputs()
    out_ref, out_fast = ref_fn(**ins_ref), fast_fn(**ins_fast)
    for i, (a, b) in enumerate(zip(out_fast, out_ref)):
        assert_close(a, b, atol, rel_rms, f"output {i}")
    g_ref, g_fast = grads_of(out_ref, ins_ref), grads_of(out_fast, ins_fast)
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        assert g_fast[name] is not None, f"no gradient for {name}"
        assert_close(g_fast[name], g_ref[name], atol, rel_rms, f"grad {name}")


# ----------------------------------------------------------------------------- selective scan


def scan_inputs(b=2, d=6, n=4, length=37, dtype=F32, seed=0, init=True, skip=True, gate=True, bias=True,
                dt_scale=1.0, a_max=3.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    ins = dict(
        u=rnd(b, d, length),
        delta=rnd(b, d, length) * dt_scale,
        A=-(torch.rand(d, n, generator=gen, dtype=F64) * a_max + 0.05).to(dtype),
        B=rnd(b, n, length),
        C=rnd(b, n, length),
        D=rnd(d) if skip else None,
        z=rnd(b, d, length) if gate else None,
        delta_bias=rnd(d) * 0.5 if bias else None,
        initial_state=rnd(b, d, n) if init else None,
    )
    return {k: (leaf(v) if v is not None else None) for k, v in ins.items()}


def scan_ref(**kw):
    return selective_scan_ref(**kw, return_final_state=True)


def scan_chunked(chunk_size):
    return lambda **kw: selective_scan_chunked(**kw, return_final_state=True, chunk_size=chunk_size)


SCAN_OPTIONS = [
    dict(init=True, skip=True, gate=True, bias=True),
    dict(init=False, skip=False, gate=False, bias=False),
    dict(init=True, skip=False, gate=True, bias=False),
]


@pytest.mark.parametrize("chunk_size,length", [(16, 1), (16, 5), (16, 16), (16, 37), (7, 50), (64, 100), (1, 9), (3, 2)])
@pytest.mark.parametrize("opts", range(len(SCAN_OPTIONS)))
def test_scan_chunked_matches_ref(chunk_size, length, opts):
    make = lambda: scan_inputs(length=length, seed=length + opts, **SCAN_OPTIONS[opts])  # noqa: E731
    compare(scan_chunked(chunk_size), scan_ref, make)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), d=st.integers(1, 5), n=st.integers(1, 5), length=st.integers(1, 40),
       chunk_size=st.integers(1, 24), seed=st.integers(0, 2**16), dt_scale=st.sampled_from([0.1, 1.0, 10.0]),
       init=st.booleans())
def test_scan_chunked_matches_ref_property(b, d, n, length, chunk_size, seed, dt_scale, init):
    make = lambda: scan_inputs(b, d, n, length, seed=seed, init=init, dt_scale=dt_scale)  # noqa: E731
    compare(scan_chunked(chunk_size), scan_ref, make)


@pytest.mark.parametrize("chunk_size", [5, 40])  # 5: summed by cumsum-matmul; 40: by torch.cumsum
def test_scan_without_softplus_allows_negative_steps(chunk_size):
    # delta_softplus=False with signed deltas: cumsum(dt) is not monotone inside a chunk, so the
    # chunk's reference point comes from its min and max, not its ends
    def make():
        ins = scan_inputs(length=45, seed=11, dt_scale=0.3)
        return ins

    def chunked(**kw):
        return selective_scan_chunked(**kw, delta_softplus=False, return_final_state=True, chunk_size=chunk_size)

    def ref(**kw):
        return selective_scan_ref(**kw, delta_softplus=False, return_final_state=True)

    assert (make()["delta"] < 0).any() and (make()["delta"] > 0).any()
    compare(chunked, ref, make)


def test_scan_chunked_matches_ref_float64():
    make = lambda: scan_inputs(length=45, dtype=F64, seed=3)  # noqa: E731
    compare(scan_chunked(16), scan_ref, make, atol=1e-10, rel_rms=1e-10)


def test_scan_chunked_gradcheck():
    ins = scan_inputs(b=1, d=2, n=3, length=9, dtype=F64, seed=4)
    names = list(ins)

    def fn(*args):
        return selective_scan_chunked(**dict(zip(names, args)), return_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tuple(ins.values()))


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_scan_steep_decays_are_finite_and_exact(chunk_size):
    # steps with dt*|A| up to several hundred: chunks shrink, down to single steps
    make = lambda: scan_inputs(length=40, seed=5, dt_scale=30.0, a_max=20.0)  # noqa: E731
    ins = make()
    y, h = selective_scan_chunked(**ins, return_final_state=True, chunk_size=chunk_size)
    (y.sum() + h.sum()).backward()
    for name, t in ins.items():
        assert torch.isfinite(t.grad).all(), name
    compare(scan_chunked(chunk_size), scan_ref, make)


def test_scan_mamba_init_long_sequence():
    # HF Mamba initialisation (A = -1..N, dt in [1e-3, 0.1]) over a long sequence
    b, d, n, length = 1, 8, 16, 300
    gen = torch.Generator().manual_seed(6)
    dt0 = torch.exp(torch.rand(d, generator=gen) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                    + torch.log(torch.tensor(1e-3)))

    def make():
        return dict(
            u=leaf(torch.randn(b, d, length, generator=torch.Generator().manual_seed(7))),
            delta=leaf(torch.randn(b, d, length, generator=torch.Generator().manual_seed(8)) * 0.1),
            A=leaf(-torch.arange(1, n + 1, dtype=F32).repeat(d, 1)),
            B=leaf(torch.randn(b, n, length, generator=torch.Generator().manual_seed(9))),
            C=leaf(torch.randn(b, n, length, generator=torch.Generator().manual_seed(10))),
            delta_bias=leaf(dt0 + torch.log(-torch.expm1(-dt0))),
        )

    compare(scan_chunked(64), scan_ref, make)


def test_scan_chunked_saves_no_full_size_tensors():
    ins = scan_inputs(b=2, d=8, n=16, length=128, seed=11)
    full = 2 * 8 * 16 * 128
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan_chunked(**ins, chunk_size=32)
    assert max(sizes) < full, "a [B, D, N, L] tensor was saved for backward"


def test_selective_state_update_iterates_to_full_scan():
    ins = scan_inputs(length=11, seed=12)
    y_full, h_full = selective_scan_ref(**ins, return_final_state=True)
    state, ys = ins["initial_state"], []
    for t in range(11):
        y_t, state = selective_state_update(
            state, ins["u"][:, :, t], ins["delta"][:, :, t], ins["A"], ins["B"][:, :, t], ins["C"][:, :, t],
            ins["D"], z=ins["z"][:, :, t], dt_bias=ins["delta_bias"], dt_softplus=True,
        )
        ys.append(y_t)
    assert_close(torch.stack(ys, -1), y_full, 1e-5, 1e-5, "y")
    assert_close(state, h_full, 1e-5, 1e-5, "state")


def check_split_with_carried_state(scan, ins, split):
    """scan over [:split] then [split:] from the carried state == one pass (y and final state)."""
    y, h = scan(**ins, return_final_state=True)
    first = {k: (v[..., :split] if k in ("u", "delta", "B", "C", "z") and v is not None else v) for k, v in ins.items()}
    second = {k: (v[..., split:] if k in ("u", "delta", "B", "C", "z") and v is not None else v) for k, v in ins.items()}
    y1, h1 = scan(**first, return_final_state=True)
    second["initial_state"] = h1
    y2, h2 = scan(**second, return_final_state=True)
    assert_close(torch.cat([y1, y2], -1), y, 1e-5, 1e-5, "y")
    assert_close(h2, h, 1e-5, 1e-5, "state")


@pytest.mark.parametrize("split", [1, 13, 29])
def test_scan_split_with_carried_state_equals_one_pass(split):
    scan = lambda **kw: selective_scan_chunked(**kw, chunk_size=8)  # noqa: E731
    check_split_with_carried_state(scan, scan_inputs(length=30, seed=13), split)


def test_scan_dtypes():
    ins = {k: (v.detach().bfloat16() if k in ("u", "delta", "z", "B", "C") and v is not None else v)
           for k, v in scan_inputs(length=20, seed=14).items()}
    for fn in (selective_scan_ref, selective_scan_chunked):
        y, h = fn(**ins, return_final_state=True)
        assert y.dtype == torch.bfloat16 and h.dtype == F32


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked, selective_scan])
@pytest.mark.parametrize("name,bad", [
    ("delta", lambda i: i["delta"][..., :-1]),
    ("A", lambda i: i["A"][:-1]),
    ("B", lambda i: i["B"][:, :-1]),
    ("C", lambda i: i["C"][..., None]),
    ("D", lambda i: i["D"][:-1]),
    ("z", lambda i: i["z"][:1]),
    ("delta_bias", lambda i: i["delta_bias"][None]),
    ("initial_state", lambda i: i["initial_state"][:, :, :-1]),
])
def test_scan_bad_shapes_name_the_argument(fn, name, bad):
    ins = scan_inputs(length=8)
    ins[name] = bad(ins)
    with pytest.raises(ValueError, match=f"`{name}`"):
        fn(**ins)


def test_scan_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**scan_inputs(length=4), chunk_size=0)


def test_selective_state_update_bad_shapes():
    ins = scan_inputs(length=1)
    args = dict(state=ins["initial_state"], x=ins["u"][..., 0], dt=ins["delta"][..., 0], A=ins["A"],
                B=ins["B"][..., 0], C=ins["C"][..., 0])
    for name in ("state", "dt", "B", "C"):
        bad = dict(args, **{name: args[name][..., :-1]})
        with pytest.raises(ValueError, match=f"`{name}`"):
            selective_state_update(**bad)


# ----------------------------------------------------------------------------- causal conv1d


def conv_inputs(b=2, d=5, length=9, width=4, seed=0, init=True, bias=True, dtype=F32):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return leaf(torch.randn(*shape, generator=gen, dtype=dtype))

    return dict(x=rnd(b, d, length), weight=rnd(d, width), bias=rnd(d) if bias else None,
                initial_state=rnd(b, d, width - 1) if init else None)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 2, 3, 10])
@pytest.mark.parametrize("init,bias,activation", [(True, True, "silu"), (False, False, None)])
def test_conv_matches_ref(width, length, init, bias, activation):
    make = lambda: conv_inputs(length=length, width=width, seed=length, init=init, bias=bias)  # noqa: E731

    def run(fn):
        return lambda **kw: fn(**kw, activation=activation, return_final_state=True)

    compare(run(causal_conv1d), run(causal_conv1d_ref), make, atol=1e-5, rel_rms=1e-5)


def test_conv_final_state_is_last_inputs():
    x = torch.arange(2 * 3 * 2, dtype=F32).view(2, 3, 2)
    weight = torch.ones(3, 4)
    _, state = causal_conv1d(x, weight, return_final_state=True)  # L=2 < W-1=3: zero-padded on the left
    assert torch.equal(state, torch.cat([torch.zeros(2, 3, 1), x], -1))
    init = torch.full((2, 3, 3), -1.0)
    _, state = causal_conv1d(x, weight, initial_state=init, return_final_state=True)
    assert torch.equal(state, torch.cat([init[..., 2:], x], -1))


def test_conv_update_iterates_and_splits():
    ins = conv_inputs(length=12, seed=1)
    y, state = causal_conv1d(**ins, activation="silu", return_final_state=True)
    s, ys = ins["initial_state"], []
    for t in range(12):
        y_t, s = causal_conv1d_update(ins["x"][:, :, t], s, ins["weight"], ins["bias"], activation="silu")
        ys.append(y_t)
    assert_close(torch.stack(ys, -1), y, 1e-6, 1e-6, "y")
    assert_close(s, state, 0, 0, "state")
    y1, s1 = causal_conv1d(ins["x"][..., :5], ins["weight"], ins["bias"], ins["initial_state"], "silu", True)
    y2, s2 = causal_conv1d(ins["x"][..., 5:], ins["weight"], ins["bias"], s1, "silu", True)
    assert_close(torch.cat([y1, y2], -1), y, 1e-6, 1e-6, "y")
    assert_close(s2, state, 0, 0, "state")


def test_conv_bad_arguments():
    ins = conv_inputs()
    for name, bad in [("weight", ins["weight"][:-1]), ("bias", ins["bias"][:-1]),
                      ("initial_state", ins["initial_state"][..., :-1]), ("x", ins["x"][0])]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            causal_conv1d(**dict(ins, **{name: bad}))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(**ins, activation="relu")
    with pytest.raises(ValueError, match="`conv_state`"):
        causal_conv1d_update(ins["x"][..., 0], ins["initial_state"][..., :-1], ins["weight"])


# ----------------------------------------------------------------------------- retention


def retention_inputs(b=2, h=3, length=37, dk=5, dv=6, per_token=False, init=True, seed=0, dtype=F32,
                     decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    if per_token:
        log_decay = -torch.rand(b, h, length, generator=gen, dtype=F64).to(dtype) * decay_scale
    else:
        log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(h, dtype=F64))).to(dtype)  # RetNet gammas
    ins = dict(q=rnd(b, h, length, dk), k=rnd(b, h, length, dk), v=rnd(b, h, length, dv), log_decay=log_decay,
               initial_state=rnd(b, h, dk, dv) if init else None)
    return {k: (leaf(v) if v is not None else None) for k, v in ins.items()}


def ret_form(fn, **extra):
    return lambda **kw: fn(**kw, scale=0.5, return_final_state=True, **extra)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("chunk_size,length", [(16, 1), (16, 7), (16, 16), (16, 37), (5, 23), (64, 100), (1, 6)])
def test_retention_chunked_matches_ref(per_token, init, chunk_size, length):
    make = lambda: retention_inputs(length=length, per_token=per_token, init=init, seed=length)  # noqa: E731
    compare(ret_form(retention_chunked, chunk_size=chunk_size), ret_form(retention_ref), make)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("length", [1, 10, 33])
def test_retention_parallel_matches_ref(per_token, init, length):
    make = lambda: retention_inputs(length=length, per_token=per_token, init=init, seed=length + 1)  # noqa: E731
    compare(ret_form(retention_parallel), ret_form(retention_ref), make)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), length=st.integers(1, 40), dk=st.integers(1, 6),
       dv=st.integers(1, 6), chunk_size=st.integers(1, 24), per_token=st.booleans(), init=st.booleans(),
       seed=st.integers(0, 2**16), decay_scale=st.sampled_from([0.01, 1.0, 30.0]))
def test_retention_chunked_matches_ref_property(b, h, length, dk, dv, chunk_size, per_token, init, seed,
                                                decay_scale):
    def make():
        return retention_inputs(b, h, length, dk, dv, per_token=per_token, init=init, seed=seed,
                                decay_scale=decay_scale)

    compare(ret_form(retention_chunked, chunk_size=chunk_size), ret_form(retention_ref), make)


def test_retention_float64_tight():
    make = lambda: retention_inputs(length=50, per_token=True, dtype=F64, seed=2)  # noqa: E731
    compare(ret_form(retention_chunked, chunk_size=16), ret_form(retention_ref), make, 1e-10, 1e-10)
    compare(ret_form(retention_parallel), ret_form(retention_ref), make, 1e-10, 1e-10)


@pytest.mark.parametrize("per_token", [False, True])
def test_retention_chunked_gradcheck(per_token):
    ins = retention_inputs(b=1, h=2, length=7, dk=2, dv=3, per_token=per_token, dtype=F64, seed=12)
    names = list(ins)

    def fn(*args):
        return retention_chunked(**dict(zip(names, args)), scale=0.5, return_final_state=True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, tuple(ins.values()))


@pytest.mark.parametrize("fn", [retention_ref, retention_parallel, retention_chunked])
@pytest.mark.parametrize("decay_scale", [50.0, 1e4, 1e30])
def test_retention_strongly_negative_decay_is_finite(fn, decay_scale):
    ins = retention_inputs(length=40, per_token=True, seed=3, decay_scale=decay_scale)
    o, s = fn(**ins, return_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    (o.sum() + s.sum()).backward()
    for name, t in ins.items():
        assert torch.isfinite(t.grad).all(), name


def test_retention_strongly_negative_decay_matches_ref():
    make = lambda: retention_inputs(length=40, per_token=True, seed=4, decay_scale=200.0)  # noqa: E731
    compare(ret_form(retention_chunked, chunk_size=16), ret_form(retention_ref), make)
    compare(ret_form(retention_parallel), ret_form(retention_ref), make)


def test_retention_resets_then_slow_decay_keep_precision():
    # large log-decays early in a chunk must not swamp the small ones after them
    def make():
        ins = retention_inputs(length=48, per_token=True, init=True, seed=10)
        ld = torch.full((2, 3, 48), -0.01)
        ld[:, :, 2:14] = -60.0
        ld[:, :, 30] = -1e6
        ins["log_decay"] = leaf(ld)
        return ins

    compare(ret_form(retention_chunked, chunk_size=32), ret_form(retention_ref), make)
    compare(ret_form(retention_parallel), ret_form(retention_ref), make)


@pytest.mark.parametrize("fn", [retention_ref, retention_parallel, retention_chunked])
def test_retention_infinite_log_decay_resets_the_state(fn):
    ins = retention_inputs(length=12, per_token=True, seed=11)
    ld = ins["log_decay"].detach().clone()
    ld[:, :, 5] = float("-inf")
    ins["log_decay"] = leaf(ld)
    o, s = fn(**ins, return_final_state=True)
    tail = {k: (v[:, :, 5:].detach() if k != "initial_state" else None) for k, v in ins.items()}
    o_tail, s_tail = retention_ref(**tail, return_final_state=True)
    assert_close(o[:, :, 5:], o_tail, 1e-5, 1e-5, "o after the reset")
    assert_close(s, s_tail, 1e-5, 1e-5, "state")
    (o.sum() + s.sum()).backward()
    for name, t in ins.items():
        assert torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize("per_token", [False, True])
def test_retention_step_iterates_to_full_form(per_token):
    ins = retention_inputs(length=9, per_token=per_token, seed=5)
    o_full, s_full = retention_chunked(**ins, scale=0.5, return_final_state=True, chunk_size=4)
    state, outs = ins["initial_state"], []
    for t in range(9):
        ld = ins["log_decay"][:, :, t] if per_token else ins["log_decay"]
        o_t, state = retention_step(ins["q"][:, :, t], ins["k"][:, :, t], ins["v"][:, :, t], ld, state, scale=0.5)
        outs.append(o_t)
    assert_close(torch.stack(outs, 2), o_full, 1e-5, 1e-5, "o")
    assert_close(state, s_full, 1e-5, 1e-5, "state")


def test_retention_step_without_state_starts_from_zero():
    ins = retention_inputs(length=1, init=False, seed=6)
    o, s = retention_ref(**ins, return_final_state=True)
    o1, s1 = retention_step(ins["q"][:, :, 0], ins["k"][:, :, 0], ins["v"][:, :, 0], ins["log_decay"], None)
    assert_close(o1, o[:, :, 0], 1e-6, 1e-6, "o")
    assert_close(s1, s, 1e-6, 1e-6, "state")


@pytest.mark.parametrize("split", [1, 16, 30])
def test_retention_split_with_carried_state_equals_one_pass(split):
    ins = retention_inputs(length=31, per_token=True, seed=7)
    o, s = retention_chunked(**ins, return_final_state=True, chunk_size=8)
    part = lambda t, sl: t[:, :, sl] if t.dim() >= 3 else t  # noqa: E731
    first = {k: part(v, slice(0, split)) for k, v in ins.items() if k != "initial_state"}
    second = {k: part(v, slice(split, None)) for k, v in ins.items() if k != "initial_state"}
    o1, s1 = retention_chunked(**first, initial_state=ins["initial_state"], return_final_state=True, chunk_size=8)
    o2, s2 = retention_chunked(**second, initial_state=s1, return_final_state=True, chunk_size=8)
    assert_close(torch.cat([o1, o2], 2), o, 1e-5, 1e-5, "o")
    assert_close(s2, s, 1e-5, 1e-5, "state")


def test_non_contiguous_inputs():
    # layouts the layers produce: [B, L, H, D] projections transposed, [B, L, N] transposed
    ins = retention_inputs(length=21, per_token=True, seed=13)
    strided = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2) if v is not None and v.dim() == 4
                   and k != "initial_state" else v.detach()) for k, v in ins.items()}
    assert not strided["q"].is_contiguous()
    for fn in (retention_parallel, retention_chunked):
        assert_close(fn(**strided, chunk_size=8) if fn is retention_chunked else fn(**strided),
                     retention_ref(**ins).detach(), what=fn.__name__)
    sins = scan_inputs(length=21, seed=14)
    strided = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2) if v is not None and v.dim() == 3
                   else v) for k, v in sins.items()}
    assert not strided["B"].is_contiguous()
    assert_close(selective_scan_chunked(**strided, chunk_size=8), selective_scan_ref(**sins).detach(), what="scan")


def test_retention_output_dtype():
    ins = {k: v.detach().bfloat16() if v is not None and k != "log_decay" else v
           for k, v in retention_inputs(length=10, per_token=True).items()}
    for fn in (retention_ref, retention_parallel, retention_chunked):
        o, s = fn(**ins, return_final_state=True)
        assert o.dtype == torch.bfloat16 and s.dtype == F32


@pytest.mark.parametrize("fn", [retention_ref, retention_parallel, retention_chunked, retention])
@pytest.mark.parametrize("name,bad", [
    ("k", lambda i: i["k"][..., :-1]),
    ("v", lambda i: i["v"][:, :1]),
    ("log_decay", lambda i: i["log_decay"][:-1]),
    ("log_decay", lambda i: i["log_decay"][None]),
    ("initial_state", lambda i: i["initial_state"][..., :-1]),
])
def test_retention_bad_shapes_name_the_argument(fn, name, bad):
    ins = retention_inputs(length=6)
    ins[name] = bad(ins)
    with pytest.raises(ValueError, match=f"`{name}`"):
        fn(**ins)


def test_retention_step_bad_shapes():
    ins = retention_inputs(length=1)
    args = [ins["q"][:, :, 0], ins["k"][:, :, 0], ins["v"][:, :, 0], ins["log_decay"], ins["initial_state"]]
    with pytest.raises(ValueError, match="`state`"):
        retention_step(*args[:4], args[4][..., :-1])
    with pytest.raises(ValueError, match="`log_decay`"):
        retention_step(*args[:3], torch.zeros(2, 3, 4), args[4])


# ----------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv(kernels_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels_dispatch, "_logged", set())


def test_dispatch_default_argument_and_env(fresh_dispatch, monkeypatch):
    resolve = kernels_dispatch.resolve_backend
    assert resolve("selective_scan") == "torch"
    assert resolve("retention") == "chunked"
    assert resolve("retention", "parallel") == "parallel"
    assert resolve("retention", "torch") == "chunked"
    monkeypatch.setenv(kernels_dispatch.ENV_VAR, "ref")
    assert resolve("selective_scan") == "ref" and resolve("retention") == "ref"
    assert resolve("retention", "chunked") == "chunked"  # the argument wins
    monkeypatch.setenv(kernels_dispatch.ENV_VAR, "torch")
    assert resolve("selective_scan") == "torch" and resolve("retention") == "chunked"
    monkeypatch.setenv(kernels_dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=kernels_dispatch.ENV_VAR):
        resolve("selective_scan")
    with pytest.raises(ValueError, match="backend"):
        resolve("selective_scan", "parallel")


def test_dispatch_logs_each_choice_once(fresh_dispatch, caplog):
    ins = scan_inputs(length=5)
    with caplog.at_level(logging.INFO, logger="strata.kernels"):
        for _ in range(3):
            selective_scan(**ins)
    assert sum("selective_scan" in r.getMessage() for r in caplog.records) == 1


def test_dispatch_runs_the_chosen_form(fresh_dispatch, monkeypatch):
    ins = scan_inputs(length=20, seed=8)
    y_ref = selective_scan_ref(**ins)
    monkeypatch.setenv(kernels_dispatch.ENV_VAR, "ref")
    assert torch.equal(selective_scan(**ins, chunk_size=4), y_ref)
    monkeypatch.delenv(kernels_dispatch.ENV_VAR)
    assert_close(selective_scan(**ins, chunk_size=4), y_ref, what="y")
    rins = retention_inputs(length=20, seed=9)
    o_ref = retention_ref(**rins)
    for backend in ("ref", "parallel", "chunked", "torch", None):
        assert_close(retention(**rins, backend=backend, chunk_size=8), o_ref, what=str(backend))


def test_kernel_modules_follow_the_bundle_import_convention():
    # docs/internals.md: unique basenames, strata imports absolute from the defining
    # module, nothing else from strata, optional extras guarded
    package = Path(kernels_dispatch.__file__).resolve().parents[1]
    basenames = [p.name for p in package.rglob("*.py") if p.name != "__init__.py"]
    for path in sorted(package.joinpath("kernels").glob("kernels_*.py")):
        assert basenames.count(path.name) == 1, f"{path.name} is not unique in strata/"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "strata" for a in node.names), path.name
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("strata")):
                assert node.level == 0 and node.module.startswith("strata.kernels.kernels_"), (path.name, node.module)
