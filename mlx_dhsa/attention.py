"""DHSAAttention: a drop-in replacement for mlx-lm's Gemma2 attention module."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import kernels, reference
from .chunking import Chunks, chunk_boundaries, chunk_summaries
from .config import DHSAConfig
from .selection import block_queries, chunk_scores, key_mask, select


class SharedChunks:
    """Boundaries computed by the first patched layer and reused by the others.

    Within one forward call every layer sees the same key positions, so the owner (the first
    patched layer) recomputes the chunks and later layers reuse them when the key count and
    the forced boundary match.
    """

    def __init__(self):
        self.key = None
        self.chunks: Chunks | None = None


class DHSAAttention(nn.Module):
    """Gemma2 attention whose multi-token calls attend only to DHSA-selected keys.

    Same signature and projections as ``mlx_lm.models.gemma2.Attention``. Calls with one
    query (decode) or with at most ``budget`` keys run dense attention with the model's mask;
    longer calls plan per query block and run sparse attention, the last ``dense_tail``
    queries dense.
    """

    def __init__(
        self,
        config: DHSAConfig,
        *,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        scale: float,
        softcap: float | None,
        window: int | None = None,
        shared: SharedChunks | None = None,
        owner: bool = True,
    ):
        super().__init__()
        self.config = config
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.repeats = n_heads // n_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.attn_logit_softcapping = softcap
        self.window = window  # sliding window of this layer (None = global)
        self._shared = shared if shared is not None else SharedChunks()
        self._owner = owner
        self.last_path = "none"  # "dense", "dhsa(reference)" or "dhsa(kernel)"

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        config: DHSAConfig,
        *,
        window: int | None = None,
        shared: SharedChunks | None = None,
        owner: bool = True,
    ) -> "DHSAAttention":
        """Wrap an mlx-lm Gemma2 ``Attention``, sharing its projections and RoPE by reference."""
        attn = cls(
            config,
            n_heads=base.n_heads,
            n_kv_heads=base.n_kv_heads,
            head_dim=base.head_dim,
            scale=base.scale,
            softcap=getattr(base, "attn_logit_softcapping", None),
            window=window,
            shared=shared,
            owner=owner,
        )
        # Share, don't copy: keeps quantized projections and weight paths intact.
        attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (
            base.q_proj,
            base.k_proj,
            base.v_proj,
            base.o_proj,
        )
        attn.rope = base.rope
        object.__setattr__(attn, "_base", base)  # kept out of the parameter tree, for unpatch
        return attn

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = 0
        if cache is not None:
            offset = cache.offset
            queries = self.rope(queries, offset=offset)
            keys = self.rope(keys, offset=offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)

        output = self.attend(queries, keys, values, mask=mask, offset=offset)
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        mask: mx.array | str | None = None,
        offset: int = 0,
    ) -> mx.array:
        """Attention of post-RoPE queries (B, H, L, D) at positions ``offset..`` over keys
        and values (B, H_kv, S, D); returns (B, H, L, D)."""
        L, S = queries.shape[2], keys.shape[2]
        window = self.window if self.config.sliding_window else None
        args = dict(scale=self.scale, softcap=self.attn_logit_softcapping)
        if L == 1 or S <= self.config.dense_limit:
            self.last_path = "dense"
            return reference.dense_attention(
                queries, keys, values, mask=self._dense_mask(mask, offset, L, S, window), **args
            )
        if isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[0] > 1:
            raise NotImplementedError(
                "DHSA sparse prefill does not support per-sequence (padded batch) masks; "
                "prefill sequences one at a time, or raise the budget above the context length"
            )
        n_sparse = L - min(self.config.dense_tail, L)
        outputs = []
        if n_sparse > 0:
            plan = self.plan(queries[:, :, :n_sparse], keys, offset=offset, window=window)
            use_kernel = self.config.use_kernel
            outputs.append(
                kernels.sparse_attention(
                    queries[:, :, :n_sparse], keys, values, plan, use_kernel=use_kernel, **args
                )
            )
            self.last_path = f"dhsa({kernels.last_path})"
        else:
            self.last_path = "dense"
        if n_sparse < L:
            tail_mask = key_mask(offset + n_sparse, L - n_sparse, S, window)
            outputs.append(
                reference.dense_attention(
                    queries[:, :, n_sparse:], keys, values, mask=tail_mask, **args
                )
            )
        return mx.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]

    def plan(self, queries: mx.array, keys: mx.array, *, offset: int, window: int | None):
        """Select keys for the query blocks of ``queries`` (B, H, L, D) at ``offset``."""
        L, S = queries.shape[2], keys.shape[2]
        tail_start = offset + L  # queries after the planned ones run dense
        chunks = self._chunks(keys, tail_start if tail_start < S else None)
        scores = chunk_scores(
            block_queries(queries, self.config.block_size), chunk_summaries(keys, chunks)
        )
        return select(scores, chunks, self.config, n_queries=L, q_offset=offset, window=window)

    def _chunks(self, keys: mx.array, forced: int | None) -> Chunks:
        shared, key = self._shared, (keys.shape[0], keys.shape[2], forced)
        if self.config.share_boundaries and not self._owner and shared.key == key:
            return shared.chunks
        chunks = chunk_boundaries(keys, self.config, forced=forced)
        if self.config.share_boundaries and self._owner:
            shared.key, shared.chunks = key, chunks
        return chunks

    @staticmethod
    def _dense_mask(mask, offset: int, L: int, S: int, window: int | None):
        if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
            mask = mask > mx.finfo(mask.dtype).min / 2  # additive mask -> bool
        if window is not None and S > window:
            causal = key_mask(offset, L, S, window)
            return causal if not isinstance(mask, mx.array) else mask & causal
        if isinstance(mask, str) or (mask is None and L > 1):
            return key_mask(offset, L, S, None)
        return mask
