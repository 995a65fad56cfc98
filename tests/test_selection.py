import mlx.core as mx
import numpy as np
from conftest import small_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dhsa import DHSACache, selection
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.chunking import Chunks, chunk_boundaries
from mlx_dhsa.selection import block_queries, chunk_scores, intervals_to_indices, select


def _plan(S, n_queries, cfg, window, seed, B=1):
    """A plan for the last n_queries of S keys, with random chunk scores."""
    mx.random.seed(seed)
    keys = mx.random.normal((B, 2, S, 8))
    offset = S - n_queries
    chunks = chunk_boundaries(keys, cfg)
    NB = -(-n_queries // cfg.block_size)
    scores = mx.random.normal((B, NB, chunks.starts.shape[1]))
    return select(scores, chunks, cfg, n_queries=n_queries, q_offset=offset, window=window), chunks


@settings(max_examples=250, deadline=None)
@given(
    S=st.integers(1, 400),
    frac=st.floats(0.0, 1.0),
    budget=st.sampled_from([28, 33, 48, 100]),
    block=st.sampled_from([4, 7, 16]),
    sink=st.integers(0, 8),
    local=st.integers(0, 8),
    window=st.sampled_from([None, 5, 40, 130]),
    seed=st.integers(0, 2**16),
)
def test_selection_invariants(S, frac, budget, block, sink, local, window, seed):
    cfg = small_config(
        budget=max(budget, sink + local + block), block_size=block, sink=sink, local=local
    )
    n_queries = max(1, int(frac * S))
    plan, _ = _plan(S, n_queries, cfg, window, seed)
    idx, n_valid = np.array(plan.indices)[0], np.array(plan.n_valid)[0]
    offset = S - n_queries
    for b in range(idx.shape[0]):
        q0 = offset + b * block
        q1 = min(q0 + block, S) - 1
        lo = max(0, q0 - window + 1) if window else 0
        chosen = idx[b, : n_valid[b]]
        cand = q1 - lo + 1
        assert n_valid[b] == min(cfg.budget, cand)  # exactly min(budget, candidates)
        assert len(set(chosen.tolist())) == len(chosen)  # no duplicates
        assert (np.diff(chosen) > 0).all()  # ascending
        assert (chosen >= lo).all() and (chosen <= q1).all()  # in range, causal, window
        assert (idx[b, n_valid[b] :] == 0).all()  # padding
        must = set(range(lo, min(sink, q1 + 1))) | set(range(max(lo, q0 - local), q1 + 1))
        assert must <= set(chosen.tolist())  # sinks, local window and the block itself


def test_top_chunks_win_and_the_last_is_cut():
    cfg = small_config(budget=28, block_size=4, sink=4, local=4)
    starts = mx.array([[0, 10, 20, 30, 40, 50]], mx.int32)
    chunks = Chunks(starts=starts, lengths=mx.full((1, 6), 10, mx.int32), segment=64)
    scores = mx.array([[[0.0, 5.0, 1.0, 9.0, -1.0, 0.0]]])  # one block: queries 56..59
    plan = select(scores, chunks, cfg, n_queries=4, q_offset=56)
    got = np.array(plan.indices)[0, 0, : int(plan.n_valid[0, 0])].tolist()
    # sinks 0-3, local 52-59 (4 before the block + block), room 28 - 4 - 8 = 16:
    # chunk 30-39 (score 9) whole, then chunk 10-19 (score 5) cut to its first 6 keys.
    assert got == [0, 1, 2, 3, *range(10, 16), *range(30, 40), *range(52, 60)]


def test_batch_rows_plan_independently():
    cfg = small_config()
    keys = mx.random.normal((2, 2, 300, 8))
    chunks = chunk_boundaries(keys, cfg)
    scores = mx.random.normal((2, 16, chunks.starts.shape[1]))
    both = select(scores, chunks, cfg, n_queries=250, q_offset=50)
    for b in range(2):
        row = Chunks(chunks.starts[b : b + 1], chunks.lengths[b : b + 1], chunks.segment)
        one = select(scores[b : b + 1], row, cfg, n_queries=250, q_offset=50)
        assert mx.array_equal(both.indices[b], one.indices[0])
    assert not mx.array_equal(both.indices[0], both.indices[1])


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8),
    K=st.integers(1, 40),
    gap=st.integers(0, 3),
)
def test_intervals_to_indices_matches_python(lengths, K, gap):
    starts, pos = [], 0
    for n in lengths:
        pos += gap
        starts.append(pos)
        pos += n
    if sum(lengths) > K:
        K = sum(lengths)
    got = np.array(intervals_to_indices(mx.array([starts]), mx.array([lengths]), K))[0]
    want = [s + j for s, n in zip(starts, lengths) for j in range(n)]
    assert got[: len(want)].tolist() == want and (got[len(want) :] == 0).all()


def test_block_queries_average_ragged_blocks():
    q = mx.random.normal((1, 2, 10, 4))
    got = np.array(block_queries(q, 4))[0]
    qn = np.array(q)[0].mean(0)
    np.testing.assert_allclose(got, [qn[0:4].mean(0), qn[4:8].mean(0), qn[8:10].mean(0)], atol=1e-6)


