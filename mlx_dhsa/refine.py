"""Refinement (``decode_refine``, ``prefill_refine``): exact key scores over the best chunks.

The planner first chooses chunks for ``f x budget`` keys per query block (the candidates);
every candidate key is then scored with the block's own queries, per head, as the
probability dense attention would give it among the candidates and the forced keys (sinks
and local window), summed over heads and queries; the best of them fill the scored part of
the budget. Chunk scores only shortlist, so what a query needs has to rank among the top
``f`` shares of chunks instead of the top one, and the plan is chosen key by key (issue 16:
docs/accuracy/README.md). A decode step scores with its one query; a prefill block with every
``refine_stride``-th of its queries, counted back from its last. The widened plan runs on the
planning kernels where they run (``kernels.planning.max_intervals`` sizes their interval
buffer for it). A prefill call's candidates are scored on refine_scores.metal where the
kernels run (``kernels.refine_kernel``), else by ``reference.refine_scores``; a decode step's
by MLX here (one compiled graph over its ``f x budget`` candidate rows).
"""

import mlx.core as mx

from . import kernels, reference
from .config import DHSAConfig
from .plan import Plan
from .reference import gather_rows, logits
from .selection import block_ranges


def factor(config: DHSAConfig, decode: bool) -> int:
    """The refinement factor of a decode step or a prefill call (1: none)."""
    return config.decode_refine if decode else config.prefill_refine


def widened(config: DHSAConfig, f: int) -> DHSAConfig:
    """The config whose plan gives the candidates: ``f x budget`` keys per block."""
    return config.replace(budget=config.budget * f, decode_refine=1, prefill_refine=1)


def refine_plan(
    wide: Plan,
    queries: mx.array,
    keys,
    config: DHSAConfig,
    *,
    scale: float,
    softcap: float | None,
    kernel: kernels.RefineKernel | None = None,
) -> Plan:
    """Keep the forced keys of each block of ``wide`` and its ``budget - forced`` best others.

    Args:
        wide (Plan): the plan of these queries under :func:`widened` ``(config, f)``,
            (B, NB, K').
        queries (mx.array): the planned queries, (B, H, L, D), at ``wide.q_offset``.
        keys (mx.array or QuantizedKV): all keys, (B, H_kv, S, D).
        config (DHSAConfig): ``budget``, ``sink``, ``local``, ``local_mode``,
            ``refine_stride``.
        scale (float), softcap (float or None): the layer's attention math.
        kernel (kernels.RefineKernel, optional): the launch that scores a prefill call's
            candidates (``kernels.refine_kernel``, as the layer's route decides); None:
            ``reference.refine_scores``. A decode step scores in MLX.

    Returns:
        Plan: (B, NB, budget) ascending key indices.
    """
    L = queries.shape[2]
    lo, sink_end, local_start, q1 = block_ranges(config, L, wide.q_offset, wide.window)
    if L == 1:
        bounds = mx.concatenate([lo, sink_end, local_start, q1])
        rows = gather_rows(keys, wide.indices)[:, :, 0]  # (B, H_kv, K', D)
        indices, n_valid = _keep(wide.indices[:, 0], wide.n_valid[:, 0], bounds, queries, rows,
                                 config.budget, scale, softcap)  # fmt: skip
        return Plan(indices[:, None], n_valid[:, None], wide.q_offset, wide.block_size, wide.window)
    idx = wide.indices
    valid = mx.arange(idx.shape[-1]) < wide.n_valid[..., None]
    forced = _forced(idx, *(x[:, None] for x in (lo, sink_end, local_start, q1))) & valid
    args = (wide, queries, keys, config.refine_stride, scale, softcap)
    score = reference.refine_scores(*args) if kernel is None else kernels.run_refine(kernel, *args)
    indices, n_valid = _choose(idx, valid, forced, score, config.budget)
    return Plan(indices, n_valid, wide.q_offset, wide.block_size, wide.window)


def _forced(idx, lo, sink_end, local_start, q1):
    """Which slots hold a sink or local-window key (positions broadcast against ``idx``)."""
    return ((idx >= lo) & (idx < sink_end)) | ((idx >= local_start) & (idx <= q1))


def _choose(idx, valid, forced, score, K: int):
    """Indices (..., K) and counts (...,): the forced slots and the best-scoring others, up
    to ``K`` keys, ascending (padding slots hold 0)."""
    Kw = idx.shape[-1]
    cand = valid & ~forced
    room = K - forced.sum(-1, keepdims=True)
    order = mx.argsort(mx.where(cand, -score, mx.inf), axis=-1)
    ranks = mx.broadcast_to(mx.arange(Kw, dtype=order.dtype), order.shape)
    rank = mx.put_along_axis(mx.zeros_like(order), order, ranks, -1)
    keep = forced | (cand & (rank < room))
    big = mx.array(2**31 - 1, mx.int32)
    kept = mx.sort(mx.where(keep, idx, big), axis=-1)
    if Kw < K:
        pad = mx.full((*kept.shape[:-1], K - Kw), big, mx.int32)
        kept = mx.concatenate([kept, pad], axis=-1)
    kept = kept[..., :K]
    n_valid = keep.sum(-1).astype(mx.int32)
    return mx.where(mx.arange(K) < n_valid[..., None], kept, 0).astype(mx.int32), n_valid


@mx.compile
def _keep(idx, n_wide, bounds, queries, rows, K: int, scale: float, softcap: float | None):
    """Indices (B, K) and counts (B,) of a decode step's kept keys among the candidate keys
    ``idx`` (B, K') whose rows are ``rows``; one compiled graph (the step's positions come in
    ``bounds`` = lo, sink end, local start, query; the rest is constant)."""
    B, H, _, D = queries.shape
    H_kv = rows.shape[1]
    valid = mx.arange(idx.shape[-1]) < n_wide[:, None]
    forced = _forced(idx, bounds[0], bounds[1], bounds[2], bounds[3]) & valid
    q = queries.reshape(B, H_kv, H // H_kv, 1, D)
    lg = logits(q, mx.expand_dims(rows, 2), scale, softcap).astype(mx.float32)
    lg = mx.where(valid[:, None, None, None], lg, -mx.inf)  # (B, H_kv, rep, 1, K')
    probs = mx.exp(lg - mx.logsumexp(lg, axis=-1, keepdims=True))
    return _choose(idx, valid, forced, probs.sum(axis=(1, 2, 3)), K)
