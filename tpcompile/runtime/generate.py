"""The generation loop, run inside every worker: chunked prefill, then one decode step per token.

Both graphs take (input_ids (B, T), positions (B, T)): every row is its own sequence, at its own position.
Prompts are left-padded to a multiple of the prefill chunk; pad tokens and idle rows get position S = max_seq,
the scratch slot of the cache, which no real token reads. Every rank samples the same token itself
(Generation); step_or_resume carries a generation over a restart of the worker group.
"""
import math
import time
from collections import Counter

import torch


def generation_inputs(max_batch: int, tokens: int, max_seq: int, vocab: int) -> tuple[list[dict], tuple]:
    """The input specs of a prefill (tokens = prefill_chunk) or decode (tokens = 1) graph, and meta example
    arguments to capture it with: input_ids (B, T) below vocab, positions (B, T) in [0, max_seq] (max_seq: the
    scratch slot)."""
    shape = [max_batch, tokens]
    specs = [dict(name="input_ids", shape=shape, dtype="int64", high=vocab),
             dict(name="positions", shape=shape, dtype="int64", high=max_seq + 1)]
    args = tuple(torch.zeros(shape, dtype=torch.long, device="meta") for _ in specs)
    return specs, args


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> tokens (B,). temperature 0 is greedy; top_k 0 and top_p 1.0 turn those filters off."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_request(spec: dict, prompts: list[list[int]], max_new_tokens: int) -> int:
    """Checks a request against the cache sizes; returns the padded prompt length. Each error is one line
    naming the limit and the setting that raises it."""
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    if len(prompts) > spec["max_batch"]:
        raise ValueError(f"{len(prompts)} prompts exceed max_batch={spec['max_batch']}; "
                         f"recompile with max_batch={len(prompts)} or send fewer prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        bad = [t for t in p if not 0 <= t < spec["vocab_size"]]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {spec['vocab_size']})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    chunk, limit = spec["prefill_chunk"], spec["max_seq"]
    longest = max(len(p) for p in prompts)
    total = math.ceil(longest / chunk) * chunk
    if total > limit:
        raise ValueError(f"a prompt of {longest} tokens (padded to {total}, a multiple of prefill_chunk={chunk}) "
                         f"is longer than max_seq={limit}; recompile with a larger max_seq")
    if longest + max_new_tokens - 1 > limit:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} passes the cache "
                         f"(max_seq={limit}); lower max_new_tokens to {limit - longest + 1} or recompile with "
                         f"max_seq={longest + max_new_tokens - 1}")
    return total


