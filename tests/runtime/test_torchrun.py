"""An artifact served by processes that torchrun starts (how runs span machines), against the unsharded model."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tpcompile.capture import example_inputs
from tpcompile.pipeline import build_artifact
from tpcompile.weights import materialize


@pytest.mark.slow  # torchrun in a subprocess
def test_torchrun_two_ranks_match_the_unsharded_model(job_config, tmp_path):
    job = job_config("tp=2")
    built = build_artifact(job)
    path, m = built.path, built.model
    x = example_inputs(built.input_specs, device="cpu", seed=5)
    save_file({"input_ids": x[0]}, tmp_path / "in.safetensors")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "tpcompile.runtime.torchrun", str(path), "--inputs", str(tmp_path / "in.safetensors"),
                        "--out", str(tmp_path / "out.safetensors"), "--timeout-s", "120"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "error" in l.lower())[-3000:]
    with torch.no_grad():
        ref = materialize(m.module, m.source, m.dtype)(*x)
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["output0"], ref, rtol=1e-5, atol=1e-5)
