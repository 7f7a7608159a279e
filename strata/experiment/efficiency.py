"""Efficiency of one model: training throughput, decoding latency and memory against context, FLOPs.

Measured on the model as built (random weights: cost does not depend on what it learned),
batch 1 for inference, in this process:

- training: ``train_steps`` steps (forward with labels + backward + AdamW) on a fixed random
  batch after one untimed warm-up step; tokens/s over wall time and over the process's CPU time;
- at every context length L: a prefill of L - 1 prompt tokens (one cached forward), then
  ``decode_tokens`` greedy one-token cached forwards; per-token latency = decode time / tokens;
  ``peak_rss_mb`` = peak resident memory during prefill + decode minus the resident memory
  before it (Linux VmHWM, reset per context; the method of bench/harness.py ``PeakRSS``);
  ``state_mb`` = the bytes of every tensor in the returned cache (key/values or recurrent state);
- FLOPs per token of a forward pass at the ``flops_context_lengths``, counted by
  ``torch.utils.flop_counter.FlopCounterMode``. It counts matrix products, convolutions and
  attention (torch's formula: the full L x L score matrix, the causal mask not discounted;
  the CPU attention kernel is given the same formula as the CUDA ones); element-wise work (the recurrences of the selective scan and of chunked
  retention's decay, activations, norms) is not counted, so it is a lower bound that
  undercounts recurrent mixers more than attention.

A context whose prefill + decode takes more than ``max_seconds`` of CPU time ends the sweep: longer ones
are recorded as skipped with the reason, so one slow architecture cannot stall an experiment.
Wall times on a shared machine are noisy; CPU times are recorded beside them.
"""

from __future__ import annotations

import ctypes
import gc
import re
import time

import torch

_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakRSS:
    """``with PeakRSS() as m: ...`` -> ``m.delta``: peak RSS in the block minus RSS at its start (bytes),
    None where Linux's /proc/self/clear_refs is unavailable."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.supported = True
        except OSError:
            self.supported = False
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM")
        ok = self.supported and peak is not None and self.start is not None
        self.delta = max(0, peak - self.start) * 1024 if ok else None
        return False


class Stopwatch:
    """Wall and CPU (this process, all threads) seconds of a block."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        return False


def _tensors(obj, seen: set, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel(), obj.dtype)
        if key not in seen:
            seen.add(key)
            out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, seen, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, seen, out)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for value in vars(obj).values():
            _tensors(value, seen, out)


def state_bytes(cache) -> int:
    """Bytes of every distinct tensor reachable from a cache object."""
    found: list[torch.Tensor] = []
    _tensors(cache, set(), found)
    return sum(t.numel() * t.element_size() for t in found)


def _forward(model, ids, **kwargs):
    try:
        return model(input_ids=ids, logits_to_keep=1, **kwargs)
    except TypeError:  # a model without logits_to_keep
        return model(input_ids=ids, **kwargs)


def train_throughput(model, batch: int, seq: int, steps: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up; creates the optimizer state
    with PeakRSS() as mem, Stopwatch() as sw:
        for _ in range(steps):
            step()
    model.eval()
    del opt
    tokens = batch * seq * steps
    return {"train_tokens_per_s": tokens / sw.wall, "train_tokens_per_cpu_s": tokens / max(sw.cpu, 1e-9),
            "train_step_s": sw.wall / steps, "train_step_cpu_s": sw.cpu / steps,
            "train_peak_rss_mb": None if mem.delta is None else mem.delta / 2 ** 20,
            "train_batch": batch, "train_seq_len": seq}


@torch.no_grad()
def decode_at(model, context: int, new_tokens: int, seed: int = 0) -> dict:
    """Prefill ``context - 1`` tokens, then ``new_tokens`` greedy cached one-token forwards."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, context - 1), generator=gen)
    gc.collect()
    with PeakRSS() as mem:
        with Stopwatch() as pre:
            out = _forward(model, ids, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        del out
        with Stopwatch() as dec:
            for _ in range(new_tokens):
                out = _forward(model, token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
    result = {
        "context": context,
        "prefill_s": pre.wall, "prefill_cpu_s": pre.cpu, "prefill_tokens_per_s": (context - 1) / pre.wall,
        "ms_per_token": dec.wall / new_tokens * 1e3, "cpu_ms_per_token": dec.cpu / new_tokens * 1e3,
        "decode_tokens": new_tokens,
        "peak_rss_mb": None if mem.delta is None else mem.delta / 2 ** 20,
        "state_mb": state_bytes(cache) / 2 ** 20,
    }
    del cache
    gc.collect()
    return result


def flops_per_token(model, context: int, seed: int = 0) -> float:
    """Counted FLOPs of one forward pass over ``context`` tokens, per token.

    Gradients stay enabled: FlopCounterMode's module tracker fails on some models under
    ``torch.no_grad`` (it hooks the autograd graph), and the count is the same either way.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=gen)
    # torch registers the attention formula for the CUDA kernels only; the CPU flash kernel gets the same one
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention})
    with counter:
        out = model(input_ids=ids, use_cache=False)
    del out
    return counter.get_total_flops() / context


def measure(model, params: dict, progress=None) -> dict:
    """All efficiency metrics of ``model`` (see the module docstring); ``progress(text)`` reports steps."""
    say = progress or (lambda text: None)
    say("training throughput")
    result = train_throughput(model, params["train_batch_size"], params["train_seq_len"], params["train_steps"])
    result["flops_per_token"] = {}
    for length in params["flops_context_lengths"]:
        say(f"FLOPs at {length}")
        result["flops_per_token"][str(length)] = flops_per_token(model, length)
    decode_at(model, min(params["context_lengths"]), 2)  # warm-up of the inference path
    result["contexts"], result["skipped_contexts"] = [], []
    too_slow = None
    for length in params["context_lengths"]:
        if too_slow is not None:
            result["skipped_contexts"].append({"context": length, "reason": too_slow})
            continue
        say(f"context {length}")
        point = decode_at(model, length, params["decode_tokens"])
        result["contexts"].append(point)
        # CPU time, not wall time: on a shared machine the cut-off then does not depend on the load.
        spent = point["prefill_cpu_s"] + point["cpu_ms_per_token"] * point["decode_tokens"] / 1e3
        if spent > params["max_seconds"]:
            too_slow = (f"context {length} took {spent:.0f} CPU-s (> max_seconds {params['max_seconds']:g}); "
                        "longer contexts not measured")
    return result
