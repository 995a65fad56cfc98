"""Dynamic key chunking (paper section "dynamic chunking"), pure MLX.

Keys are cut into variable-length chunks where their content shifts. The cut is decided per
segment of ``chunk_limit`` keys (``4 * block_size`` by default): every segment start is a
forced boundary (so no chunk exceeds ``chunk_limit``), and inside a whole segment the
``chunk_limit // target_chunk - 1`` strongest gaps, after non-maximum suppression, become
boundaries, so chunks average ``target_chunk`` keys. Keys after the last whole segment form
one open chunk until their segment fills (the paper's "not-yet-chunked recent keys"). A
segment's cuts depend on its own keys only, so chunking is identical whether keys arrive at
once, in prefill steps or one by one (decode), which the DHSA cache relies on. All shapes are
static: no host synchronisation.
"""

from dataclasses import dataclass

import mlx.core as mx

from .boundaries.predictor import load_predictor
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


def _learned_gap_logits(keys: mx.array, config: DHSAConfig) -> mx.array:
    """The boundary predictor's (B, S) gap logits (loaded once per file)."""
    predictor = load_predictor(config.predictor_path)
    if predictor.args.window > config.min_chunk:
        raise ValueError(
            f"the boundary predictor reads {predictor.args.window} keys per side, more than "
            f"min_chunk ({config.min_chunk}): segments would not chunk independently"
        )
    return predictor.gap_logits(keys)


def segment_chunks(keys: mx.array, config: DHSAConfig, *, offset: int = 0) -> Chunks:
    """Chunk whole segments of keys (the closed part of a sequence).

    Inside a segment a cut keeps ``min_chunk`` (>= ``boundary_window``) keys to the segment
    edges, so a segment's chunks depend on its own keys only: chunking segment by segment,
    as keys arrive, equals chunking everything at once. ``boundaries="learned"`` ranks gaps
    by the boundary predictor's logits above ``predictor_threshold`` instead of key shifts.

    Args:
        keys (mx.array): post-RoPE keys, (B, H_kv, n * chunk_limit, D).
        config (DHSAConfig): chunking settings.
        offset (int): absolute position of the first key (a multiple of ``chunk_limit``).

    Returns:
        Chunks: ``chunks_per_segment(config)`` entries per segment, starts absolute.
    """
    B, _, S, _ = keys.shape
    seg = config.chunk_limit
    n_seg = S // seg
    pos = mx.arange(S).reshape(n_seg, seg)
    picks_per_seg = _chunks_cut(config) - 1
    if config.boundaries == "fixed":
        step = config.target_chunk
        picks = mx.broadcast_to(
            pos[None, :, step::step][..., :picks_per_seg], (B, n_seg, picks_per_seg)
        )
    else:
        p = pos % seg
        ok = (p >= config.min_chunk) & (seg - p >= config.min_chunk)
        if config.boundaries == "learned":
            raw, threshold = _learned_gap_logits(keys, config), config.predictor_threshold
            if threshold is None:
                threshold = load_predictor(config.predictor_path).args.threshold
        else:
            raw, threshold = gap_scores(keys, config.boundary_window), config.boundary_threshold
        score = mx.where(ok.reshape(-1), raw, -mx.inf)
        score = _peaks(score, config.nms_window)
        if threshold is not None:
            score = mx.where(score > threshold, score, -mx.inf)
        score = score.reshape(B, n_seg, seg)
        order = mx.argsort(-score, axis=-1)[..., :picks_per_seg]  # strongest gaps first
        good = mx.isfinite(mx.take_along_axis(score, order, axis=-1))
        picks = mx.where(good, order, seg) + pos[:, :1]  # unused picks: empty chunks at the end
    starts = mx.concatenate([mx.broadcast_to(pos[None, :, :1], (B, n_seg, 1)), picks], axis=-1)
    starts = mx.sort(starts, axis=-1)
    seg_end = mx.broadcast_to(pos[None, :, :1] + seg, (B, n_seg, 1))
    ends = mx.concatenate([starts[..., 1:], seg_end], -1)
    if config.chunk_cap is not None:
        starts = _split_long(
            starts, ends, seg_end, seg, config.chunk_cap, chunks_per_segment(config)
        )
        ends = mx.concatenate([starts[..., 1:], seg_end], -1)
    return Chunks(
        starts=(starts + offset).reshape(B, -1).astype(mx.int32),
        lengths=(ends - starts).reshape(B, -1).astype(mx.int32),
        segment=seg,
    )


