"""THL beyond the conformance suite: clock schedule, router math, writer policies, decay,
bounded state over a 20,000-token stream, truncated BPTT, learning, documented examples.

Each test pins down one thing the public reference got wrong or never tested.
"""

import gc
import importlib.util
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from strata import RecurrentCache, THLConfig, THLForCausalLM
from strata.modeling.modeling_thl import (
    EMPTY_SCORE,
    TBPTTStream,
    THLRouter,
    THLWriter,
    choose_target,
    effective_bank,
    init_state,
    make_plan,
    state_from_cache,
    state_nbytes,
    topk_lowest_index,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return THLForCausalLM(THLConfig.from_preset(preset, **overrides)).eval()


def ids_for(model, batch=1, length=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=g)


# --------------------------------------------------------------------------- config
def test_default_timescales_are_powers_of_two():
    assert THLConfig(num_hidden_layers=4).timescales == [1, 2, 4, 8]  # the reference defaulted to [1, 8, 64]
    assert THLConfig.from_preset("tiny").timescales == [1, 2, 4]
    assert THLConfig.from_preset("small").memory_slots == 1024


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(timescales=[1, 2]), "timescales"),  # tiny has 3 tiers
        (dict(timescales=[2, 4, 8]), r"timescales\[0\]"),
        (dict(timescales=[1, 0, 4]), r"timescales\[1\]"),
        (dict(router_top_k=33), "router_top_k"),  # tiny has 32 slots
        (dict(memory_slots=0), "memory_slots"),
        (dict(eviction_policy="random"), "eviction_policy"),
        (dict(local_heads=3), "hidden_size"),
        (dict(memory_decay=1.5), "memory_decay"),
        (dict(novelty_beta=0.0), "novelty_beta"),
        (dict(tbptt_length=0), "tbptt_length"),
    ],
)
def test_invalid_config_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        THLConfig.from_preset("tiny", **overrides)


# --------------------------------------------------------------------------- clocks
@pytest.mark.parametrize("preset", ["tiny", "tiny-stale"])
@torch.no_grad()
def test_tier_k_updates_exactly_every_tau_k_real_tokens(preset):
    model = tiny(preset)
    taus = model.config.timescales
    ids = ids_for(model, length=24)
    cache = RecurrentCache(model.config.num_hidden_layers)
    before = [torch.zeros(1, model.config.hidden_size) for _ in taus]
    for p in range(ids.shape[1]):
        model(ids[:, p : p + 1], past_key_values=cache, use_cache=True)
        after = [cache.layer(k).get("tier").clone() for k in range(len(taus))]
        for k, tau in enumerate(taus):
            changed = not torch.equal(after[k], before[k])
            assert changed == (p % tau == 0), (preset, k, tau, p)
        before = after
    assert int(cache.layer(0).get("clock")[0]) == ids.shape[1]


def test_clocks_count_real_tokens_only():
    config = THLConfig.from_preset("tiny")
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    plan = make_plan(config, torch.tensor([0, 5]), mask, 6, "cpu")
    assert plan.pos[0].tolist() == [0, 5 - 1]  # a pad before any real token of row 1 sits at its last position
    assert plan.pos[3:, 1].tolist() == [5, 6, 7]  # row 1's real tokens continue its clock
    assert plan.next_clock.tolist() == [6, 8]
    active = plan.active  # (T, B, K): row 0 at positions 0..5, row 1 only its 3 real tokens at 5, 6, 7
    for k, tau in enumerate(config.timescales):
        assert active[:, 0, k].tolist() == [p % tau == 0 for p in range(6)]
        assert active[:, 1, k].tolist() == [False] * 3 + [p % tau == 0 for p in (5, 6, 7)]
    assert plan.all_real == [False] * 3 + [True] * 3
    # The model: a padded row ends with the clock of its real tokens.
    model = tiny()
    ids = ids_for(model, batch=2, length=6)
    out = model(ids, attention_mask=mask.long(), use_cache=True)
    assert out.past_key_values.layer(0).get("clock").tolist() == [6, 3]


# --------------------------------------------------------------------------- router
def _router_setup(J=6, seed=0, **overrides):
    config = THLConfig.from_preset("tiny", memory_slots=J, router_heads=2, router_top_k=2, router_head_dim=4,
                                   load_penalty=0.5, **overrides)
    torch.manual_seed(seed)
    router = THLRouter(config).eval()
    state = init_state(config, 2, "cpu")
    state["bank"] = torch.randn(2, J, config.hidden_size)
    state["keys"] = torch.randn(2, J, 4)
    state["read_ema"] = torch.rand(2, J)
    state["written"][0] = True
    state["written"][1, :3] = True  # row 1: slots 3.. never written
    return config, router, state


