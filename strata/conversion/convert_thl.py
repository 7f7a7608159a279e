"""Bring checkpoints of the public THL reference implementation (EGen-V/Transformer-Hierarchical-Layers)
into strata THL, parameter by parameter, and say exactly what does not carry over.

The reference's checkpoint folder holds ``config.json`` (its dataclass config: ``vocab_size``,
``embedding_dim``, ``tier_dims``, ``num_tiers``, ``tier_timescales``, ``memory_slots``, ``memory_dim``,
``value_dim``, ``query_dim``, ``num_heads``, ``head_dim``, ``read_topk``, ``load_penalty``,
``novelty_theta``, ``novelty_beta``, ``write_clip_max``, ``memory_decay``, ``local_window``,
``output_dim``, ...) and a state dict with these keys::

    embedding.weight                       (V, d)
    router.W_q.weight                      (H*dh, 3d)   input [e_t; s0_{t-1}; s_top_{t-1}]
    router.W_k.weight                      (H*dh, d)    one key projection per head
    router.W_v.weight                      (d_v, d)     head h reads rows h*d_v/H ...
    tiers.cells.{k}.W_{z,r,h}.{weight,bias}  (d, 3d)    input [s_prev; lower; read]
    writer.W_w.{weight,bias}               (d, 2d)      candidate from [s0; s_top]
    writer.W_r.weight                      (d, d_v)     unused by the reference's forward
    local_attn.{q,k,v}.weight                           tier-0 local read (added to the memory read)
    layer_norm.{weight,bias}, output_head.{weight,bias} LayerNorm + Linear(K*d -> V)

Exact, parameter for parameter (the same function of the same inputs):

- ``embedding`` -> ``model.embed_tokens``;
- ``router.W_q`` -> split by columns into ``query_proj`` (token part) and ``state_query_proj``
  (tier-state part, zero bias);
- ``router.W_k`` -> ``key_proj`` when every head uses the same key projection (strata keys each
  slot once for all heads); different per-head keys are refused;
- ``router.W_v`` -> ``read_proj`` as a block-diagonal matrix: strata reads full slots per head and
  projects the concatenation, which contains the reference's per-head value projection exactly;
- ``tiers.cells.k.W_z`` / ``W_r`` -> the update / reset gates (strata's update gate weighs the old
  state, the reference's the candidate: z_strata = 1 - z_ref = sigmoid(-a), so W_z is negated);
- ``tiers.cells.k.W_h`` -> the candidate, only when its columns on s_prev are zero: the reference
  applies the reset gate BEFORE the matrix (``tanh(W_h [r * s; x])``), strata after it like
  torch.nn.GRUCell (``tanh(W x + r * (U s + b))``); the two agree only without the s_prev term;
- ``writer.W_w`` -> ``writer.write_proj``; the config's timescales, slots, top-k, load penalty,
  novelty threshold/beta, write clip and decay carry over by name.

Not exact, and why (``partial=True`` / ``--partial`` converts anyway: what maps is copied and the
rest keeps strata's initialisation, or the parameters of ``init_from``; the model then has to be
fine-tuned):

- the output: the reference is LayerNorm (mean-centred, with bias) + one Linear(K*d -> V, bias);
  strata is RMSNorm + ``out_proj`` (K*d -> d) + ``lm_head`` (d -> V, no bias). The logits can never be
  equal, so a strict conversion of a reference checkpoint is always refused;
- the candidate ``W_h`` when its s_prev columns are not zero (see above);
- the tier-0 local attention: the reference adds a read over the previous W embeddings (no output
  projection, no distance bias, current token excluded) to the memory read; strata adds its
  attention (current token included, distance bias) to the token embedding;
- the write rule: the reference adds ``g * w`` to the chosen slots (``scatter_add``, gate forced to 1
  for non-novel candidates); strata replaces (novel) or moves a slot towards w (reinforce). The
  bank therefore evolves differently after the first write. The reference also reads never-written
  (zero) slots; strata never routes to them;
- ``writer.W_r`` is not used by the reference's forward pass and is dropped.

Not reproduced (their bugs): the layered engine's missing LayerNorm, and the default timescales
[1, 8, 64]: timescales are taken from the checkpoint's ``tier_timescales`` (refused when absent, never
defaulted). The reference saves ``pytorch_model.bin`` (a pickle); strata never unpickles: re-save the
state dict as ``model.safetensors`` first (see docs/conversion.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from strata.configuration.configuration_thl import THLConfig
from strata.modeling.modeling_thl import THLForCausalLM

RESAVE_HINT = (
    "strata reads safetensors only and never unpickles .bin/.pt files (they can run arbitrary code). "
    "Re-save it where you trust it, e.g.:\n"
    "    import torch, safetensors.torch\n"
    "    sd = torch.load('pytorch_model.bin', map_location='cpu', weights_only=True)\n"
    "    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')"
)

# Config fields of the reference -> THLConfig fields, copied when present.
_CONFIG_RENAMES = {
    "memory_slots": "memory_slots",
    "num_heads": "router_heads",
    "head_dim": "router_head_dim",
    "read_topk": "router_top_k",
    "load_penalty": "load_penalty",
    "novelty_theta": "novelty_threshold",
    "novelty_beta": "novelty_beta",
    "write_clip_max": "write_max_norm",
    "memory_decay": "memory_decay",
}


class InexactConversion(ValueError):
    """The reference checkpoint cannot be converted with identical logits."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__(
            "this THL reference checkpoint cannot be converted with identical logits:\n- " + "\n- ".join(reasons)
            + "\nPass partial=True (strata convert --partial) to copy what maps exactly and keep strata's "
              "initialisation for the rest (then fine-tune); see docs/conversion.md."
        )


