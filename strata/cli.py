"""The `strata` command: train, generate, export and push models.

    strata train --preset fusion-tiny --max-steps 200 --output-dir outputs/my-model
    strata generate outputs/my-model --prompt "ROMEO:"
    strata export outputs/my-model/checkpoints/checkpoint-200 outputs/clean
    strata push outputs/my-model --repo-id you/my-model

Heavy libraries are imported inside the commands, so `strata --help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

_EPILOG_MAIN = """\
examples:
  strata train --preset fusion-tiny --max-steps 200 --output-dir outputs/tiny
  strata generate outputs/tiny --prompt "ROMEO:" --max-new-tokens 200
  strata export outputs/tiny/checkpoints/checkpoint-200 outputs/tiny-clean
  strata push outputs/tiny --repo-id your-name/retmamba-tiny
  strata convert --from hf-llama path/to/llama-checkpoint outputs/retmamba-llama

Run `strata COMMAND --help` for the options of a command.
"""

_EPILOG_TRAIN = """\
examples:
  # two minutes of a small fusion model on tiny Shakespeare (what `make demo` does)
  strata train --preset fusion-small --set hidden_size=128 --set num_hidden_layers=4 \\
      --set layer_pattern=F --time-budget 120 --output-dir outputs/shakespeare
  # the Mamba baseline, 500 steps, Tang poems, the packaged tokenizer
  strata train --preset mamba-small --corpus tang_poems --tokenizer default --max-steps 500
  # your own text file, then upload (needs network and `hf auth login`)
  strata train --corpus my_text.txt --max-steps 2000 --push_to_hub --hub_model_id you/my-model

The output folder is Hub-ready: config.json, model.safetensors, the flat .py files,
tokenizer files, generation_config.json and a README.md model card. Trainer checkpoints
(--save-steps) go to OUTPUT_DIR/checkpoints and are never uploaded.
"""

_EPILOG_GENERATE = """\
examples:
  strata generate outputs/shakespeare --prompt "ROMEO:"
  strata generate outputs/shakespeare --prompt "JULIET:" --max-new-tokens 400 --temperature 0.6 --top-k 20
  strata generate outputs/shakespeare --prompt "To be" --greedy

Sampling settings default to the folder's generation_config.json.
"""

_EPILOG_EXPORT = """\
examples:
  strata export outputs/run/checkpoints/checkpoint-1000 outputs/run-1000
  strata export outputs/run/checkpoints/checkpoint-1000 outputs/run-1000 --evaluate --corpus tinyshakespeare

Copies only what a user needs (config.json, generation_config.json, model.safetensors,
the flat .py files, tokenizer files) and writes a README.md model card; optimizer,
scheduler and RNG state are left behind. Weights are read from safetensors only.
"""

_EPILOG_PUSH = """\
examples:
  strata push outputs/shakespeare --repo-id your-name/retmamba-shakespeare
  strata push outputs/shakespeare --repo-id your-org/retmamba --private

