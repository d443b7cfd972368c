"""Weight sources: where global tensors come from, one parameter at a time.

- random_source(model, seed): the model's own reset_parameters() per owning module, seeded by the
  module's path, so any single tensor can be made without the rest (and bit-identically again).
- module_source(model): a model that already holds its weights.
"""
import copy
import hashlib
from typing import Callable

import torch
from torch import nn

Source = Callable[[str], torch.Tensor]  # fqn -> global tensor


def module_source(model: nn.Module) -> Source:
    state = model.state_dict(keep_vars=False)
    # non-persistent buffers (rotary inv_freq) are not in the state dict but the graph reads them
    state.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if n not in state)
    return lambda fqn: state[fqn].detach()


def random_source(model: nn.Module, seed: int) -> Source:
    """Tensors for a meta-device model from a seed. The owning module of each parameter is copied, made
    real and reset alone; the seed mixes in the module path, so the order of requests does not matter.
    A tied tensor (one object under several fqns) belongs to the module it is first registered in, whichever
    fqn asks: every name of it gets the same values, as in the model built for real."""
    owners = {}
    for fqn, first in _first_names(model).items():
        mod_name, _, name = first.rpartition(".")
        owners[fqn] = (mod_name, model.get_submodule(mod_name), name)
    cache: dict[str, nn.Module] = {}

    def get(fqn: str) -> torch.Tensor:
        mod_name, mod, name = owners[fqn]
        if mod_name not in cache:
            cache.clear()  # one owning module alive at a time keeps memory near one tensor
            cache[mod_name] = _reset_alone(mod_name, mod, seed)
        return getattr(cache[mod_name], name).detach()

    return get


def _reset_alone(path: str, mod: nn.Module, seed: int) -> nn.Module:
    if not hasattr(mod, "reset_parameters"):
        raise ValueError(f"module {path or '<root>'} ({type(mod).__name__}) has no reset_parameters(), so random "
                         f"weights cannot be made for it; load real weights or add reset_parameters()")
    alone = copy.copy(mod)
    alone._modules = {}
    alone._parameters = {k: None if v is None else nn.Parameter(torch.empty_like(v, device="cpu"), requires_grad=False)
                         for k, v in mod._parameters.items()}
    alone._buffers = {k: None if v is None else torch.empty_like(v, device="cpu") for k, v in mod._buffers.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + int(hashlib.sha256(path.encode()).hexdigest()[:8], 16))
        with torch.no_grad():
            alone.reset_parameters()
    return alone


def materialize(model: nn.Module, source: Source, dtype: torch.dtype | None = None) -> nn.Module:
    """Give a meta-device model real tensors from a source (the unsharded reference). A tied tensor is asked
    for by the fqn it was first registered under, as torch.export names it."""
    from tpcompile.capture import set_tensor
    first = _first_names(model)
    state = {fqn: source(first[fqn]) for fqn, t in _tensors(model) if t.device.type == "meta"}
    model.load_state_dict(state, assign=True, strict=False)
    for fqn, t in list(model.named_buffers(remove_duplicate=False)):
        if t.device.type == "meta" and fqn in state:  # non-persistent buffers (RoPE tables): load_state_dict skips them
            set_tensor(model, fqn, state[fqn])
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _first_names(model: nn.Module) -> dict[str, str]:
    """fqn -> the fqn its tensor was first registered under (itself unless tied), as torch.export names it."""
    first: dict[int, str] = {}
    return {fqn: first.setdefault(id(t), fqn) for fqn, t in _tensors(model)}


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
