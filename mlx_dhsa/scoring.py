"""Chunk scores that estimate attention mass per key (``DHSAConfig.scoring="softmax"``), pure MLX.

The paper's score ``q_b . k_c`` averages the block's queries over heads and ranks raw dot
products: heads with large logits dominate, and a chunk's mean hides its best key. Here each
representative r (one query head, mean over ``block_size / query_groups`` queries of the
block; the exact query at decode) estimates the attention it puts on every chunk with the
model's own logits against the chunk's per-KV-head mean key, normalised over the chunks it can
see:

    a_rc = n_c exp(l_rc) / sum_c' n_c' exp(l_rc'),  l_rc = scale q_r . mu_c [+ spread]

and a chunk's score is the mass per key summed over representatives, ``sum_r a_rc / n_c``,
which is what the chunk oracle ranks by (``planners.plan_oracle``). With ``spread=True`` the
logit adds ``scale^2 / 2 * sum_d q_rd^2 var_cd`` (the log-mean-exp of Gaussian logits): a
chunk whose keys vary along the query's direction may hold a key well above its mean.
Working memory is representatives x chunks, never queries x keys.
"""

import mlx.core as mx

from .chunking import Chunks, chunk_summaries
from .config import DHSAConfig
from .selection import block_queries


def chunk_moments(
    keys: mx.array, chunks: Chunks, *, spread: bool
) -> tuple[mx.array, mx.array | None]:
    """Per-KV-head mean of each chunk's keys and, with ``spread``, their per-channel variance.

    Args:
        keys (mx.array): (B, H_kv, S, D), the first at position 0.
        chunks (Chunks): (B, N_c) chunks of those keys.
        spread (bool): also return the variance.

    Returns:
        tuple: mean (B, H_kv, N_c, D) float32 and variance of the same shape (or None).
    """
    B, H_kv, S, D = keys.shape
    flat = keys.astype(mx.float32).reshape(B * H_kv, 1, S, D)
    rep = Chunks(
        mx.repeat(chunks.starts, H_kv, axis=0), mx.repeat(chunks.lengths, H_kv, axis=0),
        chunks.segment,
    )  # fmt: skip
    mean = chunk_summaries(flat, rep, summary="mean").reshape(B, H_kv, -1, D)
    if not spread:
        return mean, None
    square = chunk_summaries(flat * flat, rep, summary="mean").reshape(B, H_kv, -1, D)
    return mean, mx.maximum(square - mean * mean, 0.0)


def mass_scores(
    queries: mx.array,
    keys: mx.array,
    chunks: Chunks,
    config: DHSAConfig,
    *,
    q_offset: int,
    scale: float,
) -> mx.array:
    """Estimated attention mass per key of every chunk, per query block, (B, NB, N_c).

    Args:
        queries (mx.array): (B, H, L, D) post-RoPE, at positions ``q_offset..``.
        keys (mx.array): (B, H_kv, S, D) post-RoPE.
        chunks (Chunks): (B, N_c) chunks of the keys (zero-length entries are padding).
        config (DHSAConfig): ``block_size``, ``query_groups``, ``scoring``.
        q_offset (int): position of the first query.
        scale (float): the layer's logit scale.
    """
    B, H, L, D = queries.shape
    H_kv = keys.shape[1]
    NB = -(-L // config.block_size)
    G = config.query_groups if L > 1 else 1
    sub = -(-config.block_size // G) if L > 1 else 1
    spread = config.scoring == "softmax_spread"
    mean, var = chunk_moments(keys, chunks, spread=spread)
    # Representatives: (B, H, R, D), R = ceil(L / sub) sub-blocks of one head each.
    reps = block_queries(queries, sub, per_head=True)
    R = reps.shape[2]
    reps = reps.reshape(B, H_kv, H // H_kv, R, D)
    logits = (reps * scale) @ mx.expand_dims(mean, 2).swapaxes(-1, -2)  # (B, H_kv, rep, R, N_c)
    if var is not None:
        logits = logits + (0.5 * scale * scale) * (
            (reps * reps) @ mx.expand_dims(var, 2).swapaxes(-1, -2)
        )
    n = chunks.lengths.astype(mx.float32)  # (B, N_c)
    # A representative sees the chunks that start at or before its last query.
    last = mx.minimum((mx.arange(R) + 1) * sub, L) - 1 + q_offset  # (R,)
    seen = (chunks.starts[:, None, :] <= last[None, :, None]) & (n[:, None, :] > 0)  # (B, R, N_c)
    seen = seen[:, None, None]
    logits = mx.where(seen, logits, -mx.inf)
    logz = mx.logsumexp(logits + mx.log(mx.maximum(n, 1.0))[:, None, None, None], axis=-1,
                        keepdims=True)  # fmt: skip
    density = mx.where(seen, mx.exp(logits - logz), 0.0).sum(axis=(1, 2))  # (B, R, N_c)
    # Sum the representatives of each block.
    pad = NB * G - R
    density = mx.pad(density, [(0, 0), (0, pad), (0, 0)]) if pad > 0 else density
    return density.reshape(B, NB, G, -1).sum(axis=2)
