"""Incremental chunk state and the DHSA prompt cache.

Closed segments (whole ``chunk_limit`` spans of keys) are chunked and summarised once, as keys
arrive; the keys after them form one open chunk, summarised on each call (the planning kernel
adds new keys to a running sum that it keeps itself; the pure-MLX planner sums them afresh). The same
code serves a plain mlx-lm ``KVCache`` by rebuilding the state from the cached keys on every
call, so both give identical chunks, summaries and selections (up to the float rounding of the
running sum).
"""

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache

from .chunking import (
    Chunks,
    chunk_spreads,
    chunk_summaries,
    chunks_per_segment,
    concat_chunks,
    open_chunk,
    open_piece_summaries,
    segment_chunks,
)
from .config import DHSAConfig

# Chunk slots are allocated this many at a time, so the compiled planner sees a new shape
# (and re-traces) only every CAPACITY_STEP chunks, about 32k keys at the defaults.
CAPACITY_STEP = 1024

# Closed chunks' summaries are computed in float32 and stored in float16: they are the largest
# read of a sparse decode step after the kept keys (one D-vector per chunk, at most 8 keys),
# and rounding them leaves the plans' attention mass unchanged (docs/accuracy/cpu_summary_dtype).
# Every planner widens them to float32 as it reads them. The open chunk's summary stays float32.
# Stored values are clipped to float16's range, so keys past it rank as the largest, not inf.
SUMMARY_DTYPE = mx.float16
_SUMMARY_MAX = 65504.0


def _reserve(buf: mx.array | None, shape: tuple, needed: int, dtype) -> mx.array:
    """``buf`` with at least ``needed`` slots on axis 1, grown in CAPACITY_STEP units."""
    have = 0 if buf is None else buf.shape[1]
    if have >= needed:
        return buf
    cap = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
    grow = mx.zeros((shape[0], cap - have, *shape[1:]), dtype)
    return grow if buf is None else mx.concatenate([buf, grow], axis=1)


@dataclass
class ChunkTable:
    """Every chunk of S keys in fixed-capacity buffers, ready for the compiled planner.

    Slots ``[0, n_closed)`` hold the closed chunks, slot ``n_closed`` the open chunk
    ``[open_start, n_keys)`` with summary ``open_summary``; later slots are unused. The keys
    stay attached so that the planning kernel can summarise the open chunk itself.
    """

    starts: mx.array  # (B, cap) int32
    lengths: mx.array  # (B, cap) int32
    summaries: mx.array  # (B, cap, D) SUMMARY_DTYPE
    spreads: mx.array | None  # (B, cap, D) SUMMARY_DTYPE key variances (key_spread > 0) or None
    keys: mx.array  # (B, H_kv, n_keys - keys_start, D): the keys from keys_start on
    n_closed: int  # closed chunks
    open_start: int  # first key of the open chunk
    n_keys: int  # S
    segment: int
    summary: str = "sqrt"  # DHSAConfig.summary
    keys_start: int = 0  # position of keys[:, :, 0]: 0, or at most open_start (quantized caches)

    @cached_property
    def open_summary(self) -> mx.array:
        """The open chunk's summary, (B, 1, D) float32 (built on first use)."""
        return open_summary(self.keys[:, :, self.open_start - self.keys_start :], self.summary)

    def open_pieces(self, size: int, slots: int) -> mx.array:
        """Summaries of the open chunk cut into ``slots`` pieces of ``size`` keys
        (``DHSAConfig.open_pieces``), (B, slots, D) float32 (``chunking.open_piece_summaries``)."""
        keys = self.keys[:, :, self.open_start - self.keys_start :]
        return open_piece_summaries(keys, size, slots, self.summary)

    def materialize(self) -> tuple[Chunks, mx.array]:
        """The (B, N_c) chunks, open chunk last, and their (B, N_c, D) float32 summaries."""
        n, B = self.n_closed, self.starts.shape[0]
        tail = open_chunk(self.open_start, self.n_keys, B, self.segment)
        chunks = concat_chunks(Chunks(self.starts[:, :n], self.lengths[:, :n], self.segment), tail)
        closed = self.summaries[:, :n].astype(mx.float32)
        return chunks, mx.concatenate([closed, self.open_summary], axis=1)


