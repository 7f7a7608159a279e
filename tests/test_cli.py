"""The `strata` command: help texts, train -> generate, export of a Trainer checkpoint, push, bad input."""

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from strata.cli import main
from strata.conversion.code_bundle import collect_bundle

TINY_TRAIN = ["train", "--max-steps", "4", "--seq-len", "32", "--batch-size", "4",
              "--warmup-steps", "1", "--eval-max-blocks", "2", "--cpu", "--no-progress"]


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as excinfo:
        main(argv + ["--help"])
    assert excinfo.value.code == 0
    return capsys.readouterr().out


def test_help_texts_explain_each_command_with_examples(capsys):
    top = _help([], capsys)
    for command in ("train", "generate", "export", "push"):
        assert command in top
    assert "examples:" in top

    train = _help(["train"], capsys)
    for option in ("--arch", "--preset", "--corpus", "--max-steps", "--time-budget", "--output-dir",
                   "--push_to_hub", "--hub_model_id", "--set KEY=VALUE", "tinyshakespeare"):
        assert option in train, option
    generate = _help(["generate"], capsys)
    for option in ("folder", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--greedy"):
        assert option in generate, option
    export = _help(["export"], capsys)
    assert "CHECKPOINT_DIR" in export and "OUT_DIR" in export and "safetensors" in export
    push = _help(["push"], capsys)
    assert "--repo-id" in push and "hf auth login" in push
    for text in (train, generate, export, push):
        assert "examples:" in text and "strata " in text.split("examples:")[1]


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: strata" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(TINY_TRAIN + ["--preset", "tiny", "--output-dir", str(folder), "--save-steps", "2"]) == 0
    return folder


def test_train_then_generate_streams_text(trained, capsys):
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "16", "--seed", "0"]) == 0
    sampled = capsys.readouterr().out
    assert sampled.startswith("ROMEO:") and len(sampled.rstrip("\n")) > len("ROMEO:")

    greedy = []
    for _ in range(2):
        assert main(["generate", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--greedy"]) == 0
        greedy.append(capsys.readouterr().out)
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO:")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    ids = tok("ROMEO:", return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert greedy[0].rstrip("\n") == tok.decode(expected[0])


def test_export_of_a_trainer_checkpoint_gives_exactly_the_hub_files(trained, tmp_path, capsys):
    checkpoint = trained / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    out = tmp_path / "clean"
    assert main(["export", str(checkpoint), str(out), "--evaluate", "--eval-max-blocks", "2"]) == 0
    assert "exported" in capsys.readouterr().out

    code = set(collect_bundle(["strata.configuration.configuration_retmamba", "strata.modeling.modeling_retmamba"]))
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md",
                "tokenizer_config.json", "vocab.json", "word_vocab.json", "tokenization_charword.py"} | code
    assert {p.name for p in out.iterdir()} == expected

    exported, original = load_file(out / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name
    assert json.loads((out / "generation_config.json").read_text())["do_sample"] is True
    assert json.loads((out / "config.json").read_text())["use_cache"] is True

    card = ModelCard.load(out / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"loss", "bpc", "perplexity"}
    assert "| optimizer steps | 4 |" in card.text
    assert "| preset | `tiny` |" in card.text  # from the checkpoint's strata_run.json

    # The export folder loads and generates like the checkpoint.
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--greedy"]) == 0
    from_export = capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--greedy"]) == 0
    assert from_export == capsys.readouterr().out


def test_export_refuses_to_mix_into_a_non_empty_folder(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as excinfo:
        main(["export", str(trained / "checkpoints" / "checkpoint-2"), str(tmp_path)])
    assert "exists and is not empty" in str(excinfo.value.code)
    with pytest.raises(SystemExit) as excinfo:
        main(["export", str(tmp_path), str(tmp_path / "x")])
    assert "no config.json" in str(excinfo.value.code)


def test_push_offline_is_one_line(trained, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as excinfo:
        main(["push", str(trained), "--repo-id", "someone/tiny"])
    message = str(excinfo.value.code)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "someone/tiny" in message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--preset", "fusion-huge"], r"unknown preset 'fusion-huge'.*'fusion-small'"),
        (["--preset", "tiny", "--arch", "gpt5"], r"unknown architecture 'gpt5'; available: \[.*'retmamba'"),
        (["--preset", "tiny", "--corpus", "shakespear"], r"unknown corpus 'shakespear'.*'tinyshakespeare'"),
        (["--preset", "tiny", "--set", "hidden_size=-3"], r"hidden_size"),
    ],
)
def test_bad_train_arguments_name_the_value_and_the_choices(argv, expected, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        main(TINY_TRAIN + ["--output-dir", str(tmp_path / "x")] + argv)
    message = str(excinfo.value.code)
    assert message.startswith("strata train: ") and "\n" not in message
    assert re.search(expected, message), message


def test_bad_generate_arguments(trained, tmp_path):
    with pytest.raises(SystemExit, match="not a model folder"):
        main(["generate", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit, match="--temperature must be > 0"):
        main(["generate", str(trained), "--temperature", "0"])
    with pytest.raises(SystemExit) as excinfo:  # argparse: usage error, exit code 2
        main(["generate", str(trained), "--max-new-tokens", "0"])
    assert excinfo.value.code == 2