def left_padded(prompts: list[list[int]], rows: int, length: int, scratch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and positions (rows, length): prompt i right-aligned in row i at positions 0..len-1; the pads
    before it and the rows after the prompts at the scratch position (token 0)."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    positions = torch.full((rows, length), scratch, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        positions[i, length - len(p):] = torch.arange(len(p))
    return ids, positions


class Generation:
    """State of one batch being generated on this rank: the cache lives in the engine's graphs.

    Every rank samples the same token from the same logits (all-gathered or computed alike on every rank) with a
    generator seeded alike, so no rank waits for another's token. On a GPU the next decode step is queued before
    the host reads the current token (the step needs only the token on the device), so the host's work for a
    step overlaps the device's and a streaming client sees tokens at the device's pace."""

    def __init__(self, engine, rank: int, world_size: int):
        self.engine, self.rank, self.world_size = engine, rank, world_size
        self.spec = engine.manifest.generation
        self.device = engine.device
        self.lookahead = self.device.type == "cuda"  # on the CPU a queued step would not overlap anything
        self.active = False

    def start(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, seed: int = 0, return_logits: bool = False) -> dict:
        total = check_request(self.spec, prompts, max_new_tokens)
        B, chunk, n, S = self.spec["max_batch"], self.spec["prefill_chunk"], len(prompts), self.spec["max_seq"]
        ids, positions = left_padded(prompts, B, total, S)
        self.options = (temperature, top_k, top_p)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.n, self.remaining, self.return_logits = n, max_new_tokens, return_logits
        self.queued = None
        start = time.perf_counter()
        for c in range(0, total, chunk):
            logits = self.engine.graphs["prefill"](ids[:, c:c + chunk].to(self.device),
                                                   positions[:, c:c + chunk].to(self.device))
        self.token = self._sample(logits)
        # each row's next position, advanced on the device (no copy, no sync per step); idle rows stay at S
        self.positions = torch.tensor([len(p) for p in prompts] + [S] * (B - n), device=self.device)
        self.advance = (torch.arange(B) < n).long().to(self.device)
        self.active = True
        reply = self._emit([self.token], [logits])
        reply["prefill_seconds"] = self._elapsed(start)
        return reply

    def step(self, n: int) -> dict:
        if not self.active:
            raise ValueError("no generation in progress; call generate_start first")
        tokens, logits_seen = [], []
        for _ in range(min(n, self.remaining)):
            if self.queued is None:
                self._decode()
            logits, token = self.queued
            self.queued = None
            tokens.append(token)
            logits_seen.append(logits)
        return self._emit(tokens, logits_seen)

    def _decode(self) -> None:
        """Queue one decode step: logits and the sampled token stay on the device."""
        logits = self.engine.graphs["decode"](self.token[:, None], self.positions[:, None])
        self.positions = self.positions + self.advance  # a new tensor: an engine may keep the one it was given
        self.token = self._sample(logits)
        # a CUDA-graph engine overwrites its output at the next replay: keep a copy only when it is returned
        self.queued = (logits.clone() if self.return_logits else None, self.token)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, *self.options, self.generator)

    def _emit(self, tokens: list[torch.Tensor], logits: list[torch.Tensor]) -> dict:
        self.remaining -= len(tokens)
        host = torch.stack(tokens)[:, :self.n]
        if self.device.type == "cuda":  # copy out, queue the next step, then wait for the copy alone
            pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            pinned.copy_(host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if self.lookahead and self.remaining > 0 and self.queued is None:
            self._decode()
        if self.device.type == "cuda":
            copied.synchronize()
            host = pinned
        if self.rank != 0:
            return {}
        reply = {"tokens": host.tolist(), "done": self.remaining <= 0}
        if self.return_logits:
            reply["logits"] = [lg[:self.n].float().cpu() for lg in logits]
        return reply

    def _elapsed(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def step_or_resume(group, n: int, start: dict, out: list[list[int]], finished: list[bool]) -> dict:
    """Rank 0's reply to generate_step on a RestartingGroup. If the group fails (a rank died or hung) and
    max_restarts allows a restart, the generation resumes on the new group: each prompt plus the tokens made
    so far (out; a finished row's up to its end) is prefilled again and generation goes on for the tokens
    left. Greedy output is unchanged; seeded sampling draws from a fresh generator after the restart.
    start: the generate_start payload of this generation."""
    from tpcompile.runtime.launcher import WorkerError
    try:
        return group.group.call("generate_step", {"n": n})[0]  # the group itself: its own retry cannot resume
    except WorkerError as e:
        if e.kind == "raised" or group.restarts >= group.max_restarts:
            raise
        group.log(f"tpcompile: resuming the generation on a new worker group after: {e}")
    made = max(len(o) for o, done in zip(out, finished) if not done)
    resume = {**start, "prompts": [p + o for p, o in zip(start["prompts"], out)],
              "max_new_tokens": start["max_new_tokens"] - made}
    return group.call("generate_start", resume)[0]  # RestartingGroup starts a new group first


COLLECTIVE_EVENTS = ("all_reduce", "allreduce", "all_gather", "allgather", "broadcast", "wait_tensor", "nccl", "gloo")


def bench(engine, rank: int, world_size: int, prompt_len: int, new_tokens: int, batch: int,
          profile_steps: int = 8) -> dict:
    """Time prefill and every decode step on this rank (synchronised), then profile a few more steps to find
    the share of step time spent in collectives. Rank 0 returns the figures."""
    gen = Generation(engine, rank, world_size)
    vocab = gen.spec["vocab_size"]
    prompts = [[(31 * b + 7 * i + 1) % vocab for i in range(prompt_len)] for b in range(batch)]
    sync = (lambda: torch.cuda.synchronize(engine.device)) if engine.device.type == "cuda" else (lambda: None)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    t0 = time.perf_counter()
    for i in range(3):  # warm-up: the first calls compile, the next record CUDA graphs
        gen.start(prompts, 3)
        gen.step(2)
        sync()
        if i == 0:
            first = time.perf_counter() - t0  # compile at load (inductor) or nothing (aoti, onnx, eager)
    t0 = time.perf_counter()
    gen.start(prompts, new_tokens)
    sync()
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens - 1):  # streaming: the time between tokens arriving on the host, one at a time
        t0 = time.perf_counter()
        gen.step(1)
        steps.append(time.perf_counter() - t0)
    sync()
    gen.start(prompts, new_tokens)  # a whole run: the host queues steps ahead, tokens read back at the end
    sync()
    t0 = time.perf_counter()
    gen.step(new_tokens - 1)
    sync()
    run = (time.perf_counter() - t0) / (new_tokens - 1)
    profiled = _profile(gen, prompts, profile_steps, engine.device.type, sync) if profile_steps else {}
    state, params = set(engine.manifest.state), engine.manifest.params
    weights = sum(t.numel() * t.element_size() for f, t in engine.tensors.items() if f not in state)
    cache = sum(t.numel() * t.element_size() for f, t in engine.tensors.items() if f in state)
    by_row = {f for f, p in params.items() if p.get("read") == "rows"}  # embedding tables: one row per token
    read = weights + cache - sum(t.numel() * t.element_size() * (1 - batch / t.shape[0])
                                 for f, t in engine.tensors.items() if f in by_row)
    peak = torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else _peak_rss()
    # what the decode graph waits on per step, from the pass that inserted them
    collectives = Counter(kind for kind, *_ in engine.manifest.changes.get("decode", {}).get("insert_collectives", []))
    load = {**engine.load_seconds, "first_request": first}
    if rank != 0:
        return {"load_seconds": load}
    return {"load_seconds": load, "prefill_seconds": prefill, "step_seconds": steps, "run_step_seconds": run,
            "collective_share": 0.0, **profiled, "collectives_per_step": dict(collectives),
            "weight_bytes": weights, "cache_bytes": cache, "read_bytes": int(read), "peak_memory_bytes": peak,
            "max_seq": gen.spec["max_seq"],
            "copy_bandwidth": _copy_bandwidth(engine.device) if engine.device.type == "cuda" else None,
            "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"}


def _profile(gen, prompts, steps: int, device_type: str, sync) -> dict:
    """A few decode steps under torch.profiler: the share of their time in collectives, their wall time per step
    (longer than an unprofiled step) and, on a GPU, the device kernels run per step (inside CUDA graphs too; the
    fixed cost that a fusion removes), their summed time per step, and the CUDA graphs and single kernels the host
    launched per step."""
    from torch.profiler import ProfilerActivity, profile
    lookahead, gen.lookahead = gen.lookahead, False  # every profiled step launched inside the window, none before
    gen.start(prompts, steps + 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()  # inside: the profiler's start and its collection at exit are no part of a step
        gen.step(steps)
        sync()
        wall = time.perf_counter() - t0
    gen.lookahead = lookahead
    averages = prof.key_averages()
    attr = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    comm_us = sum(getattr(e, attr, 0.0) for e in averages if any(k in e.key.lower() for k in COLLECTIVE_EVENTS))
    out = {"collective_share": min(1.0, comm_us / 1e6 / wall), "profiled_ms_per_step": wall / steps * 1e3,
           "kernels_per_step": None, "kernel_ms_per_step": None, "graph_launches_per_step": None,
           "kernel_launches_per_step": None, "top_kernels": None}
    if device_type == "cuda":
        kernels, kernel_us = device_kernels(averages)
        graphs, launches = host_launches(averages)
        out.update(kernels_per_step=kernels / steps, kernel_ms_per_step=kernel_us / steps / 1e3,
                   graph_launches_per_step=graphs / steps, kernel_launches_per_step=launches / steps,
                   top_kernels=top_kernels(averages, steps))
    return out


def host_launches(averages) -> tuple[int, int]:
    """(CUDA graphs, single kernels) the host launched, from the CUDA runtime and driver calls in a profiler's
    key_averages(): a step replayed as one CUDA graph has one graph and few kernels (sampling outside the graph)."""
    graphs = sum(e.count for e in averages if e.key.startswith("cudaGraphLaunch"))
    kernels = sum(e.count for e in averages if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    return graphs, kernels


def device_kernels(averages) -> tuple[int, float]:
    """(launches, summed microseconds) of the device events in a profiler's key_averages()."""
    events = _device_events(averages)
    return sum(e.count for e in events), sum(e.self_device_time_total for e in events)


def top_kernels(averages, steps: int, top: int = 24) -> list[dict]:
    """The device kernels that took the most time, per step: name (cut at 100 characters), microseconds and calls
    per step; where a step's time goes, kept in each bench record."""
    events = sorted(_device_events(averages), key=lambda e: -e.self_device_time_total)[:top]
    return [{"kernel": e.key[:100], "us_per_step": round(e.self_device_time_total / steps, 2),
             "calls_per_step": e.count / steps} for e in events]


def _device_events(averages) -> list:
    from torch.autograd import DeviceType
    return [e for e in averages if e.device_type == DeviceType.CUDA]


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _copy_bandwidth(device, nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy (reads + writes), the HBM roofline."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * nbytes * repeat / (time.perf_counter() - t0)
