"""`strata bench kernels`: time every form of the sequence kernels side by side.

    strata bench kernels                      # CPU: ~3 minutes on 2 cores; GPU: all forms
    strata bench kernels --quick              # small sizes, seconds (smoke run)
    strata bench kernels --threads 1 --json docs/benchmarks_kernels.json

Forward + backward (sum of the outputs as the loss), median over ``--repeats``, of:

- selective scan, B=4, D=512 channels (a model of width 256 with expand 2), N=16,
  L=2048, HF Mamba initialisation of A and dt: strata's sequential ``ref``, the
  sequential PyTorch scan that transformers' ``MambaMixer`` falls back to without
  mamba-ssm (``mamba_selective_scan``), strata's chunked ``torch`` form, on CPU the
  compiled C kernel ``cpu`` (where a C compiler builds it); on CUDA also
  strata's ``triton`` form and mamba-ssm's CUDA kernel (when installed);
- the whole Mamba mixer, B=4, L=2048, width 256, state 16: transformers' ``MambaMixer``
  (its CPU path) against strata's ``MambaMixer`` with the same weights;
- causal conv1d, B=4, D=512, L=2048, W=4: ``ref``, ``torch``; on CUDA ``triton`` and
  the causal-conv1d package;
- retention, B=2, H=4, L=2048, Dk=Dv=64, per-head and per-token log-decay: the
  recurrent ``ref``, the O(L^2) ``parallel`` form, ``chunked``; on CUDA ``triton`` and
  fla's ``chunk_simple_gla`` (a reference Triton implementation) when installed.

Every row reports wall and process-CPU milliseconds and its speed-up over the first
row of its group; on CUDA also the achieved memory bandwidth of the forward pass (the
bytes it must read and write at least, over its time) against the device's peak.
``--json`` writes everything, with the machine, load average and the share of the CPU
that other processes used meanwhile (the figures are only comparable on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from strata.kernels.kernels_conv1d import causal_conv1d
from strata.kernels.kernels_dispatch import compiled_cpu_scan_available
from strata.kernels.kernels_dispatch import gpu_form
from strata.kernels.kernels_dispatch import mamba_ssm_installed
from strata.kernels.kernels_dispatch import triton_installed
from strata.kernels.kernels_retention import retention
from strata.kernels.kernels_selective_scan import selective_scan

# Peak DRAM bandwidth (GB/s) of common GPUs, by a substring of the device name.
PEAK_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008,
            "RTX 3090": 936, "V100": 900, "T4": 320}


# ----------------------------------------------------------------------------- machine


def _cpu_counters():
    """(total, idle) jiffies of the machine and this process's own (utime + stime)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(values), values[3] + values[4], int(fields[11]) + int(fields[12])
    except OSError:  # not Linux
        return None


def _foreign_share(before, after) -> float | None:
    """Share of the machine's CPU time that other processes used between two _cpu_counters()."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    total = after[0] - before[0]
    busy = total - (after[1] - before[1])
    return max(0.0, (busy - (after[2] - before[2])) / total)


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), gpu_peak_gbs=peak_bandwidth(device))
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def peak_bandwidth(device: torch.device) -> float | None:
    """Device peak DRAM bandwidth in GB/s: from the memory clock and bus width if torch reports them, else a table."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for key, gbs in PEAK_GBS.items():
        if key in props.name:
            return float(gbs)
    return None


# ----------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, inputs: dict, repeats: int, device: torch.device, warmup: bool = True) -> dict:
    """Median forward / backward wall and CPU milliseconds of fn(**inputs).

    With ``warmup`` one untimed call comes first (allocator, Triton compilation); the
    sequential forms, whose single call takes seconds, are timed without one.
    """
    rows = {"fwd_ms": [], "bwd_ms": [], "fwd_cpu_ms": [], "bwd_cpu_ms": []}
    first = 0 if warmup else 1
    for i in range(first, repeats + 1):
        for t in inputs.values():
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(**inputs)
        out = out[0] if isinstance(out, tuple) else out
        _sync(device)
        w1, c1 = time.perf_counter(), time.process_time()
        out.float().sum().backward()
        _sync(device)
        w2, c2 = time.perf_counter(), time.process_time()
        if i == 0:
            continue  # warm-up (and Triton compilation)
        rows["fwd_ms"].append((w1 - w0) * 1e3)
        rows["bwd_ms"].append((w2 - w1) * 1e3)
        rows["fwd_cpu_ms"].append((c1 - c0) * 1e3)
        rows["bwd_cpu_ms"].append((c2 - c1) * 1e3)
    result = {k: statistics.median(v) for k, v in rows.items()}
    result["total_ms"] = result["fwd_ms"] + result["bwd_ms"]
    result["total_cpu_ms"] = result["fwd_cpu_ms"] + result["bwd_cpu_ms"]
    result["repeats"] = repeats
    return result


