"""Hugging Face-format checkpoints: config.json + safetensors (one file, or an index over several) in,
per-rank shards out (build.py streams them), and merged back.

    Pretrained(dir)               config.json -> transformers' config (refused here, before any tensor is read,
                                  when the model cannot be captured: hf_model.refusal)
      .model(dtype)               transformers' class for it on the meta device (hf_model.CausalLM)
      .check(model, seq_len)      every parameter present with the right shape and dtype, no tensor left over:
                                  all from the file headers, before any work
      .source                     fqn -> global tensor, mapped from its file (memory: that tensor only)
    export_checkpoint(art, out)   rank shards -> HF safetensors, names and dtypes mapped back, config copied

The graph's parameter names are the model's, which are the checkpoint's (after transformers' own renamings
for the class, if any): no name tables. This module knows the file formats, not any model. Nothing is ever
unpickled.
"""
import json
import re
import shutil
from pathlib import Path

import torch

from tpcompile.hf_model import CausalLM, buffer_source, build_causal_lm, refusal
from tpcompile.tokenizer import TOKENIZER_FILES
from tpcompile.safetensors_io import (DTYPES, NAMES, SafetensorsError, StreamWriter, TensorInfo, map_tensor,
                                      read_header, read_tensor)

INDEX = "model.safetensors.index.json"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)  # travel with the artifact, hashed
MAP_FILE = "checkpoint.json"  # in the artifact: checkpoint tensor name -> the fqns holding it, and its dtype


class CheckpointError(ValueError):
    """A checkpoint that cannot be compiled: one line naming the file, the tensor and the fix."""


def find_tensors(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint from the file headers: the index's weight_map, or all *.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        headers = {}
        for name, file in weight_map.items():
            if file not in headers:
                if not (path / file).is_file():
                    raise CheckpointError(f"{index}: tensor {name} is in {file}, which does not exist in {path}")
                headers[file] = _header(path / file)
            if name not in headers[file]:
                raise CheckpointError(f"{path / file}: tensor {name} is listed in {INDEX} but not in the file")
        return {name: headers[file][name] for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLES)
        if pickles:
            raise _pickle_error(pickles[0])
        raise CheckpointError(f"{path}: no *.safetensors file and no {INDEX}; a Hugging Face checkpoint directory "
                              f"holds config.json and model*.safetensors")
    tensors = {}
    for file in files:
        for name, info in _header(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} is also in {tensors[name].file.name}; keep one copy")
            tensors[name] = info
    return tensors


def _header(file: Path) -> dict[str, TensorInfo]:
    try:
        return read_header(file)[0]
    except SafetensorsError as e:
        with open(file, "rb") as f:
            magic = f.read(2)
        if magic in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):  # zip or pickle
            raise _pickle_error(file) from None
        raise CheckpointError(str(e)) from None


def _pickle_error(file: Path) -> CheckpointError:
    return CheckpointError(f"{file}: a pickle (torch.save) checkpoint; tpcompile reads safetensors only and never "
                           f"unpickles (loading a pickle can run code): convert it with transformers' "
                           f"save_pretrained(dir, safe_serialization=True) where you trust the file")


