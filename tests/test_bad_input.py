"""Bad input everywhere: config keys, artifacts, runtime inputs. Each case is a row of docs/errors.md.

CLI cases run `python -m tpcompile.cli` and check: non-zero exit, one line on stderr naming the thing,
no traceback, nothing written under out_dir. Artifact cases corrupt a copy of a small tp=2 artifact and
check that it is refused before any engine is loaded.
"""
import json
import shutil
import zipfile

import pytest
import torch
from torch import nn

import tpcompile
from tpcompile.artifact import FORMAT_VERSION, ArtifactError, read_manifest
from tpcompile.runtime.engine import RankEngine, check_inputs
from tpcompile.runtime.health import check_artifact


def _assert_one_line(r, message):
    assert r.returncode != 0, r.stdout
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- config (docs/errors.md: config)

@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["model=nope"], "model=nope: no such option; use one of"),
    (["plan=nope"], "plan=nope: no such option; use one of"),
    (["backend=nope"], "backend=nope: no such option; use one of"),
    (["backend.name=nope"], "backend.name='nope' is not known; use one of"),
    (["tp=abc"], "Error merging override tp=abc Value 'abc' of type 'str' could not be converted to Integer"),
    (["tp=0"], "tp=0: the tensor-parallel degree must be >= 1"),
    (["runtime.device=cuda", "tp=64"], "tp=64 needs 64 GPUs with runtime.device=cuda"),
    (["runtime.max_restarts=-1"], "runtime.max_restarts=-1: must be >= 0"),
    (["runtime.call_timeout_s=0"], "runtime.call_timeout_s=0.0: must be > 0 seconds"),
    (["nokey=1"], "Key 'nokey' not in 'JobConfig'"),
    (["+plan.rules=[{match: nope, style: colwise}]", "plan=replicate"], "'nope' -> colwise matches no parameter"),
])
def test_bad_config(run_cli, tmp_path, overrides, message):
    r = run_cli("compile", *overrides, f"out_dir={tmp_path}/engines", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    _assert_one_line(r, message)
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


# ---------------------------------------------------------------- artifacts

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(3, 8)
    art = tpcompile.compile(model, (x,), tp=2, plan={"0.*": "colwise", "2.weight": "rowwise"},
                            out_dir=tmp_path_factory.mktemp("engines"))
    return art.path


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "artifact"
    shutil.copytree(artifact, dst)
    return dst


@pytest.fixture
def no_engine_load(monkeypatch):
    """Any attempt to load an engine fails the test: refusals must come before it."""
    def boom(*a, **k):
        raise AssertionError("an engine was loaded from a refused artifact")
    monkeypatch.setattr(torch.export, "load", boom)


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, rank", [("engine", 0), ("rank0.safetensors", 0), ("rank1.safetensors", 1)])
def test_corrupt_loaded_file_is_refused_before_load(copy, no_engine_load, name, rank):
    if name == "engine":
        name = read_manifest(copy).engine_files[0]
    _flip(copy / name)
    with pytest.raises(ArtifactError, match=f"{name}: sha256 does not match the manifest"):
        RankEngine(rank=rank, world_size=2, device="cpu", artifact=str(copy))


def test_corrupt_report_is_not_loaded_but_health_refuses_it(copy):
    _flip(copy / "report.txt")
    RankEngine(rank=0, world_size=2, device="cpu", artifact=str(copy))  # workers never read the report
    with pytest.raises(ArtifactError, match="report.txt: sha256 does not match"):
        check_artifact(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda p: _flip(p, 0), "manifest.json: corrupted or hand-edited (not JSON"),
    (lambda p: p.write_text(p.read_text()[:100]), "manifest.json: corrupted or hand-edited (not JSON"),
    (lambda p: p.write_text("[]"), "a JSON list, not an object"),
    (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "tp"})),
     "missing 1 required positional argument: 'tp'"),
])
def test_corrupt_manifest_is_a_clean_error(copy, no_engine_load, edit, message):
    edit(copy / "manifest.json")
    with pytest.raises(ArtifactError, match="delete .* and compile again") as ei:
        read_manifest(copy)
    assert message in str(ei.value)


def _edit_manifest(path, **changes):
    data = json.loads((path / "manifest.json").read_text())
    data.update(changes)
    (path / "manifest.json").write_text(json.dumps(data))


def test_manifest_hash_edit_is_caught(copy, no_engine_load):
    data = json.loads((copy / "manifest.json").read_text())
    data["files"]["rank0.safetensors"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="rank0.safetensors: sha256 does not match"):
        RankEngine(rank=0, world_size=2, device="cpu", artifact=str(copy))


def test_artifact_of_an_older_format_asks_for_a_recompile(copy, no_engine_load):
    """A format-1 artifact (one sha256 over each whole file, no "hash" key) is refused as old, not as corrupted."""
    import hashlib
    data = json.loads((copy / "manifest.json").read_text())
    del data["hash"]
    data["format_version"] = 1
    data["files"] = {name: hashlib.sha256((copy / name).read_bytes()).hexdigest() for name in data["files"]}
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as ei:
        RankEngine(rank=0, world_size=2, device="cpu", artifact=str(copy))
    assert "built with artifact format 1, this tpcompile" in str(ei.value)
    assert f"reads format {FORMAT_VERSION}; recompile it" in str(ei.value) and "corrupted" not in str(ei.value)


