"""H-M-T-R training: windows with <eos>/<pad> and loss mask, random offsets, capsule files and
their stale-encoder refusal, the three stages (freezing, resume), the encoder from a Mamba."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from strata import HMTRConfig, HMTRForCausalLM
from strata.training.hmtr_capsules import encoder_fingerprint, load_capsules, precompute_capsules
from strata.training.hmtr_data import cut_windows, labels_for, make_windows, prepare_hmtr_data
from strata.training.hmtr_train import (
    init_encoder_from_mamba,
    lm_metrics,
    set_trainable,
    train_hmtr_stage,
)

EOS, PAD = 2, 0


# --------------------------------------------------------------------------- windows
def test_the_seeds_example_eos_then_pad_masked_from_the_loss():
    text = list("我爱Julia语言")  # 9 tokens; K = 8 -> the window holds 2 blocks
    ids = [ord(c) for c in text]
    (window,) = cut_windows(ids, seq_len=16, block_size=8, offset=0, eos_id=EOS, pad_id=PAD)
    assert window == ids + [EOS] + [PAD] * 6
    assert labels_for(window, PAD) == ids + [EOS] + [-100] * 6


def test_offsets_move_the_block_grid_and_lose_no_text():
    ids = list(range(10, 60))  # 50 tokens + eos
    K, S = 4, 16
    for offset in range(S):
        windows = cut_windows(ids, S, K, offset, EOS, PAD)
        assert all(len(w) == S for w in windows)
        real = [t for w in windows for t in w if t != PAD]
        text = ids + [EOS]
        first = 1 if offset == 1 else 0  # a piece of one token has nothing to predict ...
        last = len(text) - (1 if (len(text) - offset) % S == 1 else 0)  # ... a lone <eos> neither
        assert real == text[first:last]
        if offset >= 2:  # the text's beginning is its own window, then the grid starts at the offset
            assert windows[0][:offset] == ids[:offset] and windows[1][0] == ids[offset]
    with pytest.raises(ValueError, match="block_size=4"):
        cut_windows(ids, 18, 4, 0, EOS, PAD)
    with pytest.raises(ValueError, match="offset"):
        cut_windows(ids, 16, 4, 16, EOS, PAD)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, shakespeare):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shakespeare[:24_010], encoding="utf-8")
    return path


def test_datasets_pipeline_eager_and_streaming_agree(char_tokenizer, small_corpus):
    eager = prepare_hmtr_data(char_tokenizer, small_corpus, seq_len=32, block_size=8, seed=3)
    lazy = prepare_hmtr_data(char_tokenizer, small_corpus, seq_len=32, block_size=8, seed=3, streaming=True)
    for a, b in ((eager.train, lazy.train), (eager.validation, lazy.validation)):
        rows = list(b.take(4))
        for i, row in enumerate(rows):
            assert row["input_ids"] == a[i]["input_ids"].tolist()
            assert row["labels"] == a[i]["labels"].tolist()
    # validation: offset 0, the text in order, <eos> at its end then padding masked
    val = eager.validation[:]
    text = small_corpus.read_text()[int(24_010 * 0.9):]
    ids = char_tokenizer(text, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    flat = [t for t in val["input_ids"].flatten().tolist() if t != char_tokenizer.pad_token_id]
    assert len(ids) % 32 > 1 and flat == ids
    assert val["input_ids"][-1, len(ids) % 32 - 1] == char_tokenizer.eos_token_id
    assert (val["labels"] == -100).sum() == (val["input_ids"] == char_tokenizer.pad_token_id).sum() > 0
    # train: a different seed moves the grid
    other = prepare_hmtr_data(char_tokenizer, small_corpus, seq_len=32, block_size=8, seed=4)
    assert not torch.equal(other.train[1]["input_ids"], eager.train[1]["input_ids"])


# --------------------------------------------------------------------------- capsules
def test_capsules_memory_mapped_with_manifest_and_stale_encoder_refused(char_tokenizer, small_corpus, tmp_path):
    torch.manual_seed(0)
    model = HMTRForCausalLM(HMTRConfig.from_preset("tiny", vocab_size=len(char_tokenizer), block_size=8)).eval()
    data = prepare_hmtr_data(char_tokenizer, small_corpus, seq_len=32, block_size=8)
    windows = data.validation
    precompute_capsules(model, windows, tmp_path, "validation", batch_size=5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["encoder_sha256"] == encoder_fingerprint(model)
    caps = load_capsules(tmp_path, model, "validation")
    assert isinstance(caps.capsules, np.memmap) and caps.capsules.shape == (len(windows), 4, 64)
    with torch.no_grad():
        expected = model.model.encode_capsules(windows[:3]["input_ids"])
    torch.testing.assert_close(torch.stack([caps[i]["capsules"] for i in range(3)]), expected)
    last = windows[len(windows) - 1]["labels"].view(4, 8)
    assert caps[len(windows) - 1]["capsule_mask"].tolist() == (last != -100).any(-1).long().tolist()

    with torch.no_grad():
        model.model.reasoner.predict_proj.bias.add_(1.0)  # the reasoner does not make capsules
    load_capsules(tmp_path, model, "validation")
    with torch.no_grad():
        model.model.encoder.layers[0].mixer.D.add_(1e-3)  # the encoder does
    with pytest.raises(ValueError, match="stale capsules"):
        load_capsules(tmp_path, model, "validation")
    with pytest.raises(ValueError, match="split 'train'"):
        model.model.encoder.layers[0].mixer.D.data.sub_(1e-3)
        load_capsules(tmp_path, model, "train")


# --------------------------------------------------------------------------- stages
def test_three_stages_freeze_the_right_parts_resume_and_chain(char_tokenizer, small_corpus, tmp_path):
    tok_dir = tmp_path / "tok"
    char_tokenizer.save_pretrained(tok_dir)
    common = dict(corpus=small_corpus, seq_len=32, batch_size=8, logging_steps=2, eval_max_windows=6,
                  progress=False, use_cpu=True)
    with pytest.raises(ValueError, match="init_from"):
        train_hmtr_stage(2, tmp_path / "x", **common)

    one = train_hmtr_stage(1, tmp_path / "s1", preset="tiny", tokenizer=str(tok_dir),
                           config_overrides={"block_size": 4}, max_steps=4, save_steps=2, **common)
    assert 0.0 <= one.metrics["eval_reconstruction_accuracy"] <= 1.0
    assert one.metrics["train_steps"] == 4
    # resume: the same run continued from its last checkpoint to 6 steps
    resumed = train_hmtr_stage(1, tmp_path / "s1", preset="tiny", tokenizer=str(tok_dir),
                               config_overrides={"block_size": 4}, max_steps=6, save_steps=2, resume=True, **common)
    info = json.loads((tmp_path / "s1" / "hmtr_stage.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-4") and resumed.metrics["train_steps"] == 6
    s1 = load_file(tmp_path / "s1" / "model.safetensors")

    two = train_hmtr_stage(2, tmp_path / "s2", init_from=tmp_path / "s1", max_steps=4, **common)
    assert (tmp_path / "s2-capsules" / "manifest.json").is_file() and not (tmp_path / "s2" / "capsules").exists()
    s2 = load_file(tmp_path / "s2" / "model.safetensors")
    for name in s1:
        same = torch.equal(s1[name], s2[name])
        assert same == (not name.startswith("model.reasoner.")), name  # only the reasoner trained
    assert {"eval_latent_mse", "eval_latent_cosine", "eval_bpc"} <= set(two.metrics)

    three = train_hmtr_stage(3, tmp_path / "s3", init_from=tmp_path / "s2", max_steps=3, **common)
    s3 = load_file(tmp_path / "s3" / "model.safetensors")
    assert not torch.equal(s3["model.embed_tokens.weight"], s2["model.embed_tokens.weight"])
    assert not torch.equal(s3["model.reasoner.predict_proj.weight"], s2["model.reasoner.predict_proj.weight"])
    assert three.metrics["eval_bpc"] > 0 and "H-M-T-R" in (tmp_path / "s3" / "README.md").read_text()
    # the saved folder is an ordinary strata model folder
    model = HMTRForCausalLM.from_pretrained(tmp_path / "s3")
    assert model.config.block_size == 4


def test_stage_one_learns_to_reconstruct(char_tokenizer, small_corpus):
    torch.manual_seed(0)
    model = HMTRForCausalLM(HMTRConfig.from_preset("tiny", vocab_size=len(char_tokenizer), block_size=4))
    set_trainable(model, 1)
    data = prepare_hmtr_data(char_tokenizer, small_corpus, seq_len=32, block_size=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    batch = data.train[:32]
    first = None
    for _ in range(40):
        out = model.autoencoder_loss(batch["input_ids"], batch["labels"])
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < first - 1.5
    assert model.model.reasoner.start_capsule.grad is None  # frozen in stage 1


def test_lm_metrics_are_the_exact_next_token_loss(char_tokenizer, small_corpus):
    torch.manual_seed(0)
    model = HMTRForCausalLM(HMTRConfig.from_preset("tiny", vocab_size=len(char_tokenizer), block_size=4)).eval()
    data = prepare_hmtr_data(char_tokenizer, small_corpus, seq_len=32, block_size=4)
    metrics = lm_metrics(model, data.validation, data.tokens_per_char, batch_size=3, max_windows=5)
    rows = data.validation[:5]
    total = -model.sequence_log_prob(rows["input_ids"])  # no padding in the first windows
    scored = (rows["labels"][:, 1:] != -100).sum()
    assert int(scored) == metrics["eval_tokens"]
    torch.testing.assert_close(torch.tensor(metrics["eval_loss"]), total.sum() / scored, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- encoder from Mamba
def test_encoder_initialised_from_a_transformers_mamba_computes_its_hidden_states():
    from transformers import MambaConfig, MambaModel

    hf = MambaConfig(vocab_size=512, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                     time_step_rank=4, use_conv_bias=True, layer_norm_epsilon=1e-6)
    torch.manual_seed(0)
    mamba = MambaModel(hf).eval()
    model = HMTRForCausalLM(HMTRConfig.from_preset("tiny", encoder_layers=2, time_step_rank=4)).eval()
    names = init_encoder_from_mamba(model, mamba)
    assert "encoder.layers.1.mixer.A_log" in names and "embed_tokens.weight" in names
    ids = torch.randint(4, 512, (2, 12))
    with torch.no_grad():
        ours = model.model.encoder(model.model.embed_tokens(ids))
        theirs = mamba(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    wrong = HMTRForCausalLM(HMTRConfig.from_preset("tiny", encoder_layers=1, state_size=16))
    with pytest.raises(ValueError, match="A_log"):
        init_encoder_from_mamba(wrong, mamba)


def test_cli_runs_stages_and_names_what_is_missing(tmp_path):
    from strata.cli import main

    with pytest.raises(SystemExit, match="stage-1 folder"):
        main(["train", "--arch", "hmtr", "--stage", "2", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--arch hmtr"):
        main(["train", "--arch", "retmamba", "--stage", "1"])


def test_variational_energy_preset_runs_stages_one_and_two(char_tokenizer, small_corpus, tmp_path):
    tok_dir = tmp_path / "tok"
    char_tokenizer.save_pretrained(tok_dir)
    common = dict(corpus=small_corpus, seq_len=16, batch_size=4, max_steps=2, logging_steps=1, eval_max_windows=4,
                  progress=False, use_cpu=True)
    one = train_hmtr_stage(1, tmp_path / "v1", preset="tiny-lstm", tokenizer=str(tok_dir), **common)
    assert one.model.config.capsule == "variational" and one.model.config.loss == "energy"
    two = train_hmtr_stage(2, tmp_path / "v2", init_from=tmp_path / "v1", **common)
    assert torch.isfinite(torch.tensor(two.metrics["train_loss"])) and "eval_bpc" in two.metrics


def test_push_is_checked_before_any_training(tmp_path):
    with pytest.raises(SystemExit, match="invalid Hub repo id"):
        train_hmtr_stage(1, tmp_path / "p", preset="tiny", push_to_hub=True, hub_model_id="not a repo id!", progress=False)
    with pytest.raises(SystemExit, match="offline mode"):  # the suite runs with HF_HUB_OFFLINE=1
        train_hmtr_stage(1, tmp_path / "p", preset="tiny", push_to_hub=True, hub_model_id="me/hmtr", progress=False)
    assert not (tmp_path / "p").exists()