def test_per_head_scores_are_the_best_heads():
    q, summaries = mx.random.normal((1, 3, 20, 4)), mx.random.normal((1, 5, 4))
    got = np.array(chunk_scores(block_queries(q, 8, per_head=True), summaries))[0]  # (NB, N_c)
    qn, kn = np.array(q)[0], np.array(summaries)[0]
    for b, (i0, i1) in enumerate([(0, 8), (8, 16), (16, 20)]):
        want = (qn[:, i0:i1].mean(1) @ kn.T).max(0)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


def test_ranking_only_the_chunks_a_block_can_take_changes_nothing(monkeypatch):
    # select() partitions out the few chunks a block can take before sorting; a full sort
    # must give the same plan.
    cfg = small_config(budget=40, block_size=8, sink=4, local=4, target_chunk=4, min_chunk=2)
    keys = mx.random.normal((1, 2, 1500, 8))
    chunks = chunk_boundaries(keys, cfg)
    scores = mx.random.normal((1, 40, chunks.starts.shape[1]))
    assert chunks.starts.shape[1] > 4 * selection.max_chunks_taken(cfg)  # partition path
    fast = select(scores, chunks, cfg, n_queries=320, q_offset=1180)
    monkeypatch.setattr(selection, "max_chunks_taken", lambda config: 1 << 30)
    full = select(scores, chunks, cfg, n_queries=320, q_offset=1180)
    assert mx.array_equal(fast.indices, full.indices) and mx.array_equal(fast.n_valid, full.n_valid)


def _spread_layer(key_spread: float, **overrides):
    cfg = small_config(key_spread=key_spread, summary="mean", **overrides)
    attn = DHSAAttention(cfg, n_heads=2, n_kv_heads=1, head_dim=8, scale=0.5, softcap=None)
    return cfg, attn, DHSACache()


def test_key_spread_adds_the_chunks_spread_term_to_their_scores():
    """select_chunks with key_spread plans from q_b . k_c + key_spread * scale / 2 *
    q_b^2 . v_c over the closed chunks (the open chunk adds nothing): the plan of select()
    over those scores, computed here in numpy."""
    mx.random.seed(5)
    cfg, attn, cache = _spread_layer(1.5)
    S, L = 3 * cfg.chunk_limit + 20, 40
    keys = mx.random.normal((1, 1, S, 8))
    q = mx.random.normal((1, 2, L, 8))
    table = attn.chunk_view(keys, cache)
    got = selection.select_chunks(q, table, cfg, q_offset=S - L, scale=0.5)
    chunks, means = table.materialize()
    n = table.n_closed
    qb = np.array(block_queries(q, cfg.block_size))[0]  # (NB, D)
    spreads = np.array(table.spreads[0, :n].astype(mx.float32))
    scores = qb @ np.array(means[0]).T
    scores[:, :n] += 1.5 * 0.5 / 2 * (qb * qb) @ spreads.T
    want = select(mx.array(scores)[None], chunks, cfg, n_queries=L, q_offset=S - L)
    assert mx.array_equal(got.indices, want.indices) and mx.array_equal(got.n_valid, want.n_valid)
    # The term changes this plan, and key_spread 0 is the paper's score.
    plain = selection.select_chunks(q, table, cfg.replace(key_spread=0.0), q_offset=S - L,
                                    scale=0.5)  # fmt: skip
    want0 = select(mx.array(qb @ np.array(means[0]).T)[None], chunks, cfg, n_queries=L,
                   q_offset=S - L)  # fmt: skip
    assert mx.array_equal(plain.indices, want0.indices)
    assert not mx.array_equal(plain.indices, got.indices)


def test_key_spread_takes_the_chunk_that_hides_a_key_along_the_query():
    """Two chunks with the same mean: one's keys all equal it, the other's alternate +-x
    along the query. The paper's score ties them; with key_spread the spread one ranks first
    (the one that holds the key the query attends to most)."""
    # 8-key chunks at multiples of 8; room for one chunk besides the forced keys (4 + 8 + 16).
    cfg, attn, cache = _spread_layer(1.0, boundaries="fixed", budget=36)
    S = cfg.chunk_limit + 256
    keys = 0.01 * mx.random.normal((1, 1, S, 8))
    direction = mx.zeros((8,)).at[0].add(1.0)
    keys[0, 0, 104:112] = 0.5 * direction  # flat chunk
    keys[0, 0, 200:208] = 0.5 * direction + mx.array([1.0, -1.0] * 4)[:, None] * 3 * direction
    q = mx.broadcast_to(direction, (1, 2, 1, 8)) * 4.0
    q = mx.concatenate([q] * cfg.block_size, axis=2)
    table = attn.chunk_view(keys, cache)
    starts = table.starts[0, : table.n_closed].tolist()
    assert {104, 112, 200, 208} <= set(starts)  # whole chunks
    off = S - cfg.block_size
    spread = selection.select_chunks(q, table, cfg, q_offset=off, scale=0.5)
    plain = selection.select_chunks(q, table, cfg.replace(key_spread=0.0), q_offset=off, scale=0.5)
    kept = set(spread.indices[0, 0, : spread.n_valid[0, 0].item()].tolist())
    assert set(range(200, 208)) <= kept and not set(range(104, 112)) & kept
    kept0 = set(plain.indices[0, 0, : plain.n_valid[0, 0].item()].tolist())
    assert set(range(104, 112)) <= kept0 or set(range(200, 208)) <= kept0  # a tie
