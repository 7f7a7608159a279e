"""THL inference tools: layered engine == plain model, generate_text, ONNX step, INT8."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from strata import RecurrentCache, THLConfig, THLForCausalLM
from strata.modeling.inference_thl import (
    LayeredInferenceEngine,
    OnnxStepRunner,
    export_onnx_step,
    generate_text,
    model_nbytes,
    quantize_int8,
    state_names,
)
from strata.modeling.modeling_thl import state_from_cache


def tiny(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return THLForCausalLM(THLConfig.from_preset(preset, **overrides)).eval()


def ids_for(model, batch=2, length=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=g)


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


# --------------------------------------------------------------------------- layered engine
@torch.no_grad()
def test_layered_engine_equals_the_plain_model_on_cpu():
    model = tiny(inference_chunk_size=8)  # the core unit then runs (and streams) 3 times per prompt
    ids = ids_for(model, length=21)
    plain = model(ids, use_cache=True)
    engine = LayeredInferenceEngine(model, device="cpu")
    layered = engine(ids, past_key_values=RecurrentCache(model.config.num_hidden_layers), use_cache=True)
    assert torch.equal(layered.logits, plain.logits)  # the final norm and the output projection included
    assert engine.transfers == 5 + 2  # embed, core x3, norm, out_proj, lm_head
    # Step by step through the engine equals step by step through the plain model.
    cache_e, cache_p = None, RecurrentCache(model.config.num_hidden_layers)
    for t in range(ids.shape[1]):
        logits_e, cache_e = engine.step(ids[:, t : t + 1], cache_e)
        logits_p = model(ids[:, t : t + 1], past_key_values=cache_p, use_cache=True).logits[:, -1]
        assert torch.equal(logits_e, logits_p)
    torch.testing.assert_close(logits_e, plain.logits[:, -1], atol=1e-5, rtol=0)
    # Outside a call, the model is a plain model again: no hooks left behind.
    for _, module in model.streaming_units():
        assert not module._forward_pre_hooks and not module._forward_hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_layered_engine_on_cuda_streams_weights_and_matches():
    model = tiny("small", vocab_size=512)
    ids = ids_for(model, length=64)
    plain = model(ids).logits
    torch.cuda.reset_peak_memory_stats()
    engine = LayeredInferenceEngine(model, device="cuda")
    out = engine(ids).logits
    torch.testing.assert_close(out.cpu(), plain, atol=1e-3, rtol=1e-3)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.cuda.max_memory_allocated() < model_nbytes(model) + 64 * 2**20


def test_engine_refuses_a_model_without_units():
    with pytest.raises(TypeError, match="streaming_units"):
        LayeredInferenceEngine(torch.nn.Linear(2, 2), device="cpu")


# --------------------------------------------------------------------------- generate_text
def test_generate_text_greedy_equals_generate_and_streams(char_tokenizer):
    model = tiny(vocab_size=len(char_tokenizer))
    prompt = "ROMEO: what"
    streamer = Recorder()
    text = generate_text(model, char_tokenizer, prompt, max_length=30, temperature=0, streamer=streamer)
    enc = char_tokenizer(prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=30 - n, do_sample=False)  # both stop at <eos> (id 2)
    assert text == char_tokenizer.decode(ref[0], skip_special_tokens=True)
    assert text.startswith(prompt)  # the tokenizer round-trips the prompt
    assert streamer.ended and torch.equal(streamer.puts[0], enc["input_ids"])
    assert torch.equal(torch.cat([p.reshape(-1) for p in streamer.puts[1:]]), ref[0, n:])
    # Through the layered engine: the same text.
    assert generate_text(model, char_tokenizer, prompt, max_length=30, temperature=0, device="cpu") == text


def test_generate_text_sampling_is_seeded_and_respects_top_k(char_tokenizer):
    model = tiny(vocab_size=len(char_tokenizer))
    a = generate_text(model, char_tokenizer, "To be", max_new_tokens=20, temperature=0.8, top_k=5, seed=3)
    b = generate_text(model, char_tokenizer, "To be", max_new_tokens=20, temperature=0.8, top_k=5, seed=3)
    assert a == b and a.startswith("To be")
    one = generate_text(model, char_tokenizer, "To be", max_new_tokens=12, temperature=1.5, top_k=1, seed=4)
    assert one == generate_text(model, char_tokenizer, "To be", max_new_tokens=12, temperature=0)  # top_k=1 is greedy
    with pytest.raises(ValueError, match="temperature"):
        generate_text(model, char_tokenizer, "x", temperature=-1)
    with pytest.raises(ValueError, match="max_length"):
        generate_text(model, char_tokenizer, "a long prompt", max_length=3)


# --------------------------------------------------------------------------- ONNX
@torch.no_grad()
def test_onnx_step_reproduces_the_pytorch_logits_and_state(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = tiny(memory_slots=16)  # the bank fills up: evictions happen during the 40 tokens
    path = tmp_path / "thl_step.onnx"
    names = export_onnx_step(model, path)
    assert names == ["input_ids"] + state_names(model.config)
    runner = OnnxStepRunner(path, model.config)
    ids = ids_for(model, batch=1, length=40)
    cache = RecurrentCache(model.config.num_hidden_layers)
    for t in range(ids.shape[1]):
        expected = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(runner.step(ids[:, t : t + 1]), expected, atol=1e-4, rtol=0)
    state = state_from_cache(cache, model.config.num_hidden_layers)
    final = dict(zip(state_names(model.config), runner.state))
    assert torch.equal(torch.from_numpy(final["written"]), state["written"])
    assert torch.equal(torch.from_numpy(final["clock"]), state["clock"])
    torch.testing.assert_close(torch.from_numpy(final["bank"]), state["bank"], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- INT8
@torch.no_grad()
def test_int8_quantization_shrinks_the_linears_and_keeps_the_model(char_tokenizer, shakespeare):
    model = tiny(vocab_size=len(char_tokenizer))
    q = quantize_int8(model)
    others = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    head = model.lm_head.weight.numel()
    # fp32 -> int8 saves 3 bytes per Linear weight; the tied LM head becomes its own int8 copy (1 byte each)
    assert model_nbytes(model) - model_nbytes(q) == 3 * others - head
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = torch.tensor(char_tokenizer(shakespeare[:300])["input_ids"])[None]
    a, b = model(ids).logits, q(ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99
    # Token by token == full forward up to quantization noise only: dynamic quantization picks the
    # activation scale per call, so one 20-token call and twenty 1-token calls round differently.
    cache = RecurrentCache(q.config.num_hidden_layers)
    steps = [q(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, 1), q(ids[:, :20]).logits, atol=3e-2, rtol=0)
    assert model.lm_head.weight.dtype == torch.float32  # the original model is untouched


# --------------------------------------------------------------------------- bench
def test_bench_compares_equal_sized_models_and_measures_flat_state():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_thl", Path(__file__).resolve().parents[1] / "bench" / "thl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    thl, llama = bench.build("thl", 400), bench.build("llama", 400)
    assert abs(bench.num_parameters(llama) / bench.num_parameters(thl) - 1) < 0.05  # equal size within 5%
    short = bench.memory_child("thl", 64, 2, 1)
    long = bench.memory_child("thl", 192, 2, 1)
    assert short["state_mb"] == long["state_mb"] > 0
    kv_short, kv_long = bench.memory_child("llama", 64, 2, 1), bench.memory_child("llama", 192, 2, 1)
    assert kv_long["state_mb"] > 2.5 * kv_short["state_mb"]
