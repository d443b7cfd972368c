"""Hugging Face checkpoints in, per-rank shards out, merged back: against transformers' own forward and files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tpcompile
from tpcompile.checkpoint import CheckpointError, export_checkpoint

transformers = pytest.importorskip("transformers")
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def make_checkpoint(path: Path, family: str = "llama", dtype=torch.float32, shard="100KB", **overrides) -> Path:
    """A random-weight checkpoint saved by transformers itself, spread over several files, with a tokenizer."""
    from tokenizers import Tokenizer, models
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM")}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**SIZES, **overrides})
    model = getattr(transformers, model_cls)(config).to(dtype)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them non-trivial
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size=shard)
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"llama": make_checkpoint(root / "llama"),
            "qwen2": make_checkpoint(root / "qwen2", "qwen2", tie_word_embeddings=True),
            "mistral": make_checkpoint(root / "mistral", "mistral", sliding_window=64),
            "llama_bf16": make_checkpoint(root / "llama_bf16", dtype=torch.bfloat16)}


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def all_tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("family, tp", [("llama", 1), ("llama", 2), pytest.param("llama", 4, marks=pytest.mark.slow),
                                        ("qwen2", 2), pytest.param("qwen2", 4, marks=pytest.mark.slow),
                                        ("mistral", 2)])
def test_logits_match_transformers(checkpoints, tmp_path, family, tp):
    art = tpcompile.compile_pretrained(checkpoints[family], tp=tp, generate=False, input_shape=(2, 16),
                                       out_dir=tmp_path)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(tp))
    out, ref = art.run(ids), hf_logits(checkpoints[family], ids)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "checkpoint.json"):
        assert name in art.manifest.files and (art.path / name).is_file(), name  # travels with it, hashed


@pytest.mark.parametrize("family, tp, dtype", [("llama", 2, None), ("qwen2", 4, None), ("llama_bf16", 4, torch.float32)])
def test_round_trip_is_bit_exact(checkpoints, tmp_path, family, tp, dtype):
    src = checkpoints[family]
    art = tpcompile.compile_pretrained(src, tp=tp, dtype=dtype, out_dir=tmp_path / "engines")
    files = export_checkpoint(art.path, tmp_path / "out", max_shard_size="100KB")
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    a, b = all_tensors(src), all_tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (src / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    if family == "llama":  # transformers reads what we wrote
        ids = torch.randint(0, SIZES["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(src, ids), rtol=0, atol=0)


@pytest.mark.slow
def test_cli_compile_and_export(run_cli, checkpoints, tmp_path):
    def run(*args):
        return run_cli(*args, cwd=tmp_path)
    r = run("verify", "model=hf", f"model.path={checkpoints['qwen2']}", "tp=2", "verify.per_layer=true",
            f"out_dir={tmp_path}/engines", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0 and "verify OK" in r.stdout and "no block diverges" in r.stdout, r.stderr
    art = next(p for p in (tmp_path / "engines").iterdir() if not p.name.startswith("."))
    r = run("export-checkpoint", str(art), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    a, b = all_tensors(checkpoints["qwen2"]), all_tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = run("compile", "model=hf", f"model.path={tmp_path / 'nope'}", f"out_dir={tmp_path}/engines2",
            f"hydra.run.dir={tmp_path}/run2")
    assert r.returncode != 0 and "nope: not a checkpoint directory" in r.stderr and "Traceback" not in r.stderr


READER = r"""
import os, sys, torch
from tpcompile.runtime.weights_io import load_rank_weights
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY); os.fdatasync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
def read_bytes():
    return int(next(l for l in open("/proc/self/io") if l.startswith("read_bytes")).split()[1])
