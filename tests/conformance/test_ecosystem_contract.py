"""pipeline, Trainer, gradient checkpointing, autocast and PEFT LoRA on every architecture."""

import subprocess
import sys
import textwrap

import pytest
import torch
from architectures import MAIN_CASES, case_id, classes
from test_model_contract import build, random_ids
from transformers import Trainer, TrainingArguments, pipeline

import strata


def lm_model(case, tokenizer, **overrides):
    return build(case, vocab_size=len(tokenizer), **overrides)


# --------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_pipeline_in_memory_and_from_saved_folder(case, char_tokenizer, tmp_path):
    model = lm_model(case, char_tokenizer)
    pipe = pipeline("text-generation", model=model, tokenizer=char_tokenizer)
    result = pipe("ROMEO:", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ids = char_tokenizer("ROMEO:", return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert result == char_tokenizer.decode(expected[0], skip_special_tokens=True)

    model.save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["strata"] = None
        from transformers import pipeline
        pipe = pipeline("text-generation", model={str(tmp_path)!r}, trust_remote_code=True)
        print(repr(pipe("ROMEO:", max_new_tokens=12, do_sample=False)[0]["generated_text"]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == repr(result)


# --------------------------------------------------------------------------- Trainer
class ChunkDataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, length: int):
        n = (ids.numel() - 1) // length
        self.blocks = ids[: n * length].view(n, length)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_trainer_fine_tunes_on_real_text(case, char_tokenizer, shakespeare, tmp_path):
    model = lm_model(case, char_tokenizer)
    model.train()
    ids = torch.tensor(char_tokenizer(shakespeare[:60_000])["input_ids"])
    data = ChunkDataset(ids, 64)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40, learning_rate=3e-3,
        logging_steps=5, save_steps=40, report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert result.training_loss < losses[0]
    # Trainer checkpoints carry the code bundle too.
    ckpt = tmp_path / "checkpoint-40"
    assert (ckpt / "model.safetensors").exists()
    assert any(p.name.startswith("modeling_") for p in ckpt.iterdir())


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_gradient_checkpointing_gives_same_gradients(case):
    model = build(case)
    model.train()
    ids = random_ids(model, length=24)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_bf16_autocast_runs_on_cpu(case):
    model = build(case)
    model.train()
    ids = random_ids(model, length=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        fp32 = model(ids, labels=ids).loss
    assert abs(loss.item() - fp32.item()) < 0.1


# --------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
def test_peft_lora_trains_saves_reloads_merges(case, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model_type, _ = case
    targets = strata.lora_target_modules(model_type)
    assert targets == classes(model_type)[3]
    model = build(case)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    wrapped = {n.split(".")[-1] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert wrapped == set(targets) & present and wrapped
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids = random_ids(model, length=20)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    first = None
    for _ in range(15):
        loss = lora(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    reloaded = PeftModel.from_pretrained(build(case), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
    merged = reloaded.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=0)
