"""MT-HOPE components: each against a plain reference of what it claims to compute."""

import math

import pytest
import torch

from strata import MTHopeConfig, MTHopeForCausalLM, MTHopeModel, RecurrentCache
from strata.modeling.modeling_mt_hope import (
    MEMORY_GRAD_CLIP,
    AdaptiveMobiusLayer,
    IncidenceAttention,
    PhaseCompression,
    TwistorMemorySystem,
    TwistorSelfModifyingRecurrent,
    chunked_scan,
    from_complex,
    mobius_apply,
    mobius_coefficients,
    to_complex,
    twistor_constraint_loss,
)


def tiny(**overrides):
    return MTHopeConfig.from_preset("tiny", **overrides)


def built(module):
    """Run the model's custom initialisation on a stand-alone module."""
    from transformers import initialization as init

    for m in module.modules():
        if hasattr(m, "init_custom_"):
            m.init_custom_(init, 0.02)
    return module


# --------------------------------------------------------------------------- scans
@pytest.mark.parametrize("complex_", [True, False])
def test_chunked_scan_equals_sequential_recurrence(complex_):
    g = torch.Generator().manual_seed(0)
    B, T, N = 2, 23, 5
    log_decay = -2 * torch.rand(B, T, N, generator=g)
    x_re, x_im = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    angle = torch.randn(B, T, N, generator=g) if complex_ else None
    h0_re, h0_im = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    if not complex_:
        x_im = h0_im = None
    out_re, out_im, last_re, last_im = chunked_scan(log_decay, x_re, x_im, angle, h0_re, h0_im, chunk_size=8)
    h = torch.complex(h0_re, h0_im) if complex_ else h0_re.clone()
    for t in range(T):
        lam = torch.exp(torch.complex(log_decay[:, t], angle[:, t])) if complex_ else torch.exp(log_decay[:, t])
        h = lam * h + (torch.complex(x_re[:, t], x_im[:, t]) if complex_ else x_re[:, t])
        ref_re = h.real if complex_ else h
        torch.testing.assert_close(out_re[:, t], ref_re, atol=1e-5, rtol=1e-5)
        if complex_:
            torch.testing.assert_close(out_im[:, t], h.imag, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_re, h.real if complex_ else h, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Möbius
def test_mobius_coefficients_are_normalised_and_well_conditioned():
    raw = 5 * torch.randn(3, 8, 64)  # saturates the tanh bounds
    coefs = mobius_coefficients(raw, max_shift=0.35)
    a, b, c, d = (torch.complex(*z) for z in coefs)
    torch.testing.assert_close(a * d - b * c, torch.ones_like(a), atol=1e-5, rtol=0)
    matrix = torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2).to(torch.complex128)
    cond = torch.linalg.cond(matrix)
    # entries bounded by (1 + s) / sqrt(1 - 2 s), det 1: cond <= ||M||_F^2 < 11
    assert float(cond.max()) < 11.0


def test_mobius_map_is_invertible_and_conjugation_chirality_behave():
    torch.manual_seed(0)
    for flip, conj in [(False, False), (True, False), (False, True), (True, True)]:
        layer = built(AdaptiveMobiusLayer(tiny(mobius_chirality_flip=flip, mobius_conjugate=conj, num_mobius_cycles=3)))
        u = layer.norm(torch.randn(2, 5, 64))
        coefs = layer.coefficients(u)
        z_re, z_im = to_complex(u.float() * 0.3)  # inside the region where no guard is active
        w_re, w_im = layer.transform(z_re, z_im, coefs)
        assert not torch.allclose(w_re, z_re)
        back_re, back_im = layer.inverse(w_re, w_im, coefs)
        torch.testing.assert_close(back_re, z_re, atol=1e-4, rtol=0)
        torch.testing.assert_close(back_im, z_im, atol=1e-4, rtol=0)
        # the explicit composition the options describe
        r, i = z_re, z_im
        for k, ck in enumerate(coefs):
            if conj and k % 2 == 1:
                i = -i
            r, i = mobius_apply(r, i, ck, layer.guard)
            if flip and k < 2:
                r, i = torch.cat(r.chunk(2, -1)[::-1], -1), torch.cat(i.chunk(2, -1)[::-1], -1)
        torch.testing.assert_close(w_re, r)
        torch.testing.assert_close(w_im, i)


