"""Keys and values as mlx-lm's ``QuantizedKVCache`` stores them.

``QuantizedKVCache.update_and_fetch`` returns, for keys and for values, the triple that
``mx.quantize`` makes along the head dimension: packed ``uint32`` words ``[B, H_kv, S, D * bits /
32]``, and per-group ``scales`` and ``biases`` ``[B, H_kv, S, D / group_size]`` in the model's
dtype. :class:`QuantizedKV` names that triple with its ``bits`` and ``group_size`` so the attention
paths (reference and kernels) take one argument for it.
"""

from typing import NamedTuple

import mlx.core as mx

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


class QuantizedKV(NamedTuple):
    """Quantized keys or values: ``x ~= scales * q + biases`` per group of ``group_size`` along D."""

    packed: mx.array  # [B, H_kv, S, D * bits // 32] uint32
    scales: mx.array  # [B, H_kv, S, D // group_size]
    biases: mx.array  # [B, H_kv, S, D // group_size]
    bits: int
    group_size: int

    @classmethod
    def of(cls, triple, bits: int, group_size: int) -> "QuantizedKV":
        """Wrap the ``(packed, scales, biases)`` triple of ``QuantizedKVCache``."""
        packed, scales, biases = triple
        return cls(packed, scales, biases, bits, group_size)

    @classmethod
    def quantize(cls, x: mx.array, bits: int = 8, group_size: int = 64) -> "QuantizedKV":
        """Quantize ``x`` [..., S, D] the way ``QuantizedKVCache`` does."""
        return cls(*mx.quantize(x, group_size=group_size, bits=bits), bits, group_size)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dequantized array, ``[B, H_kv, S, D]``."""
        *lead, words = self.packed.shape
        return (*lead, words * 32 // self.bits)

    @property
    def dtype(self):
        return self.scales.dtype

    def dequantize(self) -> mx.array:
        return mx.dequantize(
            self.packed, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )

    def triple(self) -> tuple[mx.array, mx.array, mx.array]:
        return self.packed, self.scales, self.biases

    def rows(self, start: int, stop: int | None = None) -> "QuantizedKV":
        """Key positions ``[start, stop)`` (axis 2), still quantized."""
        cut = lambda x: x[:, :, start:stop]
        return self._replace(packed=cut(self.packed), scales=cut(self.scales),
                             biases=cut(self.biases))  # fmt: skip

    def map(self, fn) -> "QuantizedKV":
        """``fn`` applied to each of packed, scales and biases (same row indexing for all)."""
        return self._replace(packed=fn(self.packed), scales=fn(self.scales), biases=fn(self.biases))


def is_quantized(x) -> bool:
    """Whether ``x`` is a :class:`QuantizedKV` (keys or values of a quantized cache)."""
    return isinstance(x, QuantizedKV)


def check_kv_bits(bits, group_size) -> None:
    """Raise ``ValueError`` (one line) unless ``bits`` is in BITS (or None) and ``group_size``
    in GROUP_SIZES."""
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise ValueError(f"kv_bits must be one of {BITS} (or None: no quantization), got {bits!r}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {GROUP_SIZES}, got {group_size!r}")