def run_group(title: str, forms: list, make_inputs, args, device, fwd_bytes: int | None = None) -> dict:
    """Time every (name, fn, sequential) of ``forms`` on fresh inputs; print a table; return the rows."""
    before = _cpu_counters()
    rows = []
    for name, fn, sequential in forms:
        repeats = args.slow_repeats if sequential else args.repeats
        warmup = not sequential or device.type == "cuda"
        rows.append(dict(form=name, **measure(fn, make_inputs(), repeats, device, warmup), sequential=sequential))
    share = _foreign_share(before, _cpu_counters())
    key = "total_cpu_ms" if args.clock == "cpu" else "total_ms"
    base = rows[0][key]
    peak = peak_bandwidth(device) if device.type == "cuda" else None
    print(f"\n{title}")
    header = (f"  {'form':<58}{'fwd ms':>11}{'bwd ms':>12}{'total ms':>12}{'cpu ms':>12}"
              f"{'speed-up':>10} ({args.clock})")
    print(header + ("   fwd GB/s (% peak)" if fwd_bytes and device.type == "cuda" else ""))
    for row in rows:
        row["speedup"] = base / row[key]
        line = (f"  {row['form']:<58}{row['fwd_ms']:>11.2f}{row['bwd_ms']:>12.2f}{row['total_ms']:>12.2f}"
                f"{row['total_cpu_ms']:>12.1f}{row['speedup']:>9.1f}x")
        if fwd_bytes and device.type == "cuda":
            row["fwd_gbs"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
            row["fwd_peak_share"] = row["fwd_gbs"] / peak if peak else None
            line += f"   {row['fwd_gbs']:8.1f}" + (f" ({100 * row['fwd_peak_share']:.0f}%)" if peak else "")
        print(line)
    if share is not None:
        print(f"  (other processes used {100 * share:.0f}% of the machine's CPU time meanwhile)")
    return dict(title=title, rows=rows, foreign_cpu_share=share, fwd_bytes=fwd_bytes)


def print_ratio(group: dict, fast: str, slow: str, clock: str) -> None:
    """One line: how many times faster the row starting with ``fast`` is than the one starting with ``slow``."""
    rows = {r["form"]: r for r in group["rows"]}
    a = next((r for name, r in rows.items() if name.startswith(fast)), None)
    b = next((r for name, r in rows.items() if name.startswith(slow)), None)
    if a is not None and b is not None:
        key = "total_cpu_ms" if clock == "cpu" else "total_ms"
        ratio = b[key] / a[key]
        group.setdefault("ratios", {})[f"{fast} vs {slow}"] = ratio
        print(f"  {fast} is {ratio:.1f}x faster than {slow} (fwd + bwd, {clock} time)")


# ----------------------------------------------------------------------------- inputs


def scan_inputs(b, d, n, length, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt_min, dt_max = 1e-3, 0.1  # HF MambaConfig defaults
    dt0 = torch.exp(torch.rand(d, generator=gen) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    ins = dict(
        u=torch.randn(b, d, length, generator=gen).to(dtype),
        delta=(torch.randn(b, d, length, generator=gen) * 0.1).to(dtype),
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        B=torch.randn(b, n, length, generator=gen).to(dtype),
        C=torch.randn(b, n, length, generator=gen).to(dtype),
        D=torch.ones(d),
        z=torch.randn(b, d, length, generator=gen).to(dtype),
        delta_bias=dt0 + torch.log(-torch.expm1(-dt0)),
    )
    return {k: v.to(device).requires_grad_() for k, v in ins.items()}


def retention_inputs(b, h, length, dk, dv, per_token, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ins = dict(q=torch.randn(b, h, length, dk, generator=gen).to(dtype),
               k=(torch.randn(b, h, length, dk, generator=gen) * dk**-0.5).to(dtype),
               v=torch.randn(b, h, length, dv, generator=gen).to(dtype))
    log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32)))
    if per_token:
        ins["log_decay"] = F.softplus(torch.randn(b, h, length, generator=gen)) * log_gamma[None, :, None]
    else:
        ins["log_decay"] = log_gamma
    return {k: v.to(device).requires_grad_() for k, v in ins.items()}


# ----------------------------------------------------------------------------- reference implementations


def hf_mamba_scan():
    """transformers' PyTorch selective scan (MambaMixer's path without mamba-ssm), or None."""
    try:
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    except ImportError:
        return None

    def run(u, delta, A, B, C, D, z, delta_bias):
        return mamba_selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)

    return run


