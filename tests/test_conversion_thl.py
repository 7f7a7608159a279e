"""THL reference checkpoints (EGen-V/Transformer-Hierarchical-Layers layout) -> strata THL.

The reference's math differs from strata's in its output head, write rule and GRU candidate
(strata/conversion/convert_thl.py), so a full reference checkpoint never converts with equal
logits; what maps is tested exactly: a strata model written in the reference's key layout
converts back with identical logits, and the mapped pieces compute the reference's formulas.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from strata import THLConfig, THLForCausalLM
from strata.conversion.convert_thl import (
    InexactConversion,
    convert_reference_checkpoint,
    convert_reference_state,
    reference_config_to_thl,
    thl_config_to_reference,
    thl_to_reference_state,
)

UNMAPPED = ("model.norm.", "model.out_proj.", "lm_head.")


def strata_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = THLConfig.from_preset("tiny", vocab_size=61, local_window=0, memory_slots=8, timescales=[1, 2, 4],
                                 tie_word_embeddings=False, **kw)
    model = THLForCausalLM(cfg).eval()
    # Restrict to the functions both implementations share: no reset-gated state term in the
    # candidate, no query bias, per-head reads kept apart.
    d, H = cfg.hidden_size, cfg.router_heads
    with torch.no_grad():
        for cell in model.model.core.tiers:
            cell.h_proj.weight[2 * d:] = 0
            cell.h_proj.bias.normal_()
            cell.h_proj.bias[2 * d:] = 0
            cell.x_proj.bias.normal_()
        model.model.core.router.state_query_proj.bias.zero_()
        read, dv = model.model.core.router.read_proj.weight, d // H
        mask = torch.zeros_like(read)
        for h in range(H):
            mask[h * dv:(h + 1) * dv, h * d:(h + 1) * d] = 1
        read.mul_(mask)
    return model


def reference_checkpoint(model):
    """(config dict, state dict) in the reference's layout, with an output head and LayerNorm."""
    cfg, d = model.config, model.config.hidden_size
    state = thl_to_reference_state(model)
    K = cfg.num_hidden_layers
    state.update({"layer_norm.weight": torch.ones(K * d), "layer_norm.bias": torch.zeros(K * d),
                  "output_head.weight": torch.randn(cfg.vocab_size, K * d), "output_head.bias": torch.zeros(cfg.vocab_size),
                  "writer.W_r.weight": torch.randn(d, d)})
    return thl_config_to_reference(cfg), state


def test_reference_layout_round_trip_has_identical_logits():
    source = strata_model(0)
    ref_config, state = reference_checkpoint(source)
    # The parts without a reference counterpart come from init_from; everything else from the checkpoint.
    base = THLForCausalLM(source.config)
    torch.manual_seed(123)
    base.apply(base._init_weights)
    base.load_state_dict({k: v for k, v in source.state_dict().items() if k.startswith(UNMAPPED)}, strict=False)
    assert not torch.equal(base.model.core.router.query_proj.weight, source.model.core.router.query_proj.weight)
    model, reasons = convert_reference_state(ref_config, state, partial=True, init_from=base)
    assert any("output" in r for r in reasons)
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=0)
    ours, theirs = model.state_dict(), source.state_dict()
    for key, value in theirs.items():
        if key.endswith(("x_proj.bias", "h_proj.bias")):  # the reference has one bias per gate: their sum maps
            prefix = key.rsplit(".", 2)[0]
            torch.testing.assert_close(ours[prefix + ".x_proj.bias"] + ours[prefix + ".h_proj.bias"],
                                       theirs[prefix + ".x_proj.bias"] + theirs[prefix + ".h_proj.bias"])
        else:
            torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)


def test_tier_cell_computes_the_reference_gru_when_the_candidate_has_no_state_term():
    source = strata_model(0)
    ref_config, state = reference_checkpoint(source)
    d = source.config.hidden_size
    torch.manual_seed(0)
    W = {n: (torch.randn(d, 3 * d) * 0.2, torch.randn(d) * 0.5) for n in ("z", "r", "h")}
    W["h"][0][:, :d] = 0  # no s_prev term in the candidate: the case that maps exactly
    for name in ("z", "r", "h"):
        state[f"tiers.cells.0.W_{name}.weight"], state[f"tiers.cells.0.W_{name}.bias"] = W[name]
    s, x, read = torch.randn(4, d), torch.randn(4, d), torch.randn(4, d)
    # The reference's equations (its TierCell: input [s_prev; lower; read]), written out here.
    u = torch.cat([s, x, read], -1)
    z = torch.sigmoid(u @ W["z"][0].T + W["z"][1])
    r = torch.sigmoid(u @ W["r"][0].T + W["r"][1])
    cand = torch.tanh(torch.cat([r * s, x, read], -1) @ W["h"][0].T + W["h"][1])
    expected = (1 - z) * s + z * cand

    converted, reasons = convert_reference_state(ref_config, state, partial=True)
    assert not any("W_h" in reason for reason in reasons)
    cell = converted.model.core.tiers[0]
    with torch.no_grad():
        torch.testing.assert_close(cell(cell.x_proj(x), read, s), expected, atol=1e-5, rtol=0)  # float32 rounding


