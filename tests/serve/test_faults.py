"""Faults of a running server: a rank SIGKILLed while 4 streams are open (each ends with an error, the group
restarts, the next request succeeds), then SIGTERM with a stream in flight (it finishes, then the server and
its workers exit)."""
import os
import signal
import threading
import time

import openai
import pytest

pytestmark = pytest.mark.slow
MODEL = "llama_tiny"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("runtime.max_restarts=1", "runtime.heartbeat_timeout_s=5", "server.drain_s=20")


def test_a_rank_killed_with_4_streams_open(server):
    client, ended, errors = server.client(), [], []
    streams = [client.completions.create(model=MODEL, prompt=f"stream {i}", max_tokens=100, stream=True)
               for i in range(4)]
    for s in streams:
        next(iter(s))  # every stream has begun
    pids = [r["pid"] for r in server.health()["ranks"]]
    os.kill(pids[1], signal.SIGKILL)

    def drain(s):
        try:
            for _ in s:
                pass
            ended.append("finished")
        except openai.APIError as e:
            errors.append(e.message)
    threads = [threading.Thread(target=drain, args=(s,)) for s in streams]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert time.monotonic() - t0 < 30 and not ended and len(errors) == 4, (ended, errors)
    assert all("the workers failed during this request: rank 1 died (killed by SIGKILL)" in e for e in errors)
    h = server.wait(lambda: (h := server.health())["status"] == "ok" and h, timeout_s=60, what="the restart")
    assert h["restarts"] == 1 and not set(pids) & {r["pid"] for r in h["ranks"]}
    r = client.completions.create(model=MODEL, prompt="after the restart", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    assert 'tpcompile_errors_total{kind="worker"} 4.0' in server.get("/metrics")[1]


def test_sigterm_finishes_the_stream_in_flight_and_leaves_no_process(server):
    pids = [r["pid"] for r in server.health()["ranks"]]
    stream = server.client().completions.create(model=MODEL, prompt="drain", max_tokens=60, stream=True,
                                                temperature=0)
    chunks = [next(iter(stream))]
    server.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)  # the stream goes on to its end while the server drains
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.proc.wait(30) == 0
    time.sleep(0.5)
    alive = [p for p in pids + [server.proc.pid] if _alive(p)]
    assert not alive, alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # a zombie has ended
