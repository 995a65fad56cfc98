"""The speed floor of the benchmarks: attention with its scores skipped, and method switching.

``floor`` keeps what every attention method pays (projections, RoPE, the KV cache update,
``o_proj``) and drops the scores, so its time is what no attention method can beat.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from .. import DHSACache, DHSAConfig, patch, unpatch
from .. import make_prompt_cache as make_dhsa_prompt_cache

FLOOR_METHODS = ("floor", "floor_grow", "floor_kv")


class FloorAttention(nn.Module):
    """Gemma2 attention without the scores: projections, RoPE and the cache update only.

    Args:
        base (nn.Module): the mlx-lm attention module whose projections and RoPE it uses.
        kv_dependency (bool): make the output depend on the step's keys and values (for
            nothing), as every real attention's does: ``floor_kv``.
    """

    def __init__(self, base: nn.Module, *, kv_dependency: bool = False):
        super().__init__()
        self.base = base
        self.kv_dependency = kv_dependency

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        a, (B, L, _) = self.base, x.shape
        q = a.q_proj(x).reshape(B, L, a.n_heads, -1).transpose(0, 2, 1, 3)
        k = a.k_proj(x).reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = a.v_proj(x).reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = a.rope(q, offset=offset), a.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = a.o_proj(q.transpose(0, 2, 1, 3).reshape(B, L, -1))
        if self.kv_dependency:  # 0 x (one key + one value): the graph edge, not the work
            out = out + 0 * (k[:, 0, -1, 0] + v[:, 0, -1, 0]).astype(out.dtype)[:, None, None]
        return out


def set_method(model: nn.Module, method: str, config: DHSAConfig | None = None):
    """Put ``model`` in the state ``method`` needs, in place; returns its prompt cache maker.

    Args:
        model (nn.Module): an mlx-lm model (patched, floored or plain).
        method (str): ``"dense"`` (unpatched), one of ``FLOOR_METHODS`` (``floor_grow`` is the
            floor with DHSA's geometrically growing cache), or a planner name, patched with
            ``config`` (the default if None).
    """
    unpatch(model)
    for layer in model.layers:
        if isinstance(layer.self_attn, FloorAttention):
            layer.self_attn = layer.self_attn.base
    if method == "dense":
        return lambda: make_prompt_cache(model)
    if method in FLOOR_METHODS:
        for layer in model.layers:
            layer.self_attn = FloorAttention(layer.self_attn, kv_dependency=method == "floor_kv")
        if method == "floor_grow":
            return lambda: [DHSACache() for _ in model.layers]
        return lambda: make_prompt_cache(model)
    patch(model, config, method=method)
    return lambda: make_dhsa_prompt_cache(model)