@torch.no_grad()
def test_router_topk_and_load_penalty_math_on_a_hand_built_state():
    config, router, state = _router_setup()
    q = torch.randn(2, 2 * 4)
    sigma = torch.tensor([[0.8], [0.5]])
    read, flat, weights, chosen_written = router.read(q, state, sigma)

    qh = q.view(2, 2, 4)
    scores = torch.einsum("bhe,bje->bhj", qh, state["keys"]) * sigma[:, :, None] / 2.0 - 0.5 * state["read_ema"][:, None]
    scores = scores.masked_fill(~state["written"][:, None, :], EMPTY_SCORE)
    expected_read = []
    for b in range(2):
        heads = []
        for h in range(2):
            top = sorted(scores[b, h].argsort(descending=True)[:2].tolist())
            got = sorted(flat[b, h * 2 : h * 2 + 2].tolist())
            assert got == top
            assert all(state["written"][b, j] for j in got)  # empty slots are never read while 2 are written
            w = torch.softmax(scores[b, h, flat[b, h * 2 : h * 2 + 2]], -1)
            torch.testing.assert_close(weights[b, h], w)
            heads.append(sigma[b] * (w[:, None] * state["bank"][b, flat[b, h * 2 : h * 2 + 2]]).sum(0))
        expected_read.append(torch.cat(heads))
    torch.testing.assert_close(read, router.read_proj(torch.stack(expected_read)))
    assert chosen_written.all()

    # With gradients enabled (training: the chosen keys are re-projected for their gradient)
    # the values are exactly those of the cached keys.
    with torch.enable_grad():
        assert torch.equal(router.read(q, state, sigma)[0], read)


@torch.no_grad()
def test_load_penalty_moves_reads_away_from_busy_slots():
    config, router, state = _router_setup()
    q = torch.randn(2, 8)
    sigma = torch.ones(2, 1)
    state["read_ema"].zero_()
    flat = router.read(q, state, sigma)[1]
    favourite = int(flat[0, 0])  # row 0, head 0: its best slot
    state["read_ema"][0, favourite] = 1e3  # heavily read recently
    flat2 = router.read(q, state, sigma)[1]
    assert favourite not in flat2[0, :2].tolist()


@torch.no_grad()
def test_topk_ties_go_to_the_lowest_index_whatever_the_batch():
    scores = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, -0.0, 0.0], [-2.0, -1.0, -1.0, -1.0, -3.0, -1.0, -2.0]])
    assert sorted(topk_lowest_index(scores, 2)[0].tolist()) == [1, 2]
    assert sorted(topk_lowest_index(scores, 4)[0].tolist()) == [1, 2, 3, 4]
    assert sorted(topk_lowest_index(scores, 5)[0].tolist()) == [0, 1, 2, 3, 4]  # -0.0 == 0.0: index 0 first
    assert sorted(topk_lowest_index(scores, 3)[1].tolist()) == [1, 2, 3]
    big = torch.zeros(3, 2, 1024)
    big[..., ::7] = 1.0
    for row in range(3):
        assert sorted(topk_lowest_index(big, 4)[row, 1].tolist()) == [0, 7, 14, 21]
        assert torch.equal(topk_lowest_index(big[row : row + 1], 4)[0], topk_lowest_index(big, 4)[row])
    # The router: two slots with identical keys tie; the lower index is read.
    config, router, state = _router_setup(J=6)
    state["read_ema"].zero_()
    state["keys"][:, :] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    state["keys"][:, 4] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    q = torch.tensor([[1.0, 0, 0, 0, 1.0, 0, 0, 0]] * 2)
    flat = router.read(q, state, torch.ones(2, 1))[1]
    assert sorted(flat[0, :2].tolist()) == [0, 4]  # slot 4, then the tie 0 = 1 = 2 = 3 = 5 goes to slot 0


@torch.no_grad()
def test_a_read_projects_only_the_written_slot_not_the_whole_bank():
    """The reference re-projected all J slots at every step (O(J d)); THL keeps slot keys in the
    state: during decoding key_proj sees one row per sequence and token (the written slot)."""
    model = tiny(memory_slots=32)
    ids = ids_for(model, batch=2, length=12)
    rows = []
    hook = model.model.core.router.key_proj.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[:-1].numel()))
    cache = RecurrentCache(model.config.num_hidden_layers)
    model(ids[:, :4], past_key_values=cache, use_cache=True)
    rows.clear()
    for t in range(4, 12):
        model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    hook.remove()
    assert rows == [2] * 8  # batch 2, one slot each, never J = 32


