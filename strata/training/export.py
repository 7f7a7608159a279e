"""Hub-ready folders: write one, re-export a Trainer checkpoint as one, upload one.

A Hub-ready folder holds exactly what a user of the model needs:

    config.json               with `auto_map` -> the flat code below
    generation_config.json    sampling defaults
    model.safetensors         the weights (safetensors only, never pickle)
    configuration_*.py, modeling_*.py, ...   the flat code bundle (trust_remote_code=True)
    tokenizer_config.json, vocab files, tokenization_*.py
    README.md                 the model card (strata.hub_cards)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

# Trainer state and anything a checkpoint holds besides the model never goes to the Hub.
UPLOAD_IGNORE = ["checkpoints/*", "checkpoint-*/*", "runs/*", "*.pt", "*.pth", "*.bin", "trainer_state.json",
                 "strata_run.json", ".ipynb_checkpoints/*"]

SAMPLING_DEFAULTS = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=256)


def default_generation_config(config, tokenizer=None) -> GenerationConfig:
    """Sampling defaults (temperature 0.8, top-k 50, top-p 0.95, 256 new tokens) with the model's special ids."""
    ids = {name: getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if tokenizer is not None:
        ids = {name: getattr(tokenizer, name, None) if getattr(tokenizer, name, None) is not None else value
               for name, value in ids.items()}
    return GenerationConfig(**SAMPLING_DEFAULTS, **ids)


def write_hub_folder(model, tokenizer, folder: str | os.PathLike, metrics: dict[str, float] | None = None,
                     corpus=None, training: dict[str, Any] | None = None, model_id: str | None = None,
                     generation_config: GenerationConfig | None = None, license: str = "apache-2.0",
                     base_model: str | None = None) -> Path:
    """Write weights + flat code (``model.save_pretrained``), tokenizer, generation config and card.

    ``corpus`` is a ``strata.training.data.Corpus`` (or None): its Hub dataset id goes into the
    card's metadata and evaluation results. Keeps ``model.generation_config`` when it samples.
    """
    from strata.hub_cards import render_model_card

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if generation_config is None:
        current = getattr(model, "generation_config", None)
        generation_config = current if current is not None and current.do_sample else \
            default_generation_config(model.config, tokenizer)
    model.generation_config = generation_config
    model.config.use_cache = True  # the Trainer turns it off while training; a published model decodes with it
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    datasets, eval_dataset, extra = None, None, {}
    if corpus is not None:
        datasets = [corpus.hub_dataset] if corpus.hub_dataset else None
        eval_dataset = {"type": corpus.hub_dataset or corpus.name, "name": corpus.title, "split": "validation"}
        extra = dict(language=corpus.language, example_prompt=corpus.example_prompt)
    card = render_model_card(
        model, tokenizer, metrics=metrics, datasets=datasets, license=license, base_model=base_model,
        eval_dataset=eval_dataset, training=training, model_id=model_id or str(folder), **extra,
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- export of a checkpoint
def _metrics_from_trainer_state(state: dict) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for entry in state.get("log_history", []):
        if "loss" in entry:
            metrics["train_loss"] = float(entry["loss"])
        for key in ("eval_loss", "eval_bpc", "eval_perplexity"):
            if key in entry:
                metrics[key] = float(entry[key])
    if "global_step" in state:
        metrics["train_steps"] = int(state["global_step"])
    return metrics


def export_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None,
                      corpus: str | None = None, evaluate: bool = False, eval_max_blocks: int | None = None,
                      overwrite: bool = False, model_id: str | None = None) -> Path:
    """Re-save a Trainer checkpoint (or any strata model folder) as a clean Hub-ready folder.

    Reads only ``config.json``, safetensors weights, the tokenizer files, and (if present)
    ``trainer_state.json`` / ``strata_run.json`` for the card's numbers; optimizer, scheduler
    and RNG state and ``training_args.bin`` are left behind. ``tokenizer`` (a folder or
    object) is needed when the checkpoint has no tokenizer files. ``evaluate=True`` measures
    validation loss and bits per character on ``corpus`` (default: the run's corpus).
    """
    import strata  # noqa: F401  (registers the architectures with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata.training.data import resolve_corpus

    source, out = Path(source), Path(out_dir)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} is not a model folder or Trainer checkpoint: it has no config.json")
    if not any(source.glob("*.safetensors")):
        raise ValueError(f"{source} has no safetensors weights (model.safetensors); strata reads safetensors only")
    if out.resolve() == source.resolve():
        raise ValueError("the export folder must differ from the checkpoint folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty; choose a new folder or pass overwrite=True (--overwrite)")
        if not (out / "config.json").is_file():
            raise ValueError(f"refusing to overwrite {out}: it does not look like a model folder (no config.json)")
        shutil.rmtree(out)

    run_info = {}
    if (source / "strata_run.json").is_file():
        run_info = json.loads((source / "strata_run.json").read_text(encoding="utf-8"))
    metrics = {}
    if (source / "trainer_state.json").is_file():
        metrics = _metrics_from_trainer_state(json.loads((source / "trainer_state.json").read_text(encoding="utf-8")))

    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, use_safetensors=True)
    model.eval()
    if tokenizer is None:
        if not (source / "tokenizer_config.json").is_file():
            raise ValueError(f"{source} has no tokenizer files; pass the tokenizer folder (--tokenizer)")
        tokenizer = source
    if not hasattr(tokenizer, "save_pretrained"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)

    corpus = corpus or run_info.get("corpus")
    info = resolve_corpus(corpus)[1] if corpus else None
    if evaluate:
        if corpus is None:
            raise ValueError("evaluate=True needs a corpus (--corpus): the checkpoint does not name one")
        from strata.training.train import evaluate_lm

        metrics.update(evaluate_lm(model, tokenizer, corpus, seq_len=run_info.get("seq_len", 128),
                                   max_blocks=eval_max_blocks))
    metrics["parameters"] = int(sum(p.numel() for p in model.parameters()))
    training = dict(run_info) if run_info else None
    return write_hub_folder(model, tokenizer, out, metrics=metrics, corpus=info, training=training,
                            model_id=model_id)


