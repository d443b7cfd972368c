"""One rank of a WorkerGroup: `python -m tpcompile.runtime.worker`.

Everything comes from the environment (launcher.py sets it; no Hydra, no pickled state):
    RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT    torch.distributed rendezvous
    TPC_PARENT_ADDR  "127.0.0.1:<port>" of the launcher      TPC_TOKEN      shared secret for the hello
    TPC_HANDLER      "package.module:factory"                 TPC_HANDLER_ARGS  JSON object of keyword args
    TPC_DEVICE       "cpu" (gloo) | "cuda" (nccl)             TPC_START_TIMEOUT_S / TPC_CALL_TIMEOUT_S
    TPC_COLLECTIVES  "auto" | "gloo" | "nccl" (gloo on cuda: ranks may share GPUs, rank r on GPU r % count)

Life of a worker: connect + hello -> "init process group" -> "setup handler" -> ready -> "idle"
-> ("op <name>" -> reply -> "idle")* -> op "exit": handler.close(), destroy_process_group(), exit 0.
Op "health" is answered here for any handler (memory, pid), plus the handler's own health() when it has one.
A daemon thread heartbeats every second and os._exit()s when the launcher is gone, so no worker outlives it.

serve_standalone() runs the same handler under torchrun instead (no launcher, ops given up front).
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import signal
import sys
import threading
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from tpcompile.runtime import COLLECTIVES, DEVICES
from tpcompile.runtime.channel import ChannelClosed, ChannelError, connect

ENV_PARENT = "TPC_PARENT_ADDR"
ENV_TOKEN = "TPC_TOKEN"
ENV_HANDLER = "TPC_HANDLER"
ENV_HANDLER_ARGS = "TPC_HANDLER_ARGS"
ENV_DEVICE = "TPC_DEVICE"
ENV_COLLECTIVES = "TPC_COLLECTIVES"
ENV_START_TIMEOUT = "TPC_START_TIMEOUT_S"
ENV_CALL_TIMEOUT = "TPC_CALL_TIMEOUT_S"
HEARTBEAT_S = 1.0


# ---------------------------------------------------------------- shared by the launcher path and torchrun


def load_factory(spec: str) -> Callable[..., Any]:
    """"package.module:function" -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler {spec!r} must look like 'package.module:function'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no handler factory {attr!r} (from handler {spec!r})") from None


def init_process_group(device: str, timeout_s: float, collectives: str | None = None) -> str:
    """Join the default group from the env:// variables; returns this rank's device string. collectives:
    auto (gloo on cpu, nccl on cuda), gloo or nccl; default from TPC_COLLECTIVES."""
    timeout = timedelta(seconds=timeout_s)
    collectives = collectives or os.environ.get(ENV_COLLECTIVES, "auto")
    if collectives not in COLLECTIVES:
        raise ValueError(f"collectives {collectives!r} is not one of {COLLECTIVES}")
    if device == "cpu":
        if collectives == "nccl":
            raise ValueError("collectives nccl needs device cuda; use gloo (or auto) on cpu")
        dist.init_process_group("gloo", timeout=timeout)
        return "cpu"
    if device == "cuda":
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if collectives == "gloo":  # NCCL refuses two ranks on one GPU; gloo stages through the host
            if count == 0:
                raise RuntimeError("device cuda but no CUDA device is visible; check CUDA_VISIBLE_DEVICES")
            index = local_rank % count
            torch.cuda.set_device(index)
            dist.init_process_group("gloo", timeout=timeout)
            return f"cuda:{index}"
        if local_rank >= count:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {count} CUDA devices are visible: lower tp, "
                               f"check CUDA_VISIBLE_DEVICES, or share GPUs with runtime.collectives=gloo")
        torch.cuda.set_device(local_rank)
        # device_id binds the communicator to this GPU at once (eager init) instead of guessing later
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        return f"cuda:{local_rank}"
    raise ValueError(f"device {device!r} is not one of {DEVICES}")


def build_handler(factory: str, handler_args: dict, *, rank: int, world_size: int, device: str) -> Any:
    handler = load_factory(factory)(rank=rank, world_size=world_size, device=device, **handler_args)
    if not callable(getattr(handler, "handle", None)):
        raise TypeError(f"handler factory {factory!r} returned {type(handler).__name__}, "
                        f"which has no handle(op, payload) method")
    return handler


def close_handler(handler: Any) -> None:
    close = getattr(handler, "close", None)
    if callable(close):
        close()