def _refuse(what: str):
    raise ValueError(f"cannot convert this THL reference checkpoint: {what}")


def reference_config_to_thl(ref: dict, **overrides) -> THLConfig:
    """A reference ``config.json`` (dict) -> the THLConfig with the same sizes and settings."""
    required = ("vocab_size", "embedding_dim", "num_tiers", "tier_dims", "num_heads", "read_topk")
    missing = [name for name in required if name not in ref]
    if missing:
        _refuse(f"config.json lacks {missing}; is this a THL reference config?")
    d, K = int(ref["embedding_dim"]), int(ref["num_tiers"])
    tier_dims = list(ref["tier_dims"])
    if len(tier_dims) != K:
        _refuse(f"tier_dims {tier_dims} has {len(tier_dims)} entries for num_tiers={K}")
    if any(int(t) != d for t in tier_dims):
        _refuse(f"tier_dims {tier_dims} differ from embedding_dim {d}; strata THL uses one width for tokens, "
                "tiers and slots")
    for name in ("memory_dim", "value_dim"):
        if name in ref and int(ref[name]) != d:
            _refuse(f"{name}={ref[name]} != embedding_dim {d} (strata slots and reads have the model width)")
    if "query_dim" in ref and "head_dim" in ref and int(ref["query_dim"]) != int(ref["num_heads"]) * int(ref["head_dim"]):
        _refuse(f"query_dim {ref['query_dim']} != num_heads * head_dim")
    if int(ref.get("write_slots", 1)) != 1:
        _refuse(f"write_slots={ref['write_slots']}: strata writes one slot per token")
    if ref.get("read_slot_capacity") is not None:
        _refuse("read_slot_capacity (per-slot read cap) has no strata counterpart")
    if "output_dim" in ref and int(ref["output_dim"]) != int(ref["vocab_size"]):
        _refuse(f"output_dim {ref['output_dim']} != vocab_size {ref['vocab_size']}: not a language model head")
    if "tier_timescales" not in ref and "timescales" not in overrides:
        _refuse("config.json has no tier_timescales; strata does not assume the reference's default [1, 8, 64]. "
                "Add the timescales the checkpoint was trained with to config.json")
    kwargs = dict(vocab_size=int(ref["vocab_size"]), hidden_size=d, num_hidden_layers=K,
                  timescales=[int(t) for t in ref.get("tier_timescales", [])] or None,
                  local_window=int(ref.get("local_window", 0) or 0), local_heads=1,
                  tie_word_embeddings=False, gumbel_scale=1.0)
    for theirs, ours in _CONFIG_RENAMES.items():
        if theirs in ref and ref[theirs] is not None:
            kwargs[ours] = ref[theirs]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if name in ref:
            kwargs[name] = ref[name]
    kwargs.update(overrides)
    return THLConfig(**kwargs)


