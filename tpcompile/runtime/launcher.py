"""WorkerGroup: tp local processes that answer the same request together.

    with WorkerGroup(tp=2, handler="pkg.mod:make", handler_args={...}) as group:
        replies = group.call("forward", {"x": x})      # replies[rank]

The launcher knows nothing of models: a handler factory ("package.module:function") builds, in every worker,
an object with handle(op, payload) -> dict (worker.py). Messages travel over channel.py (JSON + safetensors).

Failure policy: any failure inside call() or start() -- a rank that dies, raises, misses the deadline, or
stops heartbeating -- stops every worker and raises WorkerError naming the rank. After a partial failure the
ranks disagree on how far the collectives got, so the group is not reusable; start a new one (restart.py).

Detection bounds: a dead rank within poll_s (its exit status is polled); a frozen rank (SIGSTOP, native code
holding the GIL) within heartbeat_timeout_s; a rank stuck in Python or in a collective within the start or
call deadline, with its stack dumped to its log.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tpcompile.runtime import COLLECTIVES, DEVICES
from tpcompile.runtime import worker as _w
from tpcompile.runtime.channel import Channel, ChannelError, accept, encode, free_port, listen

_TERM_GRACE_S = 3.0  # SIGTERM -> SIGKILL
_EXIT_GRACE_S = 10.0  # op "exit" -> SIGTERM; destroy_process_group is quick when every rank is healthy
_ERROR_GRACE_S = 2.0  # after a rank reports an error, how long to look for a rank that died (the root cause)
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


class WorkerError(RuntimeError):
    """A worker died, raised, or missed a deadline. str() is one line; .details has the traceback or log tail."""

    # kind: "died" (exit or signal), "raised" (the handler raised), "timeout", "hung" (no heartbeat),
    # "closed" (connection lost). A "raised" op error is the request's own fault: retrying cannot help.
    def __init__(self, rank: int, problem: str, *, status: str | None, log_path: str | None,
                 details: str = "", exit: str | None = None, kind: str = "died"):
        self.rank, self.problem, self.status, self.log_path = rank, problem, status, log_path
        self.details, self.exit, self.kind = details, exit, kind
        self.at = time.monotonic()  # when the failure was detected: tests measure detection latency from it
        super().__init__(f"rank {rank} {problem} (last status: {status!r}; log: {log_path})")


def _exit_state(pid: int) -> str | None:
    """'exit code N' / 'SIGKILL' once the child has ended, else None. Does not reap it (WNOWAIT):
    an unreaped pid cannot be reused, so killpg(pid) later can only hit our own process group."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "reaped"
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return f"exit code {info.si_status}"
    try:
        return signal.Signals(info.si_status).name
    except ValueError:
        return f"signal {info.si_status}"


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def _log_tail(path: str | None, n_lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n_lines:])
    except (OSError, TypeError):
        return ""


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True made pid the group id: this also reaches grandchildren
    except (ProcessLookupError, PermissionError):
        pass


class _Rank:
    """Launcher-side state of one worker."""

    def __init__(self, rank: int, proc: subprocess.Popen, log_path: str):
        self.rank, self.proc, self.log_path = rank, proc, log_path
        self.channel: Channel | None = None
        self.status = "starting"
        self.reader: threading.Thread | None = None
        self.last_seen = time.monotonic()  # of any message: heartbeats arrive every worker.HEARTBEAT_S
        self.ready = False

    def exit_state(self) -> str | None:
        return _exit_state(self.proc.pid)