# --------------------------------------------------------------------------- writer
def _writer_setup(policy="least_used", J=4):
    config = THLConfig.from_preset("tiny", memory_slots=J, eviction_policy=policy, novelty_threshold=0.3,
                                   novelty_beta=10.0, reinforce_rate=0.5, usage_ema_decay=0.9)
    torch.manual_seed(0)
    writer = THLWriter(config).eval()
    key_proj = THLRouter(config).key_proj
    state = init_state(config, 2, "cpu")
    return config, writer, key_proj, state


def _basis(d, i, scale=1.0):
    v = torch.zeros(d)
    v[i] = scale
    return v


@torch.no_grad()
def test_writer_novel_candidate_goes_to_the_first_empty_slot():
    config, writer, key_proj, state = _writer_setup()
    d = config.hidden_size
    state["bank"][0, 0], state["written"][0, 0] = _basis(d, 0), True
    state["bank"][0, 2], state["written"][0, 2] = _basis(d, 2), True
    state["norms"][0] = state["bank"][0].norm(dim=-1)
    w = torch.stack([_basis(d, 5, 2.0), _basis(d, 6, 3.0)])  # orthogonal to everything: novelty 1
    sigma = torch.tensor([[0.5], [1.0]])
    pos = torch.tensor([7, 3])
    target, novel, gate = writer.write(w, state, key_proj, sigma, pos, None)
    assert target.tolist() == [1, 0] and novel.all()  # row 0: first empty is 1; row 1: empty bank -> slot 0
    expected_gate = torch.sigmoid(torch.tensor(10.0 * (1.0 - 0.3)))
    torch.testing.assert_close(gate, expected_gate.expand(2))
    # stored S = gate * w / sigma; the effective value sigma * S is gate * w
    torch.testing.assert_close(state["bank"][0, 1], expected_gate * w[0] / 0.5)
    torch.testing.assert_close(state["keys"][0, 1], key_proj(state["bank"][0, 1]))
    torch.testing.assert_close(state["norms"][0, 1], state["bank"][0, 1].norm())
    assert state["written"][0].tolist() == [True, True, True, False]
    assert state["last_write"][0].tolist() == [-1, 7, -1, -1] and state["last_write"][1, 0] == 3
    torch.testing.assert_close(state["write_ema"][0], torch.tensor([0.0, 0.1, 0.0, 0.0]))


@pytest.mark.parametrize("policy", ["least_used", "stale"])
@torch.no_grad()
def test_writer_evicts_by_policy_when_the_bank_is_full(policy):
    config, writer, key_proj, state = _writer_setup(policy)
    d = config.hidden_size
    state["bank"][:, :4] = torch.stack([_basis(d, i) for i in range(4)])
    state["norms"][:] = 1.0
    state["written"][:] = True
    state["read_ema"][:] = torch.tensor([[0.5, 0.2, 0.9, 0.2], [0.1, 0.3, 0.3, 0.4]])
    state["write_ema"][:] = torch.tensor([[0.1, 0.1, 0.0, 0.1], [0.3, 0.0, 0.0, 0.0]])
    state["last_read"][:] = torch.tensor([[5, 9, 2, 8], [4, 1, 6, 6]])
    state["last_write"][:] = torch.tensor([[3, 1, 6, 0], [5, 0, 2, 3]])
    w = torch.stack([_basis(d, 10), _basis(d, 11)])
    target, novel, _ = writer.write(w, state, key_proj, torch.ones(2, 1), torch.tensor([10, 10]), None)
    assert novel.all()
    if policy == "least_used":  # argmin(read + write EMA): [.6 .3 .9 .3] -> 1 (tie), [.4 .3 .3 .4] -> 1 (tie)
        assert target.tolist() == [1, 1]
    else:  # argmin(max(last read, last write)): [5 9 6 8] -> 0, [5 1 6 6] -> 1
        assert target.tolist() == [0, 1]
    # choose_target alone gives the same answer
    state2 = dict(state)
    assert choose_target(torch.tensor([False, False]), torch.tensor([3, 2]), state2, policy).tolist() == [3, 2]


