"""`tpcompile bench`: prefill latency, decode latency percentiles, tokens/s, memory, collective share and,
on a GPU, the fraction of HBM bandwidth reached. Timings are taken inside rank 0: per step,
synchronised (streaming latency), and over a whole run with one read-back at the end (throughput);
this module turns them into one JSON record and a table."""
import statistics


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(raw: dict, *, batch: int, prompt_len: int, new_tokens: int) -> dict:
    steps = raw["step_seconds"]
    p50 = percentile(steps, 0.5)
    # every weight and the whole static cache are read; of an embedding table, one row per token
    bytes_per_step = raw.get("read_bytes", raw["weight_bytes"] + raw["cache_bytes"])
    # what a step must read: the same with only the cache slots filled (on average over the decode steps)
    max_seq = raw.get("max_seq")
    filled = raw["cache_bytes"] * min(1.0, (prompt_len + new_tokens / 2) / (max_seq + 1)) if max_seq else None
    record = {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "device_name": raw["device_name"],
        "prefill_ms": raw["prefill_seconds"] * 1e3,
        "prefill_tokens_per_s": batch * prompt_len / raw["prefill_seconds"],
        "decode_ms_p50": p50 * 1e3, "decode_ms_p95": percentile(steps, 0.95) * 1e3,
        "decode_ms_p99": percentile(steps, 0.99) * 1e3, "decode_ms_mean": statistics.fmean(steps) * 1e3,
        "decode_steps": len(steps), "decode_tokens_per_s": batch / p50,
        "collective_share": raw["collective_share"], "collectives_per_step": raw.get("collectives_per_step", {}),
        "kernels_per_step": raw.get("kernels_per_step"), "kernel_ms_per_step": raw.get("kernel_ms_per_step"),
        "profiled_ms_per_step": raw.get("profiled_ms_per_step"),
        "graph_launches_per_step": raw.get("graph_launches_per_step"),
        "kernel_launches_per_step": raw.get("kernel_launches_per_step"), "top_kernels": raw.get("top_kernels"),
        "weight_bytes_per_rank": raw["weight_bytes"],
        "cache_bytes_per_rank": raw["cache_bytes"], "peak_memory_bytes": raw["peak_memory_bytes"],
        "bytes_per_step": bytes_per_step,
        "bytes_per_step_filled": None if filled is None else bytes_per_step - raw["cache_bytes"] + filled,
        # a whole generation run, tokens read back at the end: the host queues steps ahead of the device
        "decode_ms_run": raw["run_step_seconds"] * 1e3, "decode_tokens_per_s_run": batch / raw["run_step_seconds"],
    }
    if raw.get("kernel_ms_per_step"):  # kernel time over a whole run's (unprofiled) step: under 1, the GPU waits
        record["kernel_busy"] = raw["kernel_ms_per_step"] / (raw["run_step_seconds"] * 1e3)
    if raw.get("copy_bandwidth"):
        record["copy_bandwidth_GBps"] = raw["copy_bandwidth"] / 1e9
        record["hbm_fraction"] = bytes_per_step / p50 / raw["copy_bandwidth"]
        record["hbm_fraction_run"] = bytes_per_step / raw["run_step_seconds"] / raw["copy_bandwidth"]
        if filled is not None:  # the time a step cannot go below, and how far above it a whole run is
            record["floor_ms_filled"] = record["bytes_per_step_filled"] / raw["copy_bandwidth"] * 1e3
            record["run_over_floor_filled"] = record["decode_ms_run"] / record["floor_ms_filled"]
    return record


def table(record: dict) -> str:
    rows = [
        ("model / tp / backend / dtype", f"{record['model']} / {record['tp']} / {record['backend']} / {record['dtype']}"),
        ("device", record["device_name"]),
        ("batch, prompt, new tokens", f"{record['batch']}, {record['prompt_len']}, {record['new_tokens']}"),
        ("prefill", f"{record['prefill_ms']:.2f} ms ({record['prefill_tokens_per_s']:.0f} tokens/s)"),
        ("decode per step p50 / p95 / p99",
         f"{record['decode_ms_p50']:.3f} / {record['decode_ms_p95']:.3f} / {record['decode_ms_p99']:.3f} ms"),
        ("decode tokens/s", f"{record['decode_tokens_per_s']:.1f}"),
        ("decode per step, whole run (no read-back per token)",
         f"{record['decode_ms_run']:.3f} ms ({record['decode_tokens_per_s_run']:.1f} tokens/s)"),
        ("collective share of a step", f"{record['collective_share']:.1%}"),
        ("collectives per decode step", ", ".join(f"{n} {k}" for k, n in record["collectives_per_step"].items())
         or "none"),
        ("device kernels per decode step (profiler)", "-" if record.get("kernels_per_step") is None
         else f"{record['kernels_per_step']:.0f}"),
        ("host launches per decode step (profiler)", "-" if record.get("graph_launches_per_step") is None
         else f"{record['graph_launches_per_step']:.0f} CUDA graphs, {record['kernel_launches_per_step']:.0f} kernels"),
        ("device kernel time per decode step (profiler)", "-" if record.get("kernel_busy") is None
         else f"{record['kernel_ms_per_step']:.3f} ms ({record['kernel_busy']:.0%} of a whole run's step; "
              f"under 100%: the GPU waits for launches or the host)"),
        ("weights + cache per rank", f"{record['weight_bytes_per_rank'] / 2**20:.1f} + "
                                     f"{record['cache_bytes_per_rank'] / 2**20:.1f} MiB"),
        ("bytes read per step per rank", f"{record['bytes_per_step'] / 2**20:.1f} MiB"
         + ("" if record.get("bytes_per_step_filled") is None
            else f" ({record['bytes_per_step_filled'] / 2**20:.1f} MiB with only the filled cache slots)")),
        ("peak memory per rank", f"{record['peak_memory_bytes'] / 2**20:.1f} MiB"),
    ]
    if record.get("passes") is not None:
        rows.append(("optional passes", ", ".join(record["passes"]) or "none"))
    if record.get("inductor_options"):
        rows.append(("Inductor settings", ", ".join(f"{k}={v}" for k, v in record["inductor_options"].items())))
    if record.get("load_seconds_per_rank"):
        slowest = max(record["load_seconds_per_rank"], key=lambda x: x["weights"] + x["engines"])
        rows.append(("load, slowest rank: weights / engines / first request",
                     f"{slowest['weights']:.2f} / {slowest['engines']:.2f} / {slowest['first_request']:.2f} s"))
    if "hbm_fraction" in record:
        rows.append(("HBM bandwidth reached (p50 / whole run)", f"{record['hbm_fraction']:.1%} / "
                     f"{record['hbm_fraction_run']:.1%} of {record['copy_bandwidth_GBps']:.0f} GB/s"))
    if "floor_ms_filled" in record:
        rows.append(("whole run over (weights + filled cache) / bandwidth",
                     f"{record['run_over_floor_filled']:.2f}x of {record['floor_ms_filled']:.3f} ms"))
    for i, k in enumerate((record.get("top_kernels") or [])[:5]):  # where the step's time goes (GPU profiles)
        rows.append(("longest kernels per decode step (profiler)" if i == 0 else "",
                     f"{k['us_per_step']:8.1f} us  {k['calls_per_step']:5.1f} x  {k['kernel'][:60]}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
