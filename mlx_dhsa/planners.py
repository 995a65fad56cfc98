"""Planners: DHSA and the baselines it is compared with, all returning a ``Plan``.

Every planner decides which keys each query block sees; attention over the plan is the same
code for all of them, so comparisons differ only in what they select (design.md section 2).
``DHSAConfig.method`` names the planner; ``sink``, ``local`` and ``budget`` apply to all.

- ``dhsa``: dynamic chunks, length-normalised summaries, block x chunk scores (the paper).
- ``block_sparse``: fixed key blocks of ``target_chunk`` keys (DHSA's average chunk length,
  so both select at the same granularity), scored with mean-pooled keys (no sqrt(n)
  normalisation). ``sink=0, local=0`` gives the variant without sinks and local window.
- ``streaming``: sinks plus the most recent keys, the whole budget (StreamingLLM).
- ``oracle``: DHSA's chunks ranked by the attention the block's queries really put on them
  per key (full causal attention, mass / length: the greedy optimum for a key budget): the
  upper bound for choosing chunks.
"""

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx

from . import kernels, refine
from .cache import ChunkTable
from .chunking import Chunks, split_open
from .config import DHSAConfig
from .plan import Plan
from .quantized import QuantizedKV
from .reference import logits, masked_softmax
from .scoring import mass_scores
from .selection import (
    block_queries,
    block_ranges,
    chunk_scores,
    key_mask,
    plan_from_intervals,
    select,
)

# Attention probabilities per oracle group of query blocks; bounds its working memory.
MAX_ORACLE_SCORES = 1 << 25

# (queries, keys, *, config, table, offset, window, scale, softcap, launch, state) -> Plan
Planner = Callable[..., Plan]


def plan_dhsa(
    queries: mx.array,
    keys: mx.array,
    *,
    config: DHSAConfig,
    table: Callable[[], ChunkTable],
    offset: int,
    window: int | None,
    scale: float,
    softcap: float | None,
    launch: kernels.PlanLaunch | None = None,
    state: kernels.KernelState | None = None,
) -> Plan:
    """DHSA (paper section 3): ``S_bc = q_b . k_c`` over dynamic chunks, best chunks first.

    Every planner takes these arguments (and uses what it needs).

    Args:
        queries (mx.array): the planned queries, (B, H, L, D), at positions ``offset..``.
        keys (mx.array): all keys, (B, H_kv, S, D).
        config (DHSAConfig): selection settings.
        table (Callable[[], ChunkTable]): makes the chunk table of ``keys`` (the layer's
            chunk state brought up to date), for the planners that use chunks.
        offset (int): position of the first query.
        window (int, optional): sliding window of the layer.
        scale (float), softcap (float or None): the model's attention math.
        launch (PlanLaunch, optional): how the planning kernels run it (None: pure MLX).
        state (KernelState, optional): the layer's kernel state.

    Returns:
        Plan: (B, ceil(L / block_size), budget) key indices.
    """
    if config.scoring != "paper":
        return plan_dhsa_mass(
            config, table(), queries, keys=keys, offset=offset, window=window, scale=scale
        )
    return kernels.run_plan(
        launch, queries, table(), config, q_offset=offset, window=window, scale=scale, state=state
    )


def plan_dhsa_mass(
    config, table, queries: mx.array, *, keys: mx.array, offset: int, window, scale: float
) -> Plan:
    """DHSA with ``scoring="softmax*"``: chunks ranked by estimated attention mass per key
    (``scoring.mass_scores``) over all ``keys``, pure MLX (the planning kernels implement
    ``"paper"`` only)."""
    chunks, _ = table.materialize()
    if config.open_pieces:
        chunks = split_open(chunks, keys.shape[2], config.target_chunk)
    scores = mass_scores(queries, keys, chunks, config, q_offset=offset, scale=scale)
    return select(scores, chunks, config, n_queries=queries.shape[2], q_offset=offset,
                  window=window)  # fmt: skip


def fixed_blocks(S: int, B: int, size: int) -> Chunks:
    """Key blocks ``[i * size, (i + 1) * size)`` covering S keys, (B, ceil(S / size)) each."""
    starts = mx.arange(0, S, size, dtype=mx.int32)
    lengths = mx.minimum(S - starts, size).astype(mx.int32)
    return Chunks(
        mx.broadcast_to(starts, (B, starts.size)), mx.broadcast_to(lengths, (B, starts.size)), size
    )