@torch.no_grad()
def test_writer_reinforces_the_most_similar_slot_when_not_novel():
    config, writer, key_proj, state = _writer_setup()
    d = config.hidden_size
    state["bank"][:, :3] = torch.stack([_basis(d, 0), _basis(d, 1, 2.0), _basis(d, 2)])
    state["norms"][:, :3] = torch.tensor([1.0, 2.0, 1.0])
    state["written"][:, :3] = True
    w = _basis(d, 1, 1.0) + 0.1 * _basis(d, 3)  # cos with slot 1 = 0.995 -> novelty 0.005 < 0.3
    sigma = torch.tensor([[0.8], [0.8]])
    old = state["bank"][0, 1].clone()
    real = torch.tensor([[True], [False]])  # row 1 holds a padding token: nothing may change
    before = {k: v.clone() for k, v in state.items() if k != "tiers"}
    target, novel, gate = writer.write(w.expand(2, d).clone(), state, key_proj, sigma, torch.tensor([4, 4]), real)
    assert target.tolist() == [1, 1] and not novel.any()
    assert gate[0] < 0.5
    effective_old = old * 0.8
    torch.testing.assert_close(state["bank"][0, 1] * 0.8, 0.5 * effective_old + 0.5 * w)
    assert state["written"][0, 3] == False  # noqa: E712  (no new slot used)
    for name, value in before.items():
        assert torch.equal(state[name][1], value[1]), name  # the padded row is untouched


# --------------------------------------------------------------------------- decay
@torch.no_grad()
def test_slots_decay_by_gamma_per_token_across_the_fold():
    model = tiny(memory_decay=0.9, memory_slots=64)
    config = model.config
    n = config.decay_fold_period
    assert n == 65  # 0.9^65 ~ 2^-10
    ids = ids_for(model, length=150)
    cache = RecurrentCache(config.num_hidden_layers)
    prev = None
    untouched = 0
    for p in range(ids.shape[1]):
        model(ids[:, p : p + 1], past_key_values=cache, use_cache=True)
        state = state_from_cache(cache, config.num_hidden_layers)
        bank = effective_bank(state, config)
        if prev is not None:
            keep = state["last_write"][0] != p  # slots not written at this token
            untouched += int(keep.sum())
            torch.testing.assert_close(bank[0, keep], 0.9 * prev[0, keep], rtol=1e-5, atol=1e-7)
            assert not torch.allclose(bank[0, ~keep], 0.9 * prev[0, ~keep])
        prev = bank
        # the stored bank stays bounded: the fold keeps S within gamma^-N of a fresh write
        assert state["bank"].abs().max() <= config.write_max_norm / 0.9**n + 1e-3
    assert untouched > 1000 and ids.shape[1] > 2 * n  # two folds happened


# --------------------------------------------------------------------------- long streams
@torch.no_grad()
def test_chunked_inference_equals_one_pass():
    a, b = tiny(inference_chunk_size=5), tiny()
    ids = ids_for(a, batch=2, length=23)
    out_a, out_b = a(ids, use_cache=True), b(ids, use_cache=True)
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-5, rtol=0)
    for la, lb in zip(out_a.past_key_values.layers, out_b.past_key_values.layers):
        for name in la.tensors:
            torch.testing.assert_close(la.tensors[name], lb.tensors[name], atol=1e-5, rtol=0)


@torch.no_grad()
def test_state_and_memory_stay_flat_over_a_20000_token_stream():
    psutil = pytest.importorskip("psutil")
    model = tiny()
    ids = ids_for(model, length=20_000, seed=3)
    cache = RecurrentCache(model.config.num_hidden_layers)
    process = psutil.Process()
    sizes, shapes = [], []
    rss = {}
    for i, s in enumerate(range(0, ids.shape[1], 500)):
        out = model(ids[:, s : s + 500], past_key_values=cache, use_cache=True, logits_to_keep=1)
        assert torch.isfinite(out.logits).all()
        sizes.append(state_nbytes(cache))
        shapes.append([(k, tuple(v.shape)) for layer in cache.layers for k, v in layer.tensors.items()])
        del out
        if i == 3:
            gc.collect()
            rss["start"] = process.memory_info().rss
        if i == 37:  # trace Python allocations over the last 2 chunks (1,000 tokens)
            gc.collect()
            tracemalloc.start()
            snapshot = tracemalloc.take_snapshot()
    gc.collect()
    python_growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snapshot, "filename"))
    tracemalloc.stop()
    rss["end"] = process.memory_info().rss
    assert cache.get_seq_length() == 20_000 and int(cache.layer(0).get("clock")[0]) == 20_000
    assert len(set(sizes)) == 1 and all(s == shapes[0] for s in shapes)  # the state never grows
    assert sizes[0] == state_nbytes(model.model.initial_state(1))
    assert python_growth < 64 * 1024, python_growth  # no Python-side accumulation (< 64 bytes per token)
    assert rss["end"] - rss["start"] < 32 * 2**20, rss  # no tensor accumulation (36 of 40 chunks later)


