"""Time forward + backward of the kernels against their sequential forms.

    python bench/kernels.py            # full sizes (about a minute on 2 CPU cores)
    python bench/kernels.py --quick    # small sizes, a few seconds
    python bench/kernels.py --threads 1 --clock cpu   # robust to other load on the machine

Selective scan at B=4, D=256, N=16, L=512 (HF Mamba initialisation of A and dt):
strata's chunked scan vs strata's sequential reference vs transformers' own sequential
CPU scan (``transformers.models.mamba.modeling_mamba.mamba_selective_scan``, the
path MambaMixer takes without mamba-ssm). Retention at L=2048: chunked vs the O(L^2)
parallel form (and the recurrence), for per-head and per-token decays.
Times are medians in ms (wall clock, or process CPU time with --clock cpu, which other
processes on a shared machine disturb less); "speedup" is relative to the first row of
a group.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from strata.kernels.kernels_conv1d import causal_conv1d, causal_conv1d_ref
from strata.kernels.kernels_retention import retention_chunked, retention_parallel, retention_ref
from strata.kernels.kernels_selective_scan import selective_scan_chunked, selective_scan_ref

try:
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan as hf_selective_scan
except ImportError:  # older or newer transformers layout
    hf_selective_scan = None


CLOCK = time.perf_counter


def time_fwd_bwd(fn, inputs, repeats, warmup=None):
    """Median forward and backward wall times (ms) of sum(fn(**inputs)).

    One untimed call first, on ``warmup`` (small inputs of the same kind) if given.
    """
    fwd, bwd = [], []
    for i in range(repeats + 1):
        if i == 0 and warmup is not None:
            out = fn(**warmup)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
            continue
        for t in inputs.values():
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
        t0 = CLOCK()
        out = fn(**inputs)
        out = out[0] if isinstance(out, tuple) else out
        t1 = CLOCK()
        out.float().sum().backward()
        t2 = CLOCK()
        if i > 0:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    return statistics.median(fwd), statistics.median(bwd)


def hf_scan(u, delta, A, B, C, D, z, delta_bias):
    return hf_selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)


def scan_inputs(b, d, n, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt_min, dt_max = 1e-3, 0.1  # HF MambaConfig defaults
    dt0 = torch.exp(torch.rand(d, generator=gen) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    ins = dict(
        u=torch.randn(b, d, length, generator=gen),
        delta=torch.randn(b, d, length, generator=gen) * 0.1,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        B=torch.randn(b, n, length, generator=gen),
        C=torch.randn(b, n, length, generator=gen),
        D=torch.ones(d),
        z=torch.randn(b, d, length, generator=gen),
        delta_bias=dt0 + torch.log(-torch.expm1(-dt0)),
    )
    return {k: v.requires_grad_() for k, v in ins.items()}


def retention_inputs(b, h, length, dk, dv, per_token, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ins = dict(
        q=torch.randn(b, h, length, dk, generator=gen),
        k=torch.randn(b, h, length, dk, generator=gen) * dk**-0.5,
        v=torch.randn(b, h, length, dv, generator=gen),
    )
    if per_token:
        gammas = 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32))
        ins["log_decay"] = F.softplus(torch.randn(b, h, length, generator=gen)) * torch.log(gammas)[None, :, None]
    else:
        ins["log_decay"] = torch.log(1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32)))
    return {k: v.requires_grad_() for k, v in ins.items()}


def print_group(title, rows):
    print(f"\n{title}")
    print(f"  {'form':<44}{'fwd ms':>10}{'bwd ms':>10}{'total ms':>11}{'speedup':>10}")
    base = None
    for name, (f, b) in rows:
        total = f + b
        base = base or total
        print(f"  {name:<44}{f:>10.1f}{b:>10.1f}{total:>11.1f}{base / total:>9.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast forms (median)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' sequential scan")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cs = args.chunk_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, chunk_size {cs}")

    b, d, n, length = (2, 64, 16, 128) if args.quick else (4, 256, 16, 512)
    ins, warm = scan_inputs(b, d, n, length), scan_inputs(b, d, n, 8)
    rows = []
    if hf_selective_scan is not None and not args.no_hf:
        rows.append(("transformers mamba_selective_scan (sequential)",
                     time_fwd_bwd(hf_scan, ins, 1, warm)))
    rows.append(("strata selective_scan_ref (sequential)", time_fwd_bwd(selective_scan_ref, ins, 1, warm)))
    rows.append(("strata selective_scan_chunked",
                 time_fwd_bwd(lambda **kw: selective_scan_chunked(**kw, chunk_size=cs), ins, args.repeats)))
    print_group(f"selective scan  B={b} D={d} N={n} L={length}  (fwd + bwd)", rows)

    cb, cd, cl = (2, 64, 128) if args.quick else (4, 512, 512)
    gen = torch.Generator().manual_seed(1)
    conv = dict(x=torch.randn(cb, cd, cl, generator=gen).requires_grad_(),
                weight=torch.randn(cd, 4, generator=gen).requires_grad_(),
                bias=torch.randn(cd, generator=gen).requires_grad_())
    print_group(f"causal conv1d  B={cb} D={cd} L={cl} W=4  (fwd + bwd)", [
        ("strata causal_conv1d_ref (tap loop)",
         time_fwd_bwd(lambda **kw: causal_conv1d_ref(**kw, activation="silu"), conv, args.repeats)),
        ("strata causal_conv1d (F.conv1d)",
         time_fwd_bwd(lambda **kw: causal_conv1d(**kw, activation="silu"), conv, args.repeats)),
    ])

    rb, rh, rl, rd = (1, 2, 512, 32) if args.quick else (2, 4, 2048, 64)
    for per_token in (False, True):
        rins, warm = retention_inputs(rb, rh, rl, rd, rd, per_token), retention_inputs(rb, rh, 8, rd, rd, per_token)
        rows = [
            ("strata retention_ref (recurrent)", time_fwd_bwd(retention_ref, rins, 1, warm)),
            ("strata retention_parallel (O(L^2))", time_fwd_bwd(retention_parallel, rins, max(1, args.repeats // 2), warm)),
            ("strata retention_chunked",
             time_fwd_bwd(lambda **kw: retention_chunked(**kw, chunk_size=cs), rins, args.repeats)),
        ]
        kind = "log_decay [B, H, L]" if per_token else "log_decay [H]"
        print_group(f"retention  B={rb} H={rh} L={rl} Dk=Dv={rd}, {kind}  (fwd + bwd)", rows)


if __name__ == "__main__":
    main()