def thl_config_to_reference(config: THLConfig) -> dict:
    """The reference ``config.json`` fields describing ``config`` (used to build test checkpoints)."""
    d, K = config.hidden_size, config.num_hidden_layers
    return dict(
        vocab_size=config.vocab_size, embedding_dim=d, num_tiers=K, tier_dims=[d] * K,
        tier_timescales=list(config.timescales), memory_slots=config.memory_slots, memory_dim=d, value_dim=d,
        num_heads=config.router_heads, head_dim=config.router_head_dim,
        query_dim=config.router_heads * config.router_head_dim, read_topk=config.router_top_k,
        load_penalty=config.load_penalty, novelty_theta=config.novelty_threshold,
        novelty_beta=config.novelty_beta, write_clip_max=config.write_max_norm, memory_decay=config.memory_decay,
        write_slots=1, local_window=config.local_window, output_dim=config.vocab_size,
    )


# ----------------------------------------------------------------------------- weights
def _blocks(tensor: torch.Tensor, d: int):
    """Columns [s_prev | lower | read] of a reference tier weight (d, 3d)."""
    return tensor[:, :d], tensor[:, d:2 * d], tensor[:, 2 * d:]


def reference_state_to_thl(state: dict, config: THLConfig) -> tuple[dict, list[str]]:
    """Map a reference state dict onto strata THL names.

    Returns (strata state dict of the exactly-mapped parameters, reasons the model is not exact).
    Shape mismatches and unknown keys raise ValueError."""
    d, K, H, dk = config.hidden_size, config.num_hidden_layers, config.router_heads, config.router_head_dim
    out: dict[str, torch.Tensor] = {}
    reasons: list[str] = []
    used: set[str] = set()

    def take(key: str, shape: tuple) -> torch.Tensor:
        if key not in state:
            _refuse(f"the state dict lacks {key!r}")
        tensor = state[key]
        if tuple(tensor.shape) != tuple(shape):
            _refuse(f"{key} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from config.json")
        used.add(key)
        return tensor.detach().to(torch.float32)

    out["model.embed_tokens.weight"] = take("embedding.weight", (config.vocab_size, d))

    wq = take("router.W_q.weight", (H * dk, 3 * d))
    out["model.core.router.query_proj.weight"] = wq[:, :d].clone()
    out["model.core.router.state_query_proj.weight"] = wq[:, d:].clone()
    out["model.core.router.state_query_proj.bias"] = torch.zeros(H * dk)
    wk = take("router.W_k.weight", (H * dk, d)).view(H, dk, d)
    if not all(torch.equal(wk[0], wk[h]) for h in range(1, H)):
        _refuse("router.W_k gives every head its own key projection; strata keys each slot once for all heads "
                "(no exact mapping, and no sensible partial one)")
    out["model.core.router.key_proj.weight"] = wk[0].clone()
    wv = take("router.W_v.weight", (d, d))
    if d % H:
        _refuse(f"value_dim {d} is not divisible by num_heads {H}")
    dv = d // H
    read = torch.zeros(d, H * d)
    for h in range(H):
        read[h * dv:(h + 1) * dv, h * d:(h + 1) * d] = wv[h * dv:(h + 1) * dv]
    out["model.core.router.read_proj.weight"] = read

    for k in range(K):
        p = f"tiers.cells.{k}."
        wz, bz = take(p + "W_z.weight", (d, 3 * d)), take(p + "W_z.bias", (d,))
        wr, br = take(p + "W_r.weight", (d, 3 * d)), take(p + "W_r.bias", (d,))
        wh, bh = take(p + "W_h.weight", (d, 3 * d)), take(p + "W_h.bias", (d,))
        (zs, zx, zr), (rs, rx, rr), (hs, hx, hr) = _blocks(wz, d), _blocks(wr, d), _blocks(wh, d)
        if hs.abs().max() > 0:
            reasons.append(f"{p}W_h acts on s_prev after the reset gate (tanh(W_h [r*s; x])); strata applies the "
                           "reset after the matrix (GRUCell form), so the candidate differs; its s_prev columns "
                           "are not copied")
        q = f"model.core.tiers.{k}."
        # strata rows: [reset; update; candidate]; update gate negated (it weighs the old state).
        out[q + "x_proj.weight"] = torch.cat([rx, -zx, hx])
        out[q + "x_proj.bias"] = torch.cat([br, -bz, bh])
        out[q + "r_proj.weight"] = torch.cat([rr, -zr, hr])
        out[q + "h_proj.weight"] = torch.cat([rs, -zs, torch.zeros(d, d)])
        out[q + "h_proj.bias"] = torch.zeros(3 * d)

    out["model.core.writer.write_proj.weight"] = take("writer.W_w.weight", (d, 2 * d)).clone()
    out["model.core.writer.write_proj.bias"] = take("writer.W_w.bias", (d,)).clone()
    used.update(k for k in state if k.startswith("writer.W_r."))

    reasons.append("output: the reference's LayerNorm (with bias) + Linear(K*d -> vocab, bias) has no exact "
                   "counterpart in strata's RMSNorm + out_proj (K*d -> d) + lm_head (d -> vocab); "
                   "model.norm, model.out_proj and lm_head are not copied")
    used.update(k for k in state if k.startswith(("layer_norm.", "output_head.")))
    reasons.append("memory write: the reference adds g*w to the chosen slot (scatter_add) and reads never-written "
                   "slots; strata replaces or reinforces a slot and never routes to empty slots")
    local = [k for k in state if k.startswith("local_attn.")]
    if config.local_window:
        reasons.append("tier-0 local attention: the reference adds its local read (previous tokens only, no output "
                       "projection) to the memory read; strata adds its attention to the token embedding; "
                       "local_attn.* is not copied")
    used.update(local)
    unknown = sorted(set(state) - used)
    if unknown:
        _refuse(f"unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''} (not the THL reference layout)")
    return out, reasons


