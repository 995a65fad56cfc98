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
