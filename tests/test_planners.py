import mlx.core as mx
import numpy as np
import pytest
from conftest import make_qkv, small_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dhsa import DHSAConfig, reference
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.chunking import (
    chunk_boundaries,
    chunk_summaries,
    chunks_per_segment,
    open_slots,
    split_open,
)
from mlx_dhsa.config import METHODS
from mlx_dhsa.planners import PLANNERS, block_means, chunk_mass, fixed_blocks
from mlx_dhsa.selection import (
    block_queries,
    chunk_scores,
    indices_to_mask,
    key_mask,
    select,
)


def _attn(config):
    return DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=16, scale=0.25, softcap=None)


def _run(method, config, q, k, *, offset, window=None):
    """PLANNERS[method] as a layer calls it (a chunk table of ``k`` on demand)."""
    attn = _attn(config)
    return PLANNERS[method](
        q,
        k,
        config=config,
        table=lambda: attn.chunk_view(k),
        offset=offset,
        window=window,
        scale=attn.scale,
        softcap=None,
    )


def _plan(method, S, n_queries, window=None, seed=0, **overrides):
    config = small_config(method=method, **overrides)
    q, k, _ = make_qkv(H=4, H_kv=2, L=n_queries, S=S, D=16)
    plan = _run(method, config, q, k, offset=S - n_queries, window=window)
    return plan, config, q, k


def _sets(plan):
    idx, n = np.array(plan.indices)[0], np.array(plan.n_valid)[0]
    return [idx[b, : n[b]] for b in range(idx.shape[0])], idx, n


def test_every_method_is_a_planner_and_a_config_value():
    assert tuple(PLANNERS) == METHODS  # config validates names without importing planners
    for name in PLANNERS:
        assert DHSAConfig(method=name).method == name
    with pytest.raises(ValueError, match="method must be one of"):
        DHSAConfig(method="bogus")


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(sorted(PLANNERS)),
    S=st.integers(1, 200),
    frac=st.floats(0.0, 1.0),
    sink=st.integers(0, 8),
    local=st.integers(0, 8),
    window=st.sampled_from([None, 5, 40]),
    seed=st.integers(0, 2**16),
)
def test_plan_invariants(method, S, frac, sink, local, window, seed):
    mx.random.seed(seed)
    n_queries = max(1, int(frac * S))
    plan, config, _, _ = _plan(method, S, n_queries, window, sink=sink, local=local)
    chosen, idx, n_valid = _sets(plan)
    assert plan.indices.dtype == mx.int32 and idx.shape[-1] == config.budget
    offset = S - n_queries
    for b, keys in enumerate(chosen):
        q0 = offset + b * config.block_size
        q1 = min(q0 + config.block_size, S) - 1
        lo = max(0, q0 - window + 1) if window else 0
        assert n_valid[b] == min(config.budget, q1 - lo + 1)  # the budget is always filled
        assert (np.diff(keys) > 0).all() and (keys >= lo).all() and (keys <= q1).all()
        assert (idx[b, n_valid[b] :] == 0).all()
        must = set(range(lo, min(sink, q1 + 1))) | set(range(max(lo, q0 - local), q1 + 1))
        assert must <= set(keys.tolist())  # sinks, local window and the block itself


def test_streaming_is_sinks_plus_most_recent():
    plan, config, _, _ = _plan("streaming", S=200, n_queries=64)
    chosen, _, _ = _sets(plan)
    for b, keys in enumerate(chosen):
        q1 = 200 - 64 + (b + 1) * config.block_size - 1
        recent = config.budget - config.sink
        expected = list(range(config.sink)) + list(range(q1 + 1 - recent, q1 + 1))
        assert keys.tolist() == expected


def test_fixed_blocks_and_mean_pooling():
    chunks = fixed_blocks(S=20, B=2, size=8)
    assert np.array(chunks.starts).tolist() == [[0, 8, 16]] * 2
    assert np.array(chunks.lengths).tolist() == [[8, 8, 4]] * 2
    keys = mx.random.normal((1, 2, 20, 4))
    means = np.array(block_means(keys, 8))[0]
    kbar = np.array(keys).mean(axis=1)[0]
    expected = [kbar[0:8].mean(0), kbar[8:16].mean(0), kbar[16:20].mean(0)]
    np.testing.assert_allclose(means, np.stack(expected), rtol=1e-5, atol=1e-6)