def test_truncated_bptt_detaches_at_chunk_edges():
    model = tiny(tbptt_length=8)
    model.train()
    ids = ids_for(model, length=20)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    hidden = model.model(inputs_embeds=embeds).last_hidden_state
    hidden[:, -1].sum().backward()  # the last token sits in the third chunk (16..19)
    per_token = embeds.grad.abs().sum(-1)[0]
    assert (per_token[:16] == 0).all()  # no gradient crosses a chunk edge
    assert (per_token[16:] > 0).all()


def test_tbptt_stream_carries_the_state_across_chunks():
    model = tiny(tbptt_length=8)
    ids = ids_for(model, batch=2, length=33)
    # eval mode (hard top-k) with gradients on: the losses of the stream equal one full pass
    losses = [loss.item() for loss in TBPTTStream(model, ids)]
    assert len(losses) == 4
    logits = model(ids).logits
    for c, loss in enumerate(losses):
        s = c * 8
        ref = F.cross_entropy(logits[:, s : s + 8].reshape(-1, logits.shape[-1]), ids[:, s + 1 : s + 9].reshape(-1))
        assert abs(loss - ref.item()) < 1e-4
    fresh = model(ids[:, 8:16]).logits  # the same chunk from an empty state differs
    assert not torch.allclose(fresh, logits[:, 8:16], atol=1e-3)
    with pytest.raises(ValueError, match="input_ids"):
        TBPTTStream(model, ids[0])
    # reset_every: the third chunk starts from an empty state again
    reset = [loss.item() for loss in TBPTTStream(model, ids, reset_every=16)]
    assert reset[:2] == pytest.approx(losses[:2], abs=1e-6)
    logits = model(ids[:, 16:]).logits
    ref = F.cross_entropy(logits[:, :8].reshape(-1, logits.shape[-1]), ids[:, 17:25].reshape(-1))
    assert reset[2] == pytest.approx(ref.item(), abs=1e-4)
    with pytest.raises(ValueError, match="reset_every"):
        TBPTTStream(model, ids, reset_every=12)


# --------------------------------------------------------------------------- modes and errors
def test_eval_is_deterministic_and_training_noise_is_seeded():
    model = tiny()
    ids = ids_for(model, batch=2, length=16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        a, b = model(ids).logits, model(ids).logits
        assert torch.equal(a, b)  # same batch, same seed: same Gumbel noise (checkpointing relies on it)
        hard = model.eval()(ids).logits
        assert not torch.equal(a, hard)  # ... and the noise does change the reads


@torch.no_grad()
def test_cache_of_another_batch_size_is_refused():
    model = tiny()
    out = model(ids_for(model, batch=2, length=5), use_cache=True)
    with pytest.raises(ValueError, match="batch size 3"):
        model(ids_for(model, batch=3, length=1), past_key_values=out.past_key_values, use_cache=True)


# --------------------------------------------------------------------------- learning
def test_loss_falls_on_real_text_and_every_part_gets_gradients(char_tokenizer, shakespeare):
    torch.manual_seed(0)
    model = THLForCausalLM(THLConfig.from_preset("tiny", vocab_size=len(char_tokenizer), tbptt_length=32))
    ids = torch.tensor(char_tokenizer(shakespeare[:40_000])["input_ids"])
    streams = ids[: 8 * (ids.numel() // 8)].view(8, -1)
    val = torch.tensor(char_tokenizer(shakespeare[-3_000:])["input_ids"])[None]

    def val_loss():
        model.eval()
        with torch.no_grad():
            logits = model(val).logits
        model.train()
        return F.cross_entropy(logits[0, :-1], val[0, 1:]).item()

    before = val_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, loss in enumerate(TBPTTStream(model, streams)):
        loss.backward()
        if step == 0:  # the writer and the slot keys learn through reads of written slots
            for name in ("write_proj", "key_proj", "read_proj", "state_query_proj", "q_proj"):
                grads = [p.grad for n, p in model.named_parameters() if name in n]
                assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 59:
            break
    assert sum(losses[-10:]) / 10 < losses[0] - 2.0, losses  # ~5.8 -> ~3.1 nats
    assert val_loss() < before - 2.0


# --------------------------------------------------------------------------- docs
def test_documented_examples_run(tmp_path, monkeypatch):
    """Every python block of docs/thl.md runs as written (the reference's README raised TypeError)."""
    text = (ROOT / "docs" / "thl.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith("# requires:") and not all(
            importlib.util.find_spec(m) for m in first.split(":", 1)[1].split()
        ):
            continue  # optional extras (onnx) not installed: that block only is skipped
        exec(compile(block, "docs/thl.md", "exec"), {})  # noqa: S102  (each block stands alone)
