"""A real `tpcompile serve` on loopback: llama_tiny, tp=2 on gloo, CPU. The artifact is compiled once per
session (eager backend); each test module starts its own server process and stops it with SIGTERM."""
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CLI, REPO

START_S = 240.0  # compile (first module only) + start the workers + warm-up, on 2 busy cores


class Server:
    def __init__(self, proc: subprocess.Popen, out: Path, err: Path):
        self.proc, self.out, self.err = proc, out, err
        end = time.monotonic() + START_S
        while not (m := re.search(r"on (http://\S+) after .* artifact (\S+)", out.read_text())):
            if proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"the server did not start: {err.read_text()[-3000:]}")
            time.sleep(0.2)
        self.url, self.artifact = m[1], m[2]

    def client(self, **options):
        from openai import OpenAI
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60.0, **options)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])

    def log(self) -> list[dict]:
        """The structured lines of the server's stderr (one per request, and worker events)."""
        return [json.loads(line) for line in self.err.read_text().splitlines() if line.startswith('{"event"')]

    def wait(self, condition, timeout_s: float = 20.0, what: str = "condition"):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached within {timeout_s} s")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-engines")


@pytest.fixture(scope="module")
def start_server(engines, tmp_path_factory):
    """start_server(*overrides) -> a running Server; every one started is stopped at the end of the module."""
    started = []

    def start(*overrides: str) -> Server:
        run = tmp_path_factory.mktemp("serve-run")
        out, err = run / "stdout.txt", run / "stderr.txt"
        args = ["serve", "tp=2", "generation.max_batch=8", "generation.max_seq=128", "generation.prefill_chunk=16",
                f"out_dir={engines}", "server.port=0", f"hydra.run.dir={run}", *overrides]
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen([*CLI, *args], cwd=REPO, stdout=o, stderr=e,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        server = Server(proc, out, err)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()