def test_block_sparse_selects_whole_fixed_blocks_best_first():
    # Keys 40..47 (block 5 of size 8) point along the queries; every other key is noise.
    S, D = 128, 16
    config = small_config(method="block_sparse", budget=36, block_size=16, sink=4, local=8)
    q = mx.ones((1, 4, 16, D))
    k = 0.01 * mx.random.normal((1, 2, S, D))
    k[:, :, 40:48] = 1.0
    plan = _run("block_sparse", config, q, k, offset=S - 16)
    keys = set(np.array(plan.indices)[0, 0, : np.array(plan.n_valid)[0, 0]].tolist())
    assert set(range(40, 48)) <= keys
    middle = sorted(keys - set(range(4)) - set(range(S - 16 - 8, S)))
    # 36 - 4 sinks - 24 local/own = 8 free slots: exactly one whole block.
    assert middle == list(range(40, 48))


def test_oracle_mass_sums_to_queries_times_heads():
    S, L = 96, 40
    config = small_config(method="oracle")
    q, k, _ = make_qkv(H=4, H_kv=2, L=L, S=S, D=16)
    chunks, _ = _attn(config).chunk_view(k).materialize()
    mass = chunk_mass(q, k, chunks, offset=S - L, window=None, block_size=16, scale=0.25,
                      softcap=None)  # fmt: skip
    per_block = [16 * 4, 16 * 4, 8 * 4]
    np.testing.assert_allclose(np.array(mass.sum(-1))[0], per_block, rtol=1e-4)


