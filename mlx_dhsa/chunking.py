"""Dynamic key chunking (paper section "dynamic chunking"), pure MLX.

Keys are cut into variable-length chunks where their content shifts. The cut is decided per
segment of ``chunk_limit`` keys (``4 * block_size`` by default): every segment start is a
forced boundary (so no chunk exceeds ``chunk_limit``), and inside a segment of n keys the
``round(n / target_chunk) - 1`` strongest gaps, after non-maximum suppression, become
boundaries. Segment-local choice keeps the average at ``target_chunk`` and makes a boundary
depend only on nearby keys, so chunking is stable as keys arrive (chunked prefill, decode).
All shapes are static: no host synchronisation.
"""

from dataclasses import dataclass

import mlx.core as mx

from .config import DHSAConfig


@dataclass
class Chunks:
    """Chunks of the key sequence, in ascending order; zero-length entries are padding."""

    starts: mx.array  # [B, N_c] int32, ascending
    lengths: mx.array  # [B, N_c] int32, >= 0
    segment: int  # no chunk crosses a multiple of this


def gap_scores(keys: mx.array, window: int) -> mx.array:
    """Shift score of every gap: ``g_p = 1 - cos(mean k[p-w:p], mean k[p:p+w])``.

    Args:
        keys (mx.array): post-RoPE keys, (B, H_kv, S, D); heads are concatenated.
        window (int): keys averaged on each side (w).

    Returns:
        mx.array: (B, S) float32; ``g_p`` scores the gap before key p. Gaps without w keys on
        both sides (p < w or p > S - w) are ``-inf``.
    """
    B, H_kv, S, D = keys.shape
    x = keys.transpose(0, 2, 1, 3).reshape(B, S, H_kv * D).astype(mx.float32)
    if S < 2 * window:
        return mx.full((B, S), -mx.inf)
    # Windowed sums: ws[i] = sum x[i:i+w], (B, S - w + 1, C); left(p) = ws[p-w], right(p) = ws[p].
    ws = sum(x[:, j : S - window + 1 + j] for j in range(window))
    left, right = ws[:, : S - 2 * window + 1], ws[:, window:]
    dot = (left * right).sum(-1)
    norms = mx.sqrt((left * left).sum(-1) * (right * right).sum(-1))
    score = 1.0 - dot / mx.maximum(norms, 1e-12)  # gaps p = w .. S - w
    pad_lo = mx.full((B, window), -mx.inf)
    pad_hi = mx.full((B, window - 1), -mx.inf)
    return mx.concatenate([pad_lo, score, pad_hi], axis=1)


def _peaks(score: mx.array, radius: int) -> mx.array:
    """Non-maximum suppression: keep p if it beats every gap within ``radius`` (ties: lower p)."""
    if radius == 0:
        return score
    B, S = score.shape
    pad = mx.full((B, radius), -mx.inf)
    padded = mx.concatenate([pad, score, pad], axis=1)
    keep = mx.isfinite(score)
    for d in range(1, radius + 1):
        keep = keep & (score > padded[:, radius - d : radius - d + S])  # left neighbour
        keep = keep & (score >= padded[:, radius + d : radius + d + S])  # right neighbour
    return mx.where(keep, score, -mx.inf)


