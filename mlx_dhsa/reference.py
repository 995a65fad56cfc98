"""Pure-MLX attention: the CPU path and the oracle every kernel is tested against.

The math is mlx-lm's Gemma2 attention, written once: queries scaled by ``scale``
(query_pre_attn_scalar^-0.5), logits soft-capped as ``c * tanh(s / c)``, a precise softmax,
GQA through the ``(B, H_kv, repeats, L, D)`` reshape (K/V are never repeated).

Keys and values may come quantized (:class:`~mlx_dhsa.quantized.QuantizedKV`, mlx-lm's
``QuantizedKVCache``): dense attention then multiplies with ``mx.quantized_matmul`` as mlx-lm's
``quantized_scaled_dot_product_attention`` does (plus the soft cap), and sparse attention gathers
the planned rows of packed words, scales and biases and dequantizes only that block.
"""

import mlx.core as mx

from .plan import Plan
from .quantized import QuantizedKV

# Scores per group of query blocks in sparse_attention; bounds its working memory.
MAX_GROUP_SCORES = 1 << 24
# Probabilities held at once while refine_scores scores a call's candidates (groups of blocks).
MAX_REFINE_SCORES = 1 << 25


def logits(q: mx.array, k: mx.array, scale: float, softcap: float | None) -> mx.array:
    """Gemma2's attention logits ``c * tanh(scale * q.k / c)`` (no cap: ``scale * q.k``)."""
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    return scores


def _qk(q: mx.array, k, scale: float, softcap: float | None) -> mx.array:
    """:func:`logits` of q (B, H_kv, R, L, D) over k (B, H_kv, S, D), which may be quantized;
    k gains the repeats axis here."""
    if not isinstance(k, QuantizedKV):
        return logits(q, mx.expand_dims(k, 2), scale, softcap)
    k = k.map(lambda x: mx.expand_dims(x, 2))
    scores = mx.quantized_matmul(
        q * scale, *k.triple(), transpose=True, group_size=k.group_size, bits=k.bits
    )
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    return scores


def _pv(probs: mx.array, v) -> mx.array:
    """``probs @ v`` for values (B, H_kv, S, D) that may be quantized (as in :func:`_qk`)."""
    if not isinstance(v, QuantizedKV):
        return probs @ mx.expand_dims(v, 2)
    v = v.map(lambda x: mx.expand_dims(x, 2))
    return mx.quantized_matmul(
        probs, *v.triple(), transpose=False, group_size=v.group_size, bits=v.bits
    )


def masked_softmax(scores: mx.array, mask: mx.array | None) -> mx.array:
    """A precise softmax over the last axis; False entries of ``mask`` get no weight."""
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    return mx.softmax(scores, axis=-1, precise=True)