class ClosedChunks:
    """Chunks of the closed segments of one key sequence, grown and trimmed in place."""

    def __init__(self):
        self.n_keys = 0  # keys covered: a multiple of the segment length
        self.n_chunks = 0
        self.starts: mx.array | None = None  # (B, cap) int32
        self.lengths: mx.array | None = None

    def sync(self, keys: mx.array, config: DHSAConfig, start: int = 0) -> "ClosedChunks":
        """Cover the whole segments of ``keys`` (B, H_kv, S - start, D), the keys from
        position ``start`` on: trim, then chunk new ones. ``start`` is at most the keys
        covered already (after the trim), so the new segments are all in ``keys``."""
        B, S = keys.shape[0], start + keys.shape[2]
        seg, per = config.chunk_limit, chunks_per_segment(config)
        if self.starts is not None and self.starts.shape[0] != B:
            self.__init__()  # another batch: start over
        n_closed = S // seg * seg
        self.trim(n_closed, config)
        if n_closed > self.n_keys:
            if self.n_keys < start:
                raise ValueError(f"keys from {start} on cannot extend chunks of {self.n_keys}")
            new = segment_chunks(
                keys[:, :, self.n_keys - start : n_closed - start], config, offset=self.n_keys
            )
            a, b = self.n_chunks, n_closed // seg * per
            self.starts = _reserve(self.starts, (B,), b + 1, mx.int32)  # + 1: the open chunk
            self.lengths = _reserve(self.lengths, (B,), b + 1, mx.int32)
            self.starts[:, a:b] = new.starts
            self.lengths[:, a:b] = new.lengths
            self.n_keys, self.n_chunks = n_closed, b
            # mlx-lm evaluates only the KV state each step: without this, a layer whose output
            # is not needed yet would keep a lazy graph holding old key buffers alive.
            mx.async_eval(self.starts, self.lengths)
        if self.starts is None:
            self.starts = _reserve(None, (B,), 1, mx.int32)
            self.lengths = _reserve(None, (B,), 1, mx.int32)
        return self

    def trim(self, n_keys: int, config: DHSAConfig) -> None:
        """Forget the segments past ``n_keys`` (rounded down to whole segments)."""
        seg, per = config.chunk_limit, chunks_per_segment(config)
        n_keys = n_keys // seg * seg
        if n_keys < self.n_keys:
            self.n_keys, self.n_chunks = n_keys, n_keys // seg * per


