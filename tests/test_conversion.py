"""Transformers checkpoints convert to RetMamba with identical logits and generations."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from strata import RetMambaForCausalLM
from strata.conversion.convert_hf import convert_checkpoint, convert_hf_model


def hf_mamba():
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8)).eval()


def hf_llama(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.mark.parametrize("kind,make", [("hf-mamba", hf_mamba), ("hf-llama", hf_llama)])
def test_converted_checkpoint_has_identical_logits_and_generations(kind, make, tmp_path):
    source = make()
    source.save_pretrained(tmp_path / "src")
    convert_checkpoint(kind, tmp_path / "src", tmp_path / "dst")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert isinstance(model, RetMambaForCausalLM)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-4, rtol=0)
        ours = model.generate(ids, max_new_tokens=8, do_sample=False)
        theirs = source.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_unsupported_features_are_refused_by_name():
    with pytest.raises(ValueError, match="attention or MLP biases"):
        convert_hf_model(hf_llama(attention_bias=True), "hf-llama")
    with pytest.raises(ValueError, match="expects a 'mamba' checkpoint"):
        convert_hf_model(hf_llama(), "hf-mamba")
    with pytest.raises(ValueError, match="unknown conversion"):
        convert_hf_model(hf_llama(), "gpt2")
