"""Continuous batching on the static engines: requests join and leave the rows of the KV cache between steps.

One thread owns the worker group and loops:

    admit      waiting requests take free rows (a row freed by eos, max_tokens or a disconnect is free at once)
    plan       release the rows of cancelled requests; one prefill chunk for every prompt not fully read;
               a decode step if any row runs
    call       op "rows_step" on every rank (runtime/rows.py): decode, then the chunks
    dispatch   new tokens -> text deltas -> each request's sink; ended rows are free

So a long prompt is read chunk by chunk between the decode steps of the running rows, which do not stall for
it. Greedy output does not depend on the batch: rows are independent sequences in the graphs.

Faults: a failed step (a rank died, hung or lost its connection) fails every request in flight with one
line, then the group starts again (runtime.max_restarts) and the waiting requests go on. The sink of a
request is called from this thread; the HTTP side hands it to its event loop.
"""
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from tpcompile.runtime.launcher import WorkerError
from tpcompile.text import TextStream
from tpcompile.util import one_line


class Unavailable(RuntimeError):
    """The server cannot take a request now (queue full, shutting down, workers failed); .status: HTTP code."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sink: Callable[[tuple], None]      # ("delta", text, token | None) per token | ("end", reason, token_ids)
                                       # | ("error", message)
    text: TextStream
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple = ()
    id: str = ""
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    row: int | None = None
    sent: int = 0                      # prompt tokens prefilled
    started: bool = False              # its last chunk ran: the worker decodes it
    tokens: list = field(default_factory=list)
    finish: str | None = None          # stop | length | cancelled | error
    cancelled: bool = False


class Scheduler:
    def __init__(self, session, *, metrics, max_queue: int, step_timeout_s: float, warm_timeout_s: float,
                 log: Callable[[dict], None], decode_steps: int = 1):
        spec = session.artifact.manifest.generation
        self.session, self.metrics, self.log = session, metrics, log
        self.B, self.S, self.chunk = spec["max_batch"], spec["max_seq"], spec["prefill_chunk"]
        self.max_queue, self.step_timeout_s, self.warm_timeout_s = max_queue, step_timeout_s, warm_timeout_s
        self.decode_steps = decode_steps  # decode steps per worker call while no request waits to join
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.rows: dict[int, Request] = {}
        self.state = "starting"        # starting -> ok <-> restarting -> failed | stopping
        self.failure: str | None = None
        self.ids = itertools.count(1)
        self.thread = threading.Thread(target=self._loop, name="tpc-scheduler", daemon=True)

    # ------------------------------------------------------------------ the HTTP side (any thread)

    def start(self) -> None:
        self._warm()
        self.state = "ok"
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.state == "failed":
                raise Unavailable(f"the workers failed and cannot restart ({self.failure}); restart the server", 503)
            if self.state == "stopping":
                raise Unavailable("the server is shutting down; retry on another replica", 503)
            if len(self.waiting) >= self.max_queue + self.B - len(self.rows):  # free rows take the first ones
                raise Unavailable(f"the queue is full ({self.max_queue} requests wait for a row of max_batch="
                                  f"{self.B}); retry later or raise server.max_queue", 429)
            req.id = req.id or f"req-{next(self.ids)}"
            self.waiting.append(req)
            self.metrics.queued.set(len(self.waiting))
            self.cond.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: its row is released at the next step (a no-op once it has finished)."""
        with self.cond:
            if req.finish is None:
                req.cancelled = True
                self.cond.notify()

    def health(self) -> dict:
        ranks = self.session.group.status()
        return {"status": self.state, "running_rows": len(self.rows), "queued": len(self.waiting),
                "max_batch": self.B, "restarts": self.session.group.restarts, "failure": self.failure,
                "ranks": [{k: r[k] for k in ("rank", "pid", "alive", "exit", "status", "silent_s", "rss_bytes")}
                          for r in ranks]}

    def close(self, timeout_s: float) -> None:
        """Stop after the step in progress; requests still in flight get an error. Then the workers stop."""
        with self.cond:
            self.state = "stopping"
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        with self.cond:
            for req in list(self.rows.values()) + list(self.waiting):
                self._end(req, "error", "the server shut down before the request finished")
            self.rows.clear()
            self.waiting.clear()

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.state == "ok" and not self._work():
                    self.cond.wait(1.0)
                if self.state != "ok":
                    return
                self._admit()
                payload, chunks = self._plan()
            if payload is None:
                continue
            try:
                reply = self.session.group.group.call("rows_step", payload, timeout_s=self.step_timeout_s)[0]
            except Exception as e:  # a dead, hung or disconnected rank: the group is gone
                if self.state == "stopping":
                    return
                self._fail_in_flight(e)
                self._restart()
                continue
            with self.cond:
                self._dispatch(reply, chunks)

    def _work(self) -> bool:
        return bool(self.rows) or (bool(self.waiting) and len(self.rows) < self.B)

    def _admit(self) -> None:
        free = (r for r in range(self.B) if r not in self.rows)
        while self.waiting and len(self.rows) < self.B:
            req = self.waiting.popleft()
            if req.cancelled:
                self._end(req, "cancelled")
                continue
            req.row, req.admitted = next(free), time.monotonic()
            self.rows[req.row] = req
            self.metrics.queue_time.observe(req.admitted - req.arrived)
        self.metrics.queued.set(len(self.waiting))
        self.metrics.running.set(len(self.rows))

    def _plan(self) -> tuple[dict | None, list]:
        """The next rows_step: rows to release, the decode flag, one chunk per prompt still being read. The
        first chunk of a prompt is the short one (left-padded in the graph), so the last ends on its last token."""
        release, chunks = [], []
        for row, req in list(self.rows.items()):
            if req.cancelled or req.finish is not None:
                if req.started:
                    release.append(row)
                del self.rows[row]
                if req.finish is None:
                    self._end(req, "cancelled")
        for row, req in self.rows.items():
            if req.started:
                continue
            n = len(req.prompt) - (-(-len(req.prompt) // self.chunk) - 1) * self.chunk if req.sent == 0 else self.chunk
            start = None
            if req.sent + n == len(req.prompt):
                start = {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_k": req.top_k,
                         "top_p": req.top_p, "seed": req.seed, "stop": list(req.stop_ids)}
            chunks.append({"row": row, "tokens": req.prompt[req.sent:req.sent + n], "pos": req.sent, "start": start})
        decode = 0
        if any(req.started for req in self.rows.values()):  # several steps per call while nobody waits to join
            decode = 1 if (chunks or release or self.waiting) else self.decode_steps
        self.metrics.running.set(len(self.rows))
        if not (release or chunks or decode):
            return None, []
        return {"release": release, "decode": decode, "prefill": chunks}, chunks

    def _dispatch(self, reply: dict, chunks: list) -> None:
        for c in chunks:
            req = self.rows.get(c["row"])
            if req is not None:
                req.sent += len(c["tokens"])
                req.started = req.started or c["start"] is not None
        now = time.monotonic()
        for row, token in reply["tokens"]:
            req = self.rows.get(row)
            if req is None or req.finish is not None or req.cancelled:
                continue
            if req.first_token is None:
                req.first_token = now
                self.metrics.ttft.observe(now - req.arrived)
            req.last_token = now
            req.tokens.append(token)
            req.sink(("delta", req.text.add(token), token))  # one event per token, its text maybe held back
            if req.text.stopped:  # a stop string: the row is released at the next step
                self._end(req, "stop")
        for row, reason in reply["ended"]:
            req = self.rows.pop(row, None)
            if req is not None and req.finish is None and not req.cancelled:
                req.finish = reason
                self._end(req, reason)
            elif req is not None and req.cancelled and req.finish is None:
                self._end(req, "cancelled")
        self.metrics.running.set(len(self.rows))

    def _end(self, req: Request, reason: str, message: str | None = None) -> None:
        """The last event of a request, its metrics and its log line."""
        req.finish = reason
        now = time.monotonic()
        if reason in ("stop", "length"):
            tail = req.text.finish()
            if tail:
                req.sink(("delta", tail, None))
            req.sink(("end", reason, list(req.tokens)))
            self.metrics.e2e.observe(now - req.arrived)
            if len(req.tokens) > 1:
                self.metrics.tpot.observe((req.last_token - req.first_token) / (len(req.tokens) - 1))
        elif reason == "error":
            req.sink(("error", message))
            self.metrics.errors.labels(kind="worker").inc()
        else:
            self.metrics.errors.labels(kind="disconnect").inc()
        self.metrics.tokens_in.inc(req.sent)
        self.metrics.tokens_out.inc(len(req.tokens))
        self.log({"event": "request", "id": req.id, "finish": reason, "row": req.row,
                  "prompt_tokens": len(req.prompt), "completion_tokens": len(req.tokens),
                  "queue_s": _round(req.admitted, req.arrived), "ttft_s": _round(req.first_token, req.arrived),
                  "tpot_s": _round(req.last_token, req.first_token, len(req.tokens) - 1),
                  "e2e_s": round(now - req.arrived, 4), **({"error": message} if message else {})})

    def _fail_in_flight(self, error: Exception) -> None:
        text = one_line(error) if not isinstance(error, WorkerError) else str(error)
        with self.cond:
            self.state = "restarting"
            for req in self.rows.values():
                if req.finish is None:
                    self._end(req, "error", f"the workers failed during this request: {text}")
            self.rows.clear()
            self.metrics.running.set(0)

    def _restart(self) -> None:
        """A new group (RestartingGroup starts one when the last failed, if max_restarts allows), warmed up."""
        try:
            self.session.group.call("health", timeout_s=self.warm_timeout_s)
            self._warm()
        except Exception as e:
            with self.cond:
                self.state, self.failure = "failed", one_line(e)
                for req in list(self.waiting):
                    self._end(req, "error", f"the workers failed and cannot restart: {self.failure}")
                self.waiting.clear()
            self.log({"event": "workers_failed", "error": self.failure})
            return
        with self.cond:
            if self.state == "restarting":
                self.state = "ok"
        self.log({"event": "workers_restarted", "restarts": self.session.group.restarts})

    def _warm(self) -> None:
        """Run both graphs once (backends that compile at load do it on the first call), on row 0."""
        call = self.session.group.group.call
        start = {"max_new_tokens": 2, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "stop": []}
        call("rows_step", {"prefill": [{"row": 0, "tokens": [0], "pos": 0, "start": start}]},
             timeout_s=self.warm_timeout_s)
        call("rows_step", {"decode": True}, timeout_s=self.warm_timeout_s)


def _round(end, start, n: int = 1):
    return None if end is None or start is None or n < 1 else round((end - start) / n, 4)
