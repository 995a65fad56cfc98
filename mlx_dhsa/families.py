"""DHSA attention for other model families, and their patchers.

Each subclass keeps the family's own projection math (QK norm, RoPE bases, scale, no softcap)
and hands post-RoPE queries and keys to :meth:`DHSAAttention.attend`, which is model-agnostic.
Layers with a sliding window (Gemma3's local layers, Llama ``sliding_attention`` layers) keep
mlx-lm's attention and cache: their window already bounds the cost.
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .attention import DHSAAttention, SharedChunks
from .config import DHSAConfig


class Gemma3Attention(DHSAAttention):
    """A gemma3_text global layer: q/k RMSNorm (the model's own) before RoPE, no softcap,
    scale ``query_pre_attn_scalar^-0.5``."""

    @classmethod
    def from_base(cls, base: nn.Module, config: DHSAConfig, **kwargs) -> "Gemma3Attention":
        """Wrap an mlx-lm ``gemma3_text.Attention``, sharing projections, norms and RoPE."""
        attn = super().from_base(base, config, **kwargs)
        attn.q_norm, attn.k_norm = base.q_norm, base.k_norm
        return attn

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries, keys = self.q_norm(queries), self.k_norm(keys)

        offset = 0
        if cache is not None:
            offset = cache.offset
            queries = self.rope(queries, offset=offset)
            keys = self.rope(keys, offset=offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)

        output = self.attend(queries, keys, values, mask=mask, offset=offset, cache=cache)
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)


# Llama's attention (also Mistral's and Qwen2's, whose biases live inside the projections) is
# DHSAAttention's own __call__ without a softcap: from_base finds none on the base module.
LlamaAttention = DHSAAttention


def _patch_layers(layers: list, config: DHSAConfig, cls: type, is_global) -> None:
    """Swap ``layer.self_attn`` for ``cls`` on the layers where ``is_global(i, layer)``;
    the first patched layer owns the shared boundaries."""
    shared, owner = SharedChunks(), True
    for i, layer in enumerate(layers):
        if is_global(i, layer):
            layer.self_attn = cls.from_base(layer.self_attn, config, shared=shared, owner=owner)
            owner = False


def patch_gemma3_text(model: nn.Module, config: DHSAConfig) -> None:
    """DHSA on Gemma3's global layers (one in ``sliding_window_pattern``); the sliding layers
    keep mlx-lm's attention, RotatingKVCache and window."""
    _patch_layers(model.layers, config, Gemma3Attention, lambda i, l: not l.self_attn.is_sliding)


def patch_llama(model: nn.Module, config: DHSAConfig) -> None:
    """DHSA on every full-attention layer of a Llama-family model (llama, mistral, qwen2)."""
    _patch_layers(
        model.layers, config, LlamaAttention, lambda i, l: not getattr(l, "use_sliding", False)
    )
