"""The plan: which keys each query block attends to, where selection and attention meet."""

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Plan:
    """The key set of every query block.

    Query i of the planned range sits at absolute position ``q_offset + i`` and belongs to
    block ``i // block_size``. It may attend to slots ``j < n_valid[b, blk]`` of
    ``indices[b, blk]`` whose key position ``k`` satisfies ``k <= q`` and, with a window,
    ``k > q - window``.
    """

    indices: mx.array  # (B, NB, K) int32 key positions, ascending; padding slots hold 0
    n_valid: mx.array  # (B, NB) int32, valid slots per block (<= K)
    q_offset: int  # absolute position of the first planned query
    block_size: int  # queries per block
    window: int | None  # sliding window of the layer; None = global attention

    @property
    def budget(self) -> int:
        return self.indices.shape[-1]
