"""The compiled C selective scan (strata/kernels/kernels_cpu_scan.py), held to the sequential reference.

Every test here needs a C compiler with OpenMP (``cc``); where there is none the
dispatcher falls back to the chunked PyTorch form, which the last test checks in a
subprocess with no compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.kernels import kernels_cpu_scan, kernels_dispatch
from strata.kernels.kernels_cpu_scan import selective_scan_cpu
from strata.kernels.kernels_selective_scan import selective_scan, selective_scan_chunked, selective_scan_ref
from tests.test_kernels import SCAN_OPTIONS, assert_close, check_split_with_carried_state, compare, scan_inputs, scan_ref

pytestmark = pytest.mark.skipif(not kernels_cpu_scan.available(), reason="no C compiler with OpenMP builds the kernel")

F32, F64 = torch.float32, torch.float64


def scan_cpu(chunk_size):
    return lambda **kw: selective_scan_cpu(**kw, return_final_state=True, chunk_size=chunk_size)


# D = 6 and 20 are not multiples of the 16 lanes (padding); chunk 1 and chunks longer
# than the sequence; L = 1
@pytest.mark.parametrize("d,chunk_size,length", [(6, 16, 1), (6, 16, 37), (20, 7, 50), (32, 64, 100), (16, 1, 9),
                                                 (20, 3, 2), (48, 16, 64)])
@pytest.mark.parametrize("opts", range(len(SCAN_OPTIONS)))
def test_cpu_scan_matches_ref(d, chunk_size, length, opts):
    compare(scan_cpu(chunk_size), scan_ref, lambda: scan_inputs(d=d, length=length, **SCAN_OPTIONS[opts]))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), d=st.integers(1, 40), n=st.integers(1, 20), length=st.integers(1, 70),
       chunk_size=st.integers(1, 80), seed=st.integers(0, 10_000), dt_scale=st.sampled_from([0.1, 1.0, 4.0]))
def test_cpu_scan_matches_ref_property(b, d, n, length, chunk_size, seed, dt_scale):
    compare(scan_cpu(chunk_size), scan_ref,
            lambda: scan_inputs(b=b, d=d, n=n, length=length, seed=seed, dt_scale=dt_scale))


def test_cpu_scan_float64_is_tight():
    compare(scan_cpu(8), scan_ref, lambda: scan_inputs(d=20, length=45, dtype=F64, seed=3), atol=1e-10, rel_rms=1e-12)


def test_cpu_scan_steep_decays_are_exact():
    # exp(dt A) underflows to 0 for steep decays: the plain recurrence is exact there
    # (the chunked form has to shorten its chunks for this)
    compare(scan_cpu(16), scan_ref, lambda: scan_inputs(d=24, length=40, dt_scale=30.0, a_max=60.0, seed=4))


def test_cpu_scan_equals_chunked_form_on_a_mamba_layer_shape():
    ins = scan_inputs(b=2, d=64, n=16, length=96, seed=5)
    y1, h1 = selective_scan_cpu(**ins, return_final_state=True, chunk_size=16)
    y2, h2 = selective_scan_chunked(**ins, return_final_state=True, chunk_size=16)
    assert_close(y1, y2, 1e-5, what="y")
    assert_close(h1, h2, 1e-5, what="state")


@pytest.mark.parametrize("split", [1, 16, 33])
def test_cpu_scan_split_with_carried_state_equals_one_pass(split):
    ins = {k: (v.detach() if v is not None else None) for k, v in scan_inputs(d=20, length=50, seed=6).items()}
    check_split_with_carried_state(selective_scan_cpu, ins, split)


def test_cpu_scan_threads_agree():
    ins = scan_inputs(b=3, d=64, length=40, seed=7)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(compare_outputs(ins))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close(a, b, 1e-6)


def compare_outputs(ins):
    fresh = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in ins.items()}
    y, h = selective_scan_cpu(**fresh, return_final_state=True, chunk_size=8)
    (y.square().sum() + h.sum()).backward()
    return [y.detach(), h.detach()] + [fresh[k].grad for k in ("u", "delta", "A", "B", "C", "initial_state")]


def test_cpu_scan_non_contiguous_and_low_precision_inputs():
    ins = {k: (v.detach() if v is not None else None) for k, v in scan_inputs(d=20, length=30, seed=8).items()}
    strided = dict(ins, u=ins["u"].transpose(1, 2).contiguous().transpose(1, 2), B=ins["B"][..., ::1],
                   C=torch.cat([ins["C"], ins["C"]], -1)[..., :30])
    assert not strided["u"].is_contiguous()
    assert torch.equal(selective_scan_cpu(**strided), selective_scan_cpu(**ins))
    low = {k: (v.to(torch.bfloat16) if v is not None else None) for k, v in ins.items()}
    y = selective_scan_cpu(**low)
    assert y.dtype == torch.bfloat16
    ref = selective_scan_ref(**{k: (v.float() if v is not None else None) for k, v in low.items()})
    assert_close(y.float(), ref, 2e-2, rel_rms=1e-2)


def test_cpu_scan_refuses_bad_shapes_by_name():
    ins = {k: (v.detach() if v is not None else None) for k, v in scan_inputs(length=10).items()}
    with pytest.raises(ValueError, match="`B`"):
        selective_scan_cpu(**dict(ins, B=ins["B"][:, :, :-1]))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_cpu(**ins, chunk_size=0)


def test_cpu_scan_gradcheck():
    ins = scan_inputs(b=1, d=17, n=3, length=11, dtype=F64, seed=9)
    names = [k for k, v in ins.items() if v is not None]

    def fn(*args):
        return selective_scan_cpu(**dict(zip(names, args)), return_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tuple(ins[k] for k in names))


def test_dispatch_runs_the_compiled_scan_when_asked(monkeypatch):
    monkeypatch.delenv(kernels_dispatch.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    assert kernels_dispatch.resolve_backend("selective_scan", device=cpu) == "torch"  # opt-in (docs/kernels.md)
    assert kernels_dispatch.resolve_backend("selective_scan", "cpu", device=cpu) == "cpu"
    monkeypatch.setenv(kernels_dispatch.ENV_VAR, "cpu")  # every other op maps it to its PyTorch form
    assert kernels_dispatch.resolve_backend("selective_scan", device=cpu) == "cpu"
    assert kernels_dispatch.resolve_backend("retention", device=cpu) == "chunked"
    for op in ("selective_state_update", "causal_conv1d", "causal_conv1d_update"):
        assert kernels_dispatch.resolve_backend(op, device=cpu) == "torch"
    ins = {k: (v.detach() if v is not None else None) for k, v in scan_inputs(length=12, seed=10).items()}
    assert torch.equal(selective_scan(**ins, chunk_size=4), selective_scan_cpu(**ins, chunk_size=4))


def test_a_built_kernel_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    first = kernels_cpu_scan._build()
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "kernels" and kernels_cpu_scan._build() == first
    assert first.stat().st_mtime_ns == stamp and len(list(first.parent.iterdir())) == 1


def test_without_a_compiler_the_dispatcher_falls_back(tmp_path):
    code = """