def test_router_read_projection_equals_per_head_value_projection():
    source = strata_model(0)
    cfg = source.config
    d, H, k = cfg.hidden_size, cfg.router_heads, cfg.router_top_k
    _, state = reference_checkpoint(source)
    wv, dv = state["router.W_v.weight"], d // H
    slots, weights = torch.randn(3, H, k, d), torch.softmax(torch.randn(3, H, k), -1)
    reference = torch.cat([(weights[:, h, :, None] * (slots[:, h] @ wv[h * dv:(h + 1) * dv].T)).sum(1)
                           for h in range(H)], -1)  # r = concat_h sum_k alpha W_v^h m
    model, _ = convert_reference_state(thl_config_to_reference(cfg), state, partial=True)
    heads = (weights[..., None] * slots).sum(2).reshape(3, H * d)
    with torch.no_grad():
        torch.testing.assert_close(model.model.core.router.read_proj(heads), reference, atol=1e-5, rtol=0)


def test_reference_config_converts_to_the_right_thlconfig():
    ref = {"vocab_size": 300, "embedding_dim": 48, "num_tiers": 3, "tier_dims": [48, 48, 48],
           "tier_timescales": [1, 8, 64], "memory_slots": 128, "memory_dim": 48, "value_dim": 48, "query_dim": 48,
           "num_heads": 4, "head_dim": 12, "read_topk": 6, "load_penalty": 0.05, "novelty_theta": 0.25,
           "novelty_beta": 7.0, "write_clip_max": 3.0, "memory_decay": 0.999, "write_slots": 1, "local_window": 0,
           "output_dim": 300, "device": "cpu", "dtype": "float32", "stale_weight": 1.0, "underuse_weight": 1.0}
    cfg = reference_config_to_thl(ref)
    got = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "timescales", "memory_slots",
                                        "router_heads", "router_head_dim", "router_top_k", "load_penalty",
                                        "novelty_threshold", "novelty_beta", "write_max_norm", "memory_decay",
                                        "local_window", "tie_word_embeddings")}
    assert got == dict(vocab_size=300, hidden_size=48, num_hidden_layers=3, timescales=[1, 8, 64], memory_slots=128,
                       router_heads=4, router_head_dim=12, router_top_k=6, load_penalty=0.05, novelty_threshold=0.25,
                       novelty_beta=7.0, write_max_norm=3.0, memory_decay=0.999, local_window=0,
                       tie_word_embeddings=False)
    with pytest.raises(ValueError, match="no tier_timescales"):
        reference_config_to_thl({k: v for k, v in ref.items() if k != "tier_timescales"})
    with pytest.raises(ValueError, match="tier_dims"):
        reference_config_to_thl({**ref, "tier_dims": [48, 96, 48]})
    with pytest.raises(ValueError, match="write_slots"):
        reference_config_to_thl({**ref, "write_slots": 2})


def test_inexact_parts_are_refused_by_name(tmp_path):
    source = strata_model(0)
    ref_config, state = reference_checkpoint(source)
    with pytest.raises(InexactConversion, match="LayerNorm") as info:
        convert_reference_state(ref_config, state)
    assert "--partial" in str(info.value)
    cand = dict(state)
    cand["tiers.cells.1.W_h.weight"] = torch.randn_like(state["tiers.cells.1.W_h.weight"])
    _, reasons = convert_reference_state(ref_config, cand, partial=True)
    assert any("tiers.cells.1.W_h" in r and "reset" in r for r in reasons)
    per_head = dict(state)
    per_head["router.W_k.weight"] = torch.randn_like(state["router.W_k.weight"])
    with pytest.raises(ValueError, match="own key projection"):
        convert_reference_state(ref_config, per_head, partial=True)
    with pytest.raises(ValueError, match="shape"):
        convert_reference_state({**ref_config, "vocab_size": 62, "output_dim": 62}, state, partial=True)
    with pytest.raises(ValueError, match="unknown keys"):
        convert_reference_state(ref_config, {**state, "extra.weight": torch.zeros(1)}, partial=True)


def test_checkpoint_folder_safetensors_only(tmp_path):
    source = strata_model(0)
    ref_config, state = reference_checkpoint(source)
    src = tmp_path / "ref"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(ref_config))
    (src / "pytorch_model.bin").write_bytes(b"not read")  # never unpickled
    with pytest.raises(ValueError, match="never unpickles"):
        convert_reference_checkpoint(src, partial=True)
    save_file(state, str(src / "model.safetensors"))
    model, _ = convert_reference_checkpoint(src, tmp_path / "out", partial=True)
    reloaded = THLForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(reloaded.model.embed_tokens.weight, source.model.embed_tokens.weight)


def test_strata_convert_cli_thl_reference(tmp_path):
    from transformers import AutoModelForCausalLM

    from strata.cli import main

    source = strata_model(0)
    ref_config, state = reference_checkpoint(source)
    src = tmp_path / "ref"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(ref_config))
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(SystemExit, match="cannot be converted with identical logits"):
        main(["convert", "--from", "thl-reference", str(src), str(tmp_path / "strict")])
    assert main(["convert", "--from", "thl-reference", "--partial", str(src), str(tmp_path / "out")]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "modeling_thl.py", "generation_config.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    torch.testing.assert_close(model.model.core.router.key_proj.weight, source.model.core.router.key_proj.weight)