class ClosedSummaries:
    """Summaries (B, cap, D) of one layer's closed chunks, kept in step with a ClosedChunks
    (``SUMMARY_DTYPE``), and with ``key_spread`` their keys' variances (``chunk_spreads``)."""

    def __init__(self):
        self.n_keys = 0
        self.summaries: mx.array | None = None
        self.spreads: mx.array | None = None

    def table(
        self, keys: mx.array, closed: ClosedChunks, config: DHSAConfig, start: int = 0
    ) -> ChunkTable:
        """Summarise new closed chunks of ``keys`` (B, H_kv, S - start, D), the keys from
        position ``start`` on (at most the keys summarised already), and the open chunk."""
        B, _, S, D = keys.shape
        S += start
        seg, per = config.chunk_limit, chunks_per_segment(config)
        spread = config.spread_scores
        if self.summaries is not None and (
            self.summaries.shape[0] != B or (self.spreads is not None) != spread
        ):
            self.__init__()
        self.trim(closed.n_keys, config)
        if closed.n_keys > self.n_keys:
            a, b = self.n_keys // seg * per, closed.n_chunks
            if self.n_keys < start:
                raise ValueError(f"keys from {start} on cannot extend summaries of {self.n_keys}")
            new = _compiled_summaries(seg, config.summary, spread)(
                keys[:, :, self.n_keys - start : closed.n_keys - start],
                closed.starts[:, a:b],
                closed.lengths[:, a:b],
                mx.array(self.n_keys, mx.int32),
            )
            self.summaries = _reserve(self.summaries, (B, D), b + 1, SUMMARY_DTYPE)
            self.summaries[:, a:b] = _stored(new[0])
            if spread:
                self.spreads = _reserve(self.spreads, (B, D), b + 1, SUMMARY_DTYPE)
                self.spreads[:, a:b] = _stored(new[1])
            self.n_keys = closed.n_keys
            stored = [self.summaries, self.spreads] if spread else [self.summaries]
            mx.async_eval(*stored)  # see ClosedChunks.sync
        self.summaries = _reserve(self.summaries, (B, D), closed.starts.shape[1], SUMMARY_DTYPE)
        if spread:
            self.spreads = _reserve(self.spreads, (B, D), closed.starts.shape[1], SUMMARY_DTYPE)
        return ChunkTable(
            starts=closed.starts,
            lengths=closed.lengths,
            summaries=self.summaries,
            spreads=self.spreads,
            keys=keys,
            n_closed=closed.n_chunks,
            open_start=closed.n_keys,
            n_keys=S,
            segment=seg,
            summary=config.summary,
            keys_start=start,
        )

    def trim(self, n_keys: int, config: DHSAConfig) -> None:
        seg = config.chunk_limit
        self.n_keys = min(self.n_keys, n_keys // seg * seg)


def _stored(x: mx.array) -> mx.array:
    """``x`` as the table stores it: SUMMARY_DTYPE, clipped to its range."""
    return mx.clip(x, -_SUMMARY_MAX, _SUMMARY_MAX).astype(SUMMARY_DTYPE)


@lru_cache(maxsize=8)
def _compiled_summaries(segment: int, summary: str, spread: bool):
    """chunk_summaries (and with ``spread`` chunk_spreads) as one compiled graph (one trace
    per prefill step size)."""

    def fn(keys, starts, lengths, offset):
        chunks = Chunks(starts, lengths, segment)
        out = [chunk_summaries(keys, chunks, offset=offset, summary=summary)]
        if spread:
            out.append(chunk_spreads(keys, chunks, offset=offset))
        return out

    return mx.compile(fn)


def open_summary(keys: mx.array, summary: str = "sqrt") -> mx.array:
    """Summary of the open chunk, ``sum_i mean_h k_i / sqrt(n)`` (or ``/ n``), (B, 1, D) f32.

    A direct sum: a decode step needs only a few small ops here.
    """
    n = max(keys.shape[2], 1)
    total = keys.astype(mx.float32).mean(axis=1).sum(axis=1, keepdims=True)
    return total / (n**0.5 if summary == "sqrt" else n)


class DHSACache(KVCache):
    """mlx-lm's KVCache plus the layer's incremental chunk state.

    The saved state is the KVCache's own (keys, values, offset): chunk state is derived from
    the keys, so a loaded cache rebuilds it on first use. Trimming trims it too.
    """

    _config: DHSAConfig | None = None
    _closed: ClosedChunks | None = None  # used by the layer that owns shared boundaries
    _summaries: ClosedSummaries | None = None
    # What the kernels keep for this layer between calls (kernels.KernelState): held here,
    # never looked into; dropped when the keys it describes are trimmed or re-chunked.
    kernel_state: Any = None
    # The key/value buffers grow by this factor instead of mlx-lm's next multiple of 256
    # keys, which re-allocates and copies the whole cache on every prefill step; the spare
    # capacity costs memory too (docs/benchmarks.md, memory).
    growth = 1.125
    # What to_quantized makes: QuantizedDHSACache, which quantized_cache.py (a layer above,
    # always imported with the package) sets here.
    quantized_type: type | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """KVCache's update, with geometric growth of the buffers."""
        if self.keys is not None:
            needed, capacity = self.offset + keys.shape[2], self.keys.shape[2]
            if needed > capacity:
                grown = max(needed, int(capacity * self.growth))
                grown = -(-grown // self.step) * self.step
                self.keys = _grow(self.keys[..., : self.offset, :], grown)
                self.values = _grow(self.values[..., : self.offset, :], grown)
        return super().update_and_fetch(keys, values)

    @property
    def state(self):
        """(keys, values, offset), the buffers cut to ``offset`` (no spare capacity saved)."""
        if self.keys is None:
            return self.keys, self.values, self.offset
        return (*self.keys_and_values(), self.offset)

    @state.setter
    def state(self, v):
        KVCache.state.fset(self, v)

    def chunk_state(self, config: DHSAConfig) -> tuple[ClosedChunks, ClosedSummaries]:
        if self._closed is None or (self._config is not config and self._config != config):
            if self._config is not None:  # re-chunked under another config
                self.kernel_state = None
            self._config = config
            self._closed, self._summaries = ClosedChunks(), ClosedSummaries()
        return self._closed, self._summaries

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """This cache quantized as mlx-lm's ``generate(..., kv_bits=)`` asks: a
        :class:`~mlx_dhsa.quantized_cache.QuantizedDHSACache` with the chunk state carried."""
        return self.quantized_type.from_cache(self, group_size=group_size, bits=bits)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        if self._config is not None:
            self._closed.trim(self.offset, self._config)
            self._summaries.trim(self.offset, self._config)
        self.kernel_state = None  # trimmed keys get overwritten: the kernels start afresh
        return n


def _grow(x: mx.array, capacity: int) -> mx.array:
    """x (B, H, n, D) followed by zeros up to ``capacity`` rows on axis 2."""
    B, H, n, D = x.shape
    return mx.concatenate([x, mx.zeros((B, H, capacity - n, D), x.dtype)], axis=2)


# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
mlx_cache.DHSACache = DHSACache
