"""The DHSA prompt cache over mlx-lm's quantized KV storage (design.md section 9).

:class:`QuantizedDHSACache` is mlx-lm's ``QuantizedKVCache`` (keys and values stored as
``mx.quantize`` triples, 4 or 8 bits) plus one layer's chunk state, as :class:`DHSACache` is
``KVCache`` plus it. ``mlx_lm.generate(..., kv_bits=4)`` makes one from each DHSACache through
``to_quantized``; ``DHSAConfig(kv_bits=4)`` makes them from the first token.

Chunk boundaries and summaries come from the keys before quantization
(``chunk_source="keys"``, the default): the cache keeps the model-dtype keys that its chunk
state has not consumed yet (at most one segment plus the last call's keys), and the layer
consumes them whenever a segment of ``chunk_limit`` keys closes (``DHSAAttention.sync_chunks``),
dense calls included. ``chunk_source="dequantized"`` chunks the dequantized keys instead, as
does any state rebuilt without those keys (a loaded cache, a trim into closed segments).
"""

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache

from .cache import ClosedChunks, ClosedSummaries, DHSACache
from .config import DHSAConfig
from .quantized import QuantizedKV, check_kv_bits

CHUNK_SOURCES = ("keys", "dequantized")


class QuantizedDHSACache(QuantizedKVCache):
    """mlx-lm's QuantizedKVCache plus the layer's chunk state and the unchunked keys.

    ``update_and_fetch`` returns mlx-lm's triples, so mlx-lm's own modules (and
    ``quantized_scaled_dot_product_attention``) run on it unchanged; DHSA layers wrap them in
    :class:`QuantizedKV`. The saved state is QuantizedKVCache's; a loaded cache rebuilds its
    chunk state from the dequantized keys.
    """

    # Class defaults: mlx-lm's from_state makes instances without __init__.
    chunk_source = "keys"
    _config: DHSAConfig | None = None
    _closed: ClosedChunks | None = None
    _summaries: ClosedSummaries | None = None
    kernel_state = None  # as DHSACache.kernel_state
    _fp: mx.array | None = None  # keys [_fp_start, _fp_start + _fp_n) in the model's dtype
    _fp_start = 0
    _fp_n = 0

    def __init__(self, group_size: int = 64, bits: int = 8, chunk_source: str | None = None):
        check_kv_bits(bits, group_size)
        super().__init__(group_size=group_size, bits=bits)
        if chunk_source is not None:
            if chunk_source not in CHUNK_SOURCES:
                raise ValueError(
                    f"chunk_source must be one of {CHUNK_SOURCES}, got {chunk_source!r}"
                )
            self.chunk_source = chunk_source

    @classmethod
    def from_cache(
        cls, cache: DHSACache, group_size: int = 64, bits: int = 4, chunk_source=None
    ) -> "QuantizedDHSACache":
        """``cache`` quantized, its chunk state carried over (``to_quantized``)."""
        q = cls(group_size=group_size, bits=bits, chunk_source=chunk_source)
        q.offset = cache.offset
        if cache.keys is not None:
            keys, values = cache.keys_and_values()
            q.keys = mx.quantize(keys, group_size=group_size, bits=bits)
            q.values = mx.quantize(values, group_size=group_size, bits=bits)
            done = 0 if cache._summaries is None else cache._summaries.n_keys
            if q.chunk_source == "keys" and done < cache.offset:
                q._fp, q._fp_start, q._fp_n = keys[:, :, done:], done, cache.offset - done
        q._config, q._closed, q._summaries = cache._config, cache._closed, cache._summaries
        return q

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """QuantizedKVCache's update; with ``chunk_source="keys"`` the new keys are kept in
        the model's dtype too until the chunk state consumes them."""
        if self.chunk_source == "keys":
            self._keep(keys)
        return super().update_and_fetch(keys, values)

    def _keep(self, keys: mx.array) -> None:
        n = keys.shape[2]
        if self._fp is None or self._fp_start + self._fp_n != self.offset:
            self._fp, self._fp_start, self._fp_n = None, self.offset, 0
        cap = 0 if self._fp is None else self._fp.shape[2]
        if self._fp_n + n > cap:
            grown = max(2 * cap, self._fp_n + n)
            B, H, _, D = keys.shape
            pad = mx.zeros((B, H, grown - self._fp_n, D), keys.dtype)
            self._fp = (
                pad
                if self._fp is None
                else mx.concatenate([self._fp[:, :, : self._fp_n], pad], axis=2)
            )
        self._fp[:, :, self._fp_n : self._fp_n + n] = keys
        self._fp_n += n

    def quantized(self) -> tuple[QuantizedKV, QuantizedKV]:
        """The cached keys and values as QuantizedKV (cut to ``offset``)."""
        k, v = self.keys_and_values()
        return (QuantizedKV.of(k, self.bits, self.group_size),
                QuantizedKV.of(v, self.bits, self.group_size))  # fmt: skip

    def fp_keys(self, start: int) -> mx.array:
        """Keys ``[start, offset)`` for chunking: the kept model-dtype keys where this cache
        has them, dequantized keys elsewhere."""
        start = min(start, self.offset)
        if self.chunk_source == "keys" and self._fp is not None:
            kept = max(self._fp_start, start)
            if self._fp_start + self._fp_n == self.offset and kept < self.offset:
                tail = self._fp[:, :, kept - self._fp_start : self._fp_n]
                if kept == start:
                    return tail
                head = self._dequantized(start, kept).astype(tail.dtype)
                return mx.concatenate([head, tail], axis=2)
        return self._dequantized(start, self.offset)

    def _dequantized(self, start: int, stop: int) -> mx.array:
        return QuantizedKV.of(self.keys, self.bits, self.group_size).rows(start, stop).dequantize()

    def release(self, upto: int) -> None:
        """Forget the kept model-dtype keys before position ``upto`` (chunked already)."""
        drop = min(upto, self._fp_start + self._fp_n) - self._fp_start
        if self._fp is None or drop <= 0:
            return
        rest = self._fp[:, :, drop : self._fp_n]
        self._fp = mx.contiguous(rest) if rest.shape[2] else None
        self._fp_start, self._fp_n = self._fp_start + drop, self._fp_n - drop
        if self._fp is None:
            self._fp_n = 0

    def chunk_state(self, config: DHSAConfig) -> tuple[ClosedChunks, ClosedSummaries]:
        """As :meth:`DHSACache.chunk_state`."""
        return DHSACache.chunk_state(self, config)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        if self._config is not None:
            self._closed.trim(self.offset, self._config)
            self._summaries.trim(self.offset, self._config)
        if self._fp is not None:
            if self.offset <= self._fp_start:
                self._fp, self._fp_start, self._fp_n = None, self.offset, 0
            else:
                self._fp_n = self.offset - self._fp_start
        self.kernel_state = None
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized keys and values (the kept model-dtype keys excluded:
        see :attr:`pending_nbytes`)."""
        return 0 if self.keys is None else super().nbytes

    @property
    def pending_nbytes(self) -> int:
        """Bytes of the model-dtype keys kept for chunking."""
        return 0 if self._fp is None else self._fp.nbytes


DHSACache.quantized_type = QuantizedDHSACache


class WindowKVCache(RotatingKVCache):
    """mlx-lm's RotatingKVCache that stays in the model's dtype under ``kv_bits``.

    mlx-lm cannot quantize a rotating cache (``to_quantized`` raises), so
    ``mlx_lm.generate(..., kv_bits=...)`` fails on Gemma3 models; a patched model's sliding
    layers keep their (window-bounded) cache unquantized instead, and its global layers
    quantize.
    """

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "WindowKVCache":
        return self

    @classmethod
    def of(cls, cache: RotatingKVCache) -> "WindowKVCache":
        """An empty ``cache`` (as the model makes it) under this class."""
        new = cls.__new__(cls)
        new.__dict__.update(cache.__dict__)
        return new


# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
mlx_cache.QuantizedDHSACache = QuantizedDHSACache
mlx_cache.WindowKVCache = WindowKVCache
