"""Perpetual training: identity, incremental crash-safe saves (real SIGKILL), lifecycle log,
PI-modulated plasticity, PI in the Trainer logs."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from strata import TinyONNConfig, TinyONNForCausalLM
from strata.training.perpetual import MANIFEST, TENSORS, PerpetualStore, PerpetualTrainer, PIPlasticity


def tiny_model(**overrides):
    torch.manual_seed(0)
    return TinyONNForCausalLM(TinyONNConfig.from_preset("tiny", **overrides))


def files(store):
    return sorted(p.name for p in (store.dir / TENSORS).iterdir())


# --------------------------------------------------------------------------- store
def test_incremental_saves_write_only_changed_tensors(tmp_path):
    model = tiny_model()
    store = PerpetualStore(tmp_path)
    first = store.save(model, 0)
    model_id = model.config.model_id
    assert model_id and len(model_id) == 36  # a UUID, set once
    names = set(store.manifest["tensors"])
    assert set(first["written"]) == names
    assert store.manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # tied: stored once

    assert store.save(model, 1)["written"] == []  # nothing changed: nothing written
    with torch.no_grad():
        model.model.layers[1].moie.w_out.add_(1.0)
    second = store.save(model, 2)
    assert second["written"] == ["model.layers.1.moie.w_out"]
    assert len(files(store)) == 2
    assert store.manifest["tensors"]["model.layers.1.moie.w_out"]["file"] == second["file"]
    assert model.config.model_id == model_id

    loaded = PerpetualStore(tmp_path).load_model().eval()
    assert loaded.config.model_id == model_id
    ids = torch.randint(4, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    # every parameter changes: the step-2 file is superseded and removed; the step-0 file
    # still holds the unchanged buffers (the gates' `eligible` masks)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    third = store.save(model, 3)
    assert files(store) == sorted([first["file"], third["file"]])
    assert {n for n, e in store.manifest["tensors"].items() if e["file"] == first["file"]} == {
        n for n, _ in model.named_buffers()}

    # a grown model keeps its identity; its new config travels in the manifest
    model.grow_experts(2)
    store.save(model, 4)
    assert PerpetualStore(tmp_path).load_model().config.num_experts == 10

    other = tiny_model()
    with pytest.raises(ValueError, match="one store per model identity"):
        store.save(other, 5)


def test_corrupted_tensor_is_detected(tmp_path):
    store = PerpetualStore(tmp_path)
    store.save(tiny_model(), 0)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["tensors"]["model.norm.weight"]["digest"] = "0" * 32
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="digest"):
        store.load_state_dict()
    with pytest.raises(FileNotFoundError, match="no complete state"):
        PerpetualStore(tmp_path / "empty").load_state_dict()


CHILD = textwrap.dedent(
    """
    import itertools, sys, torch
    from strata import TinyONNConfig, TinyONNForCausalLM
    from strata.training.perpetual import PerpetualStore
    sys.path.insert(0, {tests!r})
    from test_tiny_onn_perpetual import KILL_CONFIG, apply_step
    store = PerpetualStore(sys.argv[1])
    torch.manual_seed(0)
    model = TinyONNForCausalLM(TinyONNConfig.from_preset("tiny", **KILL_CONFIG))
    start = 1
    if store.manifest is not None:  # resume the life where the last complete state left it
        model.load_state_dict(store.load_state_dict())
        start = store.manifest["step"] + 1
    for step in itertools.count(start):
        apply_step(model, step)
        print("save", step, flush=True)
        store.save(model, step)
        print("saved", step, flush=True)
    """
)
KILL_CONFIG = dict(hidden_size=256, num_experts=16, expert_size=64, model_id="00000000-0000-0000-0000-00000000cafe")


def apply_step(model, step):
    """The deterministic 'training' of the kill test: a third of the tensors take the value `step`."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            if (i + step) % 3 == 0:
                p.fill_(float(step))


