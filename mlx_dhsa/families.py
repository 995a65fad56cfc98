"""DHSA attention for other model families, and their patchers.

Each subclass keeps the family's own projection math (QK norm, RoPE bases, scale, no softcap)
and hands post-RoPE queries and keys to :meth:`DHSAAttention.attend`, which is model-agnostic.
Layers with a sliding window (Gemma3's local layers, Llama ``sliding_attention`` layers) keep
mlx-lm's attention and cache: their window already bounds the cost.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

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

    def qk_norm(self, queries: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        return self.q_norm(queries), self.k_norm(keys)


# Llama's attention (also Mistral's and Qwen2's, whose biases live inside the projections) is
# DHSAAttention's own __call__ without a softcap: from_base finds none on the base module.
LlamaAttention = DHSAAttention


GEMMA2_SLIDING_WINDOW = 4096  # every released Gemma2; mlx-lm's ModelArgs drops the field


def patch_layers(layers: list, config: DHSAConfig, cls: type, is_global, window=None) -> None:
    """Swap ``layer.self_attn`` for ``cls`` on the layers where ``is_global(i, layer)``, with
    the sliding window ``window(i)`` (None: global attention).

    The first patched layer without a window owns the boundaries the later layers share; a
    windowed layer before it (Gemma2's layer 0, dense over its window cache) is an owner
    too, so that it never borrows boundaries that the next layer has not yet published."""
    shared, owner = SharedChunks(), True
    for i, layer in enumerate(layers):
        if not is_global(i, layer):
            continue
        size = None if window is None else window(i)
        layer.self_attn = cls.from_base(
            layer.self_attn, config, window=size, shared=shared, owner=owner
        )
        owner = owner and size is not None and config.sliding_window


def patch_gemma2(model: nn.Module, config: DHSAConfig) -> None:
    """DHSA on every Gemma2 layer, the even-index ones (sliding in HF Gemma2) with their
    window: mlx-lm's Gemma2 attends to every key there, which DHSA bounds. Indices count
    from the model's first layer, also on a pipeline stage that holds later ones."""
    size = getattr(model.args, "sliding_window", None) or GEMMA2_SLIDING_WINDOW
    start = getattr(getattr(model, "model", None), "start_idx", 0)  # a pipeline stage: > 0
    patch_layers(
        model.layers,
        config,
        DHSAAttention,
        lambda i, l: True,
        window=lambda i: size if (start + i) % 2 == 0 else None,
    )


def patch_gemma3_text(model: nn.Module, config: DHSAConfig) -> None:
    """DHSA on Gemma3's global layers (one in ``sliding_window_pattern``); the sliding layers
    keep mlx-lm's attention, RotatingKVCache and window."""
    patch_layers(model.layers, config, Gemma3Attention, lambda i, l: not l.self_attn.is_sliding)


def patch_llama(model: nn.Module, config: DHSAConfig) -> None:
    """DHSA on every full-attention layer of a Llama-family model (llama, mistral, qwen2)."""
    patch_layers(
        model.layers, config, LlamaAttention, lambda i, l: not getattr(l, "use_sliding", False)
    )


def shard_attention_and_mlp(layers: list, group: mx.distributed.Group) -> None:
    """Tensor parallelism as mlx-lm's ``llama.Model.shard`` writes it: Q/K/V and the MLP's
    gate/up projections keep this rank's output rows (its heads), O and down its input
    columns and sum over the group; each rank keeps ``1/N`` of the heads. Works on mlx-lm's
    attention and on a patched ``DHSAAttention`` (which passes the change to its base)."""
    N = group.size()
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= N
        attn.n_kv_heads //= N
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)


def shard_gemma(model: nn.Module, group: mx.distributed.Group) -> None:
    """``shard()`` for gemma2 and gemma3_text, which mlx-lm gives none: their attention and
    MLP use llama's names, and embeddings, norms and the tied head stay whole on every rank
    (as llama's)."""
    shard_attention_and_mlp(model.layers, group)
