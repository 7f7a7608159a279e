"""Model cards: Hub metadata parsed back with huggingface_hub, evaluation results, no placeholders."""

import math
import re

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

import strata
from strata.hub_cards import ARCHITECTURE_CARDS, render_model_card, set_card_model_id

METRICS = {"eval_loss": 1.6180339887, "eval_bpc": 1.6180339887 / math.log(2), "eval_perplexity": 5.0431,
           "train_loss": 1.55, "train_steps": 1234, "train_tokens": 2_527_232, "train_runtime_s": 118.7,
           "parameters": 123_456}
TRAINING = {"corpus_title": "tiny Shakespeare", "preset": "fusion-small", "seq_len": 128, "batch_size": 16,
            "lr": 0.003, "config_overrides": {"hidden_size": 128}}
PLACEHOLDERS = ["TODO", "TBD", "[More Information Needed]", "More Information Needed", "{", "}", "None", "xxx",
                "lorem", "<fill", "PLACEHOLDER"]


def tiny_model(model_type="retmamba", preset="tiny", vocab_size=325):
    config_cls, _, lm_cls, _ = strata.ARCHITECTURES[model_type]
    torch.manual_seed(0)
    return lm_cls(config_cls.from_preset(preset, vocab_size=vocab_size))


@pytest.fixture(scope="module")
def card_text(char_tokenizer):
    return render_model_card(
        tiny_model(vocab_size=len(char_tokenizer)), char_tokenizer, metrics=METRICS,
        datasets=["karpathy/tiny_shakespeare"], eval_dataset={"type": "karpathy/tiny_shakespeare",
                                                              "name": "tiny Shakespeare", "split": "validation"},
        training=TRAINING, model_id="someone/retmamba-shakespeare", language="en",
    )


def test_metadata_parses_with_huggingface_hub(card_text, tmp_path):
    path = tmp_path / "README.md"
    path.write_text(card_text, encoding="utf-8")
    meta = metadata_load(path)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["karpathy/tiny_shakespeare"]
    assert meta["language"] == "en"
    assert {"custom_code", "strata", "retmamba"} <= set(meta["tags"])

    card = ModelCard.load(path)
    assert isinstance(card.data, ModelCardData)
    assert card.data.library_name == "transformers" and card.data.model_name == "retmamba-shakespeare"
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "retmamba-shakespeare"
    assert {r.metric_type: r.metric_value for r in results} == {
        "loss": METRICS["eval_loss"], "bpc": METRICS["eval_bpc"], "perplexity": METRICS["eval_perplexity"]}
    for r in results:
        assert (r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) == (
            "text-generation", "karpathy/tiny_shakespeare", "tiny Shakespeare", "validation")
    assert [r.metric_value for r in card.data.eval_results] == [r.metric_value for r in results]


def test_body_explains_architecture_loading_finetuning_numbers_and_limits(card_text, char_tokenizer):
    body = card_text.split("\n---\n", 1)[1]
    for heading in ("## Architecture", "## Tokenizer", "## How to use", "## How to fine-tune",
                    "## Training and evaluation", "## Limitations", "## License"):
        assert heading in body, heading
    assert "RetNet" in body and "Mamba" in body and "Layer pattern `FF`" in body
    assert 'model_id = "someone/retmamba-shakespeare"' in body
    assert "trust_remote_code=True" in body and "import strata" in body
    assert "Trainer" in body and "LoraConfig" in body
    assert repr(strata.lora_target_modules("retmamba")) in body
    assert "| Validation bits per character | 2.3343 |" in body
    assert "| optimizer steps | 1,234 |" in body
    assert "| sequence length (tokens) | `128` |" in body
    assert "`hidden_size=128`" in body
    assert f"{len(char_tokenizer):,} tokens" in body


def test_no_placeholder_survives(card_text):
    for placeholder in PLACEHOLDERS:
        assert placeholder not in card_text, placeholder


def test_every_architecture_has_card_text_and_renders(char_tokenizer):
    assert set(strata.ARCHITECTURES) <= set(ARCHITECTURE_CARDS)
    for model_type in strata.ARCHITECTURES:
        text = render_model_card(tiny_model(model_type, vocab_size=len(char_tokenizer)), char_tokenizer)
        card = ModelCard(text)
        assert card.data.eval_results is None  # no metrics, no model-index
        assert model_type in card.data.tags and "custom_code" in card.data.tags
        assert ARCHITECTURE_CARDS[model_type].summary in text
        for placeholder in PLACEHOLDERS:
            assert placeholder not in text, (model_type, placeholder)


def test_bad_input_is_refused(char_tokenizer):
    model = tiny_model(vocab_size=len(char_tokenizer))
    with pytest.raises(ValueError, match="needs the dataset it was measured on"):
        render_model_card(model, char_tokenizer, metrics={"eval_loss": 1.0})
    model.config.model_type = "nonexistent"
    with pytest.raises(ValueError, match=r"no model card text for model_type 'nonexistent'; known: \["):
        render_model_card(model, char_tokenizer)


def test_set_card_model_id_points_the_examples_at_the_hub_repo(card_text):
    updated = set_card_model_id(card_text, "org/new-name")
    assert 'model_id = "org/new-name"' in updated
    assert "someone/retmamba-shakespeare" not in updated.split("\n---\n", 1)[1]
    assert re.sub(r'model_id = "[^"]*"', "", updated) == re.sub(r'model_id = "[^"]*"', "", card_text)
