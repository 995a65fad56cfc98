"""What the kernels keep for one layer between calls (a DHSACache holds it unopened)."""

import mlx.core as mx


class KernelState:
    """One layer's kernel-side state across its calls.

    - Ticket buffers: zeroed int32 counters that the one-query launches (decode attention
      with FOLD, the fused ``plan``) take and leave zeroed, made once instead of per step. A
      layer's decode steps run one after another, so they may share them; launches that can
      run side by side must not, so attention and planning have a buffer each.
    - The open chunk's running key sum: block_scores adds only the keys that arrived since
      the last call, ``sum_h sum_{start <= i < end} k_i`` (B, D) float32.
    - The last plan the planning kernels made, whose arrays are known row-contiguous int32
      (the attention kernel then reads them as they are).
    """

    __slots__ = ("_planned", "_tickets", "open_end", "open_start", "open_total")

    def __init__(self):
        self._tickets: dict[str, mx.array] = {}
        self.open_start, self.open_end, self.open_total = -1, -1, None
        self._planned = None

    def tickets(self, kind: str, n: int) -> mx.array:
        """``n`` zeroed int32 counters for this layer's ``kind`` launches (``"attention"`` or
        ``"plan"``), made once (again only for a larger batch)."""
        buf = self._tickets.get(kind)
        if buf is None or buf.size < n:
            buf = mx.zeros((n,), mx.int32)
            mx.eval(buf)
            self._tickets[kind] = buf
        return buf

    def carried_sum(self, open_start: int, n_keys: int, batch: int) -> tuple[mx.array, int] | None:
        """(total, end) of the running open-chunk sum if it belongs to this open chunk."""
        total = self.open_total
        if total is None or self.open_start != open_start or self.open_end > n_keys:
            return None
        if total.shape[0] != batch:
            return None
        return total, self.open_end

    def carry(self, open_start: int, n_keys: int, total: mx.array) -> None:
        """Keep the open chunk's key sum over ``[open_start, n_keys)`` for the next call."""
        self.open_start, self.open_end, self.open_total = open_start, n_keys, total

    def planned(self, indices: mx.array) -> None:
        """Record ``indices`` as a plan the kernels made (row-contiguous int32)."""
        self._planned = indices

    def take_planned(self, indices: mx.array) -> bool:
        """Whether ``indices`` is the plan recorded last; forgets it either way (a plan's
        arrays are not held past the attention call that reads them)."""
        mine, self._planned = self._planned is indices, None
        return mine