class Pretrained:
    """A Hugging Face checkpoint directory, read from its config and headers only until .source is called."""

    def __init__(self, path):
        self.path = path = Path(path)
        if path.is_file() and path.suffix in PICKLES:
            raise _pickle_error(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory (config.json + *.safetensors)")
        self.config_file = path / "config.json"
        if not self.config_file.is_file():
            raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint directory has one")
        try:
            self.config = json.loads(self.config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.config_file}: not valid JSON ({e})") from None
        self.hf_config = _hf_config(self.config_file, self.config)
        why = refusal(self.hf_config)
        if why:
            raise CheckpointError(f"{self.config_file}: {why}")
        self.tensors = find_tensors(path)
        self.names: dict[str, str] = {}        # fqn (tied ones too) -> checkpoint name read (filled by check)
        self.saved: dict[str, list[str]] = {}  # checkpoint name -> the fqns holding it (several when tied)
        self.computed: dict[str, torch.Tensor] = {}  # buffers transformers computes (RoPE tables), made on demand
        self.architecture = (self.config.get("architectures") or [self.config.get("model_type")])[0]

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.get_text_config(decoder=True).vocab_size)

    @property
    def dtype(self) -> torch.dtype:
        """config.json's dtype (torch_dtype before transformers 5), else the embedding's."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return next(i.dtype for i in self.tensors.values() if i.dtype.is_floating_point)

    def model(self, dtype: torch.dtype) -> torch.nn.Module:
        """transformers' class for config.json on the meta device, its parameter names the checkpoint's."""
        return CausalLM(build_causal_lm(self.hf_config, dtype))

    def check(self, model: CausalLM, seq_len: int) -> None:
        """Every parameter of the meta model against the headers; nothing is read. Fills names/saved."""
        limit = getattr(self.hf_config.get_text_config(decoder=True), "max_position_embeddings", None)
        if isinstance(limit, int) and seq_len > limit:
            raise CheckpointError(f"{self.config_file}: sequence length {seq_len} exceeds max_position_embeddings="
                                  f"{limit}; use at most {limit} tokens")
        hf = model.inner[0]
        renamed = _renamed(hf, self.tensors, self.config_file)  # checkpoint name -> the model's name for it
        by_fqn: dict[str, list[str]] = {}
        for name, fqn in renamed.items():
            by_fqn.setdefault(fqn, []).append(name)
        groups: dict[int, list] = {}  # tied tensors (lm_head = embed) form one group: one tensor, any name
        for fqn, p in [*hf.named_parameters(remove_duplicate=False), *_persistent_buffers(hf)]:
            groups.setdefault(id(p), []).append((fqn, p))
        expected = self.dtype
        for members in groups.values():
            found = [n for fqn, _ in members for n in by_fqn.get(fqn, [])]
            for name in found:
                self._check_tensor(name, members[0][1], expected)
            if not found:
                fqn, p = members[0]
                raise CheckpointError(f"{self.path}: tensor {fqn} ({list(p.shape)}) is missing from the checkpoint "
                                      f"({len(self.tensors)} tensors in {self._files()})")
            self.names.update({fqn: found[0] for fqn, _ in members})
            self.saved.update({name: [fqn for fqn, _ in members] for name in found})
        computed = _computed_buffers(hf)
        ignore = [re.compile(p) for p in getattr(hf, "_keys_to_ignore_on_load_unexpected", None) or []]
        for name, info in self.tensors.items():
            if name not in self.saved and renamed[name] not in computed \
                    and not any(p.search(name) for p in ignore):
                raise CheckpointError(f"{info.file}: tensor {name} is not used by {type(hf).__name__} built from "
                                      f"{self.config_file.name}; the config disagrees with the tensors")
        self._model = hf

    def _check_tensor(self, name: str, p: torch.Tensor, expected: torch.dtype) -> None:
        info = self.tensors[name]
        if info.shape != tuple(p.shape):
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, {self.config_file.name} "
                                  f"implies {list(p.shape)}; the config disagrees with the tensors")
        if info.dtype != expected and p.is_floating_point():
            raise CheckpointError(f"{info.file}: tensor {name} is {str(info.dtype).removeprefix('torch.')}, the "
                                  f"checkpoint is {str(expected).removeprefix('torch.')} (config.json dtype); "
                                  f"re-save it in one dtype")

    def _files(self) -> str:
        files = sorted({i.file.name for i in self.tensors.values()})
        return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")

    def source(self, fqn: str) -> torch.Tensor:
        if fqn in self.names:
            return map_tensor(self.tensors[self.names[fqn]])
        if fqn not in self.computed:  # a buffer transformers computes from the config (RoPE inverse frequencies)
            self.computed.update(buffer_source(self._model, [fqn]))
        return self.computed[fqn]

    def fingerprint(self) -> dict:
        """What identifies the checkpoint for the cache key, without hashing its bytes."""
        files = sorted({i.file for i in self.tensors.values()})
        return {"path": str(self.path.resolve()), "config": self.config,
                "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}

    def artifact_files(self) -> dict:
        """Files to copy into the artifact: config, generation config and tokenizer, and the name map."""
        out = {name: self.path / name for name in SIDE_FILES if (self.path / name).is_file()}
        order = sorted(self.saved, key=lambda n: (self.tensors[n].file.name, self.tensors[n].start))
        out[MAP_FILE] = json.dumps({"architecture": self.architecture, "tensors": {  # checkpoint order
            n: {"fqns": self.saved[n], "dtype": NAMES[self.tensors[n].dtype]} for n in order}}, indent=1).encode()
        return out


def _hf_config(config_file: Path, config: dict):
    """transformers' config for config.json (its own class, never remote code)."""
    from transformers import AutoConfig
    model_type = config.get("model_type")
    try:
        return AutoConfig.from_pretrained(config_file.parent, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        import transformers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not a model of transformers "
                              f"{transformers.__version__} ({first[:200]}); tpcompile captures transformers' own "
                              f"classes, never remote code") from None


def _persistent_buffers(model) -> list[tuple[str, torch.Tensor]]:
    computed = _computed_buffers(model)
    return [(f, b) for f, b in model.named_buffers(remove_duplicate=False) if f not in computed]


def _computed_buffers(model) -> set[str]:
    """Non-persistent buffers: transformers computes them from the config; a checkpoint may hold stale copies."""
    out = set()
    for name, mod in model.named_modules():
        out.update(f"{name}.{b}" if name else b for b in mod._non_persistent_buffers_set)
    return out


