"""Measurement primitives of the benchmarks: timing, memory, training and decoding loops.

Conventions
- Models compared with each other are timed round-robin (A B C A B C ...), each after
  untimed warm-up runs, and every figure is the median over its repeats: on a shared
  machine a burst of load then hits all of them alike instead of one.
- Training step = forward with labels + backward + AdamW step (+ zero_grad).
- Decoding throughput is measured on a pre-filled cache: the prompt minus its last
  token goes through one forward (timed separately as prefill), then ``generate`` is
  called on the whole prompt with a copy of that cache and emits ``new_tokens`` tokens
  (``new_tokens`` one-token forwards and as many greedy picks); the time divided by
  ``new_tokens`` is the per-token latency. Models whose ``generate`` does not accept a
  pre-filled cache (HF Mamba takes ``cache_params``) are timed by difference:
  ``(t(generate N + 1) - t(generate 1)) / N`` with N = 4 x new_tokens. EOS is disabled so that exactly N tokens
  come out.
- Memory: ``state_bytes`` is the sum of the sizes of the cache tensors; ``peak_rss`` is
  the peak resident set size reached during a region minus the resident size at its
  start (Linux: VmHWM is reset through /proc/self/clear_refs; freed heap memory is
  returned to the OS with malloc_trim first, so reuse of freed pages does not hide
  growth).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import os
import re
import statistics
import time

import torch
import transformers

# ----------------------------------------------------------------------------- machine

clock = time.perf_counter  # wall clock; set_clock("cpu") for this process's CPU time


def set_clock(kind: str) -> None:
    """``"wall"`` (default) or ``"cpu"``: CPU time of this process, which does not count the time
    other processes hold the cores (only meaningful with one thread: with more it also counts
    threads waiting on each other)."""
    global clock
    clock = {"wall": time.perf_counter, "cpu": time.process_time}[kind]



def load_average() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def uptime_line() -> str:
    try:
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
    except OSError:
        up = float("nan")
    one, five, fifteen = load_average()
    return f"up {up / 60:.0f} min, load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


class CpuSnapshot:
    """/proc/stat and /proc/self/stat counters: how busy the machine was, and with what."""

    def __init__(self):
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        self.total, self.idle = sum(values), values[3] + values[4]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        self.own = int(fields[11]) + int(fields[12])  # utime + stime of all threads, in clock ticks
        self.wall = time.time()

    def foreign_since(self, earlier: "CpuSnapshot") -> float:
        """Fraction of the machine's CPU time used by other processes since ``earlier`` (0 .. 1)."""
        total = self.total - earlier.total
        if total <= 0:
            return 0.0
        busy = total - (self.idle - earlier.idle)
        return max(0.0, busy - (self.own - earlier.own)) / total


def foreign_cpu_now(window_s: float = 5.0) -> float:
    before = CpuSnapshot()
    time.sleep(window_s)
    return CpuSnapshot().foreign_since(before)


def wait_for_quiet(max_foreign: float, timeout_s: float, window_s: float = 10.0, log=print) -> float:
    """Wait (up to ``timeout_s``) until other processes use less than ``max_foreign`` of the CPUs
    over a ``window_s`` window (more responsive than the 1-minute load average)."""
    start = time.time()
    while True:
        foreign = foreign_cpu_now(window_s)
        if foreign < max_foreign or time.time() - start >= timeout_s:
            return foreign
        log(f"  other processes use {foreign:.0%} of the CPUs (load {load_average()[0]}): waiting ...")


