import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tpcompile.config import CONF_DIR, register

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tp workers share 2 cores in CI


@pytest.fixture
def job_config(tmp_path):
    """compose(overrides) -> a validated JobConfig whose artifacts go to tmp_path."""
    register()

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"out_dir={tmp_path / 'engines'}", *overrides])
        return OmegaConf.to_object(cfg)
    return make


REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tpcompile.cli"]  # `tpcompile` as users run it, from this environment


@pytest.fixture(scope="session")
def run_cli():
    """run_cli(*args, cwd, timeout=300, env=None) -> the finished `tpcompile args` (stdout and stderr as text).
    env: variables set over this process's environment."""
    def run(*args: str, cwd, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    return run


def interpreted(code: str, timeout: float = 300) -> str:
    """What `python -c code` prints, run from the repository in a process with TRITON_INTERPRET=1 (Triton kernels
    run on the CPU); the process must succeed."""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
