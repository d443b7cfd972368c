"""One rank's weight file -> {fqn: tensor} on the rank's device, reading only that file.

CPU: the file is memory-mapped (copy-on-write) and every tensor is a view into the mapping: loading costs no
copy, pages come in on first use and stay shared through the page cache with any other process mapping it.
GPU: a reader thread preads the file into a few pinned staging buffers while the main thread copies the
filled ones to the device on a side stream; a buffer is refilled only after its copy finished (an event), so
disk reads overlap host->device copies and pinned memory stays at depth x chunk bytes.
"""
import os
import queue
import threading
from pathlib import Path

import torch

from tpcompile.safetensors_io import pread_into, read_header

CHUNK = 64 << 20  # bytes per staging buffer
DEPTH = 4         # staging buffers: reads run up to DEPTH chunks ahead of the copies


def load_rank_weights(path, device) -> dict[str, torch.Tensor]:
    path, device = Path(path), torch.device(device)
    infos, _ = read_header(path)
    if device.type == "cpu":
        return _mmap(path, infos)
    return _pipelined(path, infos, device)


def _mmap(path: Path, infos) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), False, size)  # shared=False: MAP_PRIVATE, lazy
    whole = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    out = {}
    for name, info in infos.items():
        raw = whole[info.start:info.end]
        if info.start % info.dtype.itemsize:  # safetensors packs tensors back to back: realign the rare odd one
            raw = raw.clone()
        out[name] = raw.view(info.dtype).reshape(info.shape)
    return out


def _pipelined(path: Path, infos, device: torch.device, chunk: int = CHUNK, depth: int = DEPTH) -> dict:
    out = {name: torch.empty(info.shape, dtype=info.dtype, device=device) for name, info in infos.items()}
    jobs = [(name, off, info.start + off, min(chunk, info.nbytes - off))
            for name, info in infos.items() for off in range(0, info.nbytes, chunk)]
    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(min(depth, len(jobs)) or 1)]
    done = [None] * len(buffers)            # the event of the last copy out of each buffer
    free, full = queue.Queue(), queue.Queue()
    for i in range(len(buffers)):
        free.put(i)

    def reader() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                for job in jobs:
                    i = free.get()
                    if done[i] is not None:
                        done[i].synchronize()
                    pread_into(fd, buffers[i][:job[3]], job[2])
                    full.put((i, job))
            finally:
                os.close(fd)
            full.put(None)
        except BaseException as e:  # surfaces in the main thread
            full.put(e)

    thread = threading.Thread(target=reader, name="tpcompile-weights-reader", daemon=True)
    thread.start()
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        while (item := full.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            i, (name, off, _, n) = item
            out[name].view(-1).view(torch.uint8)[off:off + n].copy_(buffers[i][:n], non_blocking=True)
            done[i] = torch.cuda.Event()
            done[i].record(stream)
            free.put(i)
    stream.synchronize()
    thread.join()
    return out
