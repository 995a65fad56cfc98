import mlx.core as mx
import numpy as np
import pytest
from conftest import small_config

from mlx_dhsa import DHSAConfig
from mlx_dhsa.chunking import chunk_boundaries, chunk_summaries, gap_scores


def _chunks_np(chunks):
    s, n = np.array(chunks.starts), np.array(chunks.lengths)
    return s, n


@pytest.mark.parametrize("S", [7, 64, 65, 200, 1000])
@pytest.mark.parametrize("method", ["shift", "fixed"])
def test_chunks_tile_the_keys(S, method):
    cfg = small_config(boundaries=method)
    keys = mx.random.normal((2, 2, S, 16))
    s, n = _chunks_np(chunk_boundaries(keys, cfg))
    for b in range(2):
        m = n[b] > 0
        starts, lens = s[b][m], n[b][m]
        assert starts[0] == 0 and (starts[1:] == (starts + lens)[:-1]).all()
        assert (starts + lens)[-1] == S
        assert lens.max() <= cfg.chunk_limit
        # No chunk crosses a segment edge.
        assert ((starts % cfg.chunk_limit) + lens <= cfg.chunk_limit).all()
        assert (np.diff(s[b]) >= 0).all()


def test_shift_boundaries_find_content_changes_and_hit_the_target_average():
    # Keys drawn around a new random direction every 24 tokens: cuts should land on those edges.
    cfg = DHSAConfig(
        block_size=64, budget=512, sink=32, local=32, target_chunk=24, min_chunk=8, chunk_cap=None
    )
    S, D, period = 768, 32, 24
    centres = mx.random.normal((S // period, 1, D)) * 4
    keys = mx.repeat(centres, period, axis=1).reshape(S, D) + mx.random.normal((S, D)) * 0.3
    s, n = _chunks_np(chunk_boundaries(keys[None, None], cfg))
    cuts = set(s[0][n[0] > 0].tolist()) - {0}
    true_edges = set(range(period, S, period))
    assert len(cuts & true_edges) >= 0.9 * len(cuts)
    assert abs(S / (len(cuts) + 1) - period) <= 3


def test_gap_scores_match_numpy():
    keys = mx.random.normal((1, 2, 40, 8))
    w = 3
    got = np.array(gap_scores(keys, w))[0]
    x = np.array(keys)[0].transpose(1, 0, 2).reshape(40, 16)
    for p in range(40):
        if w <= p <= 40 - w:
            l, r = x[p - w : p].sum(0), x[p : p + w].sum(0)
            want = 1 - l @ r / np.linalg.norm(l) / np.linalg.norm(r)
            assert abs(got[p] - want) < 1e-5
        else:
            assert got[p] == -np.inf


def test_summaries_are_mean_times_sqrt_length():
    cfg = small_config()
    keys = mx.random.normal((2, 3, 150, 8))
    chunks = chunk_boundaries(keys, cfg)
    got = np.array(chunk_summaries(keys, chunks))
    kbar = np.array(keys).mean(axis=1)  # (B, S, D)
    s, n = _chunks_np(chunks)
    for b in range(2):
        for c in range(s.shape[1]):
            want = kbar[b, s[b, c] : s[b, c] + n[b, c]].mean(0) * np.sqrt(n[b, c]) if n[b, c] else 0
            np.testing.assert_allclose(got[b, c], want, atol=1e-5)


def test_mean_summaries_are_plain_means():
    cfg = small_config(summary="mean")
    keys = mx.random.normal((1, 2, 150, 8))
    chunks = chunk_boundaries(keys, cfg)
    got = np.array(chunk_summaries(keys, chunks, summary="mean"))[0]
    kbar = np.array(keys)[0].mean(axis=0)
    s, n = _chunks_np(chunks)
    for c in range(s.shape[1]):
        if n[0, c]:
            np.testing.assert_allclose(got[c], kbar[s[0, c] : s[0, c] + n[0, c]].mean(0), atol=1e-5)


def test_chunk_cap_cuts_long_chunks_into_equal_pieces():
    # Every closed chunk of n > cap keys becomes ceil(n / cap) pieces of floor/ceil(n / m) keys,
    # starting where the uncut chunk starts; the open chunk is left whole.
    cfg = DHSAConfig(budget=512, target_chunk=16, min_chunk=4, nms_window=4, chunk_cap=None)
    keys = mx.random.normal((1, 1, 1100, 32), key=mx.random.key(3))
    whole = chunk_boundaries(keys, cfg)
    cut = chunk_boundaries(keys, cfg.replace(chunk_cap=6))
    want = []
    s, n = _chunks_np(whole)
    for start, length in zip(s[0][:-1].tolist(), n[0][:-1].tolist()):
        if length > 0:
            m = -(-length // 6)
            edges = [start + length * j // m for j in range(m + 1)]
            want += list(zip(edges[:-1], np.diff(edges).tolist()))
    want.append((int(s[0][-1]), int(n[0][-1])))
    cs, cn = _chunks_np(cut)
    got = [(a, b) for a, b in zip(cs[0].tolist(), cn[0].tolist()) if b > 0]
    assert got == want
    assert max(b for _, b in got[:-1]) <= 6 and min(b for _, b in got[:-1]) >= 3
    per_segment = cut.starts.shape[1] // (1100 // cfg.chunk_limit)
    assert per_segment >= len([b for _, b in got[:-1]]) // (1100 // cfg.chunk_limit)
