"""RestartingGroup: a WorkerGroup that is started again after a failure, up to max_restarts times.

    group = RestartingGroup(lambda: WorkerGroup(tp=2, ...), max_restarts=1)
    group.start()
    replies = group.call("run", payload)     # a rank dies mid-call -> new group, the same request once more
    group.close()

Why the whole group: after a partial failure the ranks disagree on how far the collectives got (launcher.py),
so no rank can be reused. Every step is bounded by the group's own deadlines: the failed group's close()
(kill, a few seconds), the new group's start (start_timeout_s), the retried call (call_timeout_s).

What is retried: a rank that died, froze, lost its connection, or missed a deadline. Not retried: an op the
handler itself rejected (WorkerError.kind == "raised" after the group was ready): the same inputs would fail
the same way. A request is retried at most once, so a request that kills a rank every time fails after two
tries instead of using up every restart.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

from tpcompile.runtime.launcher import WorkerError, WorkerGroup


class RestartingGroup:
    def __init__(self, make_group: Callable[[], WorkerGroup], *, max_restarts: int = 0, log=None):
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        self.make_group, self.max_restarts = make_group, max_restarts
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.group: WorkerGroup | None = None
        self.restarts = 0
        self.failures: list[tuple[float, WorkerError]] = []  # (seconds the failed call took, error), in order

    def start(self) -> None:
        """The first start is not retried: a failure there is almost always the config or the artifact."""
        self.group = self.make_group()
        self.group.start()

    def call(self, op: str, payload: dict | None = None, *, timeout_s: float | None = None) -> list[dict]:
        if self.group is None:
            raise RuntimeError("RestartingGroup.call() before start()")
        if self.group.state != "running":  # a previous request failed past its retry: start again if allowed
            self._restart(None)
        t0 = time.monotonic()
        try:
            return self.group.call(op, payload, timeout_s=timeout_s)
        except WorkerError as e:
            self.failures.append((time.monotonic() - t0, e))
            if e.kind == "raised" or self.restarts >= self.max_restarts:
                raise
            self._restart(e)
        t0 = time.monotonic()
        try:
            return self.group.call(op, payload, timeout_s=timeout_s)  # the one retry, from the same inputs
        except WorkerError as e:
            self.failures.append((time.monotonic() - t0, e))
            raise

    def _restart(self, cause: WorkerError | None) -> None:
        """Close what is left (already done by the group on failure; idempotent) and start a new group;
        a failed start uses up a restart too. Raises the last error when none are left."""
        last = cause
        while True:
            if self.restarts >= self.max_restarts:
                if last is None:
                    raise RuntimeError(f"the worker group failed and all max_restarts={self.max_restarts} "
                                       f"restarts are used; start a new session")
                raise last
            self.restarts += 1
            if self.group is not None:
                self.group.close()
            self.log(f"tpcompile: restarting the worker group ({self.restarts}/{self.max_restarts})"
                     + (f" after: {last}" if last else ""))
            self.group = self.make_group()
            try:
                self.group.start()
                return
            except WorkerError as e:
                self.failures.append((0.0, e))
                last = e

    def status(self) -> list[dict]:
        return self.group.status() if self.group is not None else []

    def health(self, timeout_s: float = 30.0) -> list[dict]:
        return self.group.health(timeout_s=timeout_s)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()

    def __enter__(self) -> "RestartingGroup":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