def block_means(keys: mx.array, size: int) -> mx.array:
    """Mean-pooled key blocks: ``k_c = mean_{i in c} mean_h k_i``.

    Args:
        keys (mx.array): (B, H_kv, S, D).
        size (int): keys per block (the last block may be shorter).

    Returns:
        mx.array: (B, ceil(S / size), D) float32.
    """
    B, _, S, D = keys.shape
    n = -(-S // size)
    kbar = mx.pad(keys.astype(mx.float32).mean(axis=1), [(0, 0), (0, n * size - S), (0, 0)])
    counts = mx.minimum(S - mx.arange(n) * size, size).astype(mx.float32)
    return kbar.reshape(B, n, size, D).sum(axis=2) / counts[:, None]


def plan_block_sparse(
    queries: mx.array, keys: mx.array, *, config: DHSAConfig, offset: int, window: int | None, **_
) -> Plan:
    """Block-sparse baseline: fixed ``target_chunk``-key blocks scored by ``q_b . mean(k)``.

    Arguments and result as :func:`plan_dhsa`.
    """
    B, _, S, _ = keys.shape
    size = config.target_chunk
    scores = chunk_scores(block_queries(queries, config.block_size), block_means(keys, size))
    return _select(config, scores, fixed_blocks(S, B, size), queries, offset, window)


def plan_streaming(
    queries: mx.array, keys: mx.array, *, config: DHSAConfig, offset: int, window: int | None, **_
) -> Plan:
    """StreamingLLM baseline: the first ``sink`` keys and the ``budget - sink`` most recent
    keys up to the block's last query; nothing is scored.

    Arguments and result as :func:`plan_dhsa`.
    """
    B, L = queries.shape[0], queries.shape[2]
    lo, sink_end, _, q1 = block_ranges(config, L, offset, window)
    n_sink = sink_end - lo
    recent = mx.maximum(sink_end, q1 + 1 - (config.budget - n_sink))
    starts = mx.stack([lo, recent], axis=-1)  # (NB, 2)
    lengths = mx.stack([n_sink, q1 + 1 - recent], axis=-1)
    NB = starts.shape[0]
    starts, lengths = (mx.broadcast_to(x[None], (B, NB, 2)) for x in (starts, lengths))
    return plan_from_intervals(starts, lengths, config, q_offset=offset, window=window)


def chunk_mass(
    queries: mx.array,
    keys: mx.array,
    chunks: Chunks,
    *,
    offset: int,
    window: int | None,
    block_size: int,
    scale: float,
    softcap: float | None,
) -> mx.array:
    """Attention mass each query block puts on each chunk under full causal attention.

    ``m_bc = sum_{i in b} sum_h sum_{k in c} softmax_k(s_hik)`` with the model's logits.
    Query blocks are processed in groups of at most ``MAX_ORACLE_SCORES`` probabilities.

    Args:
        queries (mx.array): (B, H, L, D) at positions ``offset..``.
        keys (mx.array): (B, H_kv, S, D).
        chunks (Chunks): (B, N_c) starts and lengths.
        offset (int), window (int or None): query position and sliding window.
        block_size (int): queries per block.
        scale (float), softcap (float or None): the model's attention math.

    Returns:
        mx.array: (B, ceil(L / block_size), N_c) float32.
    """
    B, H, L, D = queries.shape
    H_kv, S = keys.shape[1], keys.shape[2]
    NB = -(-L // block_size)
    G = max(1, MAX_ORACLE_SCORES // (B * H * block_size * S))
    k = mx.expand_dims(keys, 2)  # (B, H_kv, 1, S, D)
    ends = chunks.starts + chunks.lengths
    out = []
    for b0 in range(0, NB, G):
        i0, i1 = b0 * block_size, min((b0 + G) * block_size, L)
        q = queries[:, :, i0:i1].reshape(B, H_kv, H // H_kv, i1 - i0, D)
        mask = key_mask(offset + i0, i1 - i0, S, window)
        probs = masked_softmax(logits(q, k, scale, softcap).astype(mx.float32), mask)
        probs = probs.sum(axis=(1, 2))  # (B, n, S)
        nb = -(-(i1 - i0) // block_size)
        probs = mx.pad(probs, [(0, 0), (0, nb * block_size - (i1 - i0)), (0, 0)])
        per_key = probs.reshape(B, nb, block_size, S).sum(axis=2)  # (B, nb, S)
        csum = mx.pad(mx.cumsum(per_key, axis=-1), [(0, 0), (0, 0), (1, 0)])  # (B, nb, S + 1)
        hi = mx.take_along_axis(csum, mx.broadcast_to(ends[:, None], (B, nb, ends.shape[-1])), -1)
        lo = mx.take_along_axis(
            csum, mx.broadcast_to(chunks.starts[:, None], (B, nb, ends.shape[-1])), -1
        )
        out.append(hi - lo)
        mx.eval(out[-1])  # frees this group's probabilities before the next
    return mx.concatenate(out, axis=1) if len(out) > 1 else out[0]


def plan_oracle(
    queries: mx.array,
    keys: mx.array,
    *,
    config: DHSAConfig,
    table: Callable[[], ChunkTable],
    offset: int,
    window: int | None,
    scale: float,
    softcap: float | None,
    **_,
) -> Plan:
    """Oracle top-k: DHSA's chunks ranked by true attention mass per key, ``m_bc / n_c``
    (builds L x S in groups). Ranking by total mass instead favours long chunks that use up
    the budget, and captured less attention than fixed blocks on gemma-3-270m.

    Arguments and result as :func:`plan_dhsa`.
    """
    chunks, _ = table().materialize()
    mass = chunk_mass(
        queries,
        keys,
        chunks,
        offset=offset,
        window=window,
        block_size=config.block_size,
        scale=scale,
        softcap=softcap,
    )
    density = mass / mx.maximum(chunks.lengths, 1)[:, None].astype(mx.float32)
    return _select(config, density, chunks, queries, offset, window)


def _select(config, scores, chunks, queries, offset, window) -> Plan:
    return select(
        scores, chunks, config, n_queries=queries.shape[2], q_offset=offset, window=window
    )


PLANNERS: dict[str, Planner] = {
    "dhsa": plan_dhsa,
    "block_sparse": plan_block_sparse,
    "streaming": plan_streaming,
    "oracle": plan_oracle,
}


@lru_cache(maxsize=64)
def step_config(config: DHSAConfig, decode: bool) -> DHSAConfig:
    """The config of a call's chunk plan: a decode step (one query) scores chunks with
    ``decode_head_scores`` and no ``key_spread``; with refinement (``refine.factor``) the plan
    is widened to ``f x budget`` keys (``refine.widened``)."""
    step = config
    if decode:
        step = config.replace(head_scores=config.decode_head_scores, key_spread=0.0)
    f = refine.factor(config, decode)
    return refine.widened(step, f) if f > 1 else step


def plan(
    queries: mx.array,
    keys,
    *,
    config: DHSAConfig,
    refine_kernel: kernels.RefineKernel | None = None,
    **kwargs,
) -> Plan:
    """Dispatch to ``PLANNERS[config.method]``; arguments as :func:`plan_dhsa`.

    Quantized keys (:class:`QuantizedKV`) reach the planners that read every key
    (baselines, ``scoring="softmax*"``) dequantized; DHSA's paper scoring reads only the
    chunk table. The chunk plan runs :func:`step_config`: a decode step scores chunks with
    ``decode_head_scores``; with refinement (``decode_refine`` for a decode step,
    ``prefill_refine`` for prefill blocks, > 1) it plans ``f x budget`` keys and the best of
    them by exact logits are kept (``refine.refine_plan``; a prefill call's candidates scored
    on ``refine_kernel``, None: pure MLX). ``launch`` is how the planning kernels run that
    config (``kernels.plan_launch`` of it); both as the layer's route decides."""
    if isinstance(keys, QuantizedKV) and (config.method != "dhsa" or config.scoring != "paper"):
        keys = keys.dequantize()
    decode = queries.shape[2] == 1
    plan = PLANNERS[config.method](queries, keys, config=step_config(config, decode), **kwargs)
    if refine.factor(config, decode) == 1:
        return plan
    return refine.refine_plan(
        plan,
        queries,
        keys,
        config,
        scale=kwargs["scale"],
        softcap=kwargs["softcap"],
        kernel=refine_kernel,
    )
