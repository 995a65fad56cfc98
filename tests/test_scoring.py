"""The selection options of issue 16: local_mode, scoring (mass estimates), query_groups,
DHSAConfig.paper()."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_qkv, small_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dhsa import DHSAConfig
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.chunking import chunk_boundaries
from mlx_dhsa.scoring import chunk_moments, mass_scores


def _attn(config):
    return DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=16, scale=0.25, softcap=None)


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["dhsa", "block_sparse", "oracle"]),
    scoring=st.sampled_from(["paper", "softmax", "softmax_spread"]),
    local_mode=st.sampled_from(["window", "recent"]),
    groups=st.sampled_from([1, 2, 4]),
    S=st.integers(1, 200),
    frac=st.floats(0.0, 1.0),
    sink=st.integers(0, 8),
    local=st.integers(0, 24),
    window=st.sampled_from([None, 5, 40]),
    seed=st.integers(0, 2**16),
)
def test_plan_invariants_of_every_option(
    method, scoring, local_mode, groups, S, frac, sink, local, window, seed
):
    mx.random.seed(seed)
    config = small_config(method=method, scoring=scoring, local_mode=local_mode, sink=sink,
                          local=local, query_groups=groups)  # fmt: skip
    n_queries = max(1, int(frac * S))
    q, k, _ = make_qkv(H=4, H_kv=2, L=n_queries, S=S, D=16)
    offset = S - n_queries
    plan = _attn(config).plan(q, k, offset=offset, window=window)
    idx, n_valid = np.array(plan.indices)[0], np.array(plan.n_valid)[0]
    for b in range(idx.shape[0]):
        keys = idx[b, : n_valid[b]]
        q0 = offset + b * config.block_size
        q1 = min(q0 + config.block_size, S) - 1
        lo = max(0, q0 - window + 1) if window else 0
        assert n_valid[b] == min(config.budget, q1 - lo + 1)  # the budget is always filled
        assert (np.diff(keys) > 0).all() and (keys >= lo).all() and (keys <= q1).all()
        recent = q0 - local if local_mode == "window" else min(q0, q1 + 1 - local)
        must = set(range(lo, min(sink, q1 + 1))) | set(range(max(lo, recent), q1 + 1))
        assert must <= set(keys.tolist())  # sinks, the local keys and the block itself


def test_recent_local_counts_the_block_itself():
    """local_mode="recent" with local = block_size keeps exactly the block (the paper's code),
    "window" keeps local keys before it as well: block_size more scored keys with "recent"."""
    S, L = 160, 16
    sizes = {}
    for mode in ("window", "recent"):
        config = small_config(method="streaming", local=16, local_mode=mode, sink=4)
        assert config.budget == 48
        # A single block at the end: what is forced is sink + recent range.
        from mlx_dhsa.selection import block_ranges

        _, _, local_start, q1 = block_ranges(config, L, S - L, None)
        sizes[mode] = int(q1[0] + 1 - local_start[0])
    assert sizes == {"window": 32, "recent": 16}


def test_chunk_moments_match_numpy():
    k = mx.random.normal((1, 2, 64, 8))
    config = small_config(boundaries="fixed")
    chunks = chunk_boundaries(k, config)
    mean, var = chunk_moments(k, chunks, spread=True)
    kn, st, ln = np.array(k), np.array(chunks.starts)[0], np.array(chunks.lengths)[0]
    for c in range(st.size):
        if ln[c] == 0:
            continue
        seg = kn[0, :, st[c] : st[c] + ln[c]]
        np.testing.assert_allclose(np.array(mean)[0, :, c], seg.mean(1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.array(var)[0, :, c], seg.var(1), rtol=1e-3, atol=1e-4)


def test_mass_scores_equal_true_attention_for_one_key_chunks():
    """With one key per chunk and the exact query (decode), the estimate is the true softmax
    mass per key summed over heads."""
    S, scale = 40, 0.3
    config = small_config(boundaries="fixed", target_chunk=2, min_chunk=2, boundary_window=2)
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=16)
    from mlx_dhsa.chunking import Chunks

    chunks = Chunks(mx.arange(S)[None].astype(mx.int32), mx.ones((1, S), mx.int32), 1 << 20)
    got = mass_scores(q, k, chunks, config, q_offset=S - 1, scale=scale)  # (1, 1, S)
    logits = (q.reshape(1, 2, 2, 1, 16) * scale) @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    want = mx.softmax(logits, axis=-1).sum(axis=(1, 2))[:, 0]
    np.testing.assert_allclose(np.array(got)[0, 0], np.array(want)[0], rtol=1e-4, atol=1e-6)


def test_mass_scores_find_a_planted_key_the_mean_hides():
    """A chunk whose one key aligns with the query: ``softmax_spread`` ranks it above a chunk
    of uniformly mild keys with the same mean logit; ``softmax`` cannot tell them apart."""
    D = 16
    q = mx.zeros((1, 1, 1, D)).at[..., 0].add(4.0)
    k = mx.zeros((1, 1, 32, D))
    k = k.at[:, :, 8:16, 0].add(0.25)  # chunk 1: every key mildly aligned
    k = k.at[:, :, 16, 0].add(2.0)  # chunk 2: one strongly aligned key, same mean
    from mlx_dhsa.chunking import Chunks

    chunks = Chunks(mx.array([[0, 8, 16, 24]], mx.int32), mx.full((1, 4), 8, mx.int32), 32)
    config = small_config(scoring="softmax_spread")
    spread = np.array(mass_scores(q, k, chunks, config, q_offset=31, scale=1.0))[0, 0]
    plain = np.array(mass_scores(q, k, chunks, config.replace(scoring="softmax"), q_offset=31,
                                 scale=1.0))[0, 0]  # fmt: skip
    assert spread[2] > spread[1]
    assert math.isclose(plain[1], plain[2], rel_tol=1e-5)


def test_new_fields_reject_bad_values_naming_the_flag():
    with pytest.raises(ValueError, match=r"local_mode must be one of"):
        DHSAConfig(local_mode="block")
    with pytest.raises(ValueError, match=r"scoring must be one of"):
        DHSAConfig(scoring="quest")
    for bad in (0, 3, 256, True, 2.0):
        with pytest.raises(ValueError, match=r"query_groups must be"):
            DHSAConfig(query_groups=bad)
    with pytest.raises(ValueError, match="budget"):
        DHSAConfig(budget=128, sink=64, local=64, local_mode="recent")
    DHSAConfig(budget=256, sink=128, local=128, local_mode="recent")  # sink + block fits


def test_paper_config_is_the_released_one():
    paper = DHSAConfig.paper()
    assert (paper.budget, paper.block_size, paper.sink, paper.local) == (2048, 128, 128, 128)
    assert (paper.local_mode, paper.summary, paper.scoring, paper.head_scores) == (
        "recent",
        "sqrt",
        "paper",
        "mean",
    )
    assert (paper.boundaries, paper.target_chunk, paper.min_chunk, paper.nms_window) == (
        "shift",
        32,
        8,
        8,
    )
    assert paper.dense_limit == paper.budget and paper.decode_dense_below is None
    assert DHSAConfig.paper(budget=1024).dense_limit == 1024


def test_kernels_leave_unimplemented_options_to_the_reference_planner():
    """The planning kernels implement local_mode="window" and scoring="paper" only: other
    values must plan with the pure-MLX reference (kernels._plan_ok), and the new defaults
    (8-key chunks, plain mean, 16 sinks) must stay within the kernels' interval limit."""
    from mlx_dhsa.kernels import planning
    from mlx_dhsa.selection import max_chunks_taken

    config = DHSAConfig(budget=512)
    assert planning._config_ok(config)
    assert not planning._config_ok(config.replace(local_mode="recent"))
    assert not planning._config_ok(config.replace(scoring="softmax"))
    for budget in (512, 1024, 2048):  # the default plans fit the small interval buffer
        assert max_chunks_taken(DHSAConfig(budget=budget)) + 2 <= planning.INTERVAL_SIZES[0]
        assert planning.max_intervals(DHSAConfig(budget=budget)) == planning.INTERVAL_SIZES[0]
    # decode_refine's widened plans (4 x budget 2048) take the large one; beyond it, pure MLX
    assert planning.max_intervals(DHSAConfig(budget=4 * 2048)) == planning.MAX_INTERVALS
    assert planning._config_ok(DHSAConfig(budget=4 * 2048))
    assert not planning._config_ok(DHSAConfig(budget=16 * 2048))
    # scoring="softmax*" plans before the kernel dispatch, with or without use_kernel.
    attn_k = _attn(small_config(scoring="softmax_spread", use_kernel=True))
    attn_r = _attn(small_config(scoring="softmax_spread", use_kernel=False))
    q, k, _ = make_qkv(H=4, H_kv=2, L=40, S=120, D=16)
    a = attn_k.plan(q, k, offset=80, window=None)
    b = attn_r.plan(q, k, offset=80, window=None)
    assert mx.array_equal(a.indices, b.indices) and mx.array_equal(a.n_valid, b.n_valid)
