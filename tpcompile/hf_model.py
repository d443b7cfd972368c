"""transformers' own decoder, captured as it is, with a KV cache of per-row slots (the generation graphs'
interface: tpcompile/runtime/generate.py).

    build_causal_lm(config)      the class config.json names, on the meta device (no weights)
    refusal(config)              why a config cannot be captured for generation (None when it can)
    CausalLM(model)              forward(input_ids) -> logits (B, T, V); after setup_cache(max_batch, max_seq):
                                 forward(input_ids (B, T), positions (B, T)) -> logits of token T-1 (B, V)
    buffer_source(model)         fqn -> value of a buffer transformers computes instead of loading (RoPE tables)

The model's code runs unchanged: the wrapper hands it position_ids, the attention masks it builds itself (4-D,
so transformers uses them as they are) and a transformers Cache whose layers write each row's keys and values at
that row's positions. Every cache layer's tensors are buffers of the wrapper that the graph writes in place, so
the passes place them from what is written into them. Parameter names are the model's own: the checkpoint's.
"""
import copy

import torch
from torch import nn

SUPPORTED_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")


class CaptureError(ValueError):
    """A model that cannot be captured for generation: one line naming the architecture and what is missing."""


def build_causal_lm(config, dtype: torch.dtype) -> nn.Module:
    """AutoModelForCausalLM for `config` (a transformers config) on the meta device: no weight is allocated."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def layer_types(config) -> tuple[list[str], list[int | None]]:
    """Each decoder layer's attention type and window (sliding or chunk size), as transformers' caches read them."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return list(types), [k.get("sliding_window") for k in kwargs]


def refusal(config) -> str | None:
    """Why this config's model cannot run on tpcompile's row cache, in a few words naming what is missing."""
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        return f"{arch}: an encoder-decoder; tpcompile generates with decoder-only models"
    if text is not config or any(k in config.to_dict() for k in ("vision_config", "audio_config")):
        return f"{arch}: a model with a vision or audio tower; tpcompile compiles text decoders only"
    experts = [k for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
               if (getattr(text, k, None) or 0) > 1]
    if experts:
        return (f"{arch}: a mixture of experts ({experts[0]}={getattr(text, experts[0])}) routes tokens by their "
                f"values, which a static graph sharded by weights cannot follow yet")
    rope = getattr(text, "rope_parameters", None) or {}
    kinds = {r.get("rope_type") for r in (rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope
                                          else [rope])}
    if "dynamic" in kinds:
        return (f"{arch}: rope_type 'dynamic' recomputes its frequencies from the sequence length at run time; "
                f"use a checkpoint with a fixed rope type (default, linear, llama3, yarn)")
    types, _ = layer_types(config)
    other = sorted(set(types) - set(SUPPORTED_LAYERS))
    if other:
        return (f"{arch}: layer types {other} keep state other than attention keys and values; tpcompile's cache "
                f"holds attention layers only ({', '.join(SUPPORTED_LAYERS)})")
    return None


def _cache_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class RowCacheLayer(CacheLayerMixin):
        """One layer's keys and values (B, KV, S + 1, D): token t of row b is written at slot positions[b, t];
        slot S is scratch. transformers' StaticLayer writes every row at one shared offset; this writes per row."""
        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
            super().__init__()
            self.keys, self.values = keys, values
            self.is_initialized = keys is not None
            self.positions: torch.Tensor | None = None  # (B, T), set by CausalLM before each forward
            self.shapes = None                          # a dry run records what the model writes

        def lazy_initialization(self, key_states, value_states) -> None:
            raise RuntimeError("the row cache is allocated by CausalLM.setup_cache")

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if self.keys is None:  # the dry run of setup_cache: shapes only
                self.shapes = (key_states, value_states)
                return key_states, value_states
            rows = torch.arange(self.positions.shape[0], device=self.positions.device)[:, None]  # (B, 1)
            # index_put_: the indexed dims (B, T) come first, then (KV, D): k (B, KV, T, D) -> (B, T, KV, D)
            self.keys[rows, :, self.positions] = key_states.transpose(1, 2).to(self.keys.dtype)
            self.values[rows, :, self.positions] = value_states.transpose(1, 2).to(self.values.dtype)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return (query_length, 0) if self.keys is None else (self.keys.shape[-2], 0)

        def get_seq_length(self) -> int:
            return 0  # positions come from position_ids and the masks, never from the cache

        def get_max_length(self) -> int:
            return self.keys.shape[-2]

    return RowCacheLayer