# ----------------------------------------------------------------------------- memory

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
    """Context manager: ``.delta`` = peak RSS during the block minus RSS at its start (bytes)."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.supported = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.supported = False
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM")
        if not self.supported or peak is None or self.start is None:
            self.delta = None
        else:
            self.delta = max(0, peak - self.start) * 1024
        return False


def tensors_in(obj, seen=None) -> list[torch.Tensor]:
    """Every distinct tensor reachable from a cache object (attributes, dicts, lists)."""
    if seen is None:
        seen = set()
    found = []
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel(), obj.dtype)
        if key not in seen:
            seen.add(key)
            found.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            found += tensors_in(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found += tensors_in(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for value in vars(obj).values():
            found += tensors_in(value, seen)
    return found


def state_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(cache))


# ----------------------------------------------------------------------------- timing


# A timed run during which other processes used more than MAX_FOREIGN of the CPUs is
# thrown away and run again, after waiting for a quiet moment (at most RETRIES times; the
# last attempt is kept whatever happened). None: keep every run.
MAX_FOREIGN: float | None = None
RETRIES = 3
STATS = {"runs": 0, "retries": 0, "foreign": []}  # foreign CPU share of every kept run


def timed(fn, setup=None):
    """(seconds, result) of ``fn()`` or ``fn(setup())``; ``setup`` runs outside the timing."""
    for attempt in range(RETRIES + 1):
        arg = setup() if setup is not None else None
        before = CpuSnapshot()
        start = clock()
        out = fn(arg) if setup is not None else fn()
        elapsed = clock() - start
        foreign = CpuSnapshot().foreign_since(before)
        if MAX_FOREIGN is None or foreign <= MAX_FOREIGN or attempt == RETRIES:
            STATS["runs"] += 1
            STATS["foreign"].append(foreign)
            return elapsed, out
        STATS["retries"] += 1
        out = arg = None
        gc.collect()
        wait_for_quiet(MAX_FOREIGN, timeout_s=60, window_s=2, log=lambda *a: None)
    raise AssertionError("unreachable")


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = [timed(fn)[0] for _ in range(repeats)]
    return statistics.median(times), times


# ----------------------------------------------------------------------------- training


class TrainTask:
    """One model's training step on a fixed random batch: forward + backward + AdamW."""

    def __init__(self, model, batch: int, seq: int, seed: int = 0):
        self.model, self.batch, self.seq = model.train(), batch, seq
        self.gen = torch.Generator().manual_seed(seed)
        self.ids = self._ids(batch, seq)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def _ids(self, batch, seq):
        return torch.randint(3, self.model.config.vocab_size, (batch, seq), generator=self.gen)

    def step(self, ids=None):
        ids = self.ids if ids is None else ids
        out = self.model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def warm_up(self, steps: int, seq: int | None = None):
        """Untimed steps (the first also creates the optimizer state), optionally on a shorter sequence."""
        ids = self._ids(self.batch, seq) if seq else None
        for _ in range(max(1, steps)):
            self.step(ids)

    def close(self):
        self.model.eval()
        del self.opt


def train_round_robin(named_models: dict, batch: int, seq: int, steps, warmup: int = 1,
                      warmup_seq: dict | None = None) -> dict:
    """Training tokens/s of several models, their steps interleaved; peak RSS of one step each.

    ``steps``: an int, or {name: int} for fewer steps of a slow model. ``warmup_seq``:
    {name: seq} to warm a slow model up on a shorter sequence.
    """
    steps_for = steps if isinstance(steps, dict) else {name: steps for name in named_models}
    tasks = {name: TrainTask(model, batch, seq) for name, model in named_models.items()}
    for name, task in tasks.items():
        task.warm_up(warmup, (warmup_seq or {}).get(name))
    peaks = {}
    for name, task in tasks.items():
        with PeakRSS() as mem:
            task.step()
        peaks[name] = mem.delta
    times = {name: [] for name in tasks}
    for round_ in range(max(steps_for.values())):
        for name, task in tasks.items():
            if round_ < steps_for[name]:
                times[name].append(timed(task.step)[0])
    results = {}
    for name, task in tasks.items():
        median = statistics.median(times[name])
        results[name] = {
            "batch": batch,
            "seq": seq,
            "tokens_per_s": batch * seq / median,
            "step_s": median,
            "step_s_all": [round(t, 4) for t in times[name]],
            "peak_rss_bytes": peaks[name],
        }
        task.close()
    del tasks
    gc.collect()
    return results


