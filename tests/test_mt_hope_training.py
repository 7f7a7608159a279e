"""TwistorNestedLearning / NestedOptimizer / NestedTrainer on a tiny MT-HOPE."""

import logging
import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from strata import MTHopeConfig, MTHopeForCausalLM
from strata.training.nested_optimizer import (
    NestedOptimizer,
    NestedProgressCallback,
    NestedTrainer,
    TwistorNestedLearning,
)


def tiny_model(vocab=512, **overrides):
    torch.manual_seed(0)
    return MTHopeForCausalLM(MTHopeConfig.from_preset("tiny", vocab_size=vocab, **overrides))


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids, length):
        n = (ids.numel() - 1) // length
        self.blocks = ids[: n * length].view(n, length)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def test_levels_cover_every_parameter_once_with_decreasing_rates():
    model = tiny_model(num_nested_levels=4)
    nested = TwistorNestedLearning(model, lr=1e-2, level_factor=0.5)
    groups = nested.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    unique = {id(p) for p in model.parameters()}
    assert len(ids) == len(set(ids)) == len(unique)
    for g in groups:
        assert g["lr"] == pytest.approx(1e-2 * 0.5 ** g["level"])
    levels = {g["level"] for g in groups}
    assert levels == {0, 1, 2, 3}
    assert nested.level_of("model.embed_tokens.embed.weight") == 0
    assert nested.level_of("lm_head.weight") == 0
    assert nested.level_of("model.norm.weight") == 3
    assert nested.level_of("model.layers.0.mixer.in_proj.weight") <= nested.level_of("model.cms.levels.1.up_proj.weight")


def test_dynamic_level_weights_move_from_shallow_to_deep():
    nested = TwistorNestedLearning(tiny_model(num_nested_levels=5))
    start, end = nested.level_weights(0.0), nested.level_weights(1.0)
    assert sum(start) / 5 == pytest.approx(1.0) and sum(end) / 5 == pytest.approx(1.0)
    assert start[0] > start[-1] and end[-1] > end[0]


def test_omega_and_pi_parts_get_their_own_learning_rates():
    model = tiny_model()
    nested = TwistorNestedLearning(model, lr=1e-2, lr_omega=1.0, lr_pi=0.25)
    opt = NestedOptimizer(nested)
    w = model.model.layers[0].mixer.out_proj.weight  # (hidden, hidden): rows write omega then pi
    before = w.detach().clone()
    ids = torch.randint(4, 512, (2, 12))
    model(ids, labels=ids).loss.backward()
    opt.step()
    delta = (w.detach() - before).abs()
    half = w.shape[0] // 2
    # Adam's first step moves every entry by ~lr: omega rows by lr, pi rows by lr / 4
    ratio = delta[half:].mean() / delta[:half].mean()
    assert ratio.item() == pytest.approx(0.25, rel=0.05)


def test_non_finite_gradients_skip_the_step_with_a_log_line(caplog):
    model = tiny_model()
    opt = NestedOptimizer(TwistorNestedLearning(model, lr=1e-2))
    ids = torch.randint(4, 512, (2, 12))
    model(ids, labels=ids).loss.backward()
    model.model.norm.weight.grad[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING):
        opt.step()
    assert "skipping update" in caplog.text and "model.norm.weight" in caplog.text
    assert opt.skipped_steps == 1 and opt.steps_taken == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_constraint_loss_is_differentiable_and_moves_towards_target():
    model = tiny_model()
    nested = TwistorNestedLearning(model, constraint_weight=1.0)
    ids = torch.randint(4, 512, (2, 12))
    loss = nested.constraint_loss(model(ids, output_hidden_states=True).hidden_states)
    loss.backward()
    assert model.model.embed_tokens.embed.weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(10):
        opt.zero_grad()
        loss = nested.constraint_loss(model(ids, output_hidden_states=True).hidden_states)
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_nested_trainer_with_accumulation_cosine_clipping_bf16_and_a_nan_batch(char_tokenizer, shakespeare,
                                                                                 tmp_path, caplog):
    model = tiny_model(vocab=len(char_tokenizer))
    ids = torch.tensor(char_tokenizer(shakespeare[:30_000])["input_ids"])
    data = Blocks(ids, 64)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=30,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=0.1, max_grad_norm=1.0, bf16=True,
        logging_steps=5, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
    )
    trainer = NestedTrainer(model=model, args=args, train_dataset=data)

    # poison exactly one micro-batch: its logits become NaN
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 7 else output

    handle = model.lm_head.register_forward_hook(poison)
    dtypes = set()
    probe = model.model.layers[0].mixer.in_proj.register_forward_hook(lambda mod, i, o: dtypes.add(o.dtype))
    lrs = []

    class Record(NestedProgressCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            lrs.append([g["lr"] for g in optimizer.param_groups])

    trainer.add_callback(Record())
    with caplog.at_level(logging.WARNING):
        trainer.train()
    handle.remove()
    probe.remove()
    assert trainer.accelerator.mixed_precision == "bf16" and dtypes == {torch.bfloat16}  # autocast was on
    assert trainer.skipped_batches == 1
    assert "skipping batch" in caplog.text and "non-finite loss" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    # warm-up then cosine decay, and the level ratios survive the scheduler
    level0 = [step[0] for step in lrs]
    peak = max(level0)
    assert level0.index(peak) <= 4 and level0[-1] < 0.05 * peak
    opt = trainer.optimizer.optimizer if not isinstance(trainer.optimizer, NestedOptimizer) else trainer.optimizer
    for group, lr in zip(opt.param_groups, lrs[10]):
        base = trainer.nested.lr * trainer.nested.level_factor ** group["level"]
        assert lr / base == pytest.approx(lrs[10][0] / trainer.nested.lr)
    assert opt.progress > 0.9
    assert trainer.last_constraint_loss is not None and math.isfinite(float(trainer.last_constraint_loss))


def test_nested_optimizer_in_a_plain_trainer(char_tokenizer, shakespeare, tmp_path):
    model = tiny_model(vocab=len(char_tokenizer))
    ids = torch.tensor(char_tokenizer(shakespeare[:20_000])["input_ids"])
    opt = NestedOptimizer(TwistorNestedLearning(model, lr=5e-3))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                             learning_rate=5e-3, logging_steps=4, save_strategy="no", report_to=[],
                             disable_tqdm=True, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(ids, 64), optimizers=(opt, None),
                      callbacks=[NestedProgressCallback()])
    trainer.train()
    assert opt.steps_taken == 12
    assert opt.progress == pytest.approx(11 / 12)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0]


def test_nested_learning_refuses_other_models():
    from strata import RetMambaConfig, RetMambaForCausalLM

    with pytest.raises(ValueError, match="MT-HOPE"):
        TwistorNestedLearning(RetMambaForCausalLM(RetMambaConfig.from_preset("tiny")))