class CausalLM(nn.Module):
    """A transformers causal LM that keeps every parameter name (it shares the model's children, as probe.Probe
    does). forward(input_ids) -> logits (B, T, V). After setup_cache(max_batch, max_seq): forward(input_ids (B, T),
    positions (B, T)) -> logits (B, V) of token T-1 of each row, with positions as in runtime/generate.py."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.inner = [model]  # a list: not a child (that would prefix every fqn)
        self.config = model.config
        self.max_seq = 0
        self.cache = None

    def setup_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """max_seq + 1 slots per row (the last is scratch), one (keys, values) pair of buffers per attention layer,
        sized by what each layer writes in a dry run on the meta device."""
        from transformers.cache_utils import Cache
        why = refusal(self.config)
        if why:
            raise CaptureError(why)
        Layer = _cache_layer_class()
        probe = Cache(layers=[Layer() for _ in layer_types(self.config)[0]])
        ids = torch.zeros(max_batch, 1, dtype=torch.long, device=next(self.inner[0].parameters()).device)
        with torch.no_grad():
            self.inner[0](input_ids=ids, position_ids=ids, cache=probe, use_cache=True, logits_to_keep=1)
        layers = []
        for i, layer in enumerate(probe.layers):
            k, v = layer.shapes
            keys = torch.zeros(k.shape[0], k.shape[1], max_seq + 1, k.shape[3], dtype=dtype or k.dtype,
                               device=k.device)
            values = torch.zeros(v.shape[0], v.shape[1], max_seq + 1, v.shape[3], dtype=dtype or v.dtype,
                                 device=v.device)
            self._kv().register_buffer(f"k{i}", keys, persistent=False)
            self._kv().register_buffer(f"v{i}", values, persistent=False)
            layers.append(Layer(getattr(self._kv(), f"k{i}"), getattr(self._kv(), f"v{i}")))
        self.cache = Cache(layers=layers)
        self.max_seq = max_seq

    def _kv(self) -> nn.Module:
        """The module holding the cache buffers (fqns kv_cache.k{i} / kv_cache.v{i})."""
        if "kv_cache" not in self._modules:
            self._modules["kv_cache"] = nn.Module()
        return self._modules["kv_cache"]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        model = self.inner[0]
        if positions is None:
            return model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        S = self.max_seq
        kv = self._kv()
        for i, layer in enumerate(self.cache.layers):
            # read through the module on every call: torch.export traces the buffers it finds there (by fqn)
            layer.keys, layer.values, layer.positions = getattr(kv, f"k{i}"), getattr(kv, f"v{i}"), positions
        # the weights' own rope/position code sees position 0 for scratch tokens, never one past its range
        position_ids = torch.where(positions == S, 0, positions)  # (B, T)
        out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=self._masks(positions),
                    cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # (B, V)

    def _masks(self, positions: torch.Tensor):
        """4-D masks (B, 1, T, S + 1): the query at position p sees slots s <= p of its row (and s > p - W on a
        sliding layer of window W; s // C == p // C on a chunked layer of chunk C). A scratch query (p = S: a pad
        or an idle row) sees the scratch slot only, which it has just written, so no softmax row is empty and an
        idle row's attention reads one slot. One mask when every layer has the same kind, else a
        dict by layer type (as transformers' hybrid models take them)."""
        types, windows = layer_types(self.config)
        slots = torch.arange(self.max_seq + 1, device=positions.device)[None, None, :]  # (1, 1, S + 1)
        p = positions[:, :, None]  # (B, T, 1)
        scratch = p == self.max_seq
        masks = {}
        for kind, window in dict(zip(types, windows)).items():
            mask = slots <= p
            if kind == "sliding_attention":
                mask = mask & (slots > p - window)
            elif kind == "chunked_attention":
                mask = mask & (slots // window == p // window)
            mask = (mask & ~scratch) | (scratch & (slots == self.max_seq))  # no Where on bool in onnxruntime
            masks[kind] = self._as_attention_mask(mask[:, None])  # (B, 1, T, S + 1)
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _as_attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool for sdpa; 0 / most negative additive for eager attention (as transformers' eager_mask)."""
        if self.config._attn_implementation == "sdpa":
            return allowed
        dtype = next(iter(self.inner[0].parameters())).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)


def buffer_source(model: nn.Module, fqns: list[str]) -> dict[str, torch.Tensor]:
    """The values of buffers that transformers computes rather than loads (RoPE inverse frequencies, embedding
    scales): each owning module is copied with empty CPU tensors and initialised alone by the model's own
    _init_weights, as from_pretrained does for tensors a checkpoint does not hold."""
    out, done = {}, {}
    for fqn in fqns:
        owner, _, name = fqn.rpartition(".")
        if owner not in done:
            mod = model.get_submodule(owner)
            alone = copy.copy(mod)
            alone._modules = {}
            alone._parameters = dict(mod._parameters)  # left on the meta device: initialising them costs nothing
            alone._buffers = {k: None if v is None else torch.empty_like(v, device="cpu")
                              for k, v in mod._buffers.items()}
            with torch.no_grad():
                model._init_weights(alone)
            done[owner] = alone
        out[fqn] = done[owner]._buffers[name]
    return out