# ----------------------------------------------------------------------------- decoding

HF_GENERATE = transformers.GenerationMixin._sample


def no_eos(model):
    """Generate exactly ``max_new_tokens`` tokens: no EOS stopping (and no EOS-suppressing processor)."""
    model.generation_config.eos_token_id = None
    return model


def _generate(model, ids, new_tokens, mode, cache=None):
    if model.generation_config.eos_token_id is not None:
        no_eos(model)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id or 0)
    if mode == "hf":
        kwargs["custom_generate"] = HF_GENERATE
    if cache is not None:
        kwargs["past_key_values"] = cache
    return model.generate(ids, **kwargs)


DIFFERENCE_FACTOR = 4  # models timed by difference generate this many times more tokens


def supports_prefilled_cache(model) -> bool:
    return not isinstance(model, transformers.MambaForCausalLM)


@torch.no_grad()
def prefill(model, ids) -> tuple[object, float]:
    elapsed, out = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        cache = getattr(out, "cache_params", None)
    return cache, elapsed


class DecodeTask:
    """Greedy decoding of one model after one random prompt (batch 1), in one or more modes.

    modes: ``"default"`` = the model's own ``generate`` (strata: block generation);
    ``"hf"`` = ``generate(custom_generate=GenerationMixin._sample)``, the plain
    Transformers decoding loop on the same model.
    """

    def __init__(self, model, prompt_len: int, modes=("default",), seed: int = 0):
        self.model, self.prompt_len, self.modes = no_eos(model.eval()), prompt_len, tuple(modes)
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=gen)
        self.prefilled = supports_prefilled_cache(model)
        self.cache = None
        self.info = {"method": "prefilled cache" if self.prefilled else "difference"}
        self.times = {mode: [] for mode in self.modes}
        self.ones = {mode: [] for mode in self.modes}  # difference method: generate(1)
        self.mem = {mode: [] for mode in self.modes}
        self.outputs = {}

    def prefill(self, warm: bool = True):
        """Run (and time) the prefill of the prompt minus its last token; keep the cache.

        Called several times (round-robin over tasks), it records every time and the
        first run's peak RSS; the reported figure is the median.
        """
        if not self.prefilled:
            return
        if warm and "prefill_times" not in self.info:
            cache, _ = prefill(self.model, self.ids[:, :-1])
            del cache
        self.cache = None
        gc.collect()
        with PeakRSS() as mem:
            self.cache, seconds = prefill(self.model, self.ids[:, :-1])
        times = self.info.setdefault("prefill_times", [])
        times.append(round(seconds, 4))
        self.info.setdefault("prefill_peak_rss_bytes", mem.delta)
        median = statistics.median(times)
        self.info.update(prefill_s=median, prefill_tokens_per_s=(self.prompt_len - 1) / median,
                         state_bytes=state_bytes(self.cache))

    def warm_up(self, new_tokens: int = 4):
        for mode in self.modes:
            if self.prefilled:
                _generate(self.model, self.ids, new_tokens, mode, copy.deepcopy(self.cache))
            else:
                _generate(self.model, self.ids, 2, mode)

    def run(self, mode: str, new_tokens: int):
        """One timed generation of ``new_tokens`` tokens (for the difference method, two)."""
        if self.prefilled:
            first = [copy.deepcopy(self.cache)]  # copied before the memory reading starts

            def fresh_cache():
                return first.pop() if first else copy.deepcopy(self.cache)

            gc.collect()
            with PeakRSS() as mem:
                seconds, out = timed(lambda work: _generate(self.model, self.ids, new_tokens, mode, work), fresh_cache)
            self.times[mode].append(seconds)
        else:  # DIFFERENCE_FACTOR x more tokens: the two prefills' noise cancels less well than it adds up
            n = new_tokens * DIFFERENCE_FACTOR
            self.ones[mode].append(timed(lambda: _generate(self.model, self.ids, 1, mode))[0])
            with PeakRSS() as mem:  # includes the prefill
                seconds, out = timed(lambda: _generate(self.model, self.ids, n + 1, mode))
            self.times[mode].append(seconds)
        self.mem[mode].append(mem.delta)
        self.outputs[mode] = out[0, self.prompt_len:self.prompt_len + new_tokens].tolist()

    def results(self, new_tokens: int) -> dict:
        out = {}
        if not self.prefilled:
            cache, _ = prefill(self.model, self.ids)
            self.info["state_bytes"] = state_bytes(cache)
            del cache
        for mode in self.modes:
            r = {"prompt_len": self.prompt_len, "new_tokens": new_tokens, "mode": mode, **self.info}
            if self.prefilled:
                per_token = statistics.median(self.times[mode]) / new_tokens
            else:
                t1 = statistics.median(self.ones[mode])
                per_token = max(statistics.median(self.times[mode]) - t1, 1e-9) / (new_tokens * DIFFERENCE_FACTOR)
                r["new_tokens"] = new_tokens * DIFFERENCE_FACTOR
                r.update(prefill_s=t1, prefill_tokens_per_s=self.prompt_len / t1)
            r["ms_per_token"] = per_token * 1e3
            r["tokens_per_s"] = 1.0 / per_token
            r["times_s"] = [round(t, 4) for t in self.times[mode]]
            r["decode_peak_rss_bytes"] = None if None in self.mem[mode] else int(statistics.median(self.mem[mode]))
            if len(self.outputs) > 1:
                r["same_greedy_output_across_modes"] = len({tuple(v) for v in self.outputs.values()}) == 1
            out[mode] = r
        return out

    def close(self):
        self.cache = None