before = read_bytes()
weights = load_rank_weights(path, "cpu")
at_load = read_bytes() - before
total = sum(float(t.float().sum()) for t in weights.values())  # touch every page, as the first forward does
print(at_load, read_bytes() - before)
"""


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_each_rank_reads_only_its_own_bytes(tmp_path, tp):
    src = make_checkpoint(tmp_path / "big", vocab_size=2048, hidden_size=256, intermediate_size=1024, shard="2MB")
    art = tpcompile.compile_pretrained(src, tp=tp, out_dir=tmp_path / "engines")
    if not Path("/proc/self/io").is_file():
        pytest.skip("no /proc/self/io here")
    sizes = [(art.path / f"rank{r}.safetensors").stat().st_size for r in range(tp)]
    for r in range(tp):  # a fresh process per rank: nothing cached in it
        out = subprocess.run([sys.executable, "-c", READER, str(art.path / f"rank{r}.safetensors")],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        at_load, touched = map(int, out.stdout.split())
        assert at_load < 0.1 * sizes[r], (r, at_load)              # mmap: loading reads (almost) nothing
        assert abs(touched - sizes[r]) <= 0.1 * sizes[r], (r, touched, sizes)  # using it reads its own file once


def _single_file(path: Path) -> Path:
    """The llama checkpoint as one model.safetensors, to corrupt."""
    make_checkpoint(path, shard="100MB")
    return path


def _drop(path, name):
    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")
    del state[name]
    _replace(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _reshape(path, name):
    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")
    state[name] = state[name][:-1].contiguous()
    _replace(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _truncate(path, _):
    file = path / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)


def _corrupt_header(path, _):
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{garbage")


def _index_to_missing(path, name):
    make_checkpoint(path)  # sharded, with an index
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "model-00099-of-00099.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _config_fewer_layers(path, _):
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))


def _config_wider(path, _):
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 256
    (path / "config.json").write_text(json.dumps(config))


def _pickle_only(path, _):
    from safetensors.torch import load_file
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def _pickle_named_safetensors(path, _):
    from safetensors.torch import load_file
    state = load_file(path / "model.safetensors")
    _replace(path / "model.safetensors", lambda tmp: torch.save(state, tmp))


def _replace(file: Path, write) -> None:
    """Write aside and rename: the old file stays valid for the tensors still mapped from it."""
    write(file.with_suffix(".tmp"))
    os.replace(file.with_suffix(".tmp"), file)


Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("damage, message", [
    (_drop, r"tensor model\.layers\.1\.self_attn\.q_proj\.weight .* is missing from the checkpoint"),
    (_reshape, r"model\.safetensors: tensor model\.layers\.1\.self_attn\.q_proj\.weight has shape \[63, 64\], config\.json implies \[64, 64\]"),
    (_truncate, r"model\.safetensors: tensor .* ends at byte \d+, the file has \d+ bytes \(truncated\)"),
    (_corrupt_header, r"model\.safetensors: header is not valid JSON"),
    (_index_to_missing, r"model\.safetensors\.index\.json: tensor model\.layers\.1\.self_attn\.q_proj\.weight is in model-00099-of-00099\.safetensors, which does not exist"),
    (_config_fewer_layers, r"model\.safetensors: tensor model\.layers\.1\.\S+ is not used by LlamaForCausalLM built from config\.json; the config disagrees"),
    (_config_wider, r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[128, 64\], config\.json implies \[256, 64\]"),
    (_pickle_only, r"pytorch_model\.bin: a pickle \(torch\.save\) checkpoint; tpcompile reads safetensors only and never unpickles"),
    (_pickle_named_safetensors, r"model\.safetensors: a pickle \(torch\.save\) checkpoint"),
])
def test_bad_checkpoint_is_one_line_and_leaves_nothing(tmp_path, damage, message):
    path = tmp_path / "ckpt"
    if damage is not _index_to_missing:
        _single_file(path)
    damage(path, Q1)
    with pytest.raises(CheckpointError, match=message) as err:
        tpcompile.compile_pretrained(path, tp=2, out_dir=tmp_path / "engines")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())
