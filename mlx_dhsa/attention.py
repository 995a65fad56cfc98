"""DHSAAttention: a drop-in replacement for mlx-lm's Gemma2 attention module."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import kernels, planners, reference
from .cache import ChunkTable, ClosedChunks, ClosedSummaries, DHSACache
from .config import DHSAConfig
from .selection import Plan, key_mask


def _per_sequence(mask) -> bool:
    """A mask that differs across the batch (mlx-lm's padded batches).

    Any other mask mlx-lm builds for these models is the causal mask, which DHSA applies
    itself (with the layer's window); only per-sequence masks need the masked reference.
    """
    return isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[0] > 1


class SharedChunks:
    """Closed chunks published by the first DHSA layer and borrowed by the others.

    Within one forward call every layer sees the same key positions, so the owner (the first
    patched layer) brings its chunk state up to date and later layers borrow it when the
    batch and key counts match.
    """

    def __init__(self):
        self._key = None
        self._closed: ClosedChunks | None = None

    def publish(self, keys: mx.array, closed: ClosedChunks) -> None:
        self._key, self._closed = (keys.shape[0], keys.shape[2]), closed

    def get(self, keys: mx.array) -> ClosedChunks | None:
        return self._closed if self._key == (keys.shape[0], keys.shape[2]) else None


class DHSAAttention(nn.Module):
    """Gemma2 attention whose multi-token calls attend only to DHSA-selected keys.

    Same signature and projections as ``mlx_lm.models.gemma2.Attention``. Calls over at most
    ``dense_limit`` keys run dense attention with the model's mask; longer calls plan per
    query block and run sparse attention, the last ``dense_tail`` queries of a multi-token
    call dense. A decode step (one query) keeps sinks, local window and the best chunks.
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
            head_dim=getattr(base, "head_dim", base.q_proj.weight.shape[0] // base.n_heads),
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
        if L == 1 and cache is not None and self._base_decodes(cache.offset + 1):
            # A dense decode step that sees every key: mlx-lm's own module, op for op.
            self._set_path("dense")
            return self._base(x, mask=mask, cache=cache)
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries, keys = self.qk_norm(queries, keys)

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

    def _base_decodes(self, n_keys: int) -> bool:
        """Whether a decode step over ``n_keys`` keys is left to the wrapped mlx-lm module:
        dense (``DHSAConfig.sparse_decode_at``), no sliding window cutting keys off (mlx-lm's
        Gemma2 ignores the window, so those steps stay here and read only it) and no fused
        kernel to run it in one call instead of mlx-lm's six ops (``_fused_decode``)."""
        if self.__dict__.get("_base") is None:  # built directly, not by from_base
            return False
        config = self.config
        if self._fused_decode():
            return False
        if config.sliding_window and self.window is not None and n_keys > self.window:
            return False
        return not config.sparse_decode_at(n_keys)  # dense_limit is part of that test

    def _fused_decode(self) -> bool:
        """Whether one-query dense steps run the fused kernel: for soft-capped logits, which
        mlx-lm computes op by op (its models without a cap decode with MLX's fused SDPA)."""
        return self.attn_logit_softcapping is not None and kernels.fused_decode(
            self.config.use_kernel
        )

    def qk_norm(self, queries: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        """Per-head query/key normalisation before RoPE: none for Gemma2 (Gemma3 has one)."""
        return queries, keys

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        mask: mx.array | str | None = None,
        offset: int = 0,
        cache: Any = None,
    ) -> mx.array:
        """Attention of post-RoPE queries (B, H, L, D) at positions ``offset..`` over keys
        and values (B, H_kv, S, D) (``cache`` holds them, if given); returns (B, H, L, D)."""
        L, S = queries.shape[2], keys.shape[2]
        config = self.config
        window = self.window if config.sliding_window else None
        args = dict(scale=self.scale, softcap=self.attn_logit_softcapping)
        # One-query kernel launches of this layer run one after another: one set of counters.
        tickets = None
        if L == 1 and isinstance(cache, DHSACache):
            tickets = cache.decode_tickets(queries.shape[0] * self.n_kv_heads)
        visible = min(S, window) if L == 1 and window is not None else S
        if visible <= config.dense_limit or (L == 1 and not config.sparse_decode_at(visible)):
            self._set_path("dense")
            # The fused causal(+window) kernel: prefill steps, and decode steps when
            # kernels.fused_decode (fewer launches); else MLX's own ops. The kernel skips
            # keys left of the window itself.
            fused = L > 1 or self._fused_decode()
            if fused and not _per_sequence(mask) and offset + L == S:
                return kernels.dense_attention(
                    queries, keys, values, q_offset=offset, window=window,
                    use_kernel=config.use_kernel, tickets=tickets, **args,
                )
            if visible < S:
                # A dense decode step on a sliding layer reads only the last `window` keys:
                # drop the rest instead of masking them.
                keys, values = keys[:, :, S - window :], values[:, :, S - window :]
                mask = mask[..., S - window :] if isinstance(mask, mx.array) else mask
                offset, S = offset - (S - window), window
            return reference.dense_attention(
                queries, keys, values, mask=self._dense_mask(mask, offset, L, S, window), **args
            )
        if _per_sequence(mask):
            raise NotImplementedError(
                "DHSA sparse attention does not support per-sequence (padded batch) masks; "
                "run sequences one at a time, or raise the budget above the context length"
            )
        # Multi-token calls end with dense_tail queries that see every key; decode never does.
        n_sparse = L - min(config.dense_tail, L) if L > 1 else 1
        outputs = []
        if n_sparse > 0:
            q = queries if n_sparse == L else queries[:, :, :n_sparse]
            plan = self.plan(q, keys, offset=offset, window=window, cache=cache)
            outputs.append(
                kernels.sparse_attention(
                    q, keys, values, plan, use_kernel=config.use_kernel, tickets=tickets, **args
                )
            )
            self._set_path(f"dhsa({kernels.last_path})")
        else:
            self._set_path("dense")
        if n_sparse < L:
            outputs.append(
                kernels.dense_attention(
                    queries[:, :, n_sparse:], keys, values, q_offset=offset + n_sparse,
                    window=window, use_kernel=config.use_kernel, **args,
                )
            )
        return mx.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]

    def _set_path(self, path: str) -> None:
        # Only on change: nn.Module.__setattr__ costs about a microsecond, per layer and token.
        if self.last_path != path:
            self.last_path = path

    def plan(
        self,
        queries: mx.array,
        keys: mx.array,
        *,
        offset: int,
        window: int | None,
        cache: Any = None,
    ) -> Plan:
        """Select keys for the query blocks of ``queries`` (B, H, L, D) at ``offset`` with the
        planner ``config.method`` names (``planners.PLANNERS``)."""
        return planners.plan(self, queries, keys, offset=offset, window=window, cache=cache)

    def chunk_view(self, keys: mx.array, cache: Any = None) -> ChunkTable:
        """The chunks of ``keys`` (B, H_kv, S, D) and their summaries, as a ChunkTable.

        A DHSACache keeps closed chunks and summaries between calls; any other cache (or none)
        rebuilds them from the keys, with the same result. Shared boundaries come from the
        first DHSA layer of the model.
        """
        config = self.config
        if isinstance(cache, DHSACache):
            closed, summaries = cache.chunk_state(config)
        else:
            closed, summaries = ClosedChunks(), ClosedSummaries()
        borrowed = None
        if config.share_boundaries and not self._owner:
            borrowed = self._shared.get(keys)
        if borrowed is not None:
            closed = borrowed
        else:
            closed.sync(keys, config)
            if config.share_boundaries and self._owner:
                self._shared.publish(keys, closed)
        return summaries.table(keys, closed, config)

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