def decode_round_robin(tasks: dict, new_tokens: int, repeats: int, warm_prefill: bool = True,
                       prefill_repeats: int = 1) -> dict:
    """Prefill every task (``prefill_repeats`` rounds), then time their generations round-robin.

    Returns {name: {mode: result}}.
    """
    for _ in range(max(1, prefill_repeats)):
        for task in tasks.values():
            task.prefill(warm=warm_prefill)
    for task in tasks.values():
        task.warm_up(min(4, new_tokens))
    for _ in range(repeats):
        for task in tasks.values():
            for mode in task.modes:
                task.run(mode, new_tokens)
    results = {name: task.results(new_tokens) for name, task in tasks.items()}
    for task in tasks.values():
        task.close()
    gc.collect()
    return results


def decode_throughput(model, prompt_len: int, new_tokens: int, repeats: int, modes=("default",),
                      warm_prefill: bool = True) -> dict:
    """One model alone: {mode: result} (see DecodeTask)."""
    task = DecodeTask(model, prompt_len, modes)
    return decode_round_robin({"model": task}, new_tokens, repeats, warm_prefill)["model"]


@torch.no_grad()
def decode_breakdown(model, prompt_len: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    """Where a decoded token's time goes (batch 1, after a ``prompt_len`` prompt).

    - ``linears_ms``: every distinct nn.Linear weight applied once to one token, in
      sequence: the cost of streaming the weights (no other op, no Python model code);
    - ``forward_ms``: a plain loop of one-token cached forwards (``model(...)``), the
      floor shared by every decoding loop;
    - ``block_ms`` / ``hf_ms``: per token in block ``generate`` and in the Transformers
      loop; their excess over ``forward_ms`` is the loop's own cost.
    The four are timed round-robin.
    """
    gen = torch.Generator().manual_seed(seed)
    task = DecodeTask(model, prompt_len, modes=("default", "hf"), seed=seed)
    task.prefill()
    task.warm_up()
    linears = list({id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())
    inputs = [torch.randn(1, 1, m.in_features, generator=gen) for m in linears]

    def run_linears():
        for m, x in zip(linears, inputs):
            m(x)

    def run_forwards(work):
        nxt = task.ids[:, -1:]
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=work, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)

    def fresh_cache():
        return copy.deepcopy(task.cache)

    run_linears()
    run_forwards(fresh_cache())
    lin_times, fwd_times = [], []
    for _ in range(repeats):
        for _ in range(5):
            lin_times.append(timed(run_linears)[0])
        fwd_times.append(timed(run_forwards, fresh_cache)[0])
        for mode in task.modes:
            task.run(mode, new_tokens)
    loops = task.results(new_tokens)
    task.close()
    r = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "linear_weights_mb": sum(m.weight.numel() * m.weight.element_size() for m in linears) / 2**20,
        "linears_ms": statistics.median(lin_times) * 1e3,
        "forward_ms": statistics.median(fwd_times) / new_tokens * 1e3,
        "block_ms": loops["default"]["ms_per_token"],
        "hf_ms": loops["hf"]["ms_per_token"],
        "same_greedy_output": loops["default"].get("same_greedy_output_across_modes"),
    }
    r["block_loop_overhead_ms"] = r["block_ms"] - r["forward_ms"]
    r["hf_loop_overhead_ms"] = r["hf_ms"] - r["forward_ms"]
    r["block_x_hf"] = r["hf_ms"] / r["block_ms"]
    r["block_x_hf_bound"] = r["hf_ms"] / r["forward_ms"]  # if the block loop cost nothing beyond the forward
    return r


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- kernel share