def test_sigkill_during_saves_leaves_the_last_complete_state(tmp_path):
    store_dir = tmp_path / "life"
    script = CHILD.format(tests=os.path.dirname(__file__))
    rng = random.Random(0)
    killed_mid_save = 0
    last_step = 0
    for round_ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", script, str(store_dir)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines = []
        target = last_step + 3
        while True:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            lines.append(line.split())
            if lines[-1] == ["save", str(target)]:
                break
        time.sleep(rng.uniform(0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no atexit, no flush
        proc.wait()
        rest = proc.stdout.read().split("\n")
        lines += [r.split() for r in rest if r]
        began = max(int(s) for kind, s in lines if kind == "save")
        finished = max((int(s) for kind, s in lines if kind == "saved"), default=0)
        killed_mid_save += began > finished

        store = PerpetualStore(store_dir)  # also removes what the killed save left half-written
        step = store.manifest["step"]
        assert finished <= step <= began
        assert step > last_step  # every restart resumed from the stored state and went on
        torch.manual_seed(0)
        expected = TinyONNForCausalLM(TinyONNConfig.from_preset("tiny", **KILL_CONFIG))
        for s in range(1, step + 1):
            apply_step(expected, s)
        loaded = store.load_model()
        assert loaded.config.model_id == KILL_CONFIG["model_id"]
        for name, tensor in expected.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), (round_, step, name)
        assert not [p for p in (store_dir / TENSORS).iterdir() if p.name.endswith(".tmp")]
        last_step = step
    print(f"killed during a save in {killed_mid_save} of 2 rounds")


# --------------------------------------------------------------------------- Trainer
class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=32, length=24, vocab=512, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(4, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


class UpdateProbe(TrainerCallback):
    """Records, for one parameter, the gradient and the update of every optimizer step."""

    def __init__(self, param):
        self.param, self.steps = param, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = (self.param.detach().clone(), self.param.grad.detach().clone())

    def on_optimizer_step(self, args, state, control, **kwargs):
        before, grad = self.before
        self.steps.append((self.param.detach() - before, grad))


def trainer_for(model, tmp_path, steps, plasticity=None, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps, learning_rate=0.05,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, seed=0, max_grad_norm=0.0,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return PerpetualTrainer(model=model, args=args, train_dataset=Blocks(), optimizers=(optimizer, None),
                            perpetual_dir=tmp_path / "life", plasticity=plasticity, **kwargs)


def test_pi_score_modulates_the_learning_rate(tmp_path):
    plasticity = PIPlasticity(min_scale=0.25, max_scale=4.0, ema=0.5)
    model = tiny_model()
    model.train()
    probe = UpdateProbe(model.model.layers[0].attn.q_proj.weight)
    trainer = trainer_for(model, tmp_path, steps=4, plasticity=plasticity)
    trainer.add_callback(probe)
    trainer.train()
    records = [r for r in trainer.perpetual_store.read_log() if r["event"] == "step"]
    assert len(records) == 4 == len(probe.steps)
    ema = None
    for record, (delta, grad) in zip(records, probe.steps):
        pi = record["pi"]
        assert 0 < pi < 1
        ema = pi if ema is None else 0.5 * ema + 0.5 * pi
        scale = 4.0 - 3.75 * ema
        assert record["lr_scale"] == pytest.approx(scale)
        assert record["lr"] == pytest.approx(0.05)  # the schedule itself is untouched
        # SGD: the update really used the PI-scaled rate
        torch.testing.assert_close(delta, -0.05 * scale * grad, atol=1e-7, rtol=1e-4)
    assert len({round(r["lr_scale"], 6) for r in records}) > 1
    # without plasticity, the scheduled rate
    model2 = tiny_model()
    model2.train()
    probe2 = UpdateProbe(model2.model.layers[0].attn.q_proj.weight)
    trainer2 = trainer_for(model2, tmp_path / "fixed", steps=1)
    trainer2.add_callback(probe2)
    trainer2.train()
    delta, grad = probe2.steps[0]
    torch.testing.assert_close(delta, -0.05 * grad, atol=1e-7, rtol=1e-4)
    with pytest.raises(ValueError, match="min_scale"):
        PIPlasticity(min_scale=2.0, max_scale=1.0)


def test_lifecycle_log_identity_and_trainer_logs(tmp_path):
    model = tiny_model()
    model.train()
    trainer = trainer_for(model, tmp_path, steps=3, save_every=2, reinit_dead_every=3)
    trainer.train()
    model_id = model.config.model_id
    assert model_id
    # PI and routing metrics are in the Trainer logs of every step (hence TensorBoard & co.)
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 3
    for r in logs:
        assert 0 < r["pi_score"] <= 1
        assert r["gate_loss"] > 0 and 0 < r["expert_active_fraction"] <= 1 and 0 < r["head_active_fraction"] <= 1
        assert "lr_scale" in r
    store = trainer.perpetual_store
    log = store.read_log()
    steps = [r for r in log if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["model_id"] == model_id for r in steps)
    assert len({r["data_fingerprint"] for r in steps}) == 3  # three different batches
    assert all(set(r) >= {"step", "data_fingerprint", "loss", "pi", "lr"} for r in steps)
    assert "reinit_dead_experts" in steps[2]
    assert [r["step"] for r in log if r["event"] == "save"] == [2]
    assert store.manifest["step"] == 3  # the end of training is saved too
    # the fingerprint is the BLAKE2b of the step's input ids: recompute it for a known batch
    batch = torch.stack([Blocks()[i]["input_ids"] for i in range(4)])
    h = hashlib.blake2b(digest_size=16)
    h.update(b"input_ids")
    h.update(batch.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert len(h.hexdigest()) == len(steps[0]["data_fingerprint"])

    # the life continues: a new trainer on the loaded model appends, never rewrites
    before = (tmp_path / "life" / "lifecycle.jsonl").read_text()
    with open(tmp_path / "life" / "lifecycle.jsonl", "a") as f:
        f.write('{"event": "torn')  # a process killed mid-append
    loaded = store.load_model()
    loaded.train()
    assert loaded.config.model_id == model_id
    trainer_for(loaded, tmp_path, steps=2).train()
    after = (tmp_path / "life" / "lifecycle.jsonl").read_text()
    assert after.startswith(before)
    records = PerpetualStore(tmp_path / "life").read_log()
    assert len(records) > len(log) and all(r.get("model_id", model_id) == model_id for r in records)
