"""strata.training: data blocks, the Trainer run, the time budget, the Hub-ready folder, push errors."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import IterableDataset
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from strata.training import data as data_module
from strata.training.data import (
    bits_per_character,
    corpus_path,
    load_text_splits,
    pack_blocks,
    prepare_lm_data,
)
from strata.training.export import push_folder
from strata.training.train import TimeBudgetCallback, WarmupCosineSchedule, train_model

TINY_RUN = dict(arch="retmamba", preset="tiny", corpus="tinyshakespeare", max_steps=6, seq_len=32, batch_size=4,
                warmup_steps=2, eval_max_blocks=4, logging_steps=2, progress=False, use_cpu=True)


# --------------------------------------------------------------------------- data
def test_corpus_path_names_the_bundled_corpora():
    assert corpus_path("tinyshakespeare").name == "tinyshakespeare.txt"
    assert corpus_path("tinyshakespeare").is_file()
    with pytest.raises(ValueError, match=r"unknown corpus 'shakespear'.*'lunyu', 'tang_poems', 'tinyshakespeare'"):
        corpus_path("shakespear")
    with pytest.raises(ValueError, match="not a bundled corpus"):
        prepare_lm_data(None, "no/such/file.txt")


def test_blocks_are_exact_and_split_90_10_like_nanogpt(char_tokenizer, shakespeare):
    data = prepare_lm_data(char_tokenizer, "tinyshakespeare", block_size=64)
    cut = int(len(shakespeare) * 0.9)
    train_ids = torch.tensor(char_tokenizer(shakespeare[:cut], add_special_tokens=False)["input_ids"])
    val_ids = torch.tensor(char_tokenizer(shakespeare[cut:], add_special_tokens=False)["input_ids"])
    assert len(train_ids) == cut  # one token per character on this corpus

    train = data.train[:]
    validation = data.validation[:]
    assert train["input_ids"].shape == (cut // 64, 64)
    assert validation["input_ids"].shape == ((len(shakespeare) - cut) // 64, 64)
    assert torch.equal(train["labels"], train["input_ids"])
    assert torch.equal(validation["labels"], validation["input_ids"])
    # Blocks are the token stream cut in order; the remainder is dropped.
    assert torch.equal(train["input_ids"].flatten(), train_ids[: train["input_ids"].numel()])
    assert torch.equal(validation["input_ids"].flatten(), val_ids[: validation["input_ids"].numel()])
    # The split boundary is the nanoGPT one: character int(0.9 * n).
    assert char_tokenizer.decode(train["input_ids"][0]) == shakespeare[:64]
    assert char_tokenizer.decode(validation["input_ids"][0]) == shakespeare[cut : cut + 64]
    last = cut // 64 * 64
    assert char_tokenizer.decode(train["input_ids"][-1]) == shakespeare[last - 64 : last]
    assert data.tokens_per_char == 1.0


def test_in_memory_split_is_packed_as_one_stream(char_tokenizer, tmp_path):
    # 2,500 paragraphs: more than one map batch; only one remainder per split may be dropped
    path = tmp_path / "poems.txt"
    path.write_text("\n\n".join(f"poem {i}: line" for i in range(2500)), encoding="utf-8")
    data = prepare_lm_data(char_tokenizer, path, block_size=97, sample_by="paragraph")
    splits = load_text_splits(path, sample_by="paragraph")
    for name, split in (("train", data.train), ("validation", data.validation)):
        tokens = sum(len(char_tokenizer(row["text"], add_special_tokens=False)["input_ids"]) for row in splits[name])
        assert len(split) == tokens // 97, name  # per-batch packing gives 382 train blocks, not 384


def test_streaming_gives_the_same_blocks(char_tokenizer):
    eager = prepare_lm_data(char_tokenizer, "tinyshakespeare", block_size=48)
    lazy = prepare_lm_data(char_tokenizer, "tinyshakespeare", block_size=48, streaming=True)
    assert isinstance(lazy.train, IterableDataset) and isinstance(lazy.validation, IterableDataset)
    for split_eager, split_lazy in ((eager.train, lazy.train), (eager.validation, lazy.validation)):
        rows = list(split_lazy.take(3))
        for i, row in enumerate(rows):
            assert row["input_ids"] == split_eager[i]["input_ids"].tolist()
            assert row["labels"] == row["input_ids"]
    assert lazy.tokens_per_char == eager.tokens_per_char


def test_paragraph_corpus_sends_every_tenth_paragraph_to_validation(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text("\n\n".join(f"poem {i}\nline of poem {i}" for i in range(25)), encoding="utf-8")
    for streaming in (False, True):
        splits = load_text_splits(path, sample_by="paragraph", streaming=streaming)
        train = [row["text"] for row in splits["train"]]
        validation = [row["text"] for row in splits["validation"]]
        assert validation == [f"poem {i}\nline of poem {i}\n\n" for i in (9, 19)]
        assert train == [f"poem {i}\nline of poem {i}\n\n" for i in range(25) if i not in (9, 19)]


def test_pack_blocks_and_bits_per_character():
    packed = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4)
    assert packed == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]], "labels": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    assert bits_per_character(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_character(2 * math.log(2), 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="block_size"):
        data_module.tokenize_and_pack(None, None, block_size=1)


# --------------------------------------------------------------------------- schedule and budget
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_time_budget_callback_stops_at_the_first_step_past_the_budget():
    clock = FakeClock()
    callback = TimeBudgetCallback(10.0, clock=clock)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    for step, now in enumerate([103.0, 109.9, 110.0], start=1):
        clock.now = now
        state.global_step = step
        callback.on_step_end(None, state, control)
        assert control.should_training_stop == (now >= 110.0)
    assert callback.stopped_at_step == 3
    with pytest.raises(ValueError, match="time budget"):
        TimeBudgetCallback(-1)


def test_schedule_warms_up_then_decays_by_steps_or_by_time():
    clock = FakeClock()
    by_steps = WarmupCosineSchedule(max_steps=100, warmup_steps=9, clock=clock)
    assert by_steps(0) == pytest.approx(0.1)
    assert by_steps(9) == pytest.approx(1 - 0.9 * 0.5 * (1 - math.cos(math.pi * 0.09)))
    assert by_steps(100) == pytest.approx(0.1)
    by_time = WarmupCosineSchedule(max_steps=10_000, warmup_steps=0, time_budget_s=60, clock=clock)
    clock.now += 30
    assert by_time(10) == pytest.approx(0.55)  # half the budget: halfway down the cosine
    clock.now += 60
    assert by_time(11) == pytest.approx(0.1)


def test_time_budget_stops_a_real_streaming_run(tmp_path):
    result = train_model(**dict(TINY_RUN, max_steps=50), time_budget_s=0, streaming=True,
                         output_dir=tmp_path / "budget")
    assert result.metrics["train_steps"] == 1
    assert result.stopped_by_time_budget
    assert (tmp_path / "budget" / "model.safetensors").is_file()


def test_a_local_text_file_trains_and_is_named_in_the_card(tmp_path, shakespeare):
    text = tmp_path / "my_notes.txt"
    text.write_text(shakespeare[:20_000], encoding="utf-8")
    result = train_model(**dict(TINY_RUN, corpus=str(text), max_steps=2), output_dir=tmp_path / "local")
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert {r.dataset_name for r in card.data.eval_results} == {"my_notes.txt"}
    assert result.metrics["eval_loss"] > 0


# --------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "tiny-retmamba"
    return train_model(**TINY_RUN, output_dir=folder, seed=0)


def test_train_model_writes_a_hub_ready_folder(run):
    files = {p.name for p in run.folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer_config.json",
            "vocab.json", "tokenization_charword.py", "configuration_retmamba.py", "modeling_retmamba.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((run.folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_retmamba.RetMambaForCausalLM"
    assert config["vocab_size"] == len(run.tokenizer) == 4 + 256 + 65
    assert config["use_cache"] is True
    generation = json.loads((run.folder / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["temperature"] == 0.8 and generation["top_k"] == 50

    m = run.metrics
    assert m["train_steps"] == 6 and m["train_tokens"] == 6 * 4 * 32
    assert all(math.isfinite(m[k]) for k in ("eval_loss", "eval_bpc", "train_loss"))
    assert m["eval_bpc"] == pytest.approx(m["eval_loss"] / math.log(2))  # one token per character
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["parameters"] == sum(p.numel() for p in run.model.parameters())
    weights = load_file(run.folder / "model.safetensors")
    torch.testing.assert_close(weights["model.embed_tokens.weight"], run.model.model.embed_tokens.weight,
                               rtol=0, atol=0)


def test_saved_folder_loads_without_strata_and_gives_identical_logits(run, tmp_path):
    prompt = "ROMEO:\nWhat light"
    ids = run.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = run.model.eval()(ids).logits
    out = tmp_path / "logits.safetensors"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["strata"] = None  # the folder must not need the installed package
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads({torch.get_num_threads()})
        model = AutoModelForCausalLM.from_pretrained({str(run.folder)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(run.folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = tok({prompt!r}, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits
        save_file({{"ids": ids, "logits": logits}}, {str(out)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_file(out)
    assert torch.equal(loaded["ids"], ids)
    assert torch.equal(loaded["logits"], expected)  # same weights, same code, same threads: bitwise equal


def test_model_card_reports_the_run(run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run.folder / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"loss": run.metrics["eval_loss"], "bpc": run.metrics["eval_bpc"],
                       "perplexity": run.metrics["eval_perplexity"]}
    assert card.data.datasets == ["karpathy/tiny_shakespeare"]
    assert card.data.language == "en"


# --------------------------------------------------------------------------- errors
def test_unknown_architecture_and_preset_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown architecture 'retnamba'; available: \[.*'retmamba'"):
        train_model(**dict(TINY_RUN, arch="retnamba"), output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown preset 'fusion-huge'.*'fusion-small'"):
        train_model(**dict(TINY_RUN, preset="fusion-huge"), output_dir=tmp_path)
    with pytest.raises(ValueError, match="seq_len"):
        train_model(**dict(TINY_RUN, seq_len=0), output_dir=tmp_path)


def _one_line(excinfo) -> str:
    message = str(excinfo.value.code)
    assert "\n" not in message and message.startswith("strata: "), message
    return message


def test_push_to_hub_offline_is_a_one_line_error_before_training(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as excinfo:
        train_model(**TINY_RUN, output_dir=tmp_path / "never", push_to_hub=True, hub_model_id="someone/tiny")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in _one_line(excinfo)
    assert not (tmp_path / "never").exists()  # failed before any training


def test_push_folder_errors_are_one_line(run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as excinfo:
        push_folder(run.folder, "someone/tiny")
    assert "HF_HUB_OFFLINE" in _one_line(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        push_folder(run.folder, "not a repo id")
    assert "invalid Hub repo id" in _one_line(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        push_folder(run.folder / "checkpoints", "someone/tiny")
    assert "not a Hub-ready model folder" in _one_line(excinfo)

    # Online setting but nothing listening: the network error is reported, not raised.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as excinfo:
        push_folder(run.folder, "someone/tiny", token="hf_not_a_real_token")
    message = _one_line(excinfo)
    assert "cannot reach the Hugging Face Hub" in message and "strata push" in message


def test_push_folder_uploads_the_folder_without_checkpoints(run, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import filter_repo_objects

    from strata.training.export import UPLOAD_IGNORE

    folder = tmp_path / "to-push"
    shutil.copytree(run.folder, folder)
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "https://hub/commit")

    assert push_folder(folder, "org/tiny-retmamba", private=True) == "https://hub/commit"
    assert calls[0] == ("create", "org/tiny-retmamba", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = calls[1][1]
    assert upload["repo_id"] == "org/tiny-retmamba" and upload["folder_path"] == str(folder)
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert uploaded == {f for f in files if not f.startswith("checkpoints/")}
    assert upload["ignore_patterns"] == UPLOAD_IGNORE
    assert 'model_id = "org/tiny-retmamba"' in (folder / "README.md").read_text()


def test_demo_settings_from_flags_and_environment(monkeypatch):
    from strata.training import demo

    monkeypatch.setenv("STRATA_DEMO_SECONDS", "45")
    assert demo._seconds_from_env() == 45.0
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("STRATA_DEMO_SECONDS", bad)
        with pytest.raises(SystemExit, match="STRATA_DEMO_SECONDS"):
            demo._seconds_from_env()
    monkeypatch.delenv("STRATA_DEMO_SECONDS")
    assert demo._seconds_from_env() == demo.DEFAULT_SECONDS
    assert demo.choose_threads(3, available=2) == (3, "as requested")
    threads, why = demo.choose_threads(None, available=2)
    assert 1 <= threads <= 2 and why
    with pytest.raises(SystemExit, match="--threads"):
        demo.main(["--threads", "0", "--seconds", "1"])