def test_mobius_conjugation_is_orientation_reversing():
    """With conjugation a 2-cycle map is antiholomorphic: it does not satisfy Cauchy-Riemann."""
    torch.manual_seed(1)

    def jacobian_sign(conj):
        layer = built(AdaptiveMobiusLayer(tiny(mobius_conjugate=conj, mobius_chirality_flip=False,
                                               num_mobius_cycles=2)))
        u = layer.norm(torch.randn(1, 1, 64))
        coefs = layer.coefficients(u)
        z_re, z_im = to_complex(u.float() * 0.3)
        eps = 1e-3
        w0 = layer.transform(z_re, z_im, coefs)
        wx = layer.transform(z_re + eps, z_im, coefs)
        wy = layer.transform(z_re, z_im + eps, coefs)
        du_dx, dv_dx = (wx[0] - w0[0]) / eps, (wx[1] - w0[1]) / eps
        du_dy, dv_dy = (wy[0] - w0[0]) / eps, (wy[1] - w0[1]) / eps
        return torch.sign(du_dx * dv_dy - du_dy * dv_dx)

    assert bool((jacobian_sign(False) > 0).all())  # holomorphic: orientation kept
    assert bool((jacobian_sign(True) < 0).all())  # one conjugation: orientation reversed


def test_mobius_denominator_guard_keeps_output_finite_at_a_pole():
    raw = torch.zeros(8, 1)
    raw[4] = 10.0  # c = s/sqrt2 (saturated), pole at z = -d/c
    coefs = mobius_coefficients(raw, 0.35)
    (cr, ci), (dr, di) = coefs[2], coefs[3]
    pole_re, pole_im = -(dr * cr + di * ci) / (cr**2 + ci**2), -(di * cr - dr * ci) / (cr**2 + ci**2)
    w_re, w_im = mobius_apply(pole_re, pole_im, coefs, guard=0.25)
    assert torch.isfinite(w_re).all() and torch.isfinite(w_im).all()
    num = torch.sqrt(w_re**2 + w_im**2)
    assert float(num.max()) < 1e3


# --------------------------------------------------------------------------- Titans memory
def reference_memory(mem, q, k, v, log_eta, theta, log_beta, C):
    """Token-by-token Titans recurrence with autograd gradients (one row, no padding)."""
    H = q.shape[1]
    w1 = mem.init_w1.detach().float().clone()
    w2 = mem.init_w2.detach().float().clone()
    s1, s2 = torch.zeros_like(w1), torch.zeros_like(w2)
    g1, g2 = w1.clone(), w2.clone()
    scale = w1.shape[-2] ** -0.5
    outs = []
    for t in range(q.shape[2]):
        if t % C == 0:
            g1, g2 = w1.clone(), w2.clone()
        a1, a2 = g1.clone().requires_grad_(True), g2.clone().requires_grad_(True)
        kt, vt = k[0, :, t], v[0, :, t]  # (H, D)
        pred = kt + torch.einsum("hdf,hf->hd", a2, scale * torch.nn.functional.silu(torch.einsum("hfd,hd->hf", a1, kt)))
        loss = 0.5 * ((pred - vt) ** 2).sum()
        d1, d2 = torch.autograd.grad(loss, (a1, a2))
        norm = (d1.square().sum((-2, -1)) + d2.square().sum((-2, -1))).sqrt()  # per head
        clip = (MEMORY_GRAD_CLIP / norm).clamp(max=1.0)[:, None, None]
        d1, d2 = d1 * clip, d2 * clip
        eta, th, beta = log_eta[0, :, t].exp(), theta[0, :, t], log_beta[0, :, t].exp()
        s1 = eta[:, None, None] * s1 - th[:, None, None] * d1
        s2 = eta[:, None, None] * s2 - th[:, None, None] * d2
        w1 = beta[:, None, None] * w1 + s1
        w2 = beta[:, None, None] * w2 + s2
        qt = q[0, :, t]
        outs.append(qt + torch.einsum("hdf,hf->hd", w2, scale * torch.nn.functional.silu(torch.einsum("hfd,hd->hf", w1, qt))))
    return torch.stack(outs, 1)[None], (w1, w2, s1, s2)