class WorkerGroup:
    def __init__(self, *, tp: int, handler: str, handler_args: dict, device: str = "cpu", collectives: str = "auto",
                 start_timeout_s: float = 60.0, call_timeout_s: float = 300.0, poll_s: float = 0.2,
                 heartbeat_timeout_s: float = 10.0, log_dir: str | None = None, env: dict | None = None):
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be an int >= 1, got {tp!r}")
        if device not in DEVICES:
            raise ValueError(f"device {device!r} is not one of {DEVICES}")
        if collectives not in COLLECTIVES:
            raise ValueError(f"collectives {collectives!r} is not one of {COLLECTIVES}")
        for name, value in (("start_timeout_s", start_timeout_s), ("call_timeout_s", call_timeout_s),
                            ("poll_s", poll_s), ("heartbeat_timeout_s", heartbeat_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        try:
            self._handler_args_json = json.dumps(handler_args)
        except TypeError as e:
            raise TypeError(f"handler_args travel as JSON in an env var: {e}; pass paths or numbers instead") from e
        self.tp, self.handler, self.handler_args, self.device = tp, handler, handler_args, device
        self.collectives = collectives
        self.start_timeout_s, self.call_timeout_s, self.poll_s = start_timeout_s, call_timeout_s, poll_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.log_dir, self.extra_env = log_dir, dict(env or {})
        self._ranks: list[_Rank] = []
        self._inbox: queue.Queue = queue.Queue()  # (rank, message) for everything but status and heartbeat
        self._server = None
        self._token = secrets.token_hex(32)
        self._seq = 0
        self._temp_dir: str | None = None
        self._state = "new"  # new -> running -> closed; "failed" once anything went wrong

    @property
    def state(self) -> str:
        """new -> running -> closed; failed once anything went wrong (then only close() is useful)."""
        return self._state

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "WorkerGroup":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Spawn tp workers and wait until every rank is ready (bounded by start_timeout_s)."""
        if self._state != "new":
            raise RuntimeError(f"WorkerGroup.start() called on a group that is {self._state}; make a new group")
        self._state = "running"
        try:
            self._spawn()
            deadline = time.monotonic() + self.start_timeout_s
            self._accept_all(deadline)
            self._await_ready(deadline)
        except BaseException:
            self._abort()
            raise

    def _worker_env(self, rank: int, master_port: int, parent_addr: str) -> dict:
        env = dict(os.environ)
        env.update(self.extra_env)
        # workers import tpcompile (and handler modules) from this checkout even when it is not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.tp)))  # no oversubscription
        env.update({
            "RANK": str(rank), "WORLD_SIZE": str(self.tp),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(self.tp),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
            _w.ENV_PARENT: parent_addr, _w.ENV_TOKEN: self._token,
            _w.ENV_HANDLER: self.handler, _w.ENV_HANDLER_ARGS: self._handler_args_json,
            _w.ENV_DEVICE: self.device, _w.ENV_COLLECTIVES: self.collectives,
            _w.ENV_START_TIMEOUT: str(self.start_timeout_s), _w.ENV_CALL_TIMEOUT: str(self.call_timeout_s),
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            # NVLink multicast off (NCCL NVLS, symmetric memory, NVSHMEM): a fault in it can take a shared host's GPUs down
            "PYTHONUNBUFFERED": "1",  # logs up to the moment of a crash
        })
        return env

    def _spawn(self) -> None:
        if self.log_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="tpcompile-workers-")
        log_dir = Path(self.log_dir or self._temp_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self._server = listen()
        host, port = self._server.getsockname()
        master_port = free_port()
        for rank in range(self.tp):
            log_path = str(log_dir / f"rank{rank}.log")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tpcompile.runtime.worker"],
                    env=self._worker_env(rank, master_port, f"{host}:{port}"),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so close() can kill it and its children
                )
            self._ranks.append(_Rank(rank, proc, log_path))

    def _accept_all(self, deadline: float) -> None:
        while any(r.channel is None for r in self._ranks):
            self._raise_if_dead("while connecting")
            if time.monotonic() > deadline:
                self._raise_not_ready(lambda r: r.channel is None, "did not connect")
            got = accept(self._server, self._token, timeout_s=self.poll_s)
            if got is None:
                continue  # nothing yet, or a connection with a wrong token (dropped)
            ch, hello = got
            rank = hello.get("rank")
            if not isinstance(rank, int) or not 0 <= rank < self.tp or self._ranks[rank].channel is not None:
                ch.close()
                continue
            r = self._ranks[rank]
            r.channel, r.status, r.last_seen = ch, "connected", time.monotonic()
            r.reader = threading.Thread(target=self._read_loop, args=(r,), daemon=True, name=f"tpc-rank{rank}")
            r.reader.start()

    def _await_ready(self, deadline: float) -> None:
        ready = [False] * self.tp
        while not all(ready):
            rank, msg = self._next_message(deadline)
            if msg is None:
                self._raise_if_dead("during startup")
                if time.monotonic() > deadline:
                    self._raise_not_ready(lambda r: not ready[r.rank], "was not ready")
            elif msg["kind"] == "ready":
                ready[rank] = self._ranks[rank].ready = True
            elif msg["kind"] == "error":
                self._fail(rank, f"failed in {msg.get('where')}: {msg.get('error')}", msg.get("traceback", ""),
                           kind="raised")
            elif msg["kind"] == "eof":
                self._settle_eof(rank, "during startup")

    # ------------------------------------------------------------ calls

    def call(self, op: str, payload: dict | None = None, *, timeout_s: float | None = None) -> list[dict]:
        """Send (op, payload) to every rank; return the replies, index = rank. Bounded by timeout_s
        (default call_timeout_s). Any failure stops the whole group and raises WorkerError."""
        if self._state != "running":
            raise RuntimeError(f"WorkerGroup is {self._state}: call() needs a started, healthy group")
        if op == "exit":
            raise ValueError("op 'exit' is reserved for close()")
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        # encoding first: a payload that cannot travel is the caller's error and leaves the group usable
        parts = encode({"kind": "request", "seq": self._seq + 1, "op": op, "payload": payload or {}})
        deadline = time.monotonic() + timeout_s
        self._seq += 1
        try:
            for r in self._ranks:
                try:
                    r.channel.send_encoded(parts)
                except ChannelError:
                    self._settle_eof(r.rank, f"before op {op!r}")
            return self._collect(op, deadline, timeout_s)
        except BaseException:  # WorkerError, or e.g. KeyboardInterrupt: ranks are mid-op, so kill, don't ask
            self._abort()
            raise

    def _collect(self, op: str, deadline: float, timeout_s: float) -> list[dict]:
        replies: list[dict | None] = [None] * self.tp
        first_error: tuple[int, dict] | None = None
        error_deadline = float("inf")
        while any(x is None for x in replies):
            rank, msg = self._next_message(deadline)
            if msg is not None and msg.get("seq") not in (None, self._seq) and msg["kind"] != "eof":
                continue  # stale; cannot happen while every failure closes the group, kept as a guard
            if msg is not None and msg["kind"] == "reply":
                replies[rank] = msg["result"]
            elif msg is not None and msg["kind"] == "error" and first_error is None:
                first_error = (rank, msg)
                # a rank blocked in a collective errors out when its peer dies: give the dead one time to show
                error_deadline = time.monotonic() + _ERROR_GRACE_S
            elif msg is not None and msg["kind"] == "eof":
                self._settle_eof(rank, f"during op {op!r}")
            self._raise_if_dead(f"during op {op!r}")
            if first_error and (time.monotonic() > error_deadline or self._all_answered(replies, first_error)):
                rank, msg = first_error
                self._fail(rank, f"raised {msg['error']} in op {op!r}", msg.get("traceback", ""), kind="raised")
            if time.monotonic() > deadline:
                missing = [i for i, x in enumerate(replies) if x is None]
                culprit, stacks = self._find_stuck(missing)
                self._fail(culprit, f"gave no reply to op {op!r} within timeout_s={timeout_s:g} s "
                                    f"(ranks without a reply: {missing}); raise timeout_s if the op is this slow",
                           stacks, kind="timeout")
        return replies

    @staticmethod
    def _all_answered(replies: list, first_error: tuple[int, dict]) -> bool:
        return all(x is not None or i == first_error[0] for i, x in enumerate(replies))

    def _next_message(self, deadline: float) -> tuple[int | None, dict | None]:
        wait = min(self.poll_s, max(0.0, deadline - time.monotonic()))
        try:
            return self._inbox.get(timeout=wait)
        except queue.Empty:
            return None, None

    def _read_loop(self, r: _Rank) -> None:
        """Per-rank reader thread: keeps status fresh, drains heartbeats, queues the rest."""
        ch = r.channel
        while self._state in ("running", "failed"):
            try:
                if not ch.wait_readable(self.poll_s):
                    continue
                msg = ch.recv(timeout_s=self.call_timeout_s)
            except (ChannelError, OSError, ValueError) as e:
                if self._state == "running":
                    self._inbox.put((r.rank, {"kind": "eof", "error": str(e)}))
                return
            r.last_seen = time.monotonic()
            kind = msg.get("kind")
            if kind == "status":
                r.status = msg.get("status")
            elif kind != "heartbeat":
                self._inbox.put((r.rank, msg))

    # ------------------------------------------------------------ failures

    def _abort(self) -> None:
        if self._state != "closed":
            self._state = "failed"
            self.close()

    def _fail(self, rank: int, problem: str, details: str = "", exit: str | None = None, kind: str = "died") -> None:
        r = self._ranks[rank]
        err = WorkerError(rank, problem, status=r.status, log_path=r.log_path, details=details, exit=exit, kind=kind)
        self._abort()
        raise err

    def _raise_if_dead(self, when: str) -> None:
        for r in self._ranks:
            state = r.exit_state()
            if state is not None:
                how = state if state.startswith("exit") else f"killed by {state}"
                self._fail(r.rank, f"died ({how}) {when}", _log_tail(r.log_path), exit=state)
        now = time.monotonic()
        for r in self._ranks:
            silent = now - r.last_seen
            # only once ready: during startup a worker may sit in native loading code, bounded by start_timeout_s
            if r.ready and silent > self.heartbeat_timeout_s:
                self._fail(r.rank, f"sent no heartbeat for {silent:.1f} s {when} (heartbeat_timeout_s="
                                   f"{self.heartbeat_timeout_s:g}): stopped, or frozen in native code holding the GIL",
                           self._stack_dump(r.rank), kind="hung")

    def _find_stuck(self, ranks: list[int]) -> tuple[int, str]:
        """Of ranks that all missed a deadline, the one to blame: the first whose stack is not inside
        torch.distributed (the others are waiting for it in a collective). Returns it and its stack dump."""
        offsets = {}
        for i in ranks:
            r = self._ranks[i]
            offsets[i] = Path(r.log_path).stat().st_size if Path(r.log_path).exists() else 0
            if r.exit_state() is None and r.channel is not None:
                os.kill(r.proc.pid, signal.SIGUSR1)
        time.sleep(0.5)  # faulthandler writes from a C signal handler, almost at once
        dumps = {}
        for i in ranks:
            try:
                with open(self._ranks[i].log_path, "rb") as f:
                    f.seek(offsets[i])
                    dumps[i] = f.read().decode(errors="replace")
            except OSError:
                dumps[i] = ""
        culprit = next((i for i in ranks if dumps[i] and "torch/distributed/" not in dumps[i]), ranks[0])
        return culprit, dumps[culprit] or _log_tail(self._ranks[culprit].log_path)

    def _stack_dump(self, rank: int) -> str:
        """Where a stuck rank is: the worker's faulthandler prints every thread's stack on SIGUSR1."""
        r = self._ranks[rank]
        if r.exit_state() is None and r.channel is not None:  # connected: its SIGUSR1 handler is installed
            os.kill(r.proc.pid, signal.SIGUSR1)
            time.sleep(0.5)  # faulthandler writes from a C signal handler, almost at once
        return _log_tail(r.log_path)

    def _settle_eof(self, rank: int, when: str) -> None:
        """A closed connection means the process is ending: wait briefly so the error names its exit status."""
        end = time.monotonic() + _TERM_GRACE_S
        while time.monotonic() < end:
            self._raise_if_dead(when)
            time.sleep(0.05)
        self._fail(rank, f"closed its connection {when} but is still running", _log_tail(self._ranks[rank].log_path),
                   kind="closed")

    def _raise_not_ready(self, pending, what: str) -> None:
        late = [r.rank for r in self._ranks if pending(r)]
        where = {r.rank: r.status for r in self._ranks if pending(r)}
        self._fail(late[0], f"{what} within start_timeout_s={self.start_timeout_s:g} s (late ranks and where they "
                            f"are: {where}); raise start_timeout_s if startup is this slow",
                   self._stack_dump(late[0]), kind="timeout")

    # ------------------------------------------------------------ inspection and shutdown

    def status(self) -> list[dict]:
        """Per rank, without asking the worker: pid, alive, exit, last status string, seconds since its last
        message, resident memory in bytes. Safe to call from another thread while a call() runs."""
        now = time.monotonic()
        return [{"rank": r.rank, "pid": r.proc.pid, "alive": r.exit_state() is None, "exit": r.exit_state(),
                 "status": r.status, "silent_s": round(now - r.last_seen, 3), "rss_bytes": _rss_bytes(r.proc.pid),
                 "log": r.log_path} for r in self._ranks]

    def health(self, timeout_s: float = 30.0) -> list[dict]:
        """status() merged with what each worker reports about itself (op "health", answered by worker.py:
        RSS, peak RSS, CUDA memory on GPU, plus the handler's own health() if it has one). Bounded by
        timeout_s; like any call, a failure stops the group and raises WorkerError."""
        replies = self.call("health", timeout_s=timeout_s)
        return [{**s, **reply} for s, reply in zip(self.status(), replies)]

    def close(self) -> None:
        """Stop every worker: ask politely when healthy, then SIGTERM and SIGKILL their process groups.
        Idempotent; bounded by about _EXIT_GRACE_S + _TERM_GRACE_S + a few seconds."""
        if self._state == "closed" or (self._state == "new" and not self._ranks):
            self._state = "closed"
            return
        healthy = self._state == "running"
        self._state = "closed"  # reader threads stop; nothing is queued any more
        if healthy:
            for r in self._ranks:
                try:
                    r.channel.send({"kind": "request", "seq": None, "op": "exit"})
                except (ChannelError, AttributeError):
                    pass
            self._wait_exit(_EXIT_GRACE_S)
        for r in self._ranks:
            if r.exit_state() is None:
                _killpg(r.proc.pid, signal.SIGTERM)
        self._wait_exit(_TERM_GRACE_S)
        for r in self._ranks:
            _killpg(r.proc.pid, signal.SIGKILL)  # also any grandchild left in the group by an exited leader
            try:
                r.proc.wait(timeout=5.0)  # reap; SIGKILL cannot be ignored, so this returns at once
            except subprocess.TimeoutExpired:
                pass
            if r.channel is not None:
                r.channel.close()
        if self._server is not None:
            self._server.close()
        # temp logs go only when all went well: an error message points at them
        if self._temp_dir and healthy:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def _wait_exit(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and any(r.exit_state() is None for r in self._ranks):
            time.sleep(0.05)