def _renamed(model, tensors: dict, config_file: Path) -> dict[str, str]:
    """checkpoint name -> the model's name for it, by transformers' own key renamings for this class (legacy
    names, prefixes). A key transformers must convert (merge, split, transpose) is refused: tpcompile streams
    tensors as they are stored."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict(model.state_dict())
    out = {}
    for name in tensors:
        new, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, meta_state)
        if converted is not None:
            raise CheckpointError(f"{config_file.parent}: tensor {name} is stored in a layout transformers converts "
                                  f"when loading ({converted}); save the model again with transformers "
                                  f"(save_pretrained) so its tensors are stored as the model holds them")
        out[name] = new
    return out


# ---------------------------------------------------------------------------------------------- export

def parse_size(size) -> int:
    """'5GB' (1e9), '100KB', '2GiB' (2**30) or an int -> bytes, as transformers' max_shard_size reads it."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use a number of bytes or e.g. 100KB, 5GB, 2GiB")
    scale = (1024 if m[3] else 1000) ** " KMGT".index(m[2] or " ")
    return int(float(m[1]) * scale)


def export_checkpoint(artifact, out_dir, max_shard_size="5GB") -> list[Path]:
    """Merge an artifact's rank shards into a Hugging Face checkpoint directory (written aside, then renamed
    into place). Each tensor is merged alone: memory stays near the largest one."""
    from tpcompile.artifact import check_files, read_manifest
    artifact, out_dir = Path(artifact), Path(out_dir)
    m = read_manifest(artifact)
    if not (artifact / MAP_FILE).is_file():
        raise CheckpointError(f"{artifact}: has no {MAP_FILE}; only artifacts compiled from a checkpoint "
                              f"(`tpcompile compile model=hf model.path=DIR`) can be exported")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new directory")
    side = [n for n in SIDE_FILES if n in m.files]
    check_files(m, artifact, [MAP_FILE, *side] + [m.rank_file(r) for r in range(m.tp)])
    table = json.loads((artifact / MAP_FILE).read_text())
    ranks = [read_header(artifact / m.rank_file(r))[0] for r in range(m.tp)]
    entries = []  # (checkpoint name, the fqn the artifact holds it under, checkpoint dtype)
    for name, t in table["tensors"].items():
        held = [f for f in t["fqns"] if f in m.params]
        if not held:
            raise CheckpointError(f"{artifact / MAP_FILE}: tensor {name} (graph {t['fqns']}) is not in the artifact")
        entries.append((name, held[0], DTYPES[t["dtype"]]))

    limit, files, size = parse_size(max_shard_size), [[]], 0
    for entry in entries:  # greedy, in checkpoint order, as transformers splits
        n = _numel(m.params[entry[1]]["global"]) * entry[2].itemsize
        if files[-1] and size + n > limit:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += n
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    staging = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        total, weight_map = 0, {}
        for file, group in zip(names, files):
            specs = {name: (tuple(m.params[fqn]["global"]), dt) for name, fqn, dt in group}
            with StreamWriter(staging / file, specs, {"format": "pt"}) as w:
                for name, fqn, dt in group:
                    t = _merge(fqn, m.params[fqn]["placement"], lambda f, r: _piece(m, ranks, f, r), m.tp).to(dt)
                    w.write(name, t)
                    total += t.numel() * t.element_size()
                    weight_map[name] = file
        if len(names) > 1:
            (staging / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
        for name in side:
            shutil.copyfile(artifact / name, staging / name)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / n for n in names]


def _piece(m, ranks: list[dict], fqn: str, rank: int) -> torch.Tensor:
    """Rank `rank`'s local tensor of `fqn`, also when fuse_linears stored it inside a fused weight."""
    if fqn in ranks[rank]:
        return read_tensor(ranks[rank][fqn])
    for name, parts in m.fused.items():
        if fqn in parts:
            sizes = [m.params[p]["local"][0] for p in parts]
            return read_tensor(ranks[rank][name]).split(sizes, 0)[parts.index(fqn)]
    raise CheckpointError(f"parameter {fqn}: not in rank {rank}'s file; recompile the artifact")


def _merge(fqn: str, placement: str, piece, tp: int) -> torch.Tensor:
    """Rank pieces -> the global tensor. 'S(d)/w': piece p lives on rank p * tp // w; 'R': rank 0 has it all."""
    if placement == "R":
        return piece(fqn, 0)
    m = re.fullmatch(r"S\((-?\d+)\)/(\d+)", placement)
    if not m:
        raise CheckpointError(f"parameter {fqn}: placement {placement!r} cannot be merged into one tensor")
    dim, ways = int(m[1]), int(m[2])
    return torch.cat([piece(fqn, p * tp // ways) for p in range(ways)], dim=dim)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
