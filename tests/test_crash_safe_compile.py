"""SIGKILL `tpcompile compile` at several points: no directory under out_dir may look like a complete artifact
unless it is one, and the next compile cleans the dead staging dirs and publishes a working artifact."""
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import CLI
from tpcompile.artifact import MANIFEST
from tpcompile.runtime.health import check_artifact

# kill once the staging dir (.tmp-*) holds this file; None: as soon as the staging dir exists
KILL_POINTS = [None, "rank0.safetensors", "report.txt", MANIFEST]


def _compile(tmp_path, engines):
    return subprocess.Popen([*CLI, "compile", "tp=2", f"out_dir={engines}", f"hydra.run.dir={tmp_path}/run"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _published(engines):
    return [p for p in engines.iterdir() if not p.name.startswith(".tmp-")] if engines.exists() else []


@pytest.mark.slow
def test_killed_compiles_leave_nothing_that_looks_complete(run_cli, tmp_path):
    engines = tmp_path / "engines"
    for point in KILL_POINTS:
        proc = _compile(tmp_path, engines)
        end = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < end:
                staging = list(engines.glob(".tmp-*")) if engines.exists() else []
                if staging and (point is None or any((s / point).exists() for s in staging)):
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        for p in _published(engines):  # a killed compile never leaves a half artifact under a final name
            assert (p / MANIFEST).is_file(), p
            check_artifact(p)
        if _published(engines):
            break  # the compile finished before this kill point: nothing later to test
    r = run_cli("compile", "tp=2", f"out_dir={engines}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [artifact] = _published(engines)
    check_artifact(artifact)
    assert not list(engines.glob(".tmp-*")), "stale staging dirs of killed compiles were not cleaned"
