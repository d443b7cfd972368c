"""aoti and onnx end to end on real gloo workers (llama_tiny, tp=2): compiled once per module, then verified
against the unsharded model, loaded without a compiler, copied and loaded from a fresh process, refused
when the manifest says it was built for something else. Last, the split backends' state updates (a KV cache)
on a one-segment graph in one process."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.conftest import REPO
from tpcompile.api import Artifact
from tpcompile.artifact import ArtifactError, check_compatible, read_manifest
from tpcompile.capture import example_inputs
from tpcompile.cli import cmd_compile, cmd_verify
from tpcompile.config import CONF_DIR, register
from tpcompile.runtime.launcher import WorkerGroup

BACKENDS = ["aoti", "onnx"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """compose(overrides) -> JobConfig; artifacts of the whole module share one out_dir (compiled once)."""
    register()
    out = tmp_path_factory.mktemp("engines")

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"out_dir={out}", *overrides])
        return OmegaConf.to_object(cfg)
    return make


@pytest.fixture(scope="module")
def verified(job):
    """backend -> the verify record of llama_tiny at tp=2 (compiles the artifact on first use)."""
    records = {}

    def get(backend: str) -> dict:
        if backend not in records:
            records[backend] = cmd_verify(job("model=llama_tiny", "tp=2", f"backend={backend}"))
        return records[backend]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_matches_unsharded(verified, backend):
    record = verified(backend)
    assert record["ok"], record
    assert 0 < record["max_abs_err"] and record["max_rel_err"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_engine_for_all_ranks_without_weights(verified, backend):
    path = Path(verified(backend)["artifact"])
    m = read_manifest(path)
    rank0 = load_file(path / m.rank_file(0))
    if backend == "aoti":
        (package,) = m.engine_files
        names = zipfile.ZipFile(path / package).namelist()
        assert any(n.endswith(".so") for n in names)
        assert not [n for n in names if "/data/constants/" in n or "/data/weights/" in n], names
    else:
        steps = json.loads((path / m.engine_files[0]).read_text())
        collectives = [s for s in steps["steps"] if s["op"] == "collective"]
        segments = [s for s in steps["steps"] if s["op"] == "segment"]
        # 2 layers x (attention, mlp) all-reduces, the head's all-gather; a segment before each and one after
        assert len(collectives) == 5 and len(segments) == 6
        assert set(steps["params"].values()) == set(rank0)  # every weight is an input, fed per rank
        import onnx
        for s in segments:
            assert not onnx.load(str(path / s["file"])).graph.initializer or all(
                i.name not in rank0 for i in onnx.load(str(path / s["file"])).graph.initializer)
    assert m.engine_files and not [f for f in m.engine_files if "rank" in f]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_load_without_compiling(verified, backend, tmp_path):
    """The workers import no compiler: no Inductor (aoti's loader is built directly, skipping the ISA probe
    that compiles test programs), no ONNX exporter; and they produce the verified output."""
    path = Path(verified(backend)["artifact"])
    x = example_inputs(read_manifest(path).graphs["forward"]["inputs"], device="cpu", seed=1)
    cache = tmp_path / "inductor-cache"
    with WorkerGroup(tp=2, handler="tests.lower.handlers:make_probed", handler_args={"artifact": str(path)},
                     env={"TORCHINDUCTOR_CACHE_DIR": str(cache)}) as group:  # __enter__ starts it
        (y,) = group.call("run", {"args": list(x)})[0]["outputs"]
        imported = [r["modules"] for r in group.call("imported")]
    assert imported == [[], []], imported
    assert not cache.exists()
    torch.testing.assert_close(y, Artifact(verified("eager")["artifact"]).run(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_copied_artifact_runs_from_a_fresh_process(verified, backend, tmp_path):
    path = Path(verified(backend)["artifact"])
    copy = tmp_path / "elsewhere" / "artifact"
    shutil.copytree(path, copy)
    script = ("import sys, torch, tpcompile\n"
              "from safetensors.torch import save_file\n"
              "from tpcompile.capture import example_inputs\n"
              "art = tpcompile.load(sys.argv[1])\n"
              "x = example_inputs(art.manifest.graphs['forward']['inputs'], device='cpu', seed=1)\n"
              "save_file({'y': art.run(*x)}, sys.argv[2])\n")
    out = tmp_path / "y.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, str(copy), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = example_inputs(read_manifest(path).graphs["forward"]["inputs"], device="cpu", seed=1)
    torch.testing.assert_close(load_file(out)["y"], Artifact(verified("eager")["artifact"]).run(*x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    ({"torch_version": "2.0.0"}, r"built for torch 2\.0\.0, found torch .*; install torch==2\.0\.0 or recompile"),
    ({"tp": 4}, r"built for tp=4, found 2 ranks; start 4 ranks or compile for tp=2"),
    ({"backend_versions": {"onnxruntime": "0.1"}},
     r"built for aoti with onnxruntime 0\.1, found onnxruntime .*; pip install onnxruntime==0\.1"),
    ({"device_capability": "aarch64 DEFAULT"}, r"built for cpu aarch64 DEFAULT .*found cpu .*recompile"),
    ({"device": "cuda"}, r"built for device cuda, found device cpu"),
    ({"pg_name": "7"}, r"built for process group '7' .*found process group '0'"),
])
def test_edited_manifest_is_refused_with_one_clear_message(verified, tmp_path, edit, message):
    path = tmp_path / "artifact"
    shutil.copytree(verified("aoti")["artifact"], path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(ArtifactError, match=message):
        check_compatible(read_manifest(path), path, world_size=2, device="cpu", pg_name="0")


@pytest.mark.slow
def test_edited_manifest_stops_the_workers_with_the_message(verified, tmp_path):
    path = tmp_path / "artifact"
    shutil.copytree(verified("aoti")["artifact"], path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "torch_version": "2.0.0"}))
    x = example_inputs(manifest["graphs"]["forward"]["inputs"], device="cpu", seed=1)
    with pytest.raises(Exception, match=r"built for torch 2\.0\.0, found torch"):
        Artifact(path).run(*x)


def test_tensorrt_without_it_names_what_is_missing(job):
    import importlib.util
    if importlib.util.find_spec("torch_tensorrt") and torch.cuda.is_available():
        pytest.skip("torch-tensorrt and a GPU are here: nothing is missing")
    with pytest.raises(RuntimeError, match=r"backend=tensorrt needs .*a CUDA GPU.*pip install 'tpcompile\[tensorrt\]'"):
        cmd_compile(job("backend=tensorrt", "tp=2"))


class Cached(torch.nn.Module):
    """A KV cache in miniature: writes x @ w at positions pos of a buffer, then reads the whole buffer."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))
        self.register_buffer("cache", torch.zeros(2, 8, 4), persistent=False)

    def forward(self, x, pos):  # x (2, T, 4), pos (T,)
        c = self.cache.index_copy_(1, pos, x @ self.w)  # (2, 8, 4)
        return c.sum(1) * 2


