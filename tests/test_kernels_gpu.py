"""Kernels on a GPU: Triton forms in fp32 / bf16 / fp16 and the mamba-ssm backend.

Skipped without CUDA (CI has none); run on a GPU with
``pytest -q tests/test_kernels_gpu.py`` and record the outcome in docs/benchmarks.md.
References are computed in fp32 from the same (rounded) inputs; 16-bit tolerances
are relative RMS errors over the whole tensor.
"""

from __future__ import annotations

import pytest
import torch

from test_kernels import assert_close, conv_inputs, retention_inputs, scan_inputs

from strata.kernels import kernels_dispatch
from strata.kernels.kernels_conv1d import causal_conv1d_ref, causal_conv1d_update
from strata.kernels.kernels_retention import retention_ref
from strata.kernels.kernels_selective_scan import selective_scan_ref, selective_state_update

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not kernels_dispatch.triton_installed(), reason="needs triton"),
]
needs_mamba_ssm = pytest.mark.skipif(not kernels_dispatch.mamba_ssm_installed(), reason="needs mamba-ssm, causal-conv1d")

# relative RMS error allowed: outputs, gradients
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (1e-2, 3e-2), torch.float16: (3e-3, 1e-2)}
FLOAT_INPUTS = {"scan": ("u", "delta", "z", "B", "C"), "conv": ("x",), "retention": ("q", "k", "v")}


def _on_gpu(ins, kind, dtype):
    out = {}
    for name, t in ins.items():
        if t is None:
            out[name] = None
            continue
        t = t.detach().cuda()
        if name in FLOAT_INPUTS[kind]:
            t = t.to(dtype)
        out[name] = t.requires_grad_(True)
    return out


def _grads(outputs, inputs, seed=0):
    """Gradients of a fixed random projection of ``outputs`` (as test_kernels.grads_of, on their device)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)))


def _check(fast, ref, ins, kind, dtype):
    """fast on dtype inputs vs ref on the same values in fp32: outputs and gradients."""
    ins_fast = _on_gpu(ins, kind, dtype)
    ins_ref = {k: (v.detach().float().requires_grad_(True) if v is not None else None) for k, v in ins_fast.items()}
    out_fast, out_ref = fast(**ins_fast), ref(**ins_ref)
    tol_out, tol_grad = TOLERANCE[dtype]
    for i, (a, b) in enumerate(zip(out_fast, out_ref)):
        assert_close(a.float(), b.float(), 0.0, tol_out, f"output {i}")
    g_fast, g_ref = _grads(out_fast, ins_fast), _grads(out_ref, ins_ref)
    for name in g_ref:
        assert g_fast[name] is not None, name
        assert_close(g_fast[name].float(), g_ref[name].float(), 0.0, tol_grad, f"grad {name}")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_scan_on_gpu(dtype):
    ins = scan_inputs(b=2, d=64, n=16, length=300, seed=1, dt_scale=0.5, a_max=2.0)
    _check(lambda **kw: kernels_dispatch.gpu_form("selective_scan", "triton")(**kw, return_final_state=True),
           lambda **kw: selective_scan_ref(**kw, return_final_state=True), ins, "scan", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_conv_on_gpu(dtype):
    ins = conv_inputs(b=2, d=96, length=300, width=4, seed=2)
    run = lambda fn: (lambda **kw: fn(**kw, activation="silu", return_final_state=True))  # noqa: E731
    _check(run(kernels_dispatch.gpu_form("causal_conv1d", "triton")), run(causal_conv1d_ref), ins, "conv", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_triton_retention_on_gpu(dtype, per_token):
    ins = retention_inputs(b=2, h=4, length=300, dk=64, dv=64, per_token=per_token, seed=3)
    ins["k"] = (ins["k"] * 64**-0.5).detach()
    run = lambda fn: (lambda **kw: fn(**kw, return_final_state=True))  # noqa: E731
    _check(run(kernels_dispatch.gpu_form("retention", "triton")), run(retention_ref), ins, "retention", dtype)


def test_default_backend_on_cuda_is_triton(monkeypatch):
    monkeypatch.delenv(kernels_dispatch.ENV_VAR, raising=False)
    assert kernels_dispatch.resolve_backend("selective_scan", device=torch.device("cuda")) == "triton"
    assert kernels_dispatch.resolve_backend("retention", device=torch.device("cuda")) == "triton"


@needs_mamba_ssm
@pytest.mark.parametrize("init", [False, True])  # with an initial state the adapter falls back to Triton
def test_mamba_ssm_scan_parity(init):
    ins = scan_inputs(b=2, d=64, n=16, length=300, seed=4, init=init, dt_scale=0.5, a_max=2.0)
    _check(lambda **kw: kernels_dispatch.gpu_form("selective_scan", "mamba_ssm")(**kw, return_final_state=True),
           lambda **kw: selective_scan_ref(**kw, return_final_state=True), ins, "scan", torch.float32)


@needs_mamba_ssm
def test_mamba_ssm_conv_and_updates_parity():
    ins = {k: v.detach().cuda() if v is not None else None for k, v in conv_inputs(b=2, d=64, length=50, seed=5).items()}
    y, s = kernels_dispatch.gpu_form("causal_conv1d", "mamba_ssm")(ins["x"], ins["weight"], ins["bias"], None,
                                                                    "silu", True)
    y_ref, s_ref = causal_conv1d_ref(ins["x"], ins["weight"], ins["bias"], None, "silu", True)
    assert_close(y, y_ref, 1e-5, 1e-4, "conv y")
    assert_close(s, s_ref, 0, 0, "conv state")
    with torch.no_grad():
        y1, s1 = causal_conv1d_update(ins["x"][:, :, 0], ins["initial_state"], ins["weight"], ins["bias"], "silu",
                                      backend="mamba_ssm")
        y1_ref, s1_ref = causal_conv1d_update(ins["x"][:, :, 0], ins["initial_state"], ins["weight"], ins["bias"],
                                              "silu", backend="torch")
    assert_close(y1, y1_ref, 1e-5, 1e-4, "conv update y")
    assert_close(s1, s1_ref, 0, 0, "conv update state")
    sins = {k: v.detach().cuda() if v is not None else None for k, v in scan_inputs(b=2, d=64, n=16, length=1).items()}
    args = dict(state=sins["initial_state"], x=sins["u"][:, :, 0], dt=sins["delta"][:, :, 0], A=sins["A"],
                B=sins["B"][:, :, 0], C=sins["C"][:, :, 0], D=sins["D"], z=sins["z"][:, :, 0], dt_bias=sins["delta_bias"])
    with torch.no_grad():
        y2, s2 = selective_state_update(**args, backend="mamba_ssm")
        y2_ref, s2_ref = selective_state_update(**args, backend="torch")
    assert_close(y2, y2_ref, 1e-5, 1e-4, "state update y")
    assert_close(s2, s2_ref, 1e-5, 1e-4, "state update state")
    assert torch.equal(args["state"], sins["initial_state"])  # not written in place
