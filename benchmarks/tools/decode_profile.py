"""Where a decode step's time goes, in one process on one GPU (tp=1): kernel time vs wall time, the top
kernels, and inductor's perf hints (cudagraph skips). Diagnostic, not a benchmark record. A backend whose engines
need an environment set before the process starts (aoti on CUDA: lower/aoti.worker_env) gets it: the script starts
itself again with it, as the runtime's workers are started.

    TORCH_LOGS=perf_hints python benchmarks/tools/decode_profile.py model=llama_1b backend=inductor_cudagraphs
"""
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from tpcompile.pipeline import build_generation
from tpcompile.config import CONF_DIR, register
from tpcompile.lower import start_again_with_worker_env
from tpcompile.runtime.engine import RankEngine
from tpcompile.runtime.generate import Generation, device_kernels, host_launches


def main(overrides):
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        job = OmegaConf.to_object(compose("config", overrides=[
            "tp=1", "dtype=bfloat16", "runtime.device=cuda", "generation.max_batch=1", "generation.max_seq=256",
            "generation.prefill_chunk=32", *overrides]))
    start_again_with_worker_env(job.backend.name, "cuda", [__file__, *overrides])
    path = build_generation(job).path
    engine = RankEngine(rank=0, world_size=1, device="cuda", artifact=str(path))
    gen = Generation(engine, 0, 1)
    gen.start([list(range(1, 33))], 100)
    gen.step(10)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.step(40)
    torch.cuda.synchronize()
    print(f"decode: {(time.perf_counter() - t0) / 40 * 1e3:.3f} ms/step (wall, incl. sampling + token read)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        gen.step(20)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    _, kernel_us = device_kernels(events)
    graphs, launches = host_launches(events)
    print(f"profiled: wall {wall / 20 * 1e3:.3f} ms/step, device busy {kernel_us / 20 / 1e3:.3f} ms/step, "
          f"host launches {graphs / 20:.0f} CUDA graphs and {launches / 20:.0f} kernels per step")
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main(sys.argv[1:])
