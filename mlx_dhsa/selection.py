"""Selection: which keys each query block attends to (the "plan"), pure MLX.

block x chunk scores -> per-block choice of chunks under the budget -> padded key indices.
Every step has static shapes and runs on the device; no L x S array is ever built.
"""

from functools import lru_cache

import mlx.core as mx

from .cache import ChunkTable
from .chunking import Chunks, open_slots
from .config import DHSAConfig
from .plan import Plan


def block_queries(queries: mx.array, block_size: int, *, per_head: bool = False) -> mx.array:
    """Block representatives: ``q_b = mean over the block's queries and heads``.

    Args:
        queries (mx.array): (B, H, L, D).
        block_size (int): queries per block; the last block may be shorter.
        per_head (bool): keep the heads apart (``q_bh``, mean over the block only).

    Returns:
        mx.array: (B, NB, D) float32 with NB = ceil(L / block_size); (B, H, NB, D) per head.
    """
    B, H, L, D = queries.shape
    NB = -(-L // block_size)
    q = queries.astype(mx.float32)
    q = q.mean(axis=1, keepdims=True) if not per_head else q  # (B, H or 1, L, D)
    q = mx.pad(q, [(0, 0), (0, 0), (0, NB * block_size - L), (0, 0)])
    counts = mx.minimum(L - mx.arange(NB) * block_size, block_size).astype(mx.float32)
    qb = q.reshape(B, q.shape[1], NB, block_size, D).sum(axis=3) / counts[:, None]
    return qb if per_head else qb[:, 0]


def chunk_scores(qb: mx.array, summaries: mx.array) -> mx.array:
    """Block x chunk similarity ``S_bc = q_b . k_c`` (float32, no softmax: only ranks matter).

    With per-head representatives the score is the best head's: ``S_bc = max_h q_bh . k_c``.

    Args:
        qb (mx.array): block representatives, (B, NB, D) or per head (B, H, NB, D).
        summaries (mx.array): chunk summaries, (B, N_c, D).

    Returns:
        mx.array: (B, NB, N_c) float32.
    """
    if qb.ndim == 4:
        return (qb @ mx.expand_dims(summaries, 1).swapaxes(-1, -2)).max(axis=1)
    return qb @ summaries.swapaxes(-1, -2)


def block_ranges(config: DHSAConfig, n_queries: int, q_offset: int, window: int | None):
    """Per block: candidate start, sink end, local start and last query (each (NB,) int32)."""
    NB = -(-n_queries // config.block_size)
    q0 = q_offset + mx.arange(NB) * config.block_size
    q1 = mx.minimum(q0 + config.block_size, q_offset + n_queries) - 1
    lo = mx.maximum(q0 - window + 1, 0) if window is not None else mx.zeros_like(q0)
    sink_end = mx.maximum(lo, mx.minimum(config.sink, q1 + 1))
    local_start = mx.maximum(mx.maximum(q0 - config.local, lo), sink_end)
    if config.local_mode == "recent":  # the last `local` keys, the block's own included
        local_start = mx.maximum(mx.maximum(mx.minimum(q0, q1 + 1 - config.local), lo), sink_end)
    return lo, sink_end, local_start, q1


def select(
    scores: mx.array,
    chunks: Chunks,
    config: DHSAConfig,
    *,
    n_queries: int,
    q_offset: int,
    window: int | None = None,
) -> Plan:
    """Choose each block's keys: sinks + local window + the best chunks, ``budget`` in all.

    Upsampling rule: every key inherits its chunk's score. Block b (queries q0..q1) may see
    keys ``lo <= k <= q1`` (``lo = q0 - window + 1`` on sliding layers, else 0). It always
    keeps the first ``sink`` of them and ``[q0 - local, q1]``; the highest-scoring chunks fill
    the rest of the budget in score order, the last one cut at its end. Fewer candidates than
    the budget means all of them.

    Args:
        scores (mx.array): block x chunk scores, (B, NB, N_c).
        chunks (Chunks): the key chunks the scores refer to.
        config (DHSAConfig): ``budget``, ``block_size``, ``sink``, ``local``.
        n_queries (int): queries covered by the plan (NB = ceil(n_queries / block_size)).
        q_offset (int): absolute position of the first of them.
        window (int, optional): sliding window of the layer. Default: ``None``.

    Returns:
        Plan: the padded key indices, (B, NB, budget), and their counts.
    """
    B, NB, N_c = scores.shape
    K = config.budget
    lo, sink_end, local_start, q1 = (
        x[:, None] for x in block_ranges(config, n_queries, q_offset, window)
    )
    s, n = chunks.starts[:, None, :], chunks.lengths[:, None, :]  # (B, 1, N_c)
    # Chunk keys inside the free middle [sink_end, local_start) of each block.
    c0 = mx.maximum(s, sink_end)
    avail = mx.maximum(mx.minimum(s + n, local_start) - c0, 0)  # (B, NB, N_c)
    room = K - (sink_end - lo) - (q1 + 1 - local_start)  # (NB, 1), >= 0 by config validation
    order = _best_first(mx.where(avail > 0, -scores, mx.inf), max_chunks_taken(config))
    a_sorted = mx.take_along_axis(avail, order, axis=-1)
    before = mx.cumsum(a_sorted, axis=-1) - a_sorted
    take_sorted = mx.clip(room - before, 0, a_sorted)
    take = mx.put_along_axis(mx.zeros_like(avail), order, take_sorted, axis=-1)
    # Intervals in key order: sinks, chunk parts, local window.
    starts = mx.concatenate(
        [mx.broadcast_to(lo, (B, NB, 1)), c0, mx.broadcast_to(local_start, (B, NB, 1))], axis=-1
    )
    lengths = mx.concatenate(
        [
            mx.broadcast_to(sink_end - lo, (B, NB, 1)),
            take,
            mx.broadcast_to(q1 + 1 - local_start, (B, NB, 1)),
        ],
        axis=-1,
    )
    return plan_from_intervals(starts, lengths, config, q_offset=q_offset, window=window)


def plan_from_intervals(
    starts: mx.array, lengths: mx.array, config: DHSAConfig, *, q_offset: int, window
) -> Plan:
    """The Plan whose blocks keep the key intervals ``[starts, starts + lengths)``, (B, NB, N)
    each, ascending and disjoint, ``config.budget`` keys at most per block."""
    return Plan(
        indices=intervals_to_indices(starts, lengths, config.budget),
        n_valid=lengths.sum(-1).astype(mx.int32),
        q_offset=q_offset,
        block_size=config.block_size,
        window=window,
    )


def select_chunks(
    queries: mx.array,
    table: ChunkTable,
    config: DHSAConfig,
    *,
    q_offset: int,
    window: int | None = None,
    scale: float | None = None,
) -> Plan:
    """Block representatives, chunk scores and :func:`select` over a chunk table.

    A decode step (one query) runs this as one ``mx.compile``d graph: it plans once per token
    and layer, as many small ops, and its shapes change only when the table's capacity grows
    (positions and counts are array inputs). Prefill calls run the same function uncompiled:
    each new query count would trace (and JIT) a new graph, and their planning is amortised
    over thousands of queries.

    With ``config.open_pieces`` the open chunk is scored as ``target_chunk``-key pieces
    (``ChunkTable.open_pieces``), in slots after the table's. With ``config.key_spread`` a
    closed chunk's score adds ``key_spread * scale / 2 * q_b^2 . v_c`` (:func:`spread_weight`;
    the open chunk and open pieces have no stored spread and add nothing).

    Args:
        queries (mx.array): the planned queries, (B, H, L, D), at positions ``q_offset..``.
        table (ChunkTable): the chunks of the keys (see ``cache.ChunkTable``).
        config (DHSAConfig): selection settings.
        q_offset (int): position of the first query.
        window (int, optional): sliding window of the layer. Default: ``None``.
        scale (float, optional): the layer's logit scale, for ``key_spread``. Default:
            ``D ** -0.5``.

    Returns:
        Plan: as :func:`select` returns it.
    """
    weight = spread_weight(config, table, scale, queries.shape[-1])
    fn = _select_fn(config, window, queries.shape[2], table.segment, weight)
    if queries.shape[2] == 1:
        fn = _compiled(fn)
    scalars = mx.array([table.n_closed, table.open_start, table.n_keys, q_offset], mx.int32)
    if config.open_pieces:
        open_part = table.open_pieces(config.target_chunk, open_slots(config))
    else:
        open_part = table.open_summary
    spreads = table.spreads if weight else table.summaries  # not read without a weight
    indices, n_valid = fn(
        queries, table.summaries, spreads, table.starts, table.lengths, open_part, scalars
    )
    return Plan(indices, n_valid, q_offset=q_offset, block_size=config.block_size, window=window)


def spread_weight(config: DHSAConfig, table: ChunkTable, scale: float | None, D: int) -> float:
    """The factor of a closed chunk's spread term, ``key_spread * scale / 2``: 0 where
    ``config.spread_scores`` is False (decode steps: ``planners.step_config``) or the table
    holds no spreads."""
    if not config.spread_scores or table.spreads is None:
        return 0.0
    return 0.5 * config.key_spread * (D**-0.5 if scale is None else scale)


@lru_cache(maxsize=128)
def _select_fn(config: DHSAConfig, window: int | None, n_queries: int, segment: int, weight: float):
    def fn(queries, summaries, spreads, starts, lengths, open_part, scalars):
        n_closed, open_start, S, q_offset = scalars[0], scalars[1], scalars[2], scalars[3]
        summaries = summaries.astype(mx.float32)  # stored as cache.SUMMARY_DTYPE
        slot = mx.arange(starts.shape[1])
        per_head = config.head_scores == "max"
        qb = block_queries(queries, config.block_size, per_head=per_head)
        spread_term = 0.0  # the closed chunks' spread term (none in unused and open slots)
        if weight:
            closed = mx.where((slot < n_closed)[:, None], spreads.astype(mx.float32), 0.0)
            spread_term = weight * chunk_scores(qb * qb, closed)
        if config.open_pieces:
            # The open pieces (open_part: their summaries) go in slots after the table's.
            size, B, P = config.target_chunk, starts.shape[0], open_part.shape[1]
            piece = open_start + size * mx.arange(P, dtype=mx.int32)
            piece_n = mx.clip(S - piece, 0, size).astype(mx.int32)
            lengths = mx.where(slot < n_closed, lengths, 0)
            starts = mx.concatenate([starts, mx.broadcast_to(piece, (B, P))], axis=1)
            lengths = mx.concatenate([lengths, mx.broadcast_to(piece_n, (B, P))], axis=1)
            scores = mx.concatenate(
                [chunk_scores(qb, summaries) + spread_term, chunk_scores(qb, open_part)], axis=-1
            )
        else:
            is_open = slot == n_closed  # the open chunk goes in the first unused slot
            starts = mx.where(is_open, open_start, starts)
            lengths = mx.where(is_open, S - open_start, mx.where(slot < n_closed, lengths, 0))
            summaries = mx.where(is_open[:, None], open_part, summaries)
            scores = chunk_scores(qb, summaries) + spread_term
        plan = select(scores, Chunks(starts, lengths, segment), config, n_queries=n_queries,
                      q_offset=q_offset, window=window)  # fmt: skip
        return plan.indices, plan.n_valid

    return fn


@lru_cache(maxsize=128)
def _compiled(fn):
    return mx.compile(fn)


def max_chunks_taken(config: DHSAConfig) -> int:
    """How many chunks one block can take at most: enough to rank only that many.

    Closed chunks are at least ``min(min_chunk, nms_window + 1)`` keys long (cuts keep
    min_chunk from segment edges and NMS keeps cuts nms_window + 1 apart); at most two chunks
    are clipped by the sink and local ranges, and the open chunk may be shorter. ``chunk_cap``
    cuts a chunk of n > cap keys into ceil(n / cap) pieces of at least ceil(cap / 2) keys.
    ``open_pieces`` cuts the open chunk into ``target_chunk``-key pieces, the last shorter.
    """
    shortest = 1 if config.boundaries == "fixed" else min(config.min_chunk, config.nms_window + 1)
    if config.chunk_cap is not None:
        shortest = min(shortest, -(-config.chunk_cap // 2))
    if config.open_pieces:  # whole open pieces are target_chunk keys (the last may be shorter)
        shortest = min(shortest, config.target_chunk)
    return config.budget // max(shortest, 1) + 3


def _best_first(key: mx.array, k: int) -> mx.array:
    """Indices of the k smallest entries of ``key`` (..., N) in ascending order (all if k >= N).

    A partition plus a sort of k entries instead of a sort of N: planning ranks a few hundred
    chunks out of thousands.
    """
    if k >= key.shape[-1]:
        return mx.argsort(key, axis=-1)
    top = mx.argpartition(key, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(top, mx.argsort(mx.take_along_axis(key, top, -1), -1), -1)


def intervals_to_indices(starts: mx.array, lengths: mx.array, K: int) -> mx.array:
    """Expand ascending, disjoint key intervals into a padded index list.

    ``key(j) = j + st_i - off_i`` for the interval i holding slot j, where off_i is the
    number of keys in earlier intervals; built with one scatter-add and one cumsum.

    Args:
        starts (mx.array): interval starts, (..., N), ascending.
        lengths (mx.array): interval lengths, (..., N), total <= K.
        K (int): slots per row.

    Returns:
        mx.array: (..., K) int32, padding slots 0.
    """
    lead = starts.shape[:-1]
    starts, lengths = starts.reshape(-1, starts.shape[-1]), lengths.reshape(-1, starts.shape[-1])
    R = starts.shape[0]
    nonempty = lengths > 0
    ends = mx.where(nonempty, starts + lengths, 0)
    prev_end = mx.concatenate([mx.zeros((R, 1), ends.dtype), mx.cummax(ends, axis=-1)[:, :-1]], 1)
    offsets = mx.cumsum(lengths, axis=-1) - lengths
    jump = mx.where(nonempty, starts - prev_end, 0).astype(mx.int32)
    slot = mx.minimum(offsets, K)  # slot K collects jumps past the budget
    delta = mx.zeros((R, K + 1), mx.int32).at[mx.arange(R)[:, None], slot].add(jump)
    keys = mx.arange(K) + mx.cumsum(delta[:, :K], axis=-1)
    keys = mx.where(mx.arange(K) < lengths.sum(-1, keepdims=True), keys, 0)
    return keys.reshape(*lead, K).astype(mx.int32)


def indices_to_mask(plan: Plan, n_queries: int, S: int) -> mx.array:
    """The plan as a dense boolean mask, for tests and the oracle only (builds L x S).

    Returns:
        mx.array: (B, L, S) bool; True where query i may attend to key k.
    """
    B, NB, K = plan.indices.shape
    blk = mx.arange(n_queries) // plan.block_size
    idx = plan.indices[:, blk]  # (B, L, K)
    valid = mx.arange(K) < plan.n_valid[:, blk][..., None]
    hit = (idx[..., None] == mx.arange(S)) & valid[..., None]  # (B, L, K, S)
    mask = hit.any(axis=2)
    return mask & key_mask(plan.q_offset, n_queries, S, plan.window)


def key_mask(q_offset: int, n_queries: int, S: int, window: int | None) -> mx.array:
    """Causal (and sliding-window) mask, (L, S) bool."""
    q = q_offset + mx.arange(n_queries)[:, None]
    k = mx.arange(S)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask
