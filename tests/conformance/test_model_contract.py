"""The contract every strata architecture meets: config, loss, cache, errors, saving.

Parametrized over tests/conformance/architectures.py: adding an architecture means
adding it to that list.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from architectures import CASES, MAIN_CASES, case_id, classes
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import strata
from strata import RecurrentCache

ATOL = 1e-4


def build(case, **overrides):
    model_type, preset = case
    config_cls, _, lm_cls, _ = classes(model_type)
    torch.manual_seed(0)
    config = config_cls.from_preset(preset, **overrides)
    return lm_cls(config).eval()


def random_ids(model, batch=2, length=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=g)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tiny_preset_is_small_and_round_trips(case, tmp_path):
    model = build(case)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    model.config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(model.config)
    assert loaded.to_diff_dict() == model.config.to_diff_dict()


@pytest.mark.parametrize("model_type", sorted(strata.ARCHITECTURES))
def test_presets_and_invalid_values(model_type):
    config_cls = classes(model_type)[0]
    assert "tiny" in config_cls.preset_names()
    for name in config_cls.preset_names():
        assert config_cls.from_preset(name).model_type == model_type
    with pytest.raises(ValueError, match="unknown preset"):
        config_cls.from_preset("no-such-preset")
    for field, value in [("vocab_size", 0), ("hidden_size", -3), ("block_size", 0)]:
        with pytest.raises(ValueError, match=field):
            config_cls.from_preset("tiny", **{field: value})


@pytest.mark.parametrize("model_type", sorted(strata.ARCHITECTURES))
def test_auto_classes_registered(model_type):
    config_cls, model_cls, lm_cls, _ = classes(model_type)
    config = config_cls.from_preset("tiny")
    assert type(AutoModel.from_config(config)) is model_cls
    assert type(AutoModelForCausalLM.from_config(config)) is lm_cls
    assert isinstance(AutoConfig.for_model(model_type), config_cls)


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_uses_shift_and_ignore_index(case):
    model = build(case)
    ids = random_ids(model)
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, model.config.vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


# --------------------------------------------------------------------------- cache
@pytest.mark.parametrize("case", CASES, ids=case_id)
@torch.no_grad()
def test_token_by_token_equals_full_forward(case):
    model = build(case)
    ids = random_ids(model, length=21)
    full = model(ids).logits
    cache = RecurrentCache(model.config.num_hidden_layers)
    steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])]
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@torch.no_grad()
def test_two_chunk_prefill_equals_one(case):
    model = build(case)
    ids = random_ids(model, length=37)
    one = model(ids, use_cache=True)
    first = model(ids[:, :17], use_cache=True)
    second = model(ids[:, 17:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), one.logits, atol=ATOL, rtol=0)
    # The states after both prefills agree too: the next token's logits match.
    nxt = random_ids(model, length=1, seed=5)
    a = model(nxt, past_key_values=one.past_key_values, use_cache=True).logits
    b = model(nxt, past_key_values=second.past_key_values, use_cache=True).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(case):
    model = build(case)
    ids = random_ids(model, batch=3, length=15)
    pads = [0, 4, 9]
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = model.config.pad_token_id
    batched = model(ids, attention_mask=mask, use_cache=True)
    nxt = random_ids(model, batch=3, length=2, seed=7)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    cont = model(nxt, attention_mask=mask2, past_key_values=batched.past_key_values, use_cache=True).logits
    for row, p in enumerate(pads):
        alone = model(ids[row : row + 1, p:], use_cache=True)
        torch.testing.assert_close(batched.logits[row, p:], alone.logits[0], atol=ATOL, rtol=0)
        alone_cont = model(nxt[row : row + 1], past_key_values=alone.past_key_values, use_cache=True).logits
        torch.testing.assert_close(cont[row], alone_cont[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@torch.no_grad()
def test_cache_reorders_for_beams(case):
    model = build(case)
    ids = random_ids(model, batch=3, length=9)
    out = model(ids, use_cache=True)
    order = torch.tensor([2, 0, 1])
    out.past_key_values.reorder_cache(order)
    nxt = random_ids(model, batch=3, length=1, seed=3)
    reordered = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits
    direct = model(torch.cat([ids[order], nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(reordered, direct, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_foreign_cache_is_replaced_or_refused(case):
    model = build(case)
    ids = random_ids(model, length=6)
    out = model(ids, past_key_values=DynamicCache(), use_cache=True)
    assert isinstance(out.past_key_values, RecurrentCache)
    filled = DynamicCache()
    filled.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    with pytest.raises(TypeError, match="RecurrentCache"):
        model(ids, past_key_values=filled, use_cache=True)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_bad_input_is_refused_and_changes_nothing(case):
    model = build(case)
    ids = random_ids(model, length=5)
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    snapshot = [{k: v.clone() for k, v in layer.tensors.items()} for layer in cache.layers]
    v = model.config.vocab_size
    bad_calls = {
        "outside the vocabulary": dict(input_ids=torch.tensor([[1, v]])),
        "outside the vocabulary ": dict(input_ids=torch.tensor([[-1, 2]])),
        "empty input": dict(input_ids=torch.zeros(2, 0, dtype=torch.long)),
        "attention_mask": dict(input_ids=ids[:, :1], attention_mask=torch.ones(2, 3, dtype=torch.long)),
    }
    for message, kwargs in bad_calls.items():
        with pytest.raises(ValueError, match=message.strip()):
            model(**kwargs, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5
    for layer, before in zip(cache.layers, snapshot):
        assert layer.tensors.keys() == before.keys()
        for k in before:
            assert torch.equal(layer.tensors[k], before[k])
    with pytest.raises(TypeError, match="integer"):
        model(input_ids=ids.float())


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_checkpoint_with_wrong_shapes_is_refused(case, tmp_path):
    model_type, preset = case
    config_cls, _, lm_cls, _ = classes(model_type)
    build(case).save_pretrained(tmp_path)
    wrong = config_cls.from_preset(preset, vocab_size=config_cls.from_preset(preset).vocab_size + 7)
    with pytest.raises(ValueError, match=r"checkpoint \(\d+, \d+\) vs model \(\d+, \d+\)"):
        lm_cls.from_pretrained(tmp_path, config=wrong)


# --------------------------------------------------------------------------- saving
@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_saved_folder_is_self_contained_and_loads_without_strata(case, tmp_path):
    model = build(case)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    for target in auto_map.values():
        assert f"{target.split('.')[0]}.py" in files
    for py in (f for f in files if f.endswith(".py")):
        for node in ast.walk(ast.parse((tmp_path / py).read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("strata"), (py, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "strata" for a in node.names), py

    ids = random_ids(model, length=11)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["strata"] = None  # strata is not importable in this process
        import torch
        from transformers import AutoModelForCausalLM
        data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        torch.load = None  # and loading the model must never unpickle
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(data["ids"]).logits
        assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
        print("identical", type(model).__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"identical {type(model).__name__}"


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_save_load_identity_in_process(case, tmp_path):
    model = build(case)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids = random_ids(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Tied embeddings stay tied after loading.
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
