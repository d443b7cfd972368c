"""A Llama-family decoder: RMSNorm, RoPE, grouped-query attention through SDPA, SwiGLU MLP.

Plain nn.Module code in the style of gpt-fast's model.py. Nothing here knows about tensor
parallelism: the compiler finds heads and features by propagating shapes through the graph.
RoPE tables are computed in forward from the positions (no buffers), so the model can be built
on the meta device and still needs nothing but its parameters.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (..., T, head_dim // 2) for integer positions (..., T)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * freqs  # (..., T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D); cos/sin (B, 1, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class KVCache(nn.Module):
    """Static cache (B, KV, S + 1, D) per layer, written in place per row at the tokens' positions. Slot S is
    scratch: padding tokens and idle rows write there, and no real query (position < S) reads it."""

    def __init__(self, max_batch: int, slots: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch, n_kv_heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """positions (B, T); k, v (B, T, KV, D): cache[b, :, positions[b, t]] = k[b, t] for every row b."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # (B, 1), broadcast over T
        self.k[rows, :, positions] = k  # index_put_: the indexed dims (B, T) come first, then (KV, D)
        self.v[rows, :, positions] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float,
                 qkv_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta = n_heads, n_kv_heads, head_dim, rope_theta
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)  # qkv_bias: Qwen2
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope  # (B, 1, T, D/2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, D)
        else:
            k, v = self.cache.update(positions, k.transpose(1, 2), v.transpose(1, 2))  # (B, KV, S + 1, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, ffn_dim, bias=False)
        self.w_up = nn.Linear(dim, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, head_dim, ffn_dim, rope_theta, norm_eps, qkv_bias=False):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, head_dim, rope_theta, qkv_bias)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = FeedForward(dim, ffn_dim)

    def forward(self, x: torch.Tensor, rope, positions=None, mask=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, positions, mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """input_ids (B, T) int64 -> logits (B, T, vocab).

    After setup_cache(max_batch, max_seq): forward(input_ids (B, T), positions (B, T)) writes token t of row b
    at cache slot positions[b, t], which is also its RoPE position, and returns the logits of token T-1 of every
    row (B, vocab). Every row is its own sequence from position 0; position S = max_seq marks a pad token or an
    idle row (written to the scratch slot S, RoPE position 0, its output unused).
    """

    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 ffn_dim: int, head_dim: int | None = None, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-5, tie_embeddings: bool = False, qkv_bias: bool = False):
        super().__init__()
        head_dim = head_dim or dim // n_heads
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, head_dim, ffn_dim, rope_theta, norm_eps, qkv_bias) for _ in range(n_layers))
        self.norm = RMSNorm(dim, norm_eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.max_seq = 0

    def setup_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """max_seq + 1 slots per row: the last one is the scratch slot."""
        dtype = dtype or self.embed.weight.dtype
        for layer in self.layers:
            a = layer.attn
            a.cache = KVCache(max_batch, max_seq + 1, a.n_kv_heads, a.head_dim, dtype)
        self.max_seq = max_seq

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            return self._forward_cached(input_ids, positions)
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)  # (B, T, C)
        rope = self._rope(positions)
        for layer in self.layers:
            x = layer(x, rope)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _forward_cached(self, input_ids, positions):
        S = self.max_seq
        slots = torch.arange(S + 1, device=input_ids.device)
        # query at p sees slots s <= p of its own row; a scratch query (p = S: a pad or an idle row) sees the
        # scratch slot only, which it has just written: no softmax row is empty, an idle row reads one slot
        p = positions[:, :, None]
        mask = (slots[None, None, :] <= p) & ((p < S) | (slots[None, None, :] == S))  # (B, T, S + 1)
        x = self.embed(input_ids)
        rope = self._rope(torch.where(positions == S, 0, positions))  # scratch tokens: RoPE position 0
        for layer in self.layers:
            x = layer(x, rope, positions, mask[:, None])
        return self.lm_head(self.norm(x[:, -1]))  # (B, V)

    def _rope(self, positions):
        """cos/sin (B, 1, T, D/2), computed once per forward and shared by every layer."""
        a = self.layers[0].attn
        cos, sin = rope_tables(positions, a.head_dim, a.rope_theta)
        return cos[:, None], sin[:, None]