def chunk_boundaries(
    keys: mx.array, config: DHSAConfig, *, forced: int | None = None
) -> Chunks:
    """Cut the keys into chunks.

    Args:
        keys (mx.array): post-RoPE keys, (B, H_kv, S, D).
        config (DHSAConfig): chunking settings (``boundaries``, ``boundary_window``,
            ``nms_window``, ``min_chunk``, ``target_chunk``, ``chunk_limit``,
            ``boundary_threshold``).
        forced (int, optional): an extra boundary (the dense-tail start). Default: ``None``.

    Returns:
        Chunks: starts and lengths, (B, N_c) each, with N_c fixed by S and the config.
    """
    B, _, S, _ = keys.shape
    seg = config.chunk_limit
    n_seg = -(-S // seg)
    pos = mx.arange(n_seg * seg).reshape(n_seg, seg)
    picks_per_seg = max(seg // config.target_chunk - 1, 0)
    if config.boundaries == "fixed":
        step = config.target_chunk
        picks = pos[:, step::step]  # (n_seg, picks)
        picks = mx.broadcast_to(picks[None], (B, *picks.shape)).reshape(B, -1)
    else:
        score = _peaks(gap_scores(keys, config.boundary_window), config.nms_window)
        p = mx.arange(S)
        # A cut must leave min_chunk keys to the segment edges, the sequence ends and `forced`.
        ok = (p % seg >= config.min_chunk) & (seg - p % seg >= config.min_chunk)
        ok = ok & (S - p >= config.min_chunk)
        if forced is not None:
            ok = ok & (mx.abs(p - forced) >= config.min_chunk)
        if config.boundary_threshold is not None:
            ok = ok & (score > config.boundary_threshold)
        score = mx.where(ok, score, -mx.inf)
        score = mx.concatenate([score, mx.full((B, n_seg * seg - S), -mx.inf)], axis=1)
        score = score.reshape(B, n_seg, seg)
        # Per segment, the strongest picks_per_seg gaps (the last, partial segment takes fewer).
        seg_len = mx.minimum(S - pos[:, 0], seg)  # (n_seg,)
        want = mx.maximum(mx.round(seg_len / config.target_chunk).astype(mx.int32) - 1, 0)
        order = mx.argsort(-score, axis=-1)[..., :picks_per_seg]  # (B, n_seg, picks)
        top = mx.take_along_axis(score, order, axis=-1)
        rank = mx.arange(picks_per_seg)
        good = mx.isfinite(top) & (rank < want[:, None])
        picks = mx.where(good, order + pos[:, :1], S).reshape(B, -1)
    starts = [mx.broadcast_to(pos[:, 0][None], (B, n_seg)), picks.astype(mx.int32)]
    if forced is not None and 0 < forced < S:
        starts.append(mx.full((B, 1), forced, mx.int32))
    starts = mx.sort(mx.minimum(mx.concatenate(starts, axis=1), S), axis=1).astype(mx.int32)
    ends = mx.concatenate([starts[:, 1:], mx.full((B, 1), S, mx.int32)], axis=1)
    return Chunks(starts=starts, lengths=ends - starts, segment=seg)


def chunk_summaries(keys: mx.array, chunks: Chunks) -> mx.array:
    """Length-normalised chunk summaries: ``k_c = (sum_{i in c} mean_h k_i) / sqrt(n_c)``.

    Equal to mean x sqrt(n_c) (paper, "length-normalised aggregation"). Sums are taken within
    segments, so float32 prefix sums never run longer than ``chunks.segment`` keys.

    Args:
        keys (mx.array): post-RoPE keys, (B, H_kv, S, D).
        chunks (Chunks): the chunking of those keys.

    Returns:
        mx.array: (B, N_c, D) float32; zero for zero-length chunks.
    """
    B, H_kv, S, D = keys.shape
    seg = chunks.segment
    n_seg = -(-S // seg)
    kbar = keys.astype(mx.float32).mean(axis=1)  # (B, S, D)
    kbar = mx.pad(kbar, [(0, 0), (0, n_seg * seg - S), (0, 0)])
    csum = mx.cumsum(kbar.reshape(B, n_seg, seg, D), axis=2)
    csum = mx.pad(csum, [(0, 0), (0, 0), (1, 0), (0, 0)]).reshape(B, -1, D)  # (B, n_seg*(seg+1), D)
    s, n = chunks.starts, chunks.lengths
    g = mx.minimum(s, S - 1) // seg  # a chunk lies inside one segment
    lo = g * (seg + 1) + (s - g * seg)
    hi = lo + n
    total = mx.take_along_axis(csum, hi[..., None], axis=1) - mx.take_along_axis(
        csum, lo[..., None], axis=1
    )
    return total / mx.sqrt(mx.maximum(n, 1).astype(mx.float32))[..., None]