@pytest.mark.parametrize("how", [pytest.param("onnx", marks=pytest.mark.slow), "copy"])
def test_split_graph_updates_its_state_like_eager(tmp_path, how):
    """The cache update of a split graph lands in the shared state tensor: in place through onnxruntime
    (the output bound to the cache's memory), or copied back from a segment that returns a new tensor (the
    tensorrt path, here the segment's GraphModule run by torch). Eager on the same calls is the reference."""
    from tpcompile.lower import onnx, split
    torch.manual_seed(0)
    model = Cached()
    program = torch.export.export(Cached(), (torch.zeros(2, 2, 4), torch.zeros(2, dtype=torch.long)))
    segments = {}

    def keep(sub, file):  # the copy path's "compile": keep the segment's GraphModule
        segments[file.name] = sub
        return {}

    def run(step, args):
        out = segments[step["file"]](*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]
    files = split.split_program(program, tmp_path, "g", ".onnx" if how == "onnx" else ".pt2",
                                onnx.export_segment if how == "onnx" else keep)
    spec = json.loads((tmp_path / files[0]).read_text())
    (segment,) = [s for s in spec["steps"] if s["op"] == "segment"]
    state = next(ph for ph, fqn in spec["params"].items() if fqn == "cache")
    assert [i for _, i in segment["inplace"]] == ([segment["args"].index(state)] if how == "onnx" else [])
    tensors = {"w": model.w.detach().clone(), "cache": torch.zeros(2, 8, 4)}
    cache = tensors["cache"]
    steps = (onnx.load(tmp_path, files, tensors, "cpu") if how == "onnx" else
             split.Steps(spec, tensors, torch.device("cpu"), run))
    for pos in ([0, 1], [2, 3], [1, 5]):
        x = torch.randn(2, 2, 4)
        with torch.no_grad():
            want = model(x, torch.tensor(pos))
        torch.testing.assert_close(steps(x, torch.tensor(pos)), want)
    assert tensors["cache"] is cache and cache.abs().sum() > 0
    torch.testing.assert_close(cache, model.cache)


