"""Decode refinement (``DHSAConfig.decode_refine``): exact key scores over the best chunks.

At a decode step the planner first chooses chunks for ``decode_refine x budget`` keys (the
candidates); every candidate key is then scored with the step's own query, per head, as the
probability dense attention would give it among the candidates and the forced keys (sinks
and local window), summed over heads; the best of them fill the scored part of the budget.
Chunk scores only shortlist, so a needle's keys need to rank among the top ``decode_refine``
shares of chunks instead of the top one, and the plan is chosen key by key (issue 16, long
context: docs/accuracy/issue16/long_context.md). It reads the candidates' keys, about
``decode_refine x budget`` of them, on top of the plan's. The widened plan runs on the
planning kernels where they run (``kernels.planning.max_intervals`` sizes their interval
buffer for it); the rescoring here is MLX.
"""

import mlx.core as mx

from .config import DHSAConfig
from .plan import Plan
from .reference import gather_rows, logits
from .selection import block_ranges


def widened(config: DHSAConfig) -> DHSAConfig:
    """The config whose plan gives the candidates: ``decode_refine x budget`` keys."""
    return config.replace(budget=config.budget * config.decode_refine, decode_refine=1)


def refine_plan(
    wide: Plan,
    queries: mx.array,
    keys,
    config: DHSAConfig,
    *,
    scale: float,
    softcap: float | None,
) -> Plan:
    """Keep the forced keys of ``wide`` and its ``budget - forced`` best other keys.

    Args:
        wide (Plan): the plan of one decode step under :func:`widened` ``(config)``, (B, 1, K').
        queries (mx.array): the step's query, (B, H, 1, D), at ``wide.q_offset``.
        keys (mx.array or QuantizedKV): all keys, (B, H_kv, S, D).
        config (DHSAConfig): ``budget``, ``sink``, ``local``, ``local_mode``.
        scale (float), softcap (float or None): the layer's attention math.

    Returns:
        Plan: (B, 1, budget) ascending key indices.
    """
    lo, sink_end, local_start, q1 = block_ranges(config, 1, wide.q_offset, wide.window)
    bounds = mx.concatenate([lo, sink_end, local_start, q1])
    rows = gather_rows(keys, wide.indices)[:, :, 0]  # (B, H_kv, K', D)
    indices, n_valid = _keep(
        wide.indices[:, 0], wide.n_valid[:, 0], bounds, queries, rows, config.budget, scale, softcap
    )
    return Plan(indices[:, None], n_valid[:, None], wide.q_offset, wide.block_size, wide.window)


@mx.compile
def _keep(idx, n_wide, bounds, queries, rows, K: int, scale: float, softcap: float | None):
    """Indices (B, K) and counts (B,) of the kept keys: ``refine_plan``'s choice among the
    candidate keys ``idx`` (B, K') whose rows are ``rows``; one compiled graph (the step's
    positions come in ``bounds`` = lo, sink end, local start, query; the rest is constant)."""
    B, H, _, D = queries.shape
    H_kv, Kw = rows.shape[1], idx.shape[-1]
    lo, sink_end, local_start, q1 = bounds[0], bounds[1], bounds[2], bounds[3]
    valid = mx.arange(Kw) < n_wide[:, None]
    forced = ((idx >= lo) & (idx < sink_end)) | ((idx >= local_start) & (idx <= q1))
    forced = forced & valid
    cand = valid & ~forced
    q = queries.reshape(B, H_kv, H // H_kv, 1, D)
    lg = logits(q, mx.expand_dims(rows, 2), scale, softcap).astype(mx.float32)
    lg = mx.where(valid[:, None, None, None], lg, -mx.inf)  # (B, H_kv, rep, 1, K')
    probs = mx.exp(lg - mx.logsumexp(lg, axis=-1, keepdims=True))
    score = probs.sum(axis=(1, 2, 3))  # (B, K')
    room = K - forced.sum(-1, keepdims=True)
    order = mx.argsort(mx.where(cand, -score, mx.inf), axis=-1)
    rank = mx.put_along_axis(mx.zeros_like(order), order, mx.arange(Kw, dtype=order.dtype), -1)
    keep = forced | (cand & (rank < room))
    big = mx.array(2**31 - 1, mx.int32)
    kept = mx.sort(mx.where(keep, idx, big), axis=-1)
    if Kw < K:
        kept = mx.concatenate([kept, mx.full((B, K - Kw), big, mx.int32)], axis=-1)
    kept = kept[:, :K]
    n_valid = keep.sum(-1).astype(mx.int32)
    return mx.where(mx.arange(K) < n_valid[:, None], kept, 0).astype(mx.int32), n_valid
