"""Tiny-ONN: each model feature of issue 8 with a behavioural test.

(The generic contract, cache, generation, Trainer, PEFT, remote code, lives in
tests/conformance.)
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from strata import RecurrentCache, TinyONNConfig, TinyONNForCausalLM
from strata.modeling.modeling_tiny_onn import causal_word_token_ids, patchify, rotate_2d


def build(**overrides):
    torch.manual_seed(0)
    return TinyONNForCausalLM(TinyONNConfig.from_preset("tiny", **overrides)).eval()


def ids_of(model, batch=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=g)


def words_of(model, ids, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.word_vocab_size, ids.shape, generator=g)


def with_word_embedding(model):
    """The word embedding starts at zero (the model starts as a character model); give it values."""
    torch.manual_seed(3)
    with torch.no_grad():
        model.model.word_embed.weight.normal_(0, 0.5)
    return model


# --------------------------------------------------------------------------- presets
def test_presets_sizes_and_context():
    sizes = {}
    for name in ["tiny", "0.1b", "omni-1b"]:
        config = TinyONNConfig.from_preset(name)
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in TinyONNForCausalLM(config).parameters())
    assert sizes["tiny"] < 1_000_000
    assert 0.08e9 < sizes["0.1b"] < 0.15e9  # the seed's ~0.1B bonsai model
    assert 0.8e9 < sizes["omni-1b"] < 1.3e9
    assert TinyONNConfig.from_preset("0.1b").max_position_embeddings == 32768
    with pytest.raises(ValueError, match="rope_type"):
        TinyONNConfig.from_preset("tiny", rope_scaling={"rope_type": "no-such", "factor": 2.0})
    with pytest.raises(ValueError, match="min_active_experts"):
        TinyONNConfig.from_preset("tiny", min_active_experts=99)


# --------------------------------------------------------------------------- hierarchical embedding
@torch.no_grad()
def test_embedding_is_char_plus_word_and_word_term_is_optional():
    model = with_word_embedding(build())
    ids = ids_of(model)
    words = words_of(model, ids)
    out = model(ids, word_token_ids=words, output_hidden_states=True)
    expected = model.model.embed_tokens(ids) + model.model.word_embed(words)
    torch.testing.assert_close(out.hidden_states[0], expected, atol=0, rtol=0)
    plain = model(ids, output_hidden_states=True)
    torch.testing.assert_close(plain.hidden_states[0], model.model.embed_tokens(ids), atol=0, rtol=0)
    assert not torch.allclose(out.logits, plain.logits)
    # a fresh model starts as the character model: word embedding zero
    fresh = build()
    assert torch.equal(fresh(ids, word_token_ids=words).logits, fresh(ids).logits)


@torch.no_grad()
def test_word_ids_are_checked():
    model = build()
    ids = ids_of(model)
    with pytest.raises(ValueError, match="shape of `input_ids`"):
        model(ids, word_token_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the word vocabulary"):
        model(ids, word_token_ids=torch.full_like(ids, model.config.word_vocab_size))
    no_words = build(word_vocab_size=0)
    assert no_words.model.word_embed is None
    with pytest.raises(ValueError, match="no word embedding"):
        no_words(ids, word_token_ids=torch.zeros_like(ids))


@torch.no_grad()
def test_cached_decoding_with_word_ids_equals_full_forward():
    model = with_word_embedding(build())
    ids = ids_of(model, length=15)
    words = words_of(model, ids)
    full = model(ids, word_token_ids=words).logits
    cache = RecurrentCache(model.config.num_hidden_layers)
    steps = [model(ids[:, t : t + 1], word_token_ids=words[:, t : t + 1], past_key_values=cache).logits
             for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_causal_word_ids_see_no_later_character(char_tokenizer):
    text = "First Citizen: the thee thou, then"
    ids = char_tokenizer(text)["input_ids"]
    full = char_tokenizer(text, return_word_ids=True)
    causal = causal_word_token_ids(char_tokenizer, ids)
    vocab = char_tokenizer.get_word_vocab()
    # the last character of every word carries the whole word, as the tokenizer gives it
    units = full["word_ids"]
    for t in range(len(ids)):
        if t + 1 == len(ids) or units[t + 1] != units[t]:
            assert causal[t] == full["word_token_ids"][t]
    # inside a word, the prefix so far ("th" is not a word here, "the" is)
    t = text.index("then") + 2
    assert causal[t] == vocab["the"] != full["word_token_ids"][t]
    # causal: the ids of every prefix of the text are a prefix of the ids of the text
    for k in range(1, len(ids) + 1):
        assert causal_word_token_ids(char_tokenizer, ids[:k]) == causal[:k]


@torch.no_grad()
def test_generation_computes_word_ids_of_new_text(char_tokenizer):
    vocab = len(char_tokenizer)
    model = with_word_embedding(build(vocab_size=vocab, word_vocab_size=char_tokenizer.word_vocab_size, block_size=3))
    prompt = char_tokenizer(["ROMEO: the", "JULIET: th"], return_tensors="pt", padding=True)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    out = model.generate(ids, attention_mask=mask, tokenizer=char_tokenizer, max_new_tokens=8, do_sample=False)
    # reference: greedy decoding with full forwards, word ids recomputed on the whole text each step
    seq = ids
    for _ in range(8):
        rows = []
        for row, m in zip(seq.tolist(), torch.cat([mask, torch.ones(2, seq.shape[1] - mask.shape[1], dtype=torch.long)], 1)):
            pad = int((m == 0).sum())
            rows.append([0] * pad + causal_word_token_ids(char_tokenizer, row[pad:]))
        words = torch.tensor(rows)
        full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=torch.long)], 1)
        logits = model(seq, attention_mask=full_mask, word_token_ids=words).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    # the word term really took part: scores differ from generation without the tokenizer
    with_tok = model.generate(ids, attention_mask=mask, tokenizer=char_tokenizer, max_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True, output_scores=True)
    without = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
    assert not torch.allclose(with_tok.scores[0], without.scores[0])
    # the prompt's own word ids may be given; then the tokenizer is needed for the new text
    given = torch.tensor([causal_word_token_ids(char_tokenizer, r) for r in ids.tolist()])
    same = model.generate(ids, attention_mask=mask, word_token_ids=given, tokenizer=char_tokenizer,
                          max_new_tokens=8, do_sample=False)
    assert torch.equal(same[0], out[0])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, word_token_ids=given, max_new_tokens=2)


# --------------------------------------------------------------------------- patches, 2D RoPE
def test_2d_rope_rotates_x_and_y_halves_separately():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16)
    at = lambda px, py: rotate_2d(x, torch.tensor([[[px, py]]]), theta=100.0)  # noqa: E731
    a, b, c = at(3, 5), at(7, 5), at(3, 9)
    assert torch.equal(a[..., 8:], b[..., 8:]) and not torch.allclose(a[..., :8], b[..., :8])  # x: first half
    assert torch.equal(a[..., :8], c[..., :8]) and not torch.allclose(a[..., 8:], c[..., 8:])  # y: second half
    # each half is a rotation: pair (i, i + 4) turned by angle p * theta^(-2i/8)
    for axis, p in [(0, 3), (1, 5)]:
        part, rot = x[0, 0, axis * 8 : axis * 8 + 8], a[0, 0, axis * 8 : axis * 8 + 8]
        for i in range(4):
            angle = p * 100.0 ** (-2 * i / 8)
            u, v = part[i], part[i + 4]
            torch.testing.assert_close(rot[i], u * math.cos(angle) - v * math.sin(angle))
            torch.testing.assert_close(rot[i + 4], v * math.cos(angle) + u * math.sin(angle))
    torch.testing.assert_close(a.norm(), x.norm())
    assert torch.equal(at(0, 0), x)


def test_patchify_positions():
    img = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    patches, pos = patchify(img, 4)
    assert patches.shape == (2, 6, 48) and pos.shape == (2, 6, 2)
    assert pos[0].tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]
    assert torch.equal(patches[0, 4].view(3, 4, 4), img[0, :, 4:8, 4:8])  # (x=1, y=1)


def test_image_plus_caption_batch_trains():
    model = build(vocab_size=64, patch_size=4)
    model.train()
    torch.manual_seed(1)
    # two kinds of 8x8 images (bright top / bright bottom) with their own caption
    top = torch.zeros(3, 8, 8)
    top[:, :4] = 1.0
    images = torch.stack([top, top.flip(1)] * 4) + 0.05 * torch.randn(8, 3, 8, 8)
    captions = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 11, 12, 13, 14, 15]] * 4)
    out = model(captions, pixel_values=images, labels=captions)
    assert out.logits.shape == (8, 4 + 6, 64)  # 4 patches then 6 characters
    first = out.loss.item()
    out.loss.backward()
    assert model.model.patch_embed.weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.zero_grad()
    for _ in range(40):
        loss = model(captions, pixel_values=images, labels=captions).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0
    # the caption's second character (6 or 11) is read from the image: with the images
    # swapped it becomes unlikely
    model.eval()
    with torch.no_grad():
        def second_char_nll(imgs):
            logits = model(captions, pixel_values=imgs).logits[:, 4]  # after 4 patches and "5"
            return F.cross_entropy(logits, captions[:, 1])
        right, swapped = second_char_nll(images), second_char_nll(images[[1, 0] * 4])
    assert swapped > right + 1.0, (right, swapped)


@torch.no_grad()
def test_patch_positions_matter_and_inputs_are_checked():
    model = build()
    torch.manual_seed(0)
    patches = torch.randn(1, 4, model.config.patch_dim)
    ids = ids_of(model, batch=1, length=3)
    pos = torch.tensor([[[0, 0], [1, 0], [0, 1], [1, 1]]])
    a = model(ids, pixel_values=patches, patch_positions=pos).logits
    b = model(ids, pixel_values=patches, patch_positions=pos.flip(-1)).logits
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="patch_positions"):
        model(ids, pixel_values=patches)
    with pytest.raises(ValueError, match="divisible"):
        model(ids, pixel_values=torch.zeros(1, 3, 6, 8))


# --------------------------------------------------------------------------- gating
def gate_outputs(gate, x):
    r = gate(x)
    return r.logits, r.weights, r.active


def test_threshold_gate_variable_count_fallback_and_softmax():
    torch.manual_seed(0)
    model = build()
    gate = model.model.layers[0].moie.gate
    x = torch.randn(4, 50, model.config.hidden_size)
    logits, weights, active = gate_outputs(gate, x)
    counts = active.sum(-1)
    assert counts.min() >= 1 and len(counts.unique()) > 1  # a variable number of experts per token
    expected_active = logits > 0
    none = ~expected_active.any(-1)
    assert torch.equal(active[~none], expected_active[~none])
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 50))
    assert torch.all(weights[~active] == 0)
    torch.testing.assert_close(weights[0, 0][active[0, 0]], torch.softmax(logits[0, 0][active[0, 0]], -1))
    # thresholds so high that nothing opens: every token falls back to exactly k_min experts
    with torch.no_grad():
        gate.threshold.fill_(20.0)
    gate.k_min = 2
    _, weights, active = gate_outputs(gate, x)
    assert torch.all(active.sum(-1) == 2)
    top2 = (F.normalize(x, dim=-1) @ F.normalize(gate.keys, dim=-1).T).topk(2, -1).indices
    assert torch.equal(active.nonzero()[:, -1].view(4, 50, 2).sort(-1).values, top2.sort(-1).values)


def test_inactive_heads_and_experts_do_not_matter():
    model = build()
    ids = ids_of(model, length=10)
    block = model.model.layers[0]
    with torch.no_grad():  # head 0 and expert 0 never open; every token has an alternative
        block.attn.gate.threshold.fill_(-20.0)
        block.attn.gate.threshold[0] = 20.0
        block.moie.gate.threshold.fill_(-20.0)
        block.moie.gate.threshold[0] = 20.0
        before = model(ids).logits
        dh = model.config.head_dim
        for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
            proj.weight[:dh] += 1.0
        block.attn.o_proj.weight[:, :dh] += 1.0
        block.moie.w_in[0] += 1.0
        block.moie.w_out[0] += 1.0
        after = model(ids).logits
        assert torch.equal(before, after)
        block.moie.w_out[1] += 0.1  # an active expert does matter
        assert not torch.equal(model(ids).logits, before)


def test_straight_through_gate_gets_main_loss_gradient():
    model = build(gate_loss_weight=0.0)
    model.train()
    ids = ids_of(model)
    model(ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        for gate in (layer.attn.gate, layer.moie.gate):
            assert gate.keys.grad.abs().sum() > 0 and gate.threshold.grad.abs().sum() > 0


# --------------------------------------------------------------------------- growth, dead experts
def test_grow_experts_keeps_outputs_and_round_trips(tmp_path):
    model = build()
    ids = ids_of(model, batch=3, length=20)
    with torch.no_grad():
        before = model(ids).logits
    model.grow_experts(5)
    assert model.config.num_experts == 13
    assert model.model.layers[0].moie.w_in.shape[0] == 13
    with torch.no_grad():
        after = model(ids).logits
        out = model(ids, use_cache=True)
    assert torch.equal(before, after)
    assert out.expert_active_fraction > 0
    model.save_pretrained(tmp_path)
    loaded = TinyONNForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_experts == 13
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    # new experts train: once open they get gradients
    gate = model.model.layers[0].moie.gate
    assert not bool(gate.eligible[8:].any())
    with torch.no_grad():
        gate.threshold[8:] = -20.0
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].moie.w_out.grad[8:].abs().sum() > 0
    assert bool(gate.eligible[8:].all())  # opened by their own threshold: now in the fallback pool
    with pytest.raises(ValueError, match="positive integer"):
        model.grow_experts(0)


def test_dead_experts_are_reinitialised():
    model = build()
    model.train()
    moie = model.model.layers[1].moie
    with torch.no_grad():
        moie.gate.threshold.fill_(-20.0)
        moie.gate.threshold[2] = 20.0  # expert 2 never fires
    ids = ids_of(model)
    model(ids, labels=ids)
    counts = moie.gate.activation_counts
    assert counts[2] == 0 and bool((counts[torch.arange(8) != 2] > 0).all())
    w_in, w_out = moie.w_in.detach().clone(), moie.w_out.detach().clone()
    reinit = model.reinit_dead_experts()
    assert reinit[1] == 1
    assert not torch.equal(moie.w_in[2], w_in[2]) and not torch.equal(moie.w_out[2], w_out[2])
    keep = torch.arange(8) != 2
    assert torch.equal(moie.w_in[keep], w_in[keep]) and torch.equal(moie.w_out[keep], w_out[keep])
    assert moie.gate.threshold[2].item() == pytest.approx(moie.gate.initial_threshold())
    assert moie.gate.activation_counts is None
    model.eval()
    assert model.reinit_dead_experts() == [0, 0]  # no training forward since: nothing counted


# --------------------------------------------------------------------------- routing loss, PI
def gate_params(model):
    return [p for layer in model.model.layers for g in (layer.attn.gate, layer.moie.gate) for p in (g.keys, g.threshold)]


def test_surprise_gate_loss_reaches_gate_parameters_in_one_backward():
    model = build(gate_loss_weight=0.5)
    model.train()
    ids = ids_of(model)
    labels = ids.clone()
    labels[:, :3] = -100
    params = gate_params(model)

    def grads(weight):
        model.config.gate_loss_weight = weight
        model.zero_grad()
        out = model(ids, labels=labels)
        (2.0 * out.loss).backward()  # a scaled loss (as gradient accumulation does) scales both parts
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, with_gate = grads(0.5)
    torch.testing.assert_close(out.loss.detach(), out.main_loss)  # the value stays the LM loss
    stats = model.routing_stats()
    _, without = grads(0.0)
    # the readable two-pass twin: a second gradient of the main loss, then the routing loss
    model.config.gate_loss_weight = 0.5
    inner = model.model(ids, return_routing=True)
    logits = model.lm_head(inner.last_hidden_state)
    main = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    gate_loss, surprise = model.routing_loss(main, inner.routing, labels)
    expected = torch.autograd.grad(2.0 * 0.5 * gate_loss, params)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, e in zip(params, expected):
        name = names[id(p)]
        assert e.abs().sum() > 0, name  # reaches every key and threshold
        torch.testing.assert_close(with_gate[name] - without[name], e, atol=1e-6, rtol=1e-4, msg=name)
    assert stats["gate_loss"] == pytest.approx(gate_loss.item(), rel=1e-5)
    assert stats["surprise"] == pytest.approx(surprise.item(), rel=1e-4)
    # everything else gets exactly the LM loss's gradient: the routing loss trains only the gates
    gate_names = {names[id(p)] for p in params}
    for name in with_gate:
        if name not in gate_names:
            torch.testing.assert_close(with_gate[name], without[name], atol=0, rtol=0, msg=name)


def test_pi_score_formula():
    model = build(pi_alpha=2.0, pi_gamma=0.25)
    model.train()
    ids = ids_of(model)
    out = model(ids, labels=ids)
    logp = out.logits[:, :-1].detach().float().log_softmax(-1)
    tau = -(logp.exp() * logp).sum(-1).mean()
    torch.testing.assert_close(out.output_entropy, tau)
    # before any backward there is no surprise yet: PI of the loss term
    torch.testing.assert_close(out.pi_score, torch.exp(-2.0 * 0.75 * out.main_loss / tau))
    out.loss.backward()
    stats = model.routing_stats()
    assert stats["surprise"] > 0 and 0 < stats["pi_score"] <= 1
    expected = torch.exp(-2.0 * (0.75 * out.main_loss / tau + 0.25 * stats["surprise"]))
    assert stats["pi_score"] == pytest.approx(expected.item(), rel=1e-5)
    # the next forward's PI uses that surprise (the latest known)
    nxt = model(ids, labels=ids)
    expected = torch.exp(-2.0 * (0.75 * nxt.main_loss / nxt.output_entropy + 0.25 * stats["surprise"]))
    torch.testing.assert_close(nxt.pi_score, expected)
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=ids)  # evaluation: no surprise term
    torch.testing.assert_close(out.pi_score, torch.exp(-2.0 * 0.75 * out.main_loss / out.output_entropy))


# --------------------------------------------------------------------------- context, YaRN
@torch.no_grad()
def test_yarn_through_rope_scaling():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    model = build(max_position_embeddings=64, rope_scaling=yarn)
    inv_freq, factor = model.model.rotary.frequencies("cpu")
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](model.config, "cpu")
    torch.testing.assert_close(inv_freq, ref_inv.float())
    assert factor == pytest.approx(ref_factor) and factor > 1
    plain = build(max_position_embeddings=64)
    assert not torch.allclose(plain.model.rotary.frequencies("cpu")[0], inv_freq)
    ids = ids_of(model, batch=1, length=200)  # 3x beyond the original window
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    cache = RecurrentCache(model.config.num_hidden_layers)
    first = model(ids[:, :150], past_key_values=cache, use_cache=True).logits
    rest = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(150, 200)]
    torch.testing.assert_close(torch.cat([first] + rest, 1), logits, atol=1e-4, rtol=0)
    assert model.config.rope_scaling["rope_type"] == "yarn"


# --------------------------------------------------------------------------- checkpointing
def test_gating_outside_checkpoint_bf16_same_masks_and_gradients():
    model = build().to(torch.bfloat16)
    model.train()
    ids = ids_of(model, length=24)
    calls = []
    for layer in model.model.layers:
        for gate in (layer.attn.gate, layer.moie.gate):
            gate.register_forward_hook(lambda m, i, o: calls.append(o.active.clone()))

    def run():
        calls.clear()
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return [c for c in calls], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    masks, grads = run()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    ck_masks, ck_grads = run()
    # the gates ran once per sub-layer (never recomputed in backward) and decided the same
    assert len(masks) == len(ck_masks) == 2 * model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(masks, ck_masks))
    assert grads.keys() == ck_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ck_grads[name]), name
