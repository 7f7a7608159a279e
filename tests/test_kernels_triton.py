"""Triton kernels on the CPU, under the Triton interpreter, held to their `ref` twins.

TRITON_INTERPRET=1 must be set before triton is first imported (triton.language's own
helpers are jit functions too), and another test in the same process may already have
imported it. So in a normal pytest run this file contributes one test,
``test_kernels_under_the_triton_interpreter``, which runs this same file in a fresh
subprocess with TRITON_INTERPRET=1; there, and only there, the ``Interpreted`` test
classes are collected. Nothing leaks into the other tests of the worker. Run them
directly with ``TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py``.

Shapes are tiny (the interpreter runs every program in numpy); the GPU checks (dtypes,
mamba-ssm parity) are in test_kernels_gpu.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from test_kernels import assert_close, compare, conv_inputs, leaf, ret_form, retention_inputs, scan_inputs

from strata.kernels import kernels_dispatch
from strata.kernels.kernels_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from strata.kernels.kernels_retention import retention, retention_chunked, retention_ref
from strata.kernels.kernels_selective_scan import selective_scan, selective_scan_ref, selective_state_update

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not kernels_dispatch.triton_installed(), reason="needs triton")
# fp32 against the fp32 reference: the issue asks for relative RMS <= 1e-3; the kernels do 10x better
TOL = dict(atol=1e-5, rel_rms=1e-4)


def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


test_kernels_under_the_triton_interpreter.__test__ = not INTERPRETED


class Interpreted:
    """Collected only in the TRITON_INTERPRET=1 subprocess."""

    __test__ = INTERPRETED


@pytest.fixture(scope="module")
def tk():
    """The Triton forms (imported here: only the interpreter process may import them)."""
    from strata.kernels.kernels_triton_conv1d import causal_conv1d_triton, causal_conv1d_update_triton
    from strata.kernels.kernels_triton_retention import retention_triton
    from strata.kernels.kernels_triton_scan import selective_scan_triton, selective_state_update_triton

    class Forms:
        scan = staticmethod(selective_scan_triton)
        state_update = staticmethod(selective_state_update_triton)
        conv = staticmethod(causal_conv1d_triton)
        conv_update = staticmethod(causal_conv1d_update_triton)
        retention = staticmethod(retention_triton)

    return Forms


# ----------------------------------------------------------------------------- selective scan

SCAN_CASES = [  # (batch, channels, state, length, chunk_size, options)
    (2, 6, 4, 37, 16, dict(init=True, skip=True, gate=True, bias=True)),
    (2, 6, 4, 5, 4, dict(init=False, skip=False, gate=False, bias=False)),
    (2, 10, 5, 23, 7, dict(init=True, skip=False, gate=True, bias=False)),  # 3 channel blocks, N not 2^k
    (1, 3, 2, 9, 1, dict(init=True, skip=True, gate=True, bias=True)),
    (2, 4, 3, 16, 64, dict(init=False, skip=True, gate=True, bias=True)),
]


def _step_args(ins, t):
    return dict(state=ins["initial_state"], x=ins["u"][:, :, t], dt=ins["delta"][:, :, t], A=ins["A"],
                B=ins["B"][:, :, t], C=ins["C"][:, :, t], D=ins["D"], z=ins["z"][:, :, t], dt_bias=ins["delta_bias"])


class TestScanTriton(Interpreted):
    """selective_scan_triton and selective_state_update_triton against the reference."""

    @pytest.mark.parametrize("case", range(len(SCAN_CASES)))
    def test_triton_scan_matches_ref(self, tk, case):
        b, d, n, length, chunk_size, opts = SCAN_CASES[case]
        make = lambda: scan_inputs(b, d, n, length, seed=case, **opts)  # noqa: E731
        fast = lambda **kw: tk.scan(**kw, return_final_state=True, chunk_size=chunk_size)  # noqa: E731
        compare(fast, lambda **kw: selective_scan_ref(**kw, return_final_state=True), make, **TOL)

    def test_triton_scan_steep_decays_and_no_softplus(self, tk):
        make = lambda: scan_inputs(2, 5, 3, 20, seed=7, dt_scale=10.0, a_max=20.0)  # noqa: E731
        compare(lambda **kw: tk.scan(**kw, return_final_state=True, chunk_size=8),
                lambda **kw: selective_scan_ref(**kw, return_final_state=True), make, **TOL)

        def positive_dt():
            ins = scan_inputs(2, 5, 3, 12, seed=8, bias=False)
            ins["delta"] = leaf(ins["delta"].detach().abs() * 0.3)
            return ins

        compare(lambda **kw: tk.scan(**kw, delta_softplus=False, return_final_state=True, chunk_size=4),
                lambda **kw: selective_scan_ref(**kw, delta_softplus=False, return_final_state=True), positive_dt, **TOL)

    def test_triton_scan_dtypes_and_bad_shapes(self, tk):
        ins = {k: (v.detach().bfloat16() if k in ("u", "delta", "z", "B", "C") and v is not None else v)
               for k, v in scan_inputs(length=10, seed=9).items()}
        y, h = tk.scan(**ins, return_final_state=True, chunk_size=4)
        y_ref, h_ref = selective_scan_ref(**ins, return_final_state=True)
        assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
        assert_close(h, h_ref.detach(), 1e-4, 1e-4, "state")
        ins = scan_inputs(length=8)
        with pytest.raises(ValueError, match="`B`"):
            tk.scan(**dict(ins, B=ins["B"][:, :-1]))
        with pytest.raises(ValueError, match="chunk_size"):
            tk.scan(**ins, chunk_size=0)

    def test_triton_state_update_matches_torch_step(self, tk):
        args = _step_args(scan_inputs(b=2, d=10, n=5, length=1, seed=10), 0)
        y_ref, s_ref = selective_state_update(**args, backend="torch")
        with torch.no_grad():  # the fused one-token kernel
            y, s = tk.state_update(**args)
        assert_close(y, y_ref.detach(), **TOL, what="y")
        assert_close(s, s_ref.detach(), **TOL, what="state")
        # with gradients: a one-position scan, same values and the gradients of the torch step
        y, s = tk.state_update(**args)
        assert_close(y, y_ref, **TOL, what="y")
        names = ["state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
        g = torch.autograd.grad((y * 1.7).sum() + (s * s).sum(), [args[n] for n in names])
        g_ref = torch.autograd.grad((y_ref * 1.7).sum() + (s_ref * s_ref).sum(), [args[n] for n in names])
        for name, a, r in zip(names, g, g_ref):
            assert_close(a, r, **TOL, what=f"grad {name}")

    def test_triton_state_update_iterates_to_full_scan(self, tk):
        ins = scan_inputs(length=6, seed=11)
        y_full, h_full = selective_scan_ref(**ins, return_final_state=True)
        state, ys = ins["initial_state"], []
        with torch.no_grad():
            for t in range(6):
                y_t, state = tk.state_update(**dict(_step_args(ins, t), state=state))
                ys.append(y_t)
        assert_close(torch.stack(ys, -1), y_full.detach(), **TOL, what="y")
        assert_close(state, h_full.detach(), **TOL, what="state")


# ----------------------------------------------------------------------------- causal conv1d


class TestConvTriton(Interpreted):
    """causal_conv1d_triton and causal_conv1d_update_triton against the reference."""

    @pytest.mark.parametrize("width,length", [(1, 3), (2, 1), (4, 2), (4, 70), (3, 10)])
    @pytest.mark.parametrize("init,bias,activation", [(True, True, "silu"), (False, False, None)])
    def test_triton_conv_matches_ref(self, tk, width, length, init, bias, activation):
        make = lambda: conv_inputs(b=2, d=20, length=length, width=width, seed=length, init=init, bias=bias)  # noqa: E731

        def run(fn):
            return lambda **kw: fn(**kw, activation=activation, return_final_state=True)

        compare(run(tk.conv), run(causal_conv1d_ref), make, **TOL)

    def test_triton_conv_update(self, tk):
        ins = conv_inputs(b=2, d=20, length=5, width=4, seed=3)
        y_full, s_full = causal_conv1d_ref(**ins, activation="silu", return_final_state=True)
        state, ys = ins["initial_state"], []
        with torch.no_grad():
            for t in range(5):
                y_t, state = tk.conv_update(ins["x"][:, :, t], state, ins["weight"], ins["bias"], activation="silu")
                ys.append(y_t)
        assert_close(torch.stack(ys, -1), y_full.detach(), **TOL, what="y")
        assert_close(state, s_full.detach(), 0, 0, "state")
        # with gradients: a one-position conv
        args = (ins["x"][:, :, 0], ins["initial_state"], ins["weight"], ins["bias"])
        y, s = tk.conv_update(*args, activation="silu")
        y_ref, s_ref = causal_conv1d_update(*args, activation="silu", backend="torch")
        g = torch.autograd.grad(y.sum() * 2 + (s * s).sum(), args)
        g_ref = torch.autograd.grad(y_ref.sum() * 2 + (s_ref * s_ref).sum(), args)
        for a, r in zip(g, g_ref):
            assert_close(a, r, **TOL, what="grad")


# ----------------------------------------------------------------------------- retention


class TestRetentionTriton(Interpreted):
    """retention_triton against the recurrent reference."""

    @pytest.mark.parametrize("per_token", [False, True])
    @pytest.mark.parametrize("init", [True, False])
    @pytest.mark.parametrize("chunk_size,length", [(16, 1), (16, 37), (32, 20), (5, 23)])
    def test_triton_retention_matches_ref(self, tk, per_token, init, chunk_size, length):
        make = lambda: retention_inputs(b=2, h=2, length=length, per_token=per_token, init=init, seed=length)  # noqa: E731
        compare(ret_form(tk.retention, chunk_size=chunk_size), ret_form(retention_ref), make, **TOL)

    def test_triton_retention_resets_then_slow_decay_keep_precision(self, tk):
        def make():
            ins = retention_inputs(b=1, h=2, length=40, per_token=True, init=True, seed=10)
            ld = torch.full((1, 2, 40), -0.01)
            ld[:, :, 2:14] = -60.0
            ld[:, :, 30] = -1e6
            ins["log_decay"] = leaf(ld)
            return ins

        compare(ret_form(tk.retention, chunk_size=32), ret_form(retention_ref), make, **TOL)

    def test_triton_retention_strong_decays_and_split(self, tk):
        make = lambda: retention_inputs(b=1, h=2, length=24, per_token=True, seed=4, decay_scale=200.0)  # noqa: E731
        compare(ret_form(tk.retention, chunk_size=16), ret_form(retention_ref), make, **TOL)
        # two calls carrying the state == one call
        ins = {k: v.detach() if v is not None else None
               for k, v in retention_inputs(b=2, h=2, length=21, per_token=True, seed=7).items()}
        o, s = tk.retention(**ins, return_final_state=True, chunk_size=16)
        first = {k: ins[k][:, :, :9] for k in ("q", "k", "v", "log_decay")}
        second = {k: ins[k][:, :, 9:] for k in ("q", "k", "v", "log_decay")}
        o1, s1 = tk.retention(**first, initial_state=ins["initial_state"], return_final_state=True)
        o2, s2 = tk.retention(**second, initial_state=s1, return_final_state=True)
        assert_close(torch.cat([o1, o2], 2), o, **TOL, what="o")
        assert_close(s2, s, **TOL, what="state")

    def test_triton_retention_dtypes_and_bad_shapes(self, tk):
        ins = {k: v.detach().bfloat16() if v is not None and k != "log_decay" else v
               for k, v in retention_inputs(b=1, h=2, length=10, per_token=True).items()}
        o, s = tk.retention(**ins, return_final_state=True)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        ins = retention_inputs(length=6)
        with pytest.raises(ValueError, match="`log_decay`"):
            tk.retention(**dict(ins, log_decay=ins["log_decay"][:-1]))


# ----------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv(kernels_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels_dispatch, "_logged", set())


@needs_triton
def test_dispatch_defaults_by_device(fresh_dispatch):
    resolve = kernels_dispatch.resolve_backend
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for op in ("selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update", "retention"):
        assert resolve(op, device=cuda) == "triton"
    assert resolve("selective_scan", device=cpu) == "torch"
    assert resolve("retention", device=cpu) == "chunked"
    assert resolve("selective_state_update", "ref") == "torch"  # the torch step is the reference
    assert resolve("retention", "mamba_ssm", device=cuda) == "triton"


@needs_triton
def test_dispatch_triton_needs_cuda_or_the_interpreter(fresh_dispatch, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels_dispatch.resolve_backend("selective_scan", "triton", torch.device("cpu"))
    monkeypatch.setenv(kernels_dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="triton"):
        selective_scan(**scan_inputs(length=4))


@pytest.mark.skipif(kernels_dispatch.mamba_ssm_installed(), reason="mamba-ssm is installed")
def test_dispatch_mamba_ssm_missing_is_a_clear_error(fresh_dispatch):
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        causal_conv1d(**conv_inputs(), backend="mamba_ssm")


class TestTritonBackendEndToEnd(Interpreted):
    """The dispatching functions and a model config choosing the Triton forms."""

    def test_dispatch_env_runs_every_op_on_triton(self, tk, fresh_dispatch, monkeypatch, caplog):
        monkeypatch.setenv(kernels_dispatch.ENV_VAR, "triton")
        sins, cins, rins = scan_inputs(length=7, seed=1), conv_inputs(length=7, seed=1), retention_inputs(length=7, seed=1)
        with caplog.at_level(logging.INFO, logger="strata.kernels"):
            y = selective_scan(**sins)
            yc = causal_conv1d(**cins, activation="silu")
            o = retention(**rins)
            with torch.no_grad():
                ys, _ = selective_state_update(**_step_args(sins, 0))
                yu, _ = causal_conv1d_update(cins["x"][:, :, 0], cins["initial_state"], cins["weight"], cins["bias"])
        assert_close(y, selective_scan_ref(**sins), **TOL, what="scan")
        assert_close(yc, causal_conv1d_ref(**cins, activation="silu"), **TOL, what="conv")
        assert_close(o, retention_chunked(**rins), **TOL, what="retention")
        assert_close(ys, selective_state_update(**_step_args(sins, 0), backend="torch")[0].detach(), **TOL)
        assert_close(yu, causal_conv1d_update(cins["x"][:, :, 0], cins["initial_state"], cins["weight"], cins["bias"],
                                              backend="torch")[0].detach(), **TOL)
        chosen = [r.getMessage() for r in caplog.records if "'triton' backend" in r.getMessage()]
        assert len(chosen) == 5, chosen  # once per operation

    def test_model_with_triton_kernel_backend_matches_torch(self, tk):
        """A RetMamba model with kernel_backend="triton" in its config: same logits, same decoding."""
        from strata.configuration.configuration_retmamba import RetMambaConfig
        from strata.modeling.modeling_retmamba import RetMambaForCausalLM

        torch.manual_seed(0)
        small = dict(hidden_size=16, intermediate_size=32, state_size=4, vocab_size=64)
        base = RetMambaForCausalLM(RetMambaConfig.from_preset("fusion-selective-tiny", **small)).eval()
        fast = RetMambaForCausalLM(RetMambaConfig.from_preset("fusion-selective-tiny", kernel_backend="triton", **small))
        fast.load_state_dict(base.state_dict())
        fast.eval()
        ids = torch.randint(0, 64, (1, 9))
        with torch.no_grad():
            assert_close(fast(ids).logits, base(ids).logits, **TOL, what="logits")
            kw = dict(max_new_tokens=3, do_sample=False)
            assert torch.equal(fast.generate(ids, **kw), base.generate(ids, **kw))
        with pytest.raises(ValueError, match="kernel_backend"):
            RetMambaConfig.from_preset("tiny", kernel_backend="cuda")


def test_strata_bench_kernels_cli(tmp_path):
    """`strata bench kernels` runs and writes its figures (smallest section only: a smoke run)."""
    import json

    from strata.cli import main

    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--quick", "--sections", "conv", "--repeats", "1", "--device", "cpu",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (group,) = result["groups"]
    assert [r["form"] for r in group["rows"]][:2] == ["strata causal_conv1d ref (tap loop)",
                                                       "strata causal_conv1d torch (F.conv1d)"]
    assert all(r["total_ms"] > 0 and r["speedup"] > 0 for r in group["rows"])
    assert result["machine"]["device"] == "cpu"
    with pytest.raises(SystemExit, match="sections"):
        main(["bench", "kernels", "--sections", "everything"])


test_strata_bench_kernels_cli.__test__ = not INTERPRETED
