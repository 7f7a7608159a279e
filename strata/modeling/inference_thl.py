"""THL inference tools: low-VRAM layered streaming, text generation, ONNX step export, INT8.

- `LayeredInferenceEngine(model, device)`: the weights stay on the CPU (pinned when the
  device is CUDA); each streaming unit (embeddings, recurrent core, final norm, output
  projection, LM head) is copied to the device when it runs, with non-blocking copies on a
  side stream that prefetch the next unit while the current one computes, and released
  after it. The recurrent core runs at every token, so it is one unit: peak device memory
  is the largest unit (core or LM head) plus the next one in flight, plus the state.
  Logits equal those of the plain model (the final norm included).
- `generate_text(model, tokenizer, prompt, max_length, temperature, top_k)`: sampling loop
  over the recurrent cache that streams tokens to a streamer, optionally through the engine.
- `export_onnx_step(model, path)`: the one-token step (token + state in, logits + state
  out) as an ONNX graph; `OnnxStepRunner` runs it with onnxruntime.
- `quantize_int8(model)`: dynamic INT8 quantization of every Linear for CPU inference.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from strata.modeling.cache_recurrent import RecurrentCache
from strata.modeling.modeling_thl import (
    STATE_NAMES,
    StepFlags,
    decay_scales,
    flatten_state,
    init_state,
    unflatten_state,
)


# ----------------------------------------------------------------------------- layered engine
class LayeredInferenceEngine:
    """Run a model whose weights live on the CPU on ``device``, one streaming unit at a time.

    ``model.streaming_units()`` lists the units in execution order. Use the engine like the
    model (``engine(input_ids, past_key_values=cache, use_cache=True)``) or step by step
    (``logits, cache = engine.step(tokens, cache)``). The state (cache) lives on ``device``.
    Counters: ``transfers`` (unit copies started) and ``bytes_transferred``.
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, prefetch: bool = True):
        if not hasattr(model, "streaming_units"):
            raise TypeError(f"{type(model).__name__} has no `streaming_units()`; the layered engine needs one")
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        self.model = model.eval().to("cpu")
        self.device = device
        self.prefetch = prefetch
        self.units = list(model.streaming_units())
        self.cuda = device.type == "cuda"
        self._host: dict[nn.Parameter, torch.Tensor] = {}
        self._unit_params: list[list[nn.Parameter]] = []
        for _, module in self.units:
            params = list(module.parameters())
            for p in params:
                if p not in self._host:
                    self._host[p] = p.data.pin_memory() if self.cuda else p.data
                    p.data = self._host[p]
            self._unit_params.append(params)
        self._copy_stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._ready: dict[int, tuple[dict, object]] = {}  # unit -> ({param: device tensor}, event)
        self.transfers = 0
        self.bytes_transferred = 0

    # -- unit movement
    def _fetch(self, i: int) -> None:
        if i in self._ready:
            return
        tensors = {}
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                for p in self._unit_params[i]:
                    tensors[p] = self._host[p].to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        else:
            for p in self._unit_params[i]:
                tensors[p] = self._host[p].to(self.device)
            event = None
        self.transfers += 1
        self.bytes_transferred += sum(t.numel() * t.element_size() for t in tensors.values())
        self._ready[i] = (tensors, event)

    def _before(self, i: int, module, args, kwargs):
        self._fetch(i)
        tensors, event = self._ready[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors.values():
                t.record_stream(current)
        for p, t in tensors.items():
            p.data = t
        if self.prefetch and i + 1 < len(self.units):
            self._fetch(i + 1)
        if i == 0:  # the first unit receives the caller's tensors
            move = lambda v: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
        return None

    def _after(self, i: int, module, args, output):
        for p in self._unit_params[i]:
            p.data = self._host[p]
        self._ready.pop(i, None)
        return None

    @contextmanager
    def streaming(self):
        """Inside this block, calls of the model stream its units to the device (the hooks
        that do it exist only inside the block; outside, the model is a plain CPU model)."""
        hooks = []
        try:
            for i, (_, module) in enumerate(self.units):
                hooks.append(module.register_forward_pre_hook(partial(self._before, i), with_kwargs=True))
                hooks.append(module.register_forward_hook(partial(self._after, i)))
            with torch.no_grad():
                yield self
        finally:
            for h in hooks:
                h.remove()
            for p, host in self._host.items():
                p.data = host
            self._ready.clear()

    def __call__(self, input_ids=None, **kwargs):
        with self.streaming():
            return self.model(input_ids=input_ids, **kwargs)

    def step(self, tokens: torch.LongTensor, cache: RecurrentCache | None = None, attention_mask=None):
        """Feed ``tokens`` (B, T) through the cache; return (logits of the last token (B, V), cache)."""
        if cache is None:
            cache = RecurrentCache(self.model.config.num_hidden_layers)
        out = self(tokens, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values


# ----------------------------------------------------------------------------- generation
def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy when temperature == 0, else softmax of
    logits / temperature restricted to the top_k largest (all when top_k is None or 0)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_length: int = 200, temperature: float = 1.0,
                  top_k: int | None = 50, *, max_new_tokens: int | None = None, device=None, engine=None,
                  streamer=None, seed: int | None = None, stop_at_eos: bool = True) -> str:
    """Generate a continuation of ``prompt`` and return prompt + continuation as text.

    ``max_length`` counts prompt and new tokens (as in Transformers); ``max_new_tokens``
    overrides it. ``temperature=0`` is greedy decoding. Tokens are handed to ``streamer``
    (a Transformers streamer: the prompt first, then one token at a time) as they are made.
    With ``device`` (or a ready ``engine``) the model runs through a `LayeredInferenceEngine`.
    """
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 or None, got {top_k}")
    if engine is None and device is not None:
        engine = LayeredInferenceEngine(model, device)
    run = engine if engine is not None else model
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens; give at least one character")
    n_new = max_new_tokens if max_new_tokens is not None else max_length - ids.shape[1]
    if n_new < 0:
        raise ValueError(f"`max_length` ({max_length}) is shorter than the prompt ({ids.shape[1]} tokens)")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    if streamer is not None:
        streamer.put(ids)
    cache = RecurrentCache(model.config.num_hidden_layers)
    new = []
    if n_new:
        logits = run(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        for i in range(n_new):
            token = sample_next(logits, temperature, top_k, generator).cpu()
            new.append(token)
            if streamer is not None:
                streamer.put(token)
            if (eos is not None and int(token[0]) == eos) or i == n_new - 1:
                break
            logits = run(token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    if streamer is not None:
        streamer.end()
    out = torch.cat([ids[0]] + [t for t in new]) if new else ids[0]
    return tokenizer.decode(out, skip_special_tokens=True)


# ----------------------------------------------------------------------------- ONNX
class THLOnnxStep(nn.Module):
    """The one-token step as a trace-friendly module: (input_ids (B, 1), *state) ->
    (logits (B, V), *new state), state in the order of `state_names(config)`.

    Same math as the model's forward, written without host decisions: every tier is
    computed and kept where its clock says so, the decay fold is a multiply at every step,
    updates are out of place, and the router uses plain TopK (ties, which only occur
    between never-written slots, are not resolved to the lowest index).
    """

    def __init__(self, model):
        super().__init__()
        self.lm = model
        cfg = model.config
        self.register_buffer("taus", torch.tensor(cfg.timescales, dtype=torch.long), persistent=False)

    def forward(self, input_ids, *state_tensors):
        lm = self.lm
        cfg, m = lm.config, lm.model
        core = m.core
        state = unflatten_state(state_tensors, cfg.num_hidden_layers)
        x = m.embed_tokens(input_ids)
        clock = state["clock"]
        if core.local_attention is not None:
            out, state["win_k"], state["win_v"] = core.local_attention(
                x, state["win_k"], state["win_v"], clock.clamp(max=cfg.local_window))
            x = x + out
        x = x[:, 0]
        n = cfg.decay_fold_period
        after = clock + 1
        flags = StepFlags(
            real=None,
            tier_mode=[1] + [2] * (cfg.num_hidden_layers - 1),
            active=(clock[:, None] % self.taus) == 0,
            fold=torch.where((after % n) == 0, cfg.memory_decay ** n, 1.0).to(x.dtype)[:, None],
            sigma_prev=decay_scales(cfg, clock).to(x.dtype)[:, None],
            sigma_cur=decay_scales(cfg, after).to(x.dtype)[:, None],
            pos=clock,
        )
        core.step(core.router.query_proj(x), core.tiers[0].x_proj(x), state, flags, noise=None, exact_ties=False,
                  inplace=False)
        state["clock"] = after
        logits = lm.lm_head(m.out_proj(m.norm(torch.cat(state["tiers"], dim=-1))))
        return (logits, *flatten_state(state))


def state_names(config) -> list[str]:
    return [f"tier{k}" for k in range(config.num_hidden_layers)] + list(STATE_NAMES)


def export_onnx_step(model, path, batch_size: int = 1, opset_version: int = 18) -> list[str]:
    """Export the one-token step of ``model`` to ``path`` (ONNX, weights inside the file).

    Inputs: ``input_ids`` (batch, 1) int64 and the state tensors named by `state_names`;
    outputs: ``logits`` and the new state as ``new_<name>``. Returns the input names."""
    model = model.eval()
    step = THLOnnxStep(model).eval()
    weight = model.get_input_embeddings().weight
    state = init_state(model.config, batch_size, weight.device, weight.dtype)
    ids = torch.zeros(batch_size, 1, dtype=torch.long, device=weight.device)
    names = state_names(model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step, (ids, *flatten_state(state)), str(path), input_names=["input_ids"] + names,
            output_names=["logits"] + [f"new_{n}" for n in names], opset_version=opset_version, dynamo=True,
            external_data=False, verbose=False,
        )
    return ["input_ids"] + names


class OnnxStepRunner:
    """Run an exported step with onnxruntime, keeping the state between calls (numpy)."""

    def __init__(self, path, config, batch_size: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.names = state_names(config)
        self.state = [t.numpy() for t in flatten_state(init_state(config, batch_size, "cpu"))]

    def step(self, input_ids) -> torch.Tensor:
        """Logits (B, V) after feeding input_ids (B, 1)."""
        feeds = {"input_ids": torch.as_tensor(input_ids).numpy()}
        feeds.update(dict(zip(self.names, self.state)))
        out = self.session.run(None, feeds)
        self.state = out[1:]
        return torch.from_numpy(out[0])


# ----------------------------------------------------------------------------- INT8
def quantize_int8(model) -> nn.Module:
    """A copy of ``model`` with every nn.Linear dynamically quantized to INT8 (weights int8
    per tensor, activations quantized per call) for CPU inference. Embeddings stay in float;
    the tied LM head becomes its own INT8 matrix."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8, inplace=False)


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the weights of a model, quantized Linear layers counted at their INT8 size
    (tied parameters counted once)."""
    seen, total = set(), 0
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(module, "weight") and callable(module.weight):
            w, b = module.weight(), module.bias()
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
            continue
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def bits_per_character(model, ids: torch.Tensor, text_chars: int, chunk: int = 512) -> float:
    """Bits per character of a token stream (1, N) fed through the recurrent cache in chunks."""
    cache = RecurrentCache(model.config.num_hidden_layers)
    total = 0.0
    with torch.no_grad():
        for s in range(0, ids.shape[1] - 1, chunk):
            inp, tgt = ids[:, s : s + chunk], ids[:, s + 1 : s + chunk + 1]
            logits = model(inp, past_key_values=cache, use_cache=True).logits[:, : tgt.shape[1]]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="sum").item()
    return total / math.log(2) / text_chars