Needs network access and a token with write access (`hf auth login`, or HF_TOKEN, or --token).
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _config_value(text: str):
    """`--set key=value`: the value is parsed as YAML (numbers, true/false, strings)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden_size=128), got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{key!r} is not a config field name")
    return key, yaml.safe_load(raw) if raw.strip() else raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Train, run and publish strata language models (new architectures for Hugging Face "
                    "Transformers).",
        epilog=_EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the strata version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # ---------------------------------------------------------------- train
    train = sub.add_parser(
        "train", help="train a model on a corpus and save a Hub-ready folder",
        description="Train a strata model with the Hugging Face Trainer on a bundled corpus or a text file, "
                    "evaluate it (validation loss and bits per character on the last 10%% of the text) and "
                    "save a folder that loads with AutoModelForCausalLM.from_pretrained(folder, "
                    "trust_remote_code=True).",
        epilog=_EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--arch", default="retmamba", help="architecture (model_type), e.g. retmamba (default)")
    train.add_argument("--preset", default="fusion-small",
                       help="named size/variant of the architecture, e.g. fusion-tiny, fusion-small (default), "
                            "mamba-small, retnet-small, transformer-small")
    train.add_argument("--set", dest="config_overrides", action="append", type=_config_value, default=[],
                       metavar="KEY=VALUE", help="change one config field of the preset, e.g. --set hidden_size=128 "
                                                 "(repeatable)")
    train.add_argument("--corpus", default="tinyshakespeare",
                       help="bundled corpus (tinyshakespeare, tang_poems, lunyu) or a path to a UTF-8 .txt file")
    train.add_argument("--tokenizer", default="corpus",
                       help="'corpus': train a character tokenizer on the training text (default); 'default': "
                            "strata's packaged tokenizer; or a tokenizer folder")
    train.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                       help="folder to write (default: outputs/ARCH-PRESET)")
    train.add_argument("--max-steps", "--max_steps", dest="max_steps", type=_positive_int, default=1000,
                       help="optimizer steps (default: 1000)")
    train.add_argument("--time-budget", "--time_budget", dest="time_budget", type=_non_negative_float, default=None,
                       metavar="SECONDS", help="stop after this many seconds of training even before --max-steps")
    train.add_argument("--seq-len", dest="seq_len", type=_positive_int, default=128,
                       help="tokens per training sequence (default: 128)")
    train.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=16,
                       help="sequences per step (default: 16)")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    train.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=50,
                       help="linear warmup steps (default: 50)")
    train.add_argument("--save-steps", dest="save_steps", type=_positive_int, default=None,
                       help="write a Trainer checkpoint every N steps to OUTPUT_DIR/checkpoints")
    train.add_argument("--eval-max-blocks", dest="eval_max_blocks", type=_positive_int, default=None,
                       help="evaluate on at most N validation sequences (default: all)")
    train.add_argument("--streaming", action="store_true", help="stream the corpus instead of loading it (datasets)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    train.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", action="store_true",
                       help="upload the folder to the Hugging Face Hub when done")
    train.add_argument("--hub-model-id", "--hub_model_id", dest="hub_model_id", default=None,
                       help="Hub repo id, e.g. your-name/my-model (default: the output folder's name)")
    train.add_argument("--private", action="store_true", default=None, help="create the Hub repo as private")
    train.add_argument("--stage", type=int, choices=(1, 2, 3), default=None,
                       help="--arch hmtr only: curriculum stage (1 autoencoder, 2 latent prediction, 3 joint "
                            "fine-tune); see `python -m strata.training.hmtr_train --help`")
    train.add_argument("--init-from", "--init_from", dest="init_from", default=None,
                       help="with --stage 2 or 3: the previous stage's output folder")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR/checkpoints (any number of processes, "
                            "same global batch)")
    train.set_defaults(func=_cmd_train)

    # ---------------------------------------------------------------- generate
    gen = sub.add_parser(
        "generate", help="stream text from a saved model folder",
        description="Load a model folder (from `strata train`, `strata export` or the Hub cache) and stream a "
                    "continuation of a prompt to the terminal.",
        epilog=_EPILOG_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("folder", help="model folder (config.json, model.safetensors, tokenizer files)")
    gen.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    gen.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=_positive_int,
                     default=200, help="tokens to generate (default: 200)")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0)")
    gen.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None, help="sample among the k likeliest")
    gen.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None,
                     help="sample from the smallest set whose probability reaches p")
    gen.add_argument("--greedy", action="store_true", help="always pick the likeliest token (no sampling)")
    gen.add_argument("--seed", type=int, default=None, help="random seed of sampling")
    gen.add_argument("--trust-remote-code", action="store_true",
                     help="run the folder's own .py files instead of the installed strata")
    gen.set_defaults(func=_cmd_generate)

    # ---------------------------------------------------------------- export
    exp = sub.add_parser(
        "export", help="turn a Trainer checkpoint into a clean Hub-ready folder",
        description="Re-save a Trainer checkpoint (or any strata model folder) as a Hub-ready folder: weights, "
                    "config, flat code, tokenizer, generation config and a model card.",
        epilog=_EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exp.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="Trainer checkpoint or model folder")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must be new or empty)")
    exp.add_argument("--tokenizer", default=None, help="tokenizer folder, if the checkpoint has none")
    exp.add_argument("--corpus", default=None, help="corpus the model was trained on (for the model card)")
    exp.add_argument("--evaluate", action="store_true",
                     help="measure validation loss and bits per character on the corpus for the card")
    exp.add_argument("--eval-max-blocks", dest="eval_max_blocks", type=_positive_int, default=None,
                     help="evaluate on at most N validation sequences")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds a model folder")
    exp.set_defaults(func=_cmd_export)

    # ---------------------------------------------------------------- push
    push = sub.add_parser(
        "push", help="upload a Hub-ready folder to the Hugging Face Hub",
        description="Create the Hub repo if needed and upload the folder (Trainer checkpoints excluded).",
        epilog=_EPILOG_PUSH, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("folder", help="Hub-ready folder (from `strata train` or `strata export`)")
    push.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one or HF_TOKEN)")
    push.add_argument("--message", default=None, help="commit message")
    push.set_defaults(func=_cmd_push)

    # ---------------------------------------------------------------- convert
    conv = sub.add_parser(
        "convert", help="convert a Transformers or THL-reference checkpoint into a Hub-ready strata folder",
        description="hf-mamba: MambaForCausalLM -> RetMamba (mamba); hf-llama: LlamaForCausalLM -> RetMamba "
                    "(transformer); both with identical logits. thl-reference: the THL reference "
                    "implementation's config.json + model.safetensors -> strata THL (never exact: needs "
                    "--partial; docs/conversion.md). Weights are read from safetensors only.",
        epilog="examples:\n  strata convert --from hf-llama path/to/llama out/retmamba-llama\n"
               "  strata convert --from thl-reference --partial path/to/thl-ckpt out/thl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("--from", dest="source_format", required=True, choices=("hf-mamba", "hf-llama", "thl-reference"),
                      help="format of SRC")
    conv.add_argument("src", metavar="SRC", help="checkpoint folder (config.json + *.safetensors)")
    conv.add_argument("dst", metavar="DST", help="folder to write (must be new or empty)")
    conv.add_argument("--partial", action="store_true",
                      help="thl-reference only: copy what maps exactly, keep strata's initialisation for the rest")
    conv.set_defaults(func=_cmd_convert)

    # ---------------------------------------------------------------- bench
    bench = sub.add_parser(
        "bench", help="benchmarks: `strata bench kernels` times the sequence kernels (ref / torch / triton)",
        description="`strata bench kernels [OPTIONS]` times every form of the selective scan, causal conv1d and "
                    "retention kernels side by side, with transformers' Mamba and (on a GPU) mamba-ssm and fla "
                    "as references. `strata bench kernels --help` lists its options.",
    )
    bench.add_argument("target", choices=("kernels",), help="what to benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...", help="options of the benchmark")
    bench.set_defaults(func=_cmd_bench)

    # ---------------------------------------------------------------- experiment
    expt = sub.add_parser(
        "experiment", help="run a declared grid (architectures x presets x tasks x seeds) and write a report",
        description="Train and score every model of an experiment file on every task and seed (language "
                    "modelling, MQAR, selective copying, induction heads, ListOps), measure efficiency, and "
                    "write results.jsonl, report.md and figures. Finished runs are not re-run "
                    "(docs/experiments.md).",
        epilog="examples:\n  strata experiment experiments/seed003_fusion.yaml\n"
               "  strata experiment experiments/all_architectures.yaml --quick\n"
               "  strata experiment experiments/seed003_fusion.yaml --output-dir docs/results/seed003_fusion\n"
               "  strata experiment experiments/seed003_fusion.yaml --report-only",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    expt.add_argument("config", metavar="CONFIG.yaml", help="experiment file (see experiments/ and docs/experiments.md)")
    expt.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                      help="report folder (default: outputs/experiments/NAME, NAME-quick with --quick)")
    expt.add_argument("--quick", action="store_true",
                      help="smoke-test size: the file's `quick:` section (or short defaults), one seed")
    expt.add_argument("--report-only", dest="report_only", action="store_true",
                      help="rebuild report.md and the figures from results.jsonl without running anything")
    expt.add_argument("--dry-run", dest="dry_run", action="store_true", help="validate the file, list the runs, stop")
    expt.add_argument("--rerun", action="append", default=[], metavar="NAME",
                      help="run the cells of this model or task again even if finished (repeatable)")
    expt.add_argument("--threads", type=_positive_int, default=None,
                      help="torch CPU threads (default: the file's `threads`, else 1)")
    expt.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    expt.set_defaults(func=_cmd_experiment)
    return parser


# ----------------------------------------------------------------------------- commands
def _cmd_train(args) -> int:
    from strata.training.train import train_model

    if args.stage is not None or args.arch == "hmtr":  # H-M-T-R trains in stages (strata.training.hmtr_train)
        from strata.training.hmtr_train import run_from_args

        if args.arch != "hmtr":
            raise ValueError(f"--stage applies to --arch hmtr only, got --arch {args.arch}")
        args.stage = args.stage or 1
        args.output_dir = args.output_dir or os.path.join("outputs", f"hmtr-stage{args.stage}")
        args.preset = "small" if args.preset == "fusion-small" else args.preset  # the retmamba default
        args.lr = None if args.lr == 3e-3 else args.lr  # default: the stage's learning rate
        args.eval_max_windows = args.eval_max_blocks
        run_from_args(args)
        return 0
    output_dir = args.output_dir or os.path.join("outputs", f"{args.arch}-{args.preset}")
    result = train_model(
        arch=args.arch, preset=args.preset, corpus=args.corpus, output_dir=output_dir, max_steps=args.max_steps,
        time_budget_s=args.time_budget, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, tokenizer=args.tokenizer, config_overrides=dict(args.config_overrides),
        streaming=args.streaming, eval_max_blocks=args.eval_max_blocks, save_steps=args.save_steps,
        seed=args.seed, progress=args.progress, use_cpu=args.cpu, push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id, hub_private=args.private,
        resume_from_checkpoint=True if args.resume else None,
    )
    m = result.metrics
    print(f"trained {m['train_steps']} steps in {m['train_runtime_s']:.0f} s; final training loss "
          f"{m['train_loss']:.4f}; validation loss {m['eval_loss']:.4f} nats/token, "
          f"{m['eval_bpc']:.4f} bits/character")
    print(f"saved {result.folder}")
    return 0


def _cmd_generate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not args.trust_remote_code:
        import strata  # noqa: F401  (registers the architectures and the tokenizer)
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        raise SystemExit(f"strata generate: {args.folder} is not a model folder (no config.json)")
    if args.temperature is not None and args.temperature <= 0:
        raise SystemExit(f"strata generate: --temperature must be > 0, got {args.temperature} (use --greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SystemExit(f"strata generate: --top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise SystemExit(f"strata generate: --top-k must be >= 1, got {args.top_k}")
    trust = bool(args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=trust).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.folder, trust_remote_code=trust)
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs["do_sample"] = True
        for name in ("temperature", "top_k", "top_p"):
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, streamer=TextStreamer(tokenizer), **kwargs)
    return 0


def _cmd_export(args) -> int:
    from strata.training.export import export_checkpoint

    folder = export_checkpoint(args.checkpoint, args.out_dir, tokenizer=args.tokenizer, corpus=args.corpus,
                               evaluate=args.evaluate, eval_max_blocks=args.eval_max_blocks,
                               overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))
    return 0


def _cmd_push(args) -> int:
    from strata.training.export import push_folder

    url = push_folder(args.folder, args.repo_id, token=args.token, private=args.private, commit_message=args.message)
    print(f"pushed {args.folder} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


def _cmd_convert(args) -> int:
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from strata.training.export import write_hub_folder

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} is not empty")
    tokenizer, reasons = None, []
    if args.source_format == "thl-reference":
        from strata.conversion.convert_thl import convert_reference_checkpoint

        model, reasons = convert_reference_checkpoint(args.src, partial=args.partial)
    else:
        if args.partial:
            raise ValueError("--partial applies to --from thl-reference only")
        from strata.conversion.convert_hf import convert_checkpoint

        with tempfile.TemporaryDirectory() as scratch:
            model = convert_checkpoint(args.source_format, args.src, scratch)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.src)
        except (OSError, ValueError):
            tokenizer = None  # a checkpoint without tokenizer files: the card says so
    write_hub_folder(model, tokenizer, dst, base_model=None)
    for reason in reasons:
        print(f"not exact: {reason}")
    print(f"converted {args.src} ({args.source_format}) -> {dst}: " + ", ".join(sorted(p.name for p in dst.iterdir())))
    return 0


def _cmd_experiment(args) -> int:
    import shlex

    from strata.experiment import load_config, run_experiment
    from strata.experiment.report import write_report

    config = load_config(args.config, quick=args.quick)
    if args.threads is not None:
        config.threads = args.threads
    output_dir = args.output_dir or os.path.join("outputs", "experiments", config.name)
    if args.dry_run:
        for run in config.runs():
            print(f"{run.run_id}  {run.label}")
        print(f"{len(config.runs())} runs; report folder {output_dir}")
        return 0
    if args.report_only:
        print(f"wrote {write_report(config, output_dir)}")
        return 0
    command = " ".join(["strata experiment", shlex.quote(args.config)] + (["--quick"] if args.quick else [])
                       + (["--output-dir", shlex.quote(args.output_dir)] if args.output_dir else [])
                       + (["--threads", str(args.threads)] if args.threads is not None else [])
                       + [f"--rerun {shlex.quote(name)}" for name in args.rerun])
    result = run_experiment(config, output_dir, progress=args.progress, command=command, rerun=set(args.rerun))
    print(f"ran {result['ran']} run(s), reused {result['reused']}; {result['errors']} failed, "
          f"{result['skipped']} skipped; report: {result['report']}")
    return 1 if result["errors"] else 0


def _cmd_bench(args) -> int:
    from strata.kernels.bench_kernels import main as bench_kernels

    return bench_kernels(args.bench_args, prog=f"strata bench {args.target}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `strata` console script; ``argv`` defaults to ``sys.argv[1:]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"strata {version('strata')}")
        except PackageNotFoundError:
            print("strata (not installed as a package)")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        # Bad input (unknown preset, corpus, folder ...): one line, no traceback (STRATA_DEBUG=1 shows it).
        if os.environ.get("STRATA_DEBUG"):
            raise
        raise SystemExit(f"strata {args.command}: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
