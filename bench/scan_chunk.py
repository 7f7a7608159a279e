"""Training tokens/s of the ``mamba`` preset against the chunk length of its selective scan.

    .venv/bin/python bench/scan_chunk.py [--chunks 64,32,16,8] [--json PATH] [--threads 1 --clock cpu]

``config.scan_chunk_size`` (default 16; before, the scan used ``config.chunk_size``, 64) is
the chunk length of the chunked selective scan. The chunked scan materialises [batch, inner, state, chunk]
tensors (4 x 512 x 16 x 64 fp32 = 8 MB at the benchmark shape, 4x the 2 MB L2 of this
CPU), so shorter chunks may run faster. Models are timed round-robin with the
``transformer`` preset as reference (see bench/harness.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402
import models  # noqa: E402
import strata  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", default="64,32,16,8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (with --threads 1), robust to other processes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1")
    torch.set_num_threads(args.threads)
    harness.set_clock(args.clock)

    named = {"transformer": models.build("transformer")}
    for chunk in (int(c) for c in args.chunks.split(",")):
        torch.manual_seed(0)
        named[f"mamba, scan_chunk_size={chunk}"] = strata.RetMambaForCausalLM(
            models.strata_config("mamba", scan_chunk_size=chunk))
    load_start = harness.load_average()
    results = harness.train_round_robin(named, args.batch, args.seq, args.steps, warmup=2)
    print(f"training, batch {args.batch} x seq {args.seq}, {args.threads} threads, {args.clock} clock, load {load_start} -> "
          f"{harness.load_average()}")
    print("| model | tokens/s | step ms | x transformer |")
    print("| --- | ---: | ---: | ---: |")
    ref = results["transformer"]["tokens_per_s"]
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s'] / ref:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"load_start": load_start, "load_end": harness.load_average(),
                                         "args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