# ----------------------------------------------------------------------------- upload
def _fail(message: str):
    raise SystemExit(f"strata: {message}")


def check_push_possible(repo_id: str) -> None:
    """Fail fast (one line, SystemExit) on a malformed repo id or when the Hub is unreachable by setting."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        _fail(f"invalid Hub repo id {repo_id!r}: {str(e).splitlines()[0]}")
    if constants.is_offline_mode():
        _fail(f"cannot push to https://huggingface.co/{repo_id}: offline mode is on (HF_HUB_OFFLINE=1); "
              "unset it on a machine with network access")


def _is_network_error(error: BaseException) -> bool:
    if isinstance(error, OSError):  # includes ConnectionError and huggingface_hub's OfflineModeIsEnabled
        return True
    return any(cls.__module__.split(".")[0].startswith("httpx") or cls.__module__.startswith("requests")
               for cls in type(error).__mro__ if cls.__name__ in ("HTTPError", "TransportError", "RequestError",
                                                                   "ConnectionError"))


def push_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload the Hub-ready ``folder``; return the commit URL.

    Offline, unreachable, unauthenticated or refused: ``SystemExit`` with one line saying why
    (the folder stays complete on disk and can be pushed later with ``strata push``).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    folder = Path(folder)
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if not folder.is_dir() or missing or not any(folder.glob("*.safetensors")):
        what = "it does not exist" if not folder.is_dir() else f"missing {missing or ['*.safetensors']}"
        _fail(f"{folder} is not a Hub-ready model folder ({what}); create one with `strata train` or `strata export`")
    check_push_possible(repo_id)
    later = f"the folder {folder} is complete: push it later with `strata push {folder} --repo-id {repo_id}`"
    try:
        from strata.hub_cards import set_card_model_id

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        readme = folder / "README.md"  # the card's code examples now name the repo
        card = readme.read_text(encoding="utf-8")
        updated = set_card_model_id(card, repo_id)
        if updated != card:
            readme.write_text(updated, encoding="utf-8")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=UPLOAD_IGNORE,
                                   commit_message=commit_message or "Upload strata model")
    except OfflineModeIsEnabled:
        _fail(f"cannot push to https://huggingface.co/{repo_id}: offline mode is on (HF_HUB_OFFLINE=1); {later}")
    except LocalTokenNotFoundError:
        _fail(f"cannot push to {repo_id}: not logged in (run `hf auth login` or set HF_TOKEN); {later}")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        reason = {401: "the token is invalid", 403: "the token may not write to this repo"}.get(status, "")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        _fail(f"the Hub refused the upload to {repo_id} ({reason or first}); {later}")
    except Exception as e:
        if not _is_network_error(e):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        _fail(f"cannot reach the Hugging Face Hub to push {repo_id} ({type(e).__name__}: {first}); {later}")
    return str(getattr(commit, "commit_url", commit))