@pytest.mark.parametrize("chunk", [1, 4])
def test_titans_memory_chunk_parallel_equals_token_recurrence(chunk):
    torch.manual_seed(0)
    mem = built(TwistorSelfModifyingRecurrent(tiny(memory_chunk_size=chunk), 0))
    with torch.no_grad():
        mem.lr_bias.add_(torch.tensor([[2.0], [0.0], [1.0]]))  # larger steps, momentum, forgetting
    u = torch.randn(1, 11, 64)
    q, k, v, log_eta, theta, log_beta, m = mem.project(u, None)
    q, k, v = q.detach(), k.detach(), v.detach()
    log_eta, theta, log_beta, m = log_eta.detach(), theta.detach(), log_beta.detach(), m.detach()
    with torch.no_grad():
        y, state = mem.memorize(q, k, v, log_eta, theta, log_beta, m, mem.initial_state(1, u.device))
    ref, (w1, w2, s1, s2) = reference_memory(mem, q, k, v, log_eta, theta, log_beta, chunk)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state["w1"][0], w1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state["w2"][0], w2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state["s1"][0], s1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state["s2"][0], s2, atol=1e-5, rtol=1e-4)
    assert int(state["memory_pos"][0]) == 11
    # the memory did learn: its loss on the stream's own (k, v) pairs went down
    init = mem.initial_state(1, u.device)

    def assoc_loss(w1_, w2_):
        h = torch.nn.functional.silu(torch.einsum("bhfd,bhtd->bhtf", w1_, k)) * w1_.shape[-2] ** -0.5
        return 0.5 * ((k + torch.einsum("bhdf,bhtf->bhtd", w2_, h) - v) ** 2).sum()

    assert assoc_loss(state["w1"], state["w2"]) < assoc_loss(init["w1"], init["w2"])


def test_titans_memory_gradient_clip_is_exact_and_keeps_a_long_stream_finite():
    torch.manual_seed(0)
    mem = built(TwistorSelfModifyingRecurrent(tiny(memory_chunk_size=4), 0))
    with torch.no_grad():
        mem.lr_bias.copy_(torch.tensor([[6.0], [6.0], [-6.0]]).expand_as(mem.lr_bias))  # max step, momentum ~1
        mem.init_w1.mul_(8.0)  # grown weights: the regime where unclipped steps diverged
    u = torch.randn(1, 9, 64)
    q, k, v, log_eta, theta, log_beta, m = (t.detach() for t in mem.project(u, None))
    v = v * 50.0  # large targets: the clip is active on every token
    with torch.no_grad():
        y, state = mem.memorize(q, k, v, log_eta, theta, log_beta, m, mem.initial_state(1, u.device))
    ref, (w1, w2, _, _) = reference_memory(mem, q, k, v, log_eta, theta, log_beta, 4)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state["w2"][0], w2, atol=1e-4, rtol=1e-4)
    # a long stream in that regime stays finite and the memory's weights stay bounded
    long = torch.randn(1, 2000, 64)
    q, k, v, log_eta, theta, log_beta, m = (t.detach() for t in mem.project(long, None))
    with torch.no_grad():
        y, state = mem.memorize(q, k, v * 50.0, log_eta, theta, log_beta, m, mem.initial_state(1, long.device))
    assert torch.isfinite(y).all()
    assert state["w2"].abs().max() < 1e4