def mamba_ssm_scan():
    if not mamba_ssm_installed():
        return None
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    def run(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True)

    return run


def fla_retention():
    """fla's chunked simple-GLA (a scalar log-decay per head and token: exactly strata's retention), or None."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None

    def run(q, k, v, log_decay):
        b, h, length, _ = q.shape
        g = log_decay[None, :, None].expand(b, h, length) if log_decay.dim() == 1 else log_decay
        q_, k_, v_, g_ = (t.transpose(1, 2).contiguous() for t in (q, k, v, g))  # fla: [B, T, H, ...]
        o, _ = chunk_simple_gla(q_, k_, v_, g=g_.float(), scale=1.0)
        return o.transpose(1, 2)

    return run


def mixers(width, state, device, dtype):
    """transformers' MambaMixer and strata's MambaMixer with the same weights, or None."""
    try:
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer as HFMixer
    except ImportError:
        return None
    from strata.configuration.configuration_retmamba import RetMambaConfig
    from strata.modeling.layers_mamba import MambaMixer

    torch.manual_seed(0)
    hf_config = MambaConfig(hidden_size=width, state_size=state, intermediate_size=2 * width, conv_kernel=4,
                            time_step_rank=math.ceil(width / 16), use_conv_bias=True, use_bias=False)
    hf = HFMixer(hf_config, layer_idx=0).to(device=device, dtype=dtype)
    config = RetMambaConfig.from_preset("mamba-tiny", hidden_size=width, state_size=state, num_attention_heads=4)
    ours = MambaMixer(config, layer_idx=0).to(device=device, dtype=dtype)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"strata MambaMixer cannot take transformers' weights: missing {missing}, "
                           f"unexpected {unexpected}")
    return hf, ours


# ----------------------------------------------------------------------------- main


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the fast forms (median; default 5)")
    parser.add_argument("--slow-repeats", type=int, default=1,
                        help="timed repeats of the sequential forms (median; no warm-up call on CPU; default 1)")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk length of the chunked forms (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time behind the speed-ups: wall clock, or this process's CPU time (with --threads 1 "
                             "the robust choice on a machine other processes share; default wall)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the activations on CUDA (CPU runs are fp32)")
    parser.add_argument("--sections", default="scan,mixer,conv,retention",
                        help="comma-separated subset of scan, mixer, conv, retention")
    parser.add_argument("--no-hf", action="store_true",
                        help="leave out transformers' sequential scan and mixer (minutes of CPU each at full size)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results and the machine here")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"scan", "mixer", "conv", "retention"}
    if unknown:
        raise ValueError(f"--sections: unknown {sorted(unknown)}; choose among scan, mixer, conv, retention")
    gpu = device.type == "cuda"
    use_triton = gpu and triton_installed()
    cs = args.chunk_size
    info = machine_info(device)
    info["clock"] = args.clock
    info["load_average_before"] = os.getloadavg()
    print("strata bench kernels | " + ", ".join(f"{k} {v}" for k, v in info.items()))
    groups = []
    elt = torch.empty((), dtype=dtype).element_size()

    if "scan" in sections:
        b, d, n, length = (2, 64, 16, 256) if args.quick else (4, 512, 16, 2048)
        forms = [("strata selective_scan ref (sequential)", lambda **kw: selective_scan(**kw, backend="ref"), True)]
        hf = None if args.no_hf else hf_mamba_scan()
        if hf is not None:
            forms.append(("transformers mamba_selective_scan (HF Mamba's torch path)", hf, True))
        forms.append(("strata selective_scan torch (chunked)",
                      lambda **kw: selective_scan(**kw, backend="torch", chunk_size=cs), False))
        if not gpu and compiled_cpu_scan_available():
            forms.append(("strata selective_scan cpu (compiled C)",
                          lambda **kw: selective_scan(**kw, backend="cpu", chunk_size=cs), False))
        if use_triton:
            forms.append(("strata selective_scan triton",
                          lambda **kw: selective_scan(**kw, backend="triton", chunk_size=cs), False))
        if gpu and mamba_ssm_scan() is not None:
            forms.append(("mamba-ssm selective_scan_fn (CUDA)", mamba_ssm_scan(), False))
        fwd_bytes = elt * (4 * b * d * length + 2 * b * n * length)  # read u, delta, z, B, C; write y
        groups.append(run_group(f"selective scan  B={b} D={d} N={n} L={length} {args.dtype if gpu else 'float32'}"
                                "  (fwd + bwd)", forms, lambda: scan_inputs(b, d, n, length, device, dtype),
                                args, device, fwd_bytes))
        for other in ("strata selective_scan ref", "transformers mamba_selective_scan", "mamba-ssm"):
            print_ratio(groups[-1], "strata selective_scan torch", other, args.clock)
        for other in ("strata selective_scan torch", "transformers mamba_selective_scan"):
            print_ratio(groups[-1], "strata selective_scan cpu", other, args.clock)
        print_ratio(groups[-1], "strata selective_scan triton", "mamba-ssm", args.clock)

    if "mixer" in sections and not args.no_hf:
        b, width, state, length = (2, 64, 16, 256) if args.quick else (4, 256, 16, 2048)
        pair = mixers(width, state, device, dtype)
        if pair is not None:
            hf_mixer, our_mixer = pair
            groups.append(run_group(
                f"Mamba mixer  B={b} L={length} width={width} state={state}  (fwd + bwd, same weights)",
                [("transformers MambaMixer (its path without mamba-ssm)" if not gpu else "transformers MambaMixer",
                  lambda x: hf_mixer(x), True),
                 ("strata MambaMixer (default kernels)", lambda x: our_mixer(x), False)],
                lambda: dict(x=torch.randn(b, length, width, device=device, dtype=dtype, requires_grad=True)),
                args, device))
            print_ratio(groups[-1], "strata MambaMixer", "transformers MambaMixer", args.clock)

    if "conv" in sections:
        b, d, length, w = (2, 64, 256, 4) if args.quick else (4, 512, 2048, 4)

        def conv_in():
            gen = torch.Generator().manual_seed(1)
            return dict(x=torch.randn(b, d, length, generator=gen).to(device, dtype).requires_grad_(),
                        weight=torch.randn(d, w, generator=gen).to(device).requires_grad_(),
                        bias=torch.randn(d, generator=gen).to(device).requires_grad_())

        forms = [("strata causal_conv1d ref (tap loop)",
                  lambda **kw: causal_conv1d(**kw, activation="silu", backend="ref"), False),
                 ("strata causal_conv1d torch (F.conv1d)",
                  lambda **kw: causal_conv1d(**kw, activation="silu", backend="torch"), False)]
        if use_triton:
            forms.append(("strata causal_conv1d triton",
                          lambda **kw: causal_conv1d(**kw, activation="silu", backend="triton"), False))
        if gpu and mamba_ssm_installed():
            forms.append(("causal-conv1d package (CUDA)",
                          lambda **kw: gpu_form("causal_conv1d", "mamba_ssm")(**kw, activation="silu"), False))
        groups.append(run_group(f"causal conv1d  B={b} D={d} L={length} W={w}  (fwd + bwd)", forms, conv_in,
                                args, device, elt * 2 * b * d * length))

    if "retention" in sections:
        b, h, length, dh = (1, 2, 256, 32) if args.quick else (2, 4, 2048, 64)
        for per_token in (False, True):
            forms = [("strata retention ref (recurrent)", lambda **kw: retention(**kw, backend="ref"), True),
                     ("strata retention parallel (O(L^2))", lambda **kw: retention(**kw, backend="parallel"), True),
                     ("strata retention chunked (torch)",
                      lambda **kw: retention(**kw, backend="chunked", chunk_size=cs), False)]
            if use_triton:
                forms.append(("strata retention triton",
                              lambda **kw: retention(**kw, backend="triton", chunk_size=cs), False))
            if gpu and fla_retention() is not None:
                forms.append(("fla chunk_simple_gla (Triton reference)", fla_retention(), False))
            kind = "log_decay [B, H, L]" if per_token else "log_decay [H]"
            groups.append(run_group(
                f"retention  B={b} H={h} L={length} Dk=Dv={dh}, {kind}  (fwd + bwd)", forms,
                lambda: retention_inputs(b, h, length, dh, dh, per_token, device, dtype), args, device,
                elt * 4 * b * h * length * dh))
            print_ratio(groups[-1], "strata retention chunked", "strata retention ref", args.clock)
            print_ratio(groups[-1], "strata retention triton", "fla", args.clock)

    info["load_average_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(command=f"strata bench kernels {' '.join(argv or [])}".strip(), machine=info,
                           groups=groups), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