import logging, torch
from strata.kernels import kernels_dispatch
from strata.kernels.kernels_selective_scan import selective_scan, selective_scan_chunked
logging.basicConfig(level=logging.WARNING)
u = torch.randn(1, 4, 9)
args = (u, torch.randn(1, 4, 9), -torch.rand(4, 3), torch.randn(1, 3, 9), torch.randn(1, 3, 9))
assert not kernels_dispatch.compiled_cpu_scan_available()
assert torch.equal(selective_scan(*args), selective_scan_chunked(*args))
try:
    selective_scan(*args, backend="cpu")
except RuntimeError as err:
    print("refused:", err)
"""
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), STRATA_CACHE=str(tmp_path))
    env.pop(kernels_dispatch.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "compiled CPU kernel is unavailable" in out.stderr
    assert "refused: selective_scan: the 'cpu' kernel backend could not be compiled here" in out.stdout


def test_bench_kernels_times_the_compiled_scan(tmp_path):
    import json

    from strata.cli import main

    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--quick", "--sections", "scan,mixer", "--no-hf", "--repeats", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    (group,) = json.loads(out.read_text())["groups"]  # --no-hf leaves out the mixer comparison
    assert [r["form"] for r in group["rows"]] == ["strata selective_scan ref (sequential)",
                                                  "strata selective_scan torch (chunked)",
                                                  "strata selective_scan cpu (compiled C)"]
    assert "strata selective_scan cpu vs strata selective_scan torch" in group["ratios"]


def test_a_model_with_kernel_backend_cpu_matches_the_default():
    from strata import RetMambaConfig, RetMambaForCausalLM

    ids = torch.randint(4, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for backend in (None, "cpu"):
        torch.manual_seed(0)
        model = RetMambaForCausalLM(RetMambaConfig.from_preset("tiny", layer_pattern="MF", kernel_backend=backend))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert_close(outputs["cpu"][0], outputs[None][0], 1e-4, what="logits")
    for name, grad in outputs[None][1].items():
        assert_close(outputs["cpu"][1][name], grad, 1e-4, rel_rms=1e-3, what=name)