KERNEL_SITES = {  # (module holding the name the layer calls, that name)
    "selective_scan": ("strata.modeling.layers_mamba", "selective_scan"),
    "retention": ("strata.modeling.layers_retention", "retention"),
    "causal_conv1d": ("strata.modeling.layers_mamba", "causal_conv1d"),
}


def kernel_share(model, batch: int, seq: int, repeats: int = 3, seed: int = 0) -> dict:
    """Time of each strata kernel (forward + backward) inside one training step.

    One forward of the model records the arguments of every kernel call; each call is
    then replayed alone on detached copies of those arguments (forward, then backward of
    the sum of its outputs) and timed; ``step_s`` is the whole training step on the same
    batch, so ``share`` says how much of the step the kernel accounts for.
    """
    import importlib

    model.train()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
    calls = {name: [] for name in KERNEL_SITES}
    originals = {}

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            calls[name].append((args, kwargs))
            return fn(*args, **kwargs)
        return wrapped

    for name, (module_name, attr) in KERNEL_SITES.items():
        module = importlib.import_module(module_name)
        originals[name] = (module, attr, getattr(module, attr))
        setattr(module, attr, recorder(name, getattr(module, attr)))
    try:
        model(input_ids=ids, labels=ids, use_cache=False)
    finally:
        for module, attr, fn in originals.values():
            setattr(module, attr, fn)

    def detach(x):
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            return y.requires_grad_(x.requires_grad and y.is_floating_point())
        return x

    result = {}
    for name, recorded in calls.items():
        if not recorded:
            continue
        fn = originals[name][2]
        replays = [([detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()}) for args, kwargs in recorded]

        def run():
            for args, kwargs in replays:
                out = fn(*args, **kwargs)
                outs = out if isinstance(out, tuple) else (out,)
                total = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
                if isinstance(total, torch.Tensor):
                    total.backward()

        median, _ = median_time(run, repeats, warmup=1)
        result[name] = {"calls_per_step": len(recorded), "fwd_bwd_s": median}
    step = train_round_robin({"model": model}, batch, seq, repeats, warmup=1)["model"]
    for r in result.values():
        r["share_of_step"] = r["fwd_bwd_s"] / step["step_s"]
    result["step_s"] = step["step_s"]
    model.eval()
    return result