def dense_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    softcap: float | None = None,
    mask: mx.array | None = None,
) -> mx.array:
    """Dense attention with Gemma2's math: ``softmax(c * tanh(scale * q.k / c)) v``.

    Args:
        q (mx.array): queries, (B, H, L, D).
        k (mx.array or QuantizedKV): keys, (B, H_kv, S, D); H must be a multiple of H_kv.
        v (mx.array or QuantizedKV): values, (B, H_kv, S, D).
        scale (float): query scale.
        softcap (float, optional): logit soft cap c; ``None`` = no cap. Default: ``None``.
        mask (mx.array, optional): bool, broadcastable to (B, H, L, S) or given as (L, S) /
            (B, 1, L, S) as mlx-lm builds it; False entries are excluded. Default: ``None``.

    Returns:
        mx.array: (B, H, L, D). A row with every key masked gets the mean of the values.
    """
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    q = q.reshape(B, H_kv, H // H_kv, L, D)
    if mask is not None and mask.ndim == 4:
        mask = mx.expand_dims(mask, 2)  # (B, 1, 1, L, S) against (B, H_kv, R, L, S)
    scores = _qk(q, k, scale, softcap)
    out = _pv(masked_softmax(scores, mask), v)
    return out.reshape(B, H, L, D)


def gather_rows(x, idx: mx.array) -> mx.array:
    """Rows of x (B, H_kv, S, D) at idx (B, G, K) -> (B, H_kv, G, K, D); quantized rows are
    gathered packed and only they are dequantized."""
    if isinstance(x, QuantizedKV):
        return x.map(lambda a: gather_rows(a, idx)).dequantize()
    B, H_kv, S, D = x.shape
    _, G, K = idx.shape
    # Index arrays on B, H_kv and S (not take_along_axis, many times slower on CPU), over
    # any strides: a cache's keys are a view of a longer buffer.
    rows = x[mx.arange(B)[:, None, None], mx.arange(H_kv)[None, :, None], idx.reshape(B, 1, -1)]
    return rows.reshape(B, H_kv, G, K, D)


def sparse_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    plan: Plan,
    *,
    scale: float,
    softcap: float | None = None,
) -> mx.array:
    """Attention of every query over its block's planned keys (paper section 3, step 5).

    Query i (position ``plan.q_offset + i``) attends to the valid slots of its block that are
    causal and inside the window, with the math of :func:`dense_attention`. Blocks are
    processed in groups whose scores hold at most ``MAX_GROUP_SCORES`` entries, so memory
    grows like L x budget, never L x S.

    Args:
        q (mx.array): queries, (B, H, L, D).
        k (mx.array or QuantizedKV): keys, (B, H_kv, S, D).
        v (mx.array or QuantizedKV): values, (B, H_kv, S, D).
        plan (Plan): key indices per query block, (B, ceil(L / block_size), K).
        scale (float): query scale.
        softcap (float, optional): logit soft cap. Default: ``None``.

    Returns:
        mx.array: (B, H, L, D); a query with no allowed key gets zeros.
    """
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    NB, K = plan.indices.shape[1], plan.budget
    Bq = plan.block_size if NB > 1 else L  # one block (e.g. decode): no padding rows
    G = max(1, MAX_GROUP_SCORES // (B * H * Bq * K))
    outs = []
    for b0 in range(0, NB, G):
        b1 = min(b0 + G, NB)
        n = min(b1 * Bq, L) - b0 * Bq
        qg = q[:, :, b0 * Bq : b0 * Bq + n]
        qg = mx.pad(qg, [(0, 0), (0, 0), (0, (b1 - b0) * Bq - n), (0, 0)])
        qg = qg.reshape(B, H_kv, H // H_kv, b1 - b0, Bq, D)
        idx = plan.indices[:, b0:b1]  # (B, G, K)
        kg = mx.expand_dims(gather_rows(k, idx), 2)  # (B, H_kv, 1, G, K, D)
        vg = mx.expand_dims(gather_rows(v, idx), 2)
        pos = plan.q_offset + b0 * Bq + mx.arange((b1 - b0) * Bq).reshape(b1 - b0, Bq, 1)
        keys = idx[:, :, None, :]  # (B, G, 1, K)
        mask = (mx.arange(K) < plan.n_valid[:, b0:b1, None, None]) & (keys <= pos)
        if plan.window is not None:
            mask = mask & (keys > pos - plan.window)
        mask = mask[:, None, None]  # (B, 1, 1, G, Bq, K)
        scores = logits(qg, kg, scale, softcap)
        out = masked_softmax(scores, mask) @ vg
        out = out * mask.any(axis=-1, keepdims=True).astype(out.dtype)
        outs.append(out.reshape(B, H, (b1 - b0) * Bq, D)[:, :, :n])
    return mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]


def refine_scores(wide: Plan, queries, keys, stride: int, scale, softcap) -> mx.array:
    """The scores of prefill refinement (``mlx_dhsa.refine``; kernel: refine_scores.metal).

    Args:
        wide (Plan): the widened plan of ``queries``, (B, NB, K') candidate keys a block.
        queries (mx.array): (B, H, L, D) at ``wide.q_offset``.
        keys (mx.array or QuantizedKV): all keys, (B, H_kv, S, D).
        stride (int): every ``stride``-th query of a block scores, counted back from its last
            (a short last block has one).
        scale (float), softcap (float or None): the model's attention math.

    Returns:
        mx.array: (B, NB, K') float32: per block and slot, the probability each scoring
        query gives the slot's key among the block's valid, causal (and in-window) slots,
        summed over those queries and the heads. Blocks are scored in groups of at most
        ``MAX_REFINE_SCORES`` probabilities.
    """
    B, H, L, D = queries.shape
    bs, (NB, Kw), H_kv = wide.block_size, wide.indices.shape[1:], keys.shape[1]
    n_block = mx.minimum(L - mx.arange(NB) * bs, bs)  # queries of each block
    rel = n_block[:, None] - 1 - mx.arange(-(-bs // stride)) * stride  # (NB, m)
    live = rel >= 0
    rel = mx.maximum(rel, 0)
    q = mx.pad(queries, [(0, 0), (0, 0), (0, NB * bs - L), (0, 0)])
    q = q.reshape(B, H_kv, H // H_kv, NB, bs, D)
    q = mx.take_along_axis(q, rel[None, None, None, :, :, None], axis=4)  # (..., NB, m, D)
    pos = wide.q_offset + mx.arange(NB)[:, None] * bs + rel
    window = mx.array(wide.window if wide.window is not None else 2**30, mx.int32)
    valid = mx.arange(Kw) < wide.n_valid[..., None]
    group = max(1, MAX_REFINE_SCORES // (B * H * pos.shape[1] * Kw))
    out = []
    for b0 in range(0, NB, group):
        b1 = min(b0 + group, NB)
        rows = gather_rows(keys, wide.indices[:, b0:b1])  # (B, H_kv, g, K', D)
        out.append(_group_scores(q[:, :, :, b0:b1], rows, wide.indices[:, b0:b1], valid[:, b0:b1],
                                 pos[b0:b1], live[b0:b1], window, scale, softcap))  # fmt: skip
        if NB > group:
            mx.eval(out[-1])  # frees this group's probabilities before the next
    return mx.concatenate(out, axis=1) if len(out) > 1 else out[0]


@mx.compile
def _group_scores(q, rows, idx, valid, pos, live, window, scale: float, softcap: float | None):
    """:func:`refine_scores` of a group of g blocks: q (B, H_kv, R, g, m, D), rows
    (B, H_kv, g, K', D), idx / valid (B, g, K'), pos / live (g, m); one compiled graph."""
    idx, p = idx[:, :, None], pos[:, :, None]  # (B, g, 1, K'), (g, m, 1)
    # A padded query (not live) sees every slot and is dropped from the sum: no empty rows.
    ok = (valid[:, :, None] & (idx <= p) & (idx > p - window)) | ~live[:, :, None]
    lg = logits(q, mx.expand_dims(rows, 2), scale, softcap).astype(mx.float32)
    lg = mx.where(ok[:, None, None], lg, -mx.inf)
    probs = mx.softmax(lg, axis=-1)  # (B, H_kv, R, g, m, K')
    # A live query that sees no slot (none in a real plan: the local window is forced) gives
    # nothing, as in the kernel, instead of the NaN of an empty softmax.
    seen = live[:, :, None] & ok.any(axis=-1, keepdims=True)  # (B, g, m, 1)
    return mx.where(seen[:, None, None], probs, 0).sum(axis=(1, 2, 4))
