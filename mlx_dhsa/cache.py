"""Incremental chunk state and the DHSA prompt cache.

Closed segments (whole ``chunk_limit`` spans of keys) are chunked and summarised once, as keys
arrive; the keys after them form one open chunk that is summarised afresh on each call. The
same code serves a plain mlx-lm ``KVCache`` by rebuilding the state from the cached keys on
every call, so both give identical chunks, summaries and selections.
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache

from .chunking import (
    Chunks,
    chunk_summaries,
    chunks_per_segment,
    concat_chunks,
    open_chunk,
    segment_chunks,
)
from .config import DHSAConfig


class ClosedChunks:
    """Chunks of the closed segments of one key sequence, grown and trimmed in place."""

    def __init__(self):
        self.n_keys = 0  # keys covered: a multiple of the segment length
        self.chunks: Chunks | None = None

    def sync(self, keys: mx.array, config: DHSAConfig) -> "ClosedChunks":
        """Cover the whole segments of ``keys`` (B, H_kv, S, D): trim, then chunk new ones."""
        seg, per = config.chunk_limit, chunks_per_segment(config)
        n_closed = keys.shape[2] // seg * seg
        if self.chunks is not None and self.chunks.starts.shape[0] != keys.shape[0]:
            self.n_keys, self.chunks = 0, None  # another batch: start over
        self.trim(n_closed, config)
        if n_closed > self.n_keys:
            new = segment_chunks(keys[:, :, self.n_keys : n_closed], config, offset=self.n_keys)
            self.chunks = new if self.chunks is None else concat_chunks(self.chunks, new)
            self.n_keys = n_closed
        return self

    def trim(self, n_keys: int, config: DHSAConfig) -> None:
        """Forget the segments past ``n_keys`` (rounded down to whole segments)."""
        seg, per = config.chunk_limit, chunks_per_segment(config)
        n_keys = n_keys // seg * seg
        if n_keys < self.n_keys:
            n = n_keys // seg * per
            c = self.chunks
            self.chunks = Chunks(c.starts[:, :n], c.lengths[:, :n], c.segment) if n else None
            self.n_keys = n_keys

    def with_open(self, S: int, B: int, config: DHSAConfig) -> Chunks:
        """All chunks of S keys: the closed ones plus the open chunk (possibly empty)."""
        tail = open_chunk(self.n_keys, S, B, config.chunk_limit)
        return tail if self.chunks is None else concat_chunks(self.chunks, tail)


class ClosedSummaries:
    """Summaries (B, N, D) of one layer's closed chunks, kept in step with a ClosedChunks."""

    def __init__(self):
        self.n_keys = 0
        self.summaries: mx.array | None = None

    def sync(self, keys: mx.array, closed: ClosedChunks, config: DHSAConfig) -> mx.array:
        """Summaries of all chunks of ``keys``: closed (cached) and open (fresh), (B, N_c, D)."""
        B, _, S, _ = keys.shape
        seg, per = config.chunk_limit, chunks_per_segment(config)
        if self.summaries is not None and self.summaries.shape[0] != B:
            self.n_keys, self.summaries = 0, None
        self.trim(closed.n_keys, config)
        if closed.n_keys > self.n_keys:
            a, b = self.n_keys // seg * per, closed.n_keys // seg * per
            c = closed.chunks
            new = chunk_summaries(
                keys[:, :, self.n_keys : closed.n_keys],
                Chunks(c.starts[:, a:b], c.lengths[:, a:b], c.segment),
                offset=self.n_keys,
            )
            self.summaries = new if self.summaries is None else mx.concatenate(
                [self.summaries, new], axis=1
            )
            self.n_keys = closed.n_keys
        tail = open_summary(keys[:, :, closed.n_keys :])
        return tail if self.summaries is None else mx.concatenate([self.summaries, tail], axis=1)

    def trim(self, n_keys: int, config: DHSAConfig) -> None:
        seg, per = config.chunk_limit, chunks_per_segment(config)
        n_keys = n_keys // seg * seg
        if n_keys < self.n_keys:
            n = n_keys // seg * per
            self.summaries = self.summaries[:, :n] if n else None
            self.n_keys = n_keys


def open_summary(keys: mx.array) -> mx.array:
    """Summary of the open chunk, ``sum_i mean_h k_i / sqrt(n)``, (B, 1, D) float32.

    A direct sum: a decode step needs only a few small ops here.
    """
    n = keys.shape[2]
    total = keys.astype(mx.float32).mean(axis=1).sum(axis=1, keepdims=True)
    return total / max(n, 1) ** 0.5


class DHSACache(KVCache):
    """mlx-lm's KVCache plus the layer's incremental chunk state.

    The saved state is the KVCache's own (keys, values, offset): chunk state is derived from
    the keys, so a loaded cache rebuilds it on first use. Trimming trims it too.
    """

    _config: DHSAConfig | None = None
    _closed: ClosedChunks | None = None  # used by the layer that owns shared boundaries
    _summaries: ClosedSummaries | None = None

    def chunk_state(self, config: DHSAConfig) -> tuple[ClosedChunks, ClosedSummaries]:
        if self._closed is None or self._config != config:
            self._config = config
            self._closed, self._summaries = ClosedChunks(), ClosedSummaries()
        return self._closed, self._summaries

    def trim(self, n: int) -> int:
        n = super().trim(n)
        if self._config is not None:
            self._closed.trim(self.offset, self._config)
            self._summaries.trim(self.offset, self._config)
        return n


# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
mlx_cache.DHSACache = DHSACache


def make_prompt_cache(model: nn.Module, max_kv_size: int | None = None) -> list[Any]:
    """The model's prompt cache with a DHSACache for every DHSA layer.

    Other layers (e.g. Gemma3's sliding layers) keep the cache the model makes for them.

    Args:
        model (nn.Module): a model patched with :func:`mlx_dhsa.patch`.
        max_kv_size (int, optional): not supported with DHSA layers (it would rotate keys).

    Returns:
        list: one cache per layer, for ``mlx_lm.generate`` / ``stream_generate``.
    """
    from .attention import DHSAAttention

    if max_kv_size is not None:
        raise ValueError(
            "max_kv_size (a rotating KV cache) is not supported by DHSA layers: DHSA already "
            "bounds attention cost by its budget; drop max_kv_size"
        )
    make = getattr(type(model), "make_cache", None)
    caches = make(model) if make is not None else [KVCache() for _ in model.layers]
    return [
        DHSACache() if isinstance(getattr(layer, "self_attn", None), DHSAAttention) else c
        for layer, c in zip(model.layers, caches)
    ]
