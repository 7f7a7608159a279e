"""H-M-T-R beyond the conformance suite: capsule positions, block structure, mid-block prompts,
the exact-LM property, the lazy encoder and the reasoner cache, the stage losses.

Models are re-initialised with large weights (`lively`) so that every logit depends strongly
on its context: an equality that holds only because the outputs barely move proves nothing.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from strata import HMTRConfig, HMTRForCausalLM, RecurrentCache
from strata.modeling.modeling_hmtr import COUNT, PENDING, PENDING_MASK


def lively(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "A_log" not in name and "conv1d" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1.2 / math.sqrt(p.shape[-1]))
            elif name.endswith(("start_capsule", "start_input")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def tiny(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return lively(HMTRForCausalLM(HMTRConfig.from_preset(preset, **overrides)).eval(), seed)


def ids_for(model, batch=1, length=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=g)


def token_by_token(model, ids, cache=None):
    cache = cache if cache is not None else RecurrentCache(model.config.num_hidden_layers)
    steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])]
    return torch.cat(steps, 1), cache


# --------------------------------------------------------------------------- config
def test_config_defaults_and_derived_depth():
    c = HMTRConfig()
    assert c.block_size == 8 and c.capsule == "deterministic" and c.loss == "mse" and c.decoder_cell == "gru"
    assert c.num_hidden_layers == c.encoder_layers + c.reasoner_layers + c.decoder_layers
    assert HMTRConfig.from_preset("tiny-lstm").num_hidden_layers == 1 + 2 + 2
    with pytest.raises(ValueError, match="num_hidden_layers"):
        HMTRConfig(num_hidden_layers=3)
    for name in HMTRConfig.preset_names():
        HMTRConfig.from_preset(name)
    assert sum(p.numel() for p in HMTRForCausalLM(HMTRConfig.from_preset("tiny")).parameters()) < 1_000_000


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(capsule="gaussian"), "capsule"),
        (dict(loss="l1"), "loss"),
        (dict(decoder_cell="rnn"), "decoder_cell"),
        (dict(token_dropout=1.0), "token_dropout"),
        (dict(capsule_dropout=-0.1), "capsule_dropout"),
        (dict(num_attention_heads=3), "hidden_size"),
        (dict(encoder_layers=0), "encoder_layers"),
        (dict(reasoner_layers=0), "reasoner_layers"),
        (dict(decoder_layers=0), "decoder_layers"),
        (dict(energy_samples=1), "energy_samples"),
        (dict(block_size=True), "block_size"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        HMTRConfig.from_preset("tiny", **overrides)


# --------------------------------------------------------------------------- capsules and blocks
@pytest.mark.parametrize("K", [4, 8])
@torch.no_grad()
def test_capsules_are_sampled_at_the_last_position_of_every_block(K):
    model = tiny(block_size=K)
    ids = ids_for(model, batch=2, length=3 * K + 2)
    m = model.model
    y = m.encoder(m.embed_tokens(ids))
    caps = m.encode_capsules(ids)
    assert caps.shape == (2, 3, model.config.hidden_size)
    torch.testing.assert_close(caps, m.encoder.capsule_proj(y[:, [K - 1, 2 * K - 1, 3 * K - 1]]))
    # C_t summarises everything up to the end of block t, nothing after it.
    changed = ids.clone()
    changed[:, K + 1] = (changed[:, K + 1] + 1 - 4) % (model.config.vocab_size - 4) + 4  # a token of block 1
    other = m.encode_capsules(changed)
    torch.testing.assert_close(other[:, 0], caps[:, 0], atol=1e-5, rtol=0)  # (chunked scan: rounding only)
    assert (other[:, 1:] - caps[:, 1:]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("K", [4, 8])
@torch.no_grad()
def test_block_zero_is_predicted_from_the_start_capsule_alone(K):
    """Logits at positions 0 .. K-2 (tokens 1 .. K-1 of block 0) come from P_0 = reasoner(start):
    they do not depend on the encoder; from position K - 1 on (block 1) they do."""
    model = tiny(block_size=K)
    ids = ids_for(model, length=3 * K)
    before = model(ids).logits
    with torch.no_grad():
        model.model.encoder.capsule_proj.bias.add_(0.5)
    after = model(ids).logits
    torch.testing.assert_close(before[:, : K - 1], after[:, : K - 1], atol=1e-5, rtol=0)
    assert (before[:, K - 1 :] - after[:, K - 1 :]).abs().amax(-1).min() > 1e-3


@torch.no_grad()
def test_each_block_depends_on_earlier_blocks_only_through_the_capsule():
    """Position i predicts token s of block b from P_b and tokens bK .. i: changing a token of an
    earlier block changes P_b (through the capsules), changing a later token changes nothing."""
    K = 4
    model = tiny(block_size=K)
    ids = ids_for(model, length=4 * K)
    base = model(ids).logits
    later = ids.clone()
    later[0, 2 * K + 1] = 5 if int(later[0, 2 * K + 1]) != 5 else 6
    out = model(later).logits
    torch.testing.assert_close(out[:, : 2 * K + 1], base[:, : 2 * K + 1], atol=1e-5, rtol=0)
    assert (out[:, 2 * K + 1] - base[:, 2 * K + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("preset, K, first", [("tiny", 4, "start"), ("tiny", 16, "start"), ("tiny", 1, "start"),
                                               ("tiny-lstm", 3, "start"), ("tiny", 5, "previous_token")])
@torch.no_grad()
def test_token_by_token_and_every_chunking_equal_the_full_forward(preset, K, first):
    model = tiny(preset, block_size=K, decoder_first_input=first)
    ids = ids_for(model, batch=2, length=2 * K + 5)
    full = model(ids).logits
    assert full.std(1).mean() > 0.5  # the logits really move with the context
    steps, cache = token_by_token(model, ids)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == ids.shape[1]
    for cut in range(1, ids.shape[1]):  # a prompt that ends anywhere inside a block
        first = model(ids[:, :cut], use_cache=True)
        second = model(ids[:, cut:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_three_chunks_with_left_padding_and_different_block_phases():
    """Rows whose real tokens start at different offsets complete blocks at different steps."""
    K = 4
    model = tiny(block_size=K)
    ids = ids_for(model, batch=4, length=14, seed=3)
    pads = [0, 1, 2, 7]
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
        ids[r, :p] = model.config.pad_token_id
    more = ids_for(model, batch=4, length=9, seed=4)
    out1 = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    out2 = model(ids[:, 5:], attention_mask=mask, past_key_values=out1.past_key_values, use_cache=True)
    full_mask = torch.cat([mask, torch.ones_like(more)], 1)
    out3 = model(more, attention_mask=full_mask, past_key_values=out2.past_key_values, use_cache=True)
    logits = torch.cat([out1.logits, out2.logits, out3.logits], 1)
    for r, p in enumerate(pads):
        alone = model(torch.cat([ids[r : r + 1, p:], more[r : r + 1]], 1)).logits[0]
        torch.testing.assert_close(logits[r, p:], alone, atol=1e-4, rtol=0)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids():
    model = tiny(block_size=4)
    ids = ids_for(model, length=11)
    a = model(ids).logits
    b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- exact LM
@pytest.mark.parametrize("preset, K", [("tiny", 4), ("tiny-lstm", 4), ("tiny", 8)])
@torch.no_grad()
def test_exact_lm_per_token_log_probs_sum_to_the_sequence_log_prob(preset, K):
    """sum_i log p(x_{i+1} | x_0..x_i) from one forward == the log-probability accumulated while
    decoding with the cache, token by token; each conditional is a normalised distribution."""
    model = tiny(preset, block_size=K)
    ids = ids_for(model, batch=2, length=3 * K + 3)
    total = model.sequence_log_prob(ids)
    cache = RecurrentCache(model.config.num_hidden_layers)
    acc = torch.zeros(2, dtype=torch.float64)
    for t in range(ids.shape[1] - 1):
        logits = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1].double()
        torch.testing.assert_close(logits.softmax(-1).sum(-1), torch.ones(2, dtype=torch.float64))
        acc += logits.log_softmax(-1).gather(1, ids[:, t + 1 : t + 2]).squeeze(1)
    torch.testing.assert_close(total.double(), acc, atol=1e-3, rtol=1e-6)
    # and with labels the model's loss is the mean negative log-likelihood of the same tokens
    loss = model(ids, labels=ids).loss
    torch.testing.assert_close(loss.double(), -total.double().sum() / (2 * (ids.shape[1] - 1)), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("K", [4, 16])
@torch.no_grad()
def test_greedy_generation_after_prompts_ending_anywhere_in_a_block(K):
    model = tiny(block_size=K)
    base = ids_for(model, length=K + 3, seed=5)
    for length in sorted({1, 2, K - 1, K, K + 1, K + 3}):
        ids = base[:, :length]
        out = model.generate(ids, max_new_tokens=K + 2, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(K + 2):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, seq), length


@torch.no_grad()
def test_generation_runs_the_reasoner_once_per_block_and_the_encoder_lazily():
    K = 4
    model = tiny(block_size=K)
    calls = {"reasoner": 0, "encoder": []}
    r_hidden, enc_forward = model.model.reasoner.hidden, model.model.encoder.forward

    def count_reasoner(*args, **kwargs):
        calls["reasoner"] += 1
        return r_hidden(*args, **kwargs)

    def count_encoder(x, *args, **kwargs):
        calls["encoder"].append(x.shape[1])
        return enc_forward(x, *args, **kwargs)

    model.model.reasoner.hidden = count_reasoner
    model.model.encoder.forward = count_encoder
    ids = ids_for(model, length=6)  # 1 complete block + 2 tokens of block 1
    out = model.generate(ids, max_new_tokens=13, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    # prefill: encoder over 6 tokens, reasoner over [start, C_0]; then tokens 6..18 are fed
    # (the last one is not): blocks complete at tokens 7, 11, 15 -> 3 reasoner steps, each
    # after the encoder consumed the pending tokens of that block.
    assert calls["reasoner"] == 1 + 3
    assert calls["encoder"] == [6, 2, 4, 4]
    cache = out.past_key_values
    state = cache.layer(model.config.decoder_cache_offset)
    assert int(state.get(COUNT)[0]) == 18 and cache.get_seq_length() == 18
    assert state.get(PENDING).shape[1] == 2 and bool(state.get(PENDING_MASK).all())  # tokens 16, 17
    # reasoner cache: start + one slot per complete block (4 of them), 1/K of the tokens
    k = cache.layer(model.config.reasoner_cache_offset).get("key")
    assert k.shape[2] == 1 + 18 // K


@torch.no_grad()
def test_sampling_is_reproducible_and_streams_blocks():
    from transformers.generation.streamers import BaseStreamer

    class Rec(BaseStreamer):
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            pass

    model = tiny(block_size=4)
    ids = ids_for(model, length=5)
    torch.manual_seed(3)
    a = model.generate(ids, do_sample=True, max_new_tokens=10, top_k=0, pad_token_id=0)
    torch.manual_seed(3)
    rec = Rec()
    b = model.generate(ids, do_sample=True, max_new_tokens=10, top_k=0, pad_token_id=0, streamer=rec)
    assert torch.equal(a, b)
    assert [p.shape[-1] for p in rec.puts[1:]] == [4, 4, 2]


# --------------------------------------------------------------------------- errors
@torch.no_grad()
def test_cache_of_another_batch_size_is_refused():
    model = tiny()
    out = model(ids_for(model, batch=2, length=5), use_cache=True)
    with pytest.raises(ValueError, match="batch size"):
        model(ids_for(model, batch=3, length=1), past_key_values=out.past_key_values, use_cache=True)


def test_stage_losses_refuse_bad_shapes():
    model = tiny(block_size=4)
    with pytest.raises(ValueError, match="block_size=4"):
        model.autoencoder_loss(ids_for(model, length=10))
    with pytest.raises(ValueError, match="capsules"):
        model.latent_loss(torch.zeros(2, 3, 7))


# --------------------------------------------------------------------------- stage losses
def test_autoencoder_loss_scores_blocks_from_their_own_capsule():
    K = 4
    model = tiny(block_size=K)
    ids = ids_for(model, batch=2, length=3 * K)
    ids[1, -3:] = model.config.pad_token_id  # a text that ended: padding is not scored
    out = model.autoencoder_loss(ids)
    m = model.model
    with torch.no_grad():
        caps = m.encode_capsules(ids)
        logits = model.decode_blocks(caps.reshape(-1, caps.shape[-1]), m.embed_tokens(ids).view(6, K, -1))
    targets = ids.view(6, K).masked_fill(ids.view(6, K) == 0, -100)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss"], expected)
    assert int(out["scored"]) == 2 * 3 * K - 3
    hits = ((logits.argmax(-1) == targets) & (targets != -100)).sum()
    assert int(out["correct"]) == int(hits)
    # the decoder of block b reads [start, x_bK .. x_bK+K-2]: step s predicts token s of block b
    out["loss"].backward()
    assert model.model.decoder.start_input.grad.abs().sum() > 0


def test_variational_capsule_adds_clamped_kl_and_samples_only_in_training():
    model = tiny("tiny-lstm")  # variational, K = 4
    ids = ids_for(model, batch=2, length=8)
    model.eval()
    a, b = model.autoencoder_loss(ids), model.autoencoder_loss(ids)
    assert torch.equal(a["loss"], b["loss"])  # the mean in eval
    assert float(a["kl"]) >= model.config.capsule_kl_clamp * model.config.hidden_size - 1e-4
    torch.testing.assert_close(a["loss"], a["ce"] + model.config.capsule_kl_weight * a["kl"])
    model.train()
    torch.manual_seed(0)
    c = model.autoencoder_loss(ids)
    torch.manual_seed(1)
    d = model.autoencoder_loss(ids)
    assert not torch.equal(c["ce"], d["ce"])  # sampled capsule, token and capsule dropout


def test_latent_loss_mse_cosine_and_energy_score():
    model = tiny(block_size=4)
    caps = torch.randn(2, 5, model.config.hidden_size)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = model.latent_loss(caps, mask)
    r = model.model.reasoner
    slots = torch.cat([r.start_capsule.expand(2, 1, -1), caps[:, :-1]], 1)
    pred = r.predict(r.hidden(slots, torch.arange(5)[None]))
    keep = mask.bool()
    mse = ((pred - caps) ** 2).mean(-1)[keep].mean()
    cos = F.cosine_similarity(pred, caps, dim=-1)[keep].mean()
    torch.testing.assert_close(out["loss"], mse + model.config.cosine_weight * (1 - cos))
    # the prediction for a slot depends only on earlier capsules (causal)
    caps2 = caps.clone()
    caps2[:, 3] += 1.0
    pred2 = r.predict(r.hidden(torch.cat([r.start_capsule.expand(2, 1, -1), caps2[:, :-1]], 1),
                               torch.arange(5)[None]))
    torch.testing.assert_close(pred2[:, :4], pred[:, :4])

    energy = tiny("tiny-lstm")
    caps = torch.randn(2, 3, energy.config.hidden_size)
    g = torch.Generator().manual_seed(0)
    out = energy.latent_loss(caps, generator=g)
    # recompute the energy score with the same noise
    r = energy.model.reasoner
    h = r.hidden(torch.cat([r.start_capsule.expand(2, 1, -1), caps[:, :-1]], 1), torch.arange(3)[None])
    S = energy.config.energy_samples
    noise = torch.randn(2, 3, S, energy.config.energy_noise_size, generator=torch.Generator().manual_seed(0))
    z = r.predict(h[:, :, None].expand(-1, -1, S, -1), noise)
    score = 0.0
    for b in range(2):
        for t in range(3):
            to_y = sum(torch.linalg.vector_norm(z[b, t, i] - caps[b, t]) for i in range(S)) / S
            between = sum(torch.linalg.vector_norm(z[b, t, i] - z[b, t, j])
                          for i in range(S) for j in range(S) if i != j) / (S * (S - 1))
            score = score + 2 * to_y - between
    torch.testing.assert_close(out["loss"], score / 6, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_previous_token_variant_reads_the_last_token_of_the_previous_block():
    """decoder_first_input="previous_token": step 0 of block b reads token bK - 1, so the first
    token of a block depends on the token before it directly, and stage 1 decodes the same way."""
    K = 4
    model = tiny(block_size=K, decoder_first_input="previous_token")
    ids = ids_for(model, length=3 * K)
    m = model.model
    x = m.embed_tokens(ids)
    caps = m.encode_capsules(ids)
    previous = torch.cat([m.decoder.start_input.expand(1, 1, -1), x[:, K - 1 : -1 : K]], 1).reshape(3, -1)
    logits = model.decode_blocks(caps.reshape(3, -1), x.view(3, K, -1), previous)
    out = model.autoencoder_loss(ids)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out["loss"], expected)
    start = HMTRForCausalLM(HMTRConfig.from_preset("tiny", block_size=K))
    start.load_state_dict(model.state_dict())
    a, b = model(ids).logits, start.eval()(ids).logits
    torch.testing.assert_close(a[:, : K - 1], b[:, : K - 1])  # block 0: the start vector in both
    assert (a[:, K - 1] - b[:, K - 1]).abs().max() > 1e-3  # block 1, step 0: token K - 1 vs the start