def thl_to_reference_state(model: THLForCausalLM) -> dict:
    """The reference-layout state dict of the parts of a strata THL model that the reference can express
    exactly (embedding, router, tier gates, writer candidate). Raises when a part has no exact
    reference form (strata's GRU candidate term on s_prev, per-head read mixing, a query bias).
    Output head, norms and local attention are left out (no exact counterpart)."""
    c = model.config
    d, K, H, dk = c.hidden_size, c.num_hidden_layers, c.router_heads, c.router_head_dim
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = {"embedding.weight": sd["model.embed_tokens.weight"]}
    r = "model.core.router."
    if sd[r + "state_query_proj.bias"].abs().max() > 0:
        raise ValueError("state_query_proj has a bias; the reference's W_q has none")
    ref["router.W_q.weight"] = torch.cat([sd[r + "query_proj.weight"], sd[r + "state_query_proj.weight"]], dim=1)
    ref["router.W_k.weight"] = sd[r + "key_proj.weight"].repeat(H, 1)
    read, dv = sd[r + "read_proj.weight"], d // H
    wv = torch.zeros(d, d)
    for h in range(H):
        block = read[h * dv:(h + 1) * dv, h * d:(h + 1) * d]
        rest = read[:, h * d:(h + 1) * d].clone()
        rest[h * dv:(h + 1) * dv] = 0
        if rest.abs().max() > 0:
            raise ValueError("read_proj mixes a head's read into other heads' outputs; the reference's W_v cannot")
        wv[h * dv:(h + 1) * dv] = block
    ref["router.W_v.weight"] = wv
    for k in range(K):
        q = f"model.core.tiers.{k}."
        xr, xz, xn = sd[q + "x_proj.weight"].split(d)
        rr, rz, rn = sd[q + "r_proj.weight"].split(d)
        hr, hz, hn = sd[q + "h_proj.weight"].split(d)
        bxr, bxz, bxn = sd[q + "x_proj.bias"].split(d)
        bhr, bhz, bhn = sd[q + "h_proj.bias"].split(d)
        if hn.abs().max() > 0 or bhn.abs().max() > 0:
            raise ValueError(f"tier {k}: the candidate has a reset-gated term on the state (h_proj); the reference's "
                             "reset-before-matrix form cannot express it")
        p = f"tiers.cells.{k}."
        ref[p + "W_z.weight"] = -torch.cat([hz, xz, rz], dim=1)
        ref[p + "W_z.bias"] = -(bxz + bhz)
        ref[p + "W_r.weight"] = torch.cat([hr, xr, rr], dim=1)
        ref[p + "W_r.bias"] = bxr + bhr
        ref[p + "W_h.weight"] = torch.cat([torch.zeros(d, d), xn, rn], dim=1)
        ref[p + "W_h.bias"] = bxn
    ref["writer.W_w.weight"] = sd["model.core.writer.write_proj.weight"]
    ref["writer.W_w.bias"] = sd["model.core.writer.write_proj.bias"]
    return {k: v.contiguous() for k, v in ref.items()}