def _split_long(starts, ends, seg_end, seg: int, cap: int, slots: int) -> mx.array:
    """Starts of the pieces when every chunk ``[starts, ends)`` (B, n_seg, K) longer than
    ``cap`` keys is cut into ``ceil(n / cap)`` pieces of equal length (within one key).

    Returns (B, n_seg, slots) ascending starts; unused slots hold the segment end (empty
    pieces at the end, as unused cuts are).
    """
    n = ends - starts  # (B, n_seg, K), 0 for unused slots
    m = (n + cap - 1) // cap  # pieces per chunk
    j = mx.arange(-(-seg // cap))  # a chunk has at most seg keys
    cand = starts[..., None] + (n[..., None] * j) // mx.maximum(m[..., None], 1)
    cand = mx.where(j < m[..., None], cand, seg_end[..., None])
    B, n_seg = starts.shape[:2]
    cand = mx.sort(cand.reshape(B, n_seg, -1), axis=-1)
    if cand.shape[-1] < slots:
        pad = mx.broadcast_to(seg_end, (B, n_seg, slots - cand.shape[-1]))
        cand = mx.concatenate([cand, pad], axis=-1)
    return cand[..., :slots]


def _chunks_cut(config: DHSAConfig) -> int:
    """Chunks per closed segment before ``chunk_cap`` splits them: ``seg // target``."""
    return max(config.chunk_limit // config.target_chunk, 1)


def chunks_per_segment(config: DHSAConfig) -> int:
    """Chunk slots per closed segment: the segment start plus ``seg // target - 1`` cuts, and
    with ``chunk_cap`` room for the pieces: K chunks of n_c keys give at most
    ``sum ceil(n_c / cap) <= (seg + K (cap - 1)) / cap`` pieces."""
    k = _chunks_cut(config)
    if config.chunk_cap is None:
        return k
    cap = config.chunk_cap
    return max(k, (config.chunk_limit + k * (cap - 1)) // cap)


def open_chunk(n_closed: int, S: int, B: int, segment: int) -> Chunks:
    """The keys after the last whole segment as one chunk (the paper's not-yet-chunked tail)."""
    return Chunks(
        starts=mx.full((B, 1), n_closed, mx.int32),
        lengths=mx.full((B, 1), S - n_closed, mx.int32),
        segment=segment,
    )


def open_slots(config: DHSAConfig) -> int:
    """Chunk slots of the open part: ``ceil(chunk_limit / target_chunk)`` pieces with
    ``open_pieces`` (the open part holds fewer than ``chunk_limit`` keys), else 1."""
    return -(-config.chunk_limit // config.target_chunk) if config.open_pieces else 1


def split_open(chunks: Chunks, S: int, size: int) -> Chunks:
    """``chunks`` with its last (open) chunk ``[start, S)`` replaced by fixed pieces of
    ``size`` keys (``DHSAConfig.open_pieces``); ceil(segment / size) slots, unused ones empty."""
    start = chunks.starts[:, -1:]  # (B, 1)
    piece = start + size * mx.arange(-(-chunks.segment // size), dtype=mx.int32)
    lengths = mx.clip(S - piece, 0, size).astype(mx.int32)
    head = Chunks(chunks.starts[:, :-1], chunks.lengths[:, :-1], chunks.segment)
    return concat_chunks(head, Chunks(piece.astype(mx.int32), lengths, chunks.segment))


def concat_chunks(a: Chunks, b: Chunks) -> Chunks:
    return Chunks(
        starts=mx.concatenate([a.starts, b.starts], axis=1),
        lengths=mx.concatenate([a.lengths, b.lengths], axis=1),
        segment=a.segment,
    )


def chunk_boundaries(keys: mx.array, config: DHSAConfig) -> Chunks:
    """Cut the keys into chunks: whole segments by :func:`segment_chunks`, the rest one chunk.

    Args:
        keys (mx.array): post-RoPE keys, (B, H_kv, S, D).
        config (DHSAConfig): chunking settings.

    Returns:
        Chunks: (B, N_c) with N_c = (S // chunk_limit) * chunks_per_segment + 1, ascending.
    """
    B, _, S, _ = keys.shape
    seg = config.chunk_limit
    n_closed = S // seg * seg
    tail = open_chunk(n_closed, S, B, seg)
    if n_closed == 0:
        return tail
    return concat_chunks(segment_chunks(keys[:, :, :n_closed], config), tail)


def chunk_summaries(
    keys: mx.array, chunks: Chunks, *, offset: int = 0, summary: str = "sqrt"
) -> mx.array:
    """Length-normalised chunk summaries: ``k_c = (sum_{i in c} mean_h k_i) / sqrt(n_c)``.

    Equal to mean x sqrt(n_c) (paper, "length-normalised aggregation"). Sums are taken within
    segments, so float32 prefix sums never run longer than ``chunks.segment`` keys.

    Args:
        keys (mx.array): post-RoPE keys, (B, H_kv, S, D), the first at position ``offset``.
        chunks (Chunks): chunks inside those keys (absolute starts).
        offset (int): position of the first key, a multiple of ``chunks.segment``. Default: 0.
        summary (str): ``"sqrt"``: sum / sqrt(n_c) (paper); ``"mean"``: sum / n_c.

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
    s, n = chunks.starts - offset, chunks.lengths
    g = mx.clip(s, 0, max(S - 1, 0)) // seg  # a chunk lies inside one segment
    lo = g * (seg + 1) + (s - g * seg)
    hi = lo + n
    total = mx.take_along_axis(csum, hi[..., None], axis=1) - mx.take_along_axis(
        csum, lo[..., None], axis=1
    )
    return total / _norm(n, summary)[..., None]


def chunk_spreads(keys: mx.array, chunks: Chunks, *, offset: int = 0) -> mx.array:
    """Per-channel variance of each chunk's keys within a KV head, averaged over the heads:
    ``v_cd = mean_h (mean_{i in c} k_hid^2 - (mean_{i in c} k_hid)^2)``
    (``DHSAConfig.key_spread``). The heads' means differing from each other is no spread of
    one head's keys, so it is left out (on smollm2-135m's 3 KV heads it cost attention mass).

    Args and segments as :func:`chunk_summaries`.

    Returns:
        mx.array: (B, N_c, D) float32, >= 0; zero for zero-length chunks.
    """
    B, H_kv, S, D = keys.shape
    # Variances ignore a constant shift: centring each head's channels keeps E[k^2] - E[k]^2
    # exact in float32 for keys with large means (outlier channels).
    k = keys.astype(mx.float32)
    k = k - k.mean(axis=2, keepdims=True)
    square = chunk_summaries(k * k, chunks, offset=offset, summary="mean")  # mean_h, i k^2
    heads = Chunks(
        mx.repeat(chunks.starts, H_kv, axis=0), mx.repeat(chunks.lengths, H_kv, axis=0),
        chunks.segment,
    )  # fmt: skip
    mean = chunk_summaries(k.reshape(B * H_kv, 1, S, D), heads, offset=offset, summary="mean")
    mean_sq = (mean * mean).reshape(B, H_kv, -1, D).mean(axis=1)  # mean_h (mean_i k)^2
    return mx.maximum(square - mean_sq, 0.0)


def open_piece_summaries(keys: mx.array, size: int, slots: int, summary: str = "sqrt"):
    """Summaries of the open pieces (:func:`split_open`): ``sum_{i in p} mean_h k_i`` over
    each piece of ``size`` keys, divided as :func:`chunk_summaries` does; a direct sum (the
    planning kernels' math).

    Args:
        keys (mx.array): the open keys, (B, H_kv, n, D) with n <= slots * size.
        size (int): keys per piece (``target_chunk``).
        slots (int): pieces (:func:`open_slots`); unused ones are zero.
        summary (str): ``"sqrt"`` or ``"mean"``, as :func:`chunk_summaries`.

    Returns:
        mx.array: (B, slots, D) float32.
    """
    B, _, n, D = keys.shape
    kbar = mx.pad(keys.astype(mx.float32).mean(axis=1), [(0, 0), (0, slots * size - n), (0, 0)])
    total = kbar.reshape(B, slots, size, D).sum(axis=2)
    lengths = mx.clip(n - size * mx.arange(slots), 0, size)
    return total / _norm(lengths, summary)[:, None]


def _norm(n, summary: str):
    """The divisor of a chunk's key sum: sqrt(n) (paper) or n (plain mean)."""
    n = mx.maximum(n, 1).astype(mx.float32)
    return mx.sqrt(n) if summary == "sqrt" else n
