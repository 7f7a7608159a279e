"""`make demo`: train a small RetMamba on tiny Shakespeare for about two minutes on CPU,
save a Hub-ready folder, reload it the way a Hub user would, and stream a sample.

    python -m strata.training.demo                      # ~2 minutes of training
    STRATA_DEMO_SECONDS=30 python -m strata.training.demo
    python -m strata.training.demo --seconds 600 --output-dir outputs/longer

Steps: train a character tokenizer on the training text (65 characters + 256 bytes +
4 specials), train a 4-block RetMamba fusion model (RetNet retention + Mamba scan in
every block) with the Hugging Face Trainer until the time budget is spent, measure
validation bits per character on the last 10% of the text, write the folder
(weights, flat code, tokenizer, generation config, model card), reload it with
``trust_remote_code=True`` and generate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_SECONDS = 120.0
DEFAULT_OUTPUT = os.path.join("outputs", "demo-retmamba")
# fusion-small with a narrower, shallower body: learns visibly in two minutes on 2 CPU cores.
DEMO_PRESET = "fusion-small"
DEMO_CONFIG = dict(hidden_size=128, num_hidden_layers=4, layer_pattern="F", num_attention_heads=4,
                   intermediate_size=384, expand=1, state_size=8, chunk_size=32)
DEMO_TRAINING = dict(seq_len=128, batch_size=16, lr=3e-3, warmup_steps=20, logging_steps=5)


def _seconds_from_env() -> float:
    raw = os.environ.get("STRATA_DEMO_SECONDS")
    if raw is None:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"strata demo: STRATA_DEMO_SECONDS must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise SystemExit(f"strata demo: STRATA_DEMO_SECONDS must be > 0, got {raw!r}")
    return value


def idle_cores(interval: float = 0.5) -> float | None:
    """How many CPU cores were idle over the last ``interval`` seconds (Linux /proc/stat), or None."""
    def snapshot():
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return values[3] + values[4], sum(values)

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return os.cpu_count() * (idle1 - idle0) / max(1, total1 - total0)


def choose_threads(requested: int | None, available: int) -> tuple[int, str]:
    """Torch threads for the demo and why: on a busy machine, threads that wait for each other while
    another process holds their core make every step many times slower, so use only idle cores."""
    if requested is not None:
        return requested, "as requested"
    idle = idle_cores()
    if idle is None:
        return available, "all cores"
    threads = max(1, min(available, int(idle + 0.3)))
    return threads, f"{idle:.1f} of {os.cpu_count()} cores idle"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m strata.training.demo",
        description="Train a small RetMamba (RetNet x Mamba fusion) on tiny Shakespeare on CPU, save a "
                    "Hub-ready folder, reload it with trust_remote_code=True and stream a sample.",
        epilog="The time budget also comes from the environment: STRATA_DEMO_SECONDS=30 make demo",
    )
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"training time budget in seconds (default: $STRATA_DEMO_SECONDS or {DEFAULT_SECONDS:.0f})")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"where the folder goes (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--prompt", default="ROMEO:", help="start of the generated sample (default: ROMEO:)")
    parser.add_argument("--max-new-tokens", type=int, default=300, help="characters to generate (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of training and sampling (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the cores that are idle when the demo starts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seconds = args.seconds if args.seconds is not None else _seconds_from_env()
    if seconds <= 0:
        raise SystemExit(f"strata demo: --seconds must be > 0, got {seconds}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"strata demo: --threads must be >= 1, got {args.threads}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    from strata.training.train import train_model

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    threads, why = choose_threads(args.threads, torch.get_num_threads())
    torch.set_num_threads(threads)
    print(f"strata demo: training a RetMamba fusion model on tiny Shakespeare for {seconds:.0f} s "
          f"on {threads} CPU thread{'s' if threads > 1 else ''} ({why})", flush=True)
    start = time.monotonic()
    result = train_model(
        arch="retmamba", preset=DEMO_PRESET, config_overrides=DEMO_CONFIG, corpus="tinyshakespeare",
        output_dir=args.output_dir, max_steps=1_000_000, time_budget_s=seconds, seed=args.seed,
        use_cpu=True, **DEMO_TRAINING,
    )
    m = result.metrics
    print(f"\ntrained {m['train_steps']} steps in {m['train_runtime_s']:.0f} s "
          f"({m['parameters']:,} parameters, {m['train_tokens']:,} tokens); "
          f"final training loss {m['train_loss']:.3f} nats", flush=True)

    folder = str(result.folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    print(f"reloaded {folder} with trust_remote_code=True ({type(model).__name__} from "
          f"{type(model).__module__.rsplit('.', 1)[-1]}.py of the folder)\n", flush=True)
    print("-" * 72)
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer))
    print("-" * 72)
    print(f"validation: {m['eval_loss']:.3f} nats per character = {m['eval_bpc']:.3f} bits per character "
          f"(last 10% of tiny Shakespeare)")
    print(f"total time {time.monotonic() - start:.0f} s; folder {folder}/ holds weights, code, tokenizer and README.md")
    print(f"next: strata generate {folder} --prompt 'JULIET:'   |   strata push {folder} --repo-id YOU/demo-retmamba")
    return 0


if __name__ == "__main__":
    sys.exit(main())