def test_split_graph_that_mutates_an_input_is_refused(tmp_path):
    class AddsToInput(torch.nn.Module):
        def forward(self, x):
            return x.add_(1) * 2
    from tpcompile.lower.split import split_program
    program = torch.export.export(AddsToInput(), (torch.zeros(3),))
    with pytest.raises(ValueError, match=r"g: the split backends .*USER_INPUT_MUTATION x.*backend=aoti"):
        split_program(program, tmp_path, "g", ".onnx", lambda sub, file: {})


def test_aoti_cuda_workers_preload_the_libstdcxx_torch_uses(monkeypatch):
    """A CUDA aoti package crashes in its loader unless libstdc++ is preloaded (lower/aoti.worker_env); the
    preload must name the library this process maps, keep the user's LD_PRELOAD, and start a process cleanly."""
    from tpcompile.lower import worker_env
    monkeypatch.setenv("LD_PRELOAD", "")
    env = worker_env("aoti", "cuda")
    lib = env["LD_PRELOAD"]
    assert Path(lib).is_file() and Path(lib).name.startswith("libstdc++.so")
    assert worker_env("aoti", "cpu") == {} and worker_env("eager", "cuda") == {}
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=60)
    assert maps.returncode == 0 and "ld.so" not in maps.stderr, maps.stderr
    assert lib in maps.stdout  # preloaded although python itself needs no libstdc++
    monkeypatch.setenv("LD_PRELOAD", "/opt/user/libx.so")
    assert worker_env("aoti", "cuda")["LD_PRELOAD"] == f"{lib} /opt/user/libx.so"
    monkeypatch.setenv("LD_PRELOAD", lib)
    assert worker_env("aoti", "cuda") == {}


def test_inductor_settings_per_backend(monkeypatch):
    """What each backend's engines compile with (the artifact key holds it): coordinate-descent tuning on a GPU;
    programmatic dependent launch only where torch.compile launches the kernels (AOTInductor's C++ launcher does
    not pass the attribute); the user's TPCOMPILE_INDUCTOR_OPTIONS over both; nothing for a backend without
    Inductor."""
    import torch._inductor.config as config
    from tpcompile.lower import inductor_options
    monkeypatch.delenv("TPCOMPILE_INDUCTOR_OPTIONS", raising=False)
    pdl = {"triton.enable_pdl": True} if hasattr(config.triton, "enable_pdl") else {}
    for name in ("inductor", "inductor_cudagraphs"):
        assert inductor_options(name, "cuda") == {"coordinate_descent_tuning": True, **pdl}
        assert inductor_options(name, "cpu") == {"coordinate_descent_tuning": False}
    for name in ("aoti", "aoti_cudagraphs"):
        assert inductor_options(name, "cuda") == {"coordinate_descent_tuning": True}
    assert inductor_options("eager", "cuda") == {} == inductor_options("onnx", "cuda")
    monkeypatch.setenv("TPCOMPILE_INDUCTOR_OPTIONS", '{"triton.enable_pdl": false}')
    assert inductor_options("inductor_cudagraphs", "cuda")["triton.enable_pdl"] is False