def test_titans_memory_state_is_in_the_cache_and_generation_is_step_by_step():
    torch.manual_seed(0)
    model = MTHopeForCausalLM(tiny(memory_chunk_size=3)).eval()
    ids = torch.randint(4, 512, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = RecurrentCache(model.config.num_hidden_layers)
        steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    state = cache.layer(len(model.config.layer_pattern))
    assert set(state.tensors) == {"grad_w1", "grad_w2", "w1", "w2", "s1", "s2", "memory_pos"}
    assert state.get("memory_pos").tolist() == [10, 10]
    # the test-time memory moved away from its trained initial weights
    assert not torch.allclose(state.get("w1")[0], model.model.memory.mixer.init_w1.float())


# --------------------------------------------------------------------------- slot memory
def test_memory_system_cycles_equal_repeated_updates():
    torch.manual_seed(0)
    cfg = tiny(num_memory_cycles=3, phase_compression=False)
    ms = built(TwistorMemorySystem(cfg, 0))
    u = torch.randn(1, 9, 64)
    log_keep, x_re, x_im = ms.updates(u, None)
    m_re, m_im, _, _ = chunked_scan(log_keep, x_re, x_im, None, chunk_size=4)
    g = ms.gate_proj(u).float()
    addr = g[..., :2].softmax(-1)
    rate = ms.rate_max * torch.sigmoid(g[..., 2:])
    w_re, w_im = to_complex(ms.in_proj(u).float())
    M = torch.zeros(2, 32, dtype=torch.complex64)
    for t in range(9):
        w = torch.complex(w_re[0, t], w_im[0, t])
        for _ in range(3):  # the seed's repeated cycles, literally
            a = (rate[0, t] * addr[0, t])[:, None]
            M = (1 - a) * M + a * w
        torch.testing.assert_close(m_re[0, t], M.real, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m_im[0, t], M.imag, atol=1e-5, rtol=1e-4)


def test_phase_compression_keeps_magnitude_and_compresses_phase():
    torch.manual_seed(0)
    pc = PhaseCompression(16, 4)
    re, im = torch.randn(3, 16), torch.randn(3, 16)
    out_re, out_im = pc(re, im)
    torch.testing.assert_close(torch.sqrt(out_re**2 + out_im**2), torch.sqrt(re**2 + im**2 + 1e-8), atol=1e-5, rtol=0)
    assert pc.enc.out_features == 4  # the phase passes through 4 numbers
    assert not torch.allclose(out_re, re)


# --------------------------------------------------------------------------- attention
def test_incidence_attention_score_is_the_twistor_form_and_relative():
    torch.manual_seed(0)
    att = built(IncidenceAttention(tiny(layer_pattern="RI"), 0))
    x = torch.randn(1, 4, 64)
    pos = torch.arange(4)[None]
    q, k = att._heads(att.q_proj(x), pos), att._heads(att.k_proj(x), pos)
    re, im = att.incidence(q, k)
    c = att.channels

    def cplx(t):
        o_re, o_im, p_re, p_im = t.split(c, -1)
        return torch.complex(o_re, o_im), torch.complex(p_re, p_im)

    qo, qp = cplx(q)
    ko, kp = cplx(k)
    ref = qo @ kp.conj().transpose(-1, -2) + qp @ ko.conj().transpose(-1, -2)
    torch.testing.assert_close(re, ref.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(im, ref.imag, atol=1e-5, rtol=0)
    # shifting every position by the same amount leaves the output unchanged
    u = torch.randn(1, 6, 64)
    a = att(u, torch.arange(6)[None])
    b = att(u, torch.arange(6)[None] + 37)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- bidirectional
def test_bidirectional_is_an_encoder_and_refused_for_generation():
    cfg = tiny(bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        MTHopeForCausalLM(cfg)
    with pytest.raises(ValueError, match="bidirectional"):
        MTHopeForCausalLM(MTHopeConfig.from_preset("recommended", vocab_size=64, dim=16, memory_heads=2))
    torch.manual_seed(0)
    enc = MTHopeModel(cfg).eval()
    ids = torch.randint(4, 512, (1, 8))
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % 512
    with torch.no_grad():
        a, b = enc(ids).last_hidden_state, enc(other).last_hidden_state
        assert not torch.allclose(a[0, 0], b[0, 0])  # the first token sees the last one
        with pytest.raises(ValueError, match="cannot keep a cache or generate"):
            enc(ids, use_cache=True)
    causal = MTHopeModel(tiny()).eval()
    with torch.no_grad():
        torch.testing.assert_close(causal(ids).last_hidden_state[0, :-1], causal(other).last_hidden_state[0, :-1])


# --------------------------------------------------------------------------- continual learning
def test_continual_update_lowers_new_text_loss_and_reports_forgetting(shakespeare, char_tokenizer):
    torch.manual_seed(0)
    model = MTHopeForCausalLM(tiny(vocab_size=len(char_tokenizer), cms_periods=[1, 128])).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new_text = shakespeare[:1024]
    old_text = shakespeare[50_000:50_512]
    report = model.continual_update(new_text, tokenizer=char_tokenizer, heldout=old_text, segment_length=64,
                                    lr=3e-3, epochs=2)
    assert report["new_loss_after"] < report["new_loss_before"] - 0.3, report
    assert math.isfinite(report["heldout_loss_after"])
    assert report["forgetting"] == pytest.approx(report["heldout_loss_after"] - report["heldout_loss_before"])
    # level 0 updates after every 64-token segment, level 1 every second segment
    segments = 2 * 16
    assert report["updates_per_level"] == [segments, segments // 2]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".cms." in n for n in changed)
    assert all(p.requires_grad for p in model.parameters())


def test_continual_update_needs_a_tokenizer_for_text():
    model = MTHopeForCausalLM(tiny())
    with pytest.raises(ValueError, match="tokenizer"):
        model.continual_update("some text")


# --------------------------------------------------------------------------- constraint, config
def test_twistor_constraint_loss_is_zero_on_the_constraint_surface():
    n = 8
    omega = torch.complex(torch.ones(n), torch.zeros(n))
    pi = torch.complex(torch.full((n,), 0.5), torch.zeros(n))
    h = torch.cat([omega.real, omega.imag, pi.real, pi.imag])[None, None]
    assert float(twistor_constraint_loss(h, 0.5)) < 1e-10
    assert float(twistor_constraint_loss(h, 1.0)) == pytest.approx(0.25)


def test_twistor_layout_round_trip():
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(from_complex(*to_complex(x)), x, rtol=0, atol=0)


def test_config_refuses_bad_values_with_the_field_name():
    for field, value in [("dim", 7), ("layer_pattern", "RX"), ("num_hidden_layers", 9), ("mobius_max_shift", 0.5),
                         ("chunk_size", 64), ("cms_periods", [1, 0]), ("memory_heads", 3)]:
        with pytest.raises(ValueError, match=field.split("_")[0]):
            tiny(**{field: value})


def test_seed_presets():
    seed = {"small": (128, 2, 5, 3, False), "medium": (192, 2, 5, 4, False), "recommended": (256, 3, 6, 5, True),
            "large": (512, 4, 8, 8, True)}
    for name, (dim, layers, levels, memories, bidi) in seed.items():
        c = MTHopeConfig.from_preset(name)
        assert (c.dim, len(c.layer_pattern), c.num_nested_levels, c.num_memories, c.bidirectional) == (
            dim, layers, levels, memories, bidi)
        assert "I" not in c.layer_pattern  # attention-free, as the seed says


def test_readme_parameter_counts_are_the_real_ones():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for preset in ("tiny", "small", "medium", "recommended", "large"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{preset}`"))
        written = int(re.findall(r"\| ([\d,]{6,}) \|", row)[0].replace(",", ""))
        config = MTHopeConfig.from_preset(preset)
        with torch.device("meta"):
            model = MTHopeModel(config)
        tied = {id(p): p for p in model.parameters()}
        assert sum(p.numel() for p in tied.values()) == written, preset