def one_line(e: BaseException) -> str:
    """"Type: message" on one line, for the launcher's one-line error."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------- launcher path


def _error_msg(seq: int | None, where: str, e: BaseException) -> dict:
    return {"kind": "error", "seq": seq, "where": where, "error": one_line(e), "traceback": traceback.format_exc()}


def _status(ch, text: str) -> None:
    ch.send({"kind": "status", "status": text})


def _heartbeat(ch, ppid: int, stopping: threading.Event, rank: int) -> None:
    while not stopping.wait(HEARTBEAT_S):
        reason = None
        if os.getppid() != ppid:  # re-parented: the launcher died without closing us
            reason = f"launcher pid {ppid} is gone"
        else:
            try:
                ch.send({"kind": "heartbeat"})
            except ChannelError as e:
                reason = str(e)
        if reason and not stopping.is_set():
            print(f"[tpcompile worker rank {rank}] exiting: {reason}", file=sys.stderr, flush=True)
            os._exit(1)  # the main thread may be stuck in a collective: only _exit is sure to end the process


def health(handler: Any) -> dict:
    """This process's memory (bytes) and, on GPU, the CUDA caching allocator's; then handler.health()."""
    import resource
    out: dict = {"pid": os.getpid(), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(dev)
        out.update(cuda_device=dev, cuda_allocated_bytes=torch.cuda.memory_allocated(dev),
                   cuda_reserved_bytes=torch.cuda.memory_reserved(dev),
                   cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(dev),
                   cuda_free_bytes=free, cuda_total_bytes=total)
    own = getattr(handler, "health", None)
    if callable(own):
        out.update(own())
    return out


def _run_op(ch, handler: Any, msg: dict) -> None:
    seq, op = msg.get("seq"), msg["op"]
    try:
        result = health(handler) if op == "health" else handler.handle(op, msg.get("payload") or {})
        if not isinstance(result, dict):
            raise TypeError(f"handle({op!r}) returned {type(result).__name__}; a handler must return a dict")
        _status(ch, "idle")
        ch.send({"kind": "reply", "seq": seq, "result": result})
    except ChannelError:
        raise
    except Exception as e:  # report any handler failure to the launcher; it decides what happens next
        traceback.print_exc()
        _status(ch, f"raised in op {op}")
        ch.send(_error_msg(seq, f"op {op}", e))


def _serve(ch, handler: Any, call_timeout_s: float) -> None:
    """Answer requests until op "exit"."""
    while True:
        if not ch.wait_readable(HEARTBEAT_S):  # idle; the heartbeat thread watches the launcher
            continue
        msg = ch.recv(timeout_s=call_timeout_s)
        if msg.get("kind") != "request":
            continue
        if msg["op"] == "exit":
            return
        _status(ch, f"op {msg['op']}")
        _run_op(ch, handler, msg)


def main() -> int:
    env = os.environ
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", ENV_PARENT, ENV_TOKEN, ENV_HANDLER)
    missing = [k for k in required if k not in env]
    if missing:
        print(f"tpcompile.runtime.worker: missing env vars {missing}; this module is started by "
              f"tpcompile.runtime.launcher.WorkerGroup (under torchrun use serve_standalone)", file=sys.stderr)
        return 2
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    device = env.get(ENV_DEVICE, "cpu")
    start_timeout_s = float(env.get(ENV_START_TIMEOUT, "60"))
    call_timeout_s = float(env.get(ENV_CALL_TIMEOUT, "300"))
    ppid = os.getppid()
    faulthandler.enable()  # segfaults in native code leave a Python stack in the log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher asks for stacks on a timeout

    ch = connect(env[ENV_PARENT], env[ENV_TOKEN], {"rank": rank, "pid": os.getpid()}, timeout_s=start_timeout_s)
    stopping = threading.Event()
    threading.Thread(target=_heartbeat, args=(ch, ppid, stopping, rank), daemon=True, name="heartbeat").start()

    where = "init process group"
    try:
        _status(ch, where)
        # the group timeout also bounds every collective, which may legitimately take as long as a call
        local_device = init_process_group(device, max(start_timeout_s, call_timeout_s))
        where = "setup handler"
        _status(ch, where)
        handler = build_handler(env[ENV_HANDLER], json.loads(env.get(ENV_HANDLER_ARGS, "{}")),
                                rank=rank, world_size=world_size, device=local_device)
    except Exception as e:
        traceback.print_exc()
        ch.send(_error_msg(None, where, e))
        stopping.set()
        return 1

    _status(ch, "idle")  # before "ready", so the launcher never sees a ready rank with a stale status
    ch.send({"kind": "ready"})
    try:
        _serve(ch, handler, call_timeout_s)
    except ChannelClosed as e:
        print(f"[tpcompile worker rank {rank}] launcher gone: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # skip destroy_process_group: peers may be gone and it could block
    _status(ch, "exiting")
    close_handler(handler)
    dist.destroy_process_group()
    stopping.set()
    ch.close()
    return 0


# ---------------------------------------------------------------- torchrun path


def serve_standalone(factory: str, handler_args: dict, ops: list[tuple[str, dict]], *,
                     device: str | None = None, timeout_s: float = 300.0) -> list[dict] | None:
    """Run `ops` in order on a handler in a process started by torchrun; rank 0 gets the replies.

    device defaults to "cuda" when a GPU is visible, else "cpu"; timeout_s bounds the rendezvous and
    every collective (the process-group timeout).
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"serve_standalone needs torchrun's env vars, missing {missing}: "
                           f"start it with `torchrun --nproc-per-node=<tp> ...`")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_device = init_process_group(device, timeout_s)
    try:
        handler = build_handler(factory, handler_args, rank=rank, world_size=world_size, device=local_device)
        try:
            replies = [handler.handle(op, payload) for op, payload in ops]
        finally:
            close_handler(handler)
    finally:
        dist.destroy_process_group()
    return replies if rank == 0 else None


if __name__ == "__main__":
    sys.exit(main())