def test_file_digest_is_sha256_over_the_chunk_sha256s(tmp_path, monkeypatch):
    """sha256_files against hashlib directly, with chunks small enough that a file has several (each read in
    several preads), and a flipped byte caught in every chunk, the last and shorter one included."""
    import hashlib
    from tpcompile import artifact
    monkeypatch.setattr(artifact, "HASH_CHUNK", 1000)
    monkeypatch.setattr(artifact, "_HASH_READ", 300)
    data = bytes(range(256)) * 15  # 3840 bytes: chunks of 1000, 1000, 1000, 840

    def reference(d: bytes) -> str:
        chunks = [d[i:i + 1000] for i in range(0, max(len(d), 1), 1000)]  # an empty file: one empty chunk
        return hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()

    files = {"a": data, "empty": b"", "one_chunk": data[:1000]}
    for name, d in files.items():
        (tmp_path / name).write_bytes(d)
    assert artifact.sha256_files([tmp_path / n for n in files]) == [reference(d) for d in files.values()]
    for i in (0, 999, 1000, 2500, 3839):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        (tmp_path / "a").write_bytes(bytes(flipped))
        assert artifact.sha256_file(tmp_path / "a") == reference(bytes(flipped)) != reference(data)


@pytest.mark.parametrize("case, message", [
    ("missing", "rank1.safetensors: missing from the artifact"),
    ("tp", "built for tp=2"),
    ("torch", "torch 1.0.0, found torch"),
    ("path", "'../rank0.safetensors' is not a plain file name"),
])
def test_unusable_artifact(copy, no_engine_load, case, message):
    world_size, rank = 2, 1
    if case == "missing":
        (copy / "rank1.safetensors").unlink()
    elif case == "tp":
        world_size = 4
    elif case == "torch":
        _edit_manifest(copy, torch_version="1.0.0")
    elif case == "path":
        data = json.loads((copy / "manifest.json").read_text())
        data["files"]["../rank0.safetensors"] = data["files"]["rank0.safetensors"]
        (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as ei:
        RankEngine(rank=rank, world_size=world_size, device="cpu", artifact=str(copy))
    assert message in str(ei.value)


def test_pickle_in_engine_is_refused(copy, monkeypatch):
    """An attacker who rewrites the engine *and* its hash in the manifest: the no-pickle scan still refuses."""
    engine = copy / read_manifest(copy).engine_files[0]
    with zipfile.ZipFile(engine) as z:
        entries = {i.filename: z.read(i.filename) for i in z.infolist()}
    name = next(n for n in entries if n.endswith("_weights_config.json"))
    config = json.loads(entries[name])
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    entries[name] = json.dumps(config).encode()
    with zipfile.ZipFile(engine, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    from tpcompile.artifact import sha256_file
    data = json.loads((copy / "manifest.json").read_text())
    data["files"][engine.name] = sha256_file(engine)
    (copy / "manifest.json").write_text(json.dumps(data))
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ArtifactError, match="asks to unpickle"):
        RankEngine(rank=0, world_size=2, device="cpu", artifact=str(copy))


@pytest.mark.slow
def test_health_cli(run_cli, artifact, copy, tmp_path):
    r = run_cli("health", str(artifact), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "files match their sha256" in r.stdout and "rank 1: alive, idle" in r.stdout and "rss" in r.stdout
    _flip(copy / "rank1.safetensors")
    r = run_cli("health", str(copy), cwd=tmp_path)
    _assert_one_line(r, "rank1.safetensors: sha256 does not match the manifest")
    r = run_cli("health", str(tmp_path / "nope"), cwd=tmp_path)
    _assert_one_line(r, "not an artifact (no manifest.json)")


# ---------------------------------------------------------------- runtime inputs

def test_bad_runtime_inputs_leave_the_session_usable(artifact):
    x = torch.randn(3, 8)
    with tpcompile.load(artifact).session(start_timeout_s=60, call_timeout_s=60) as run:
        with pytest.raises(ValueError, match=r"input arg0: expected shape \[3, 8\] float32, got \[3, 9\] float32"):
            run(torch.randn(3, 9))
        with pytest.raises(ValueError, match=r"expected shape \[3, 8\] float32, got \[3, 8\] float64"):
            run(x.double())
        with pytest.raises(ValueError, match=r"expected 1 inputs \(\['arg0'\]\), got 2"):
            run(x, x)
        with pytest.raises(TypeError, match="inputs must be torch.Tensor"):
            run(x.tolist())
        assert run(x).shape == (3, 8)  # the workers are still there
        health = run.health()
        assert [h["rank"] for h in health] == [0, 1] and all(h["alive"] and h["rss_bytes"] for h in health)


def test_token_ids_out_of_range():
    spec = [{"name": "tokens", "shape": [1, 4], "dtype": "int64", "high": 256}]
    with pytest.raises(ValueError, match=r"input tokens: values must be in \[0, 256\), got \[0, 300\]"):
        check_inputs(spec, (torch.tensor([[0, 1, 2, 300]]),))
    with pytest.raises(ValueError, match=r"values must be in \[0, 256\), got \[-1, 2\]"):
        check_inputs(spec, (torch.tensor([[-1, 0, 1, 2]]),))