def convert_reference_state(ref_config: dict, state: dict, partial: bool = False,
                            init_from: THLForCausalLM | None = None, **overrides) -> tuple[THLForCausalLM, list[str]]:
    """Build a strata THL model from a reference config dict and state dict.

    ``partial=False`` raises `InexactConversion` unless the logits would be identical (never the case for a
    full reference checkpoint, whose output head has no exact counterpart). With ``partial=True`` the
    exactly-mapped parameters are copied and the others come from ``init_from`` (a strata THL model of the
    same config) or strata's initialisation. Returns (model, reasons it is not exact)."""
    config = reference_config_to_thl(ref_config, **overrides)
    mapped, reasons = reference_state_to_thl(state, config)
    if reasons and not partial:
        raise InexactConversion(reasons)
    if init_from is not None:
        fields = ("vocab_size", "hidden_size", "num_hidden_layers", "timescales", "memory_slots", "router_heads",
                  "router_head_dim", "router_top_k", "local_window", "tie_word_embeddings")
        differing = [f for f in fields if getattr(init_from.config, f) != getattr(config, f)]
        if differing:
            raise ValueError(f"init_from differs from the checkpoint's config in {differing}")
        model = init_from
    else:
        model = THLForCausalLM(config)
    expected = model.state_dict()
    for key, tensor in mapped.items():
        if key not in expected or expected[key].shape != tensor.shape:
            raise ValueError(f"internal mapping error: {key} {tuple(tensor.shape)}")
    model.load_state_dict(mapped, strict=False)
    return model.eval(), reasons


def load_reference_checkpoint(src: str | os.PathLike) -> tuple[dict, dict]:
    """(config dict, state dict) of a reference checkpoint folder; safetensors only."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json (expected a THL reference checkpoint folder)")
    ref_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ValueError(f"{src} holds {pickles} but no .safetensors file. {RESAVE_HINT}")
        raise FileNotFoundError(f"{src} has no .safetensors weights")
    from safetensors.torch import load_file

    state: dict = {}
    for path in weights:
        state.update(load_file(str(path)))
    return ref_config, state


def convert_reference_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | None = None,
                                 partial: bool = False) -> tuple[THLForCausalLM, list[str]]:
    """Convert the reference checkpoint folder ``src``; save the strata model to ``dst`` if given."""
    ref_config, state = load_reference_checkpoint(src)
    model, reasons = convert_reference_state(ref_config, state, partial=partial)
    if dst is not None:
        model.save_pretrained(dst)
    return model, reasons