def test_oracle_mass_matches_dense_probabilities():
    S, L = 64, 32
    q, k, _ = make_qkv(H=4, H_kv=2, L=L, S=S, D=16)
    chunks = fixed_blocks(S, 1, 8)
    mass = chunk_mass(q, k, chunks, offset=S - L, window=24, block_size=16, scale=0.25,
                      softcap=5.0)  # fmt: skip
    scores = (np.array(q) * 0.25) @ np.repeat(np.array(k), 2, axis=1).swapaxes(-1, -2)
    scores = 5.0 * np.tanh(scores / 5.0)
    scores = np.where(np.array(key_mask(S - L, L, S, 24)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).sum(1)[0]  # (L, S)
    expected = p.reshape(2, 16, S).sum(1).reshape(2, 8, 8).sum(-1)
    np.testing.assert_allclose(np.array(mass)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", sorted(PLANNERS))
def test_full_budget_plan_is_dense(method):
    # budget >= S: every planner keeps all causal keys, so sparse attention equals dense.
    S, L = 80, 48
    plan, config, q, k = _plan(method, S, L, budget=96)
    v = mx.random.normal(k.shape)
    mask = indices_to_mask(plan, L, S)
    assert mx.array_equal(mask[0], key_mask(S - L, L, S, None)).item()
    out = reference.sparse_attention(q, k, v, plan, scale=0.25)
    dense = reference.dense_attention(q, k, v, scale=0.25, mask=key_mask(S - L, L, S, None))
    assert mx.allclose(out, dense, atol=1e-5).item()


def test_oracle_finds_the_planted_chunk_that_dhsa_scores_cannot_miss():
    # One chunk of keys aligned with every query carries nearly all attention mass.
    S, D = 160, 16
    q = mx.ones((1, 4, 16, D))
    k = 0.01 * mx.random.normal((1, 2, S, D))
    k[:, :, 64:72] = 2.0
    config = small_config(method="oracle", budget=32, block_size=16, sink=4, local=4)
    plan = _run("oracle", config, q, k, offset=S - 16)
    keys = set(np.array(plan.indices)[0, 0, : np.array(plan.n_valid)[0, 0]].tolist())
    assert set(range(64, 72)) <= keys


def test_open_pieces_split_the_open_chunk():
    """open_pieces: the open chunk becomes fixed target_chunk-key pieces tiling it, in
    open_slots slots; their summaries from the chunk table (ChunkTable.open_pieces, the
    direct sums the planning kernels take) equal chunk_summaries over those pieces; the plan
    keeps the budget, and the planning kernels take the config."""
    from mlx_dhsa.kernels.planning import _config_ok, open_layout

    config = small_config(open_pieces=True, summary="sqrt")
    q, k, _ = make_qkv(B=1, H=4, H_kv=2, L=1, S=2 * config.chunk_limit + 45, D=16)
    S = k.shape[2]
    chunks = split_open(chunk_boundaries(k, config), S, config.target_chunk)
    s, n = np.array(chunks.starts[0]), np.array(chunks.lengths[0])
    assert len(s) - 2 * chunks_per_segment(config) == open_slots(config) == 8
    s, n = s[n > 0], n[n > 0]
    assert (s[1:] == (s + n)[:-1]).all() and s[0] == 0 and (s + n)[-1] == S
    open_part = s >= 2 * config.chunk_limit
    assert (n[open_part] <= config.target_chunk).all() and open_part.sum() == -(-45 // 8)
    pieces = _attn(config).chunk_view(k).open_pieces(config.target_chunk, open_slots(config))
    want = chunk_summaries(k, chunks, summary="sqrt")[:, -open_slots(config) :]
    np.testing.assert_allclose(np.array(pieces), np.array(want), rtol=1e-5, atol=1e-5)
    assert _config_ok(config) and open_layout(config) == (8, config.target_chunk)
    assert open_layout(config.replace(open_pieces=False)) == (1, 0)
    plan = _run("dhsa", config, q, k, offset=S - 1)
    assert plan.n_valid.item() == config.budget


def _split_open_plan(config, q, k, offset, window):
    """open_pieces as the docs state it: split_open's chunks, chunk_summaries, select."""
    chunks = split_open(chunk_boundaries(k, config), k.shape[2], config.target_chunk)
    summaries = chunk_summaries(k, chunks, summary=config.summary)
    qb = block_queries(q, config.block_size, per_head=config.head_scores == "max")
    return select(chunk_scores(qb, summaries), chunks, config, n_queries=q.shape[2],
                  q_offset=offset, window=window)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    S=st.integers(1, 300),
    frac=st.floats(0.0, 1.0),
    sink=st.integers(0, 8),
    local=st.integers(0, 8),
    target=st.sampled_from([2, 3, 8, 16]),
    summary=st.sampled_from(["mean", "sqrt"]),
    head_scores=st.sampled_from(["mean", "max"]),
    window=st.sampled_from([None, 5, 40]),
    seed=st.integers(0, 2**16),
)
def test_open_pieces_plan_invariants(
    S, frac, sink, local, target, summary, head_scores, window, seed
):
    """The DHSA planner with open_pieces: the budget is filled, keys ascending inside each
    block's range, sinks and local window kept; and the plan is split_open's (its chunks,
    chunk_summaries and select), up to keys traded between chunks whose scores tie within
    1e-5 (the planner sums the pieces directly, chunk_summaries by prefix sums)."""
    mx.random.seed(seed)
    n_queries = max(1, int(frac * S))
    config = small_config(
        open_pieces=True,
        sink=sink,
        local=local,
        target_chunk=target,
        summary=summary,
        head_scores=head_scores,
        key_spread=0.0,  # the reference below scores by the summaries alone
    )
    q, k, _ = make_qkv(H=4, H_kv=2, L=n_queries, S=S, D=16)
    offset = S - n_queries
    plan = _run("dhsa", config, q, k, offset=offset, window=window)
    chosen, idx, n_valid = _sets(plan)
    want, _, want_n = _sets(_split_open_plan(config, q, k, offset, window))
    assert (n_valid == want_n).all()
    for b, keys in enumerate(chosen):
        q0 = offset + b * config.block_size
        q1 = min(q0 + config.block_size, S) - 1
        lo = max(0, q0 - window + 1) if window else 0
        assert n_valid[b] == min(config.budget, q1 - lo + 1)
        assert (np.diff(keys) > 0).all() and (keys >= lo).all() and (keys <= q1).all()
        assert (idx[b, n_valid[b] :] == 0).all()
        must = set(range(lo, min(sink, q1 + 1))) | set(range(max(lo, q0 - local), q1 + 1))
        assert must <= set(keys.tolist())
        if not np.array_equal(keys, want[b]):
            _assert_near_tie(config, q, k, b, set(keys.tolist()) ^ set(want[b].tolist()))


def _assert_near_tie(config, q, k, block, keys):
    """The chunks holding ``keys`` (where two plans differ) score within 1e-5 of each other."""
    chunks = split_open(chunk_boundaries(k, config), k.shape[2], config.target_chunk)
    summaries = chunk_summaries(k, chunks, summary=config.summary)
    qb = block_queries(q, config.block_size, per_head=config.head_scores == "max")
    scores = np.array(chunk_scores(qb, summaries))[0, block]
    s, n = np.array(chunks.starts[0]), np.array(chunks.lengths[0])
    c = {int(np.nonzero((s <= key) & (key < s + n))[0][0]) for key in keys}
    picked = scores[sorted(c)]
    assert picked.max() - picked.min() <= 1e-5 * (1 + np.abs(scores).max()), (keys, picked)


def test_open_pieces_change_plans():
    """The open_pieces plans differ from one open chunk's (so the kernel tests of open pieces
    see them): decode steps whose open part has keys outside the local window."""
    config = small_config(budget=48, key_spread=0.0)  # spread terms outweigh the open part
    differ = 0
    for S in (300, 360, 700):
        mx.random.seed(0)
        q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=64)
        one = _run("dhsa", config, q, k, offset=S - 1)
        pieces = _run("dhsa", config.replace(open_pieces=True), q, k, offset=S - 1)
        differ += not mx.array_equal(one.indices, pieces.indices).item()
    assert differ >= 2


@pytest.mark.parametrize("mean_heads", [False, True])
def test_key_spread_changes_prefill_plans_only(mean_heads):
    """planners.plan: key_spread changes prefill plans (of this seed) and never a decode
    step's, whose chunk plan runs without it (step_config), whatever decode_head_scores."""
    from mlx_dhsa import planners

    mx.random.seed(7)
    base = small_config(decode_refine=1)
    if mean_heads:
        base = base.replace(decode_head_scores="mean")
    q, k, _ = make_qkv(H=4, H_kv=2, L=64, S=400, D=16, scale=2.0)

    def plan(config, queries, offset):
        attn = _attn(config)
        return planners.plan(queries, k, config=config, table=lambda: attn.chunk_view(k),
                             offset=offset, window=None, scale=attn.scale,
                             softcap=None)  # fmt: skip

    with_spread, without = base.replace(key_spread=2.0), base.replace(key_spread=0.0)
    assert not mx.array_equal(plan(with_spread, q, 336).indices, plan(without, q, 336).indices)
    for t in (0, 17, 63):
        step = q[:, :, t : t + 1]
        a, b = plan(with_spread, step, 336 + t), plan(without, step, 336 + t)
        assert mx.array_equal(a.indices, b.indices) and mx.array_equal(a.n_valid, b.n_valid)


@settings(max_examples=60, deadline=None)
@given(
    S=st.integers(1, 400),
    frac=st.floats(0.0, 1.0),
    key_spread=st.sampled_from([0.0, 0.5, 2.0, 50.0]),
    key_scale=st.sampled_from([0.1, 1.0, 30.0]),
    open_pieces=st.booleans(),
    window=st.sampled_from([None, 5, 40]),
    seed=st.integers(0, 2**16),
)
def test_key_spread_plan_invariants(S, frac, key_spread, key_scale, open_pieces, window, seed):
    """Whatever the spread weight and key magnitude: the budget is filled, keys ascend inside
    each block's range, sinks and local window are kept (the term only reorders chunks)."""
    mx.random.seed(seed)
    n_queries = max(1, int(frac * S))
    config = small_config(key_spread=key_spread, open_pieces=open_pieces)
    q, k, _ = make_qkv(H=4, H_kv=2, L=n_queries, S=S, D=16)
    offset = S - n_queries
    _, idx, n_valid = _sets(_run("dhsa", config, q, key_scale * k, offset=offset, window=window))
    for b in range(len(n_valid)):
        q0 = offset + b * config.block_size
        q1 = min(q0 + config.block_size, S) - 1
        lo = max(0, q0 - window + 1) if window else 0
        keys = idx[b, : n_valid[b]]
        assert n_valid[b] == min(config.budget, q1 - lo + 1)
        assert (np.diff(keys) > 0).all() and (keys >= lo).all() and (keys <= q1).all()
        must = set(range(lo, min(config.sink, q1 + 1)))
        must |= set(range(max(lo, q0 - config.local), q1 + 1))
        assert must <= set(keys.tolist())
