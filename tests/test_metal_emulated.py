"""The Metal kernels' own source, run on the CPU: mlx_dhsa.kernels launches them as on a Mac
(backend "metal", its tile configs, merge_splits as a second launch, block scores and
selection as two launches) through tests/metal_emulator, which builds the exact source MLX
would compile and runs it on an executable Metal shim (tests/shims/metal_emu.h). Results
are held to the GPU tests' tolerances (tests/test_kernels.py). Skipped only without a host
C++ compiler."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    assert_within_baseline,
    make_qkv,
    open_pieces_over_cache_steps,
    small_config,
    wide_plan,
)
from kernel_builds import instances, metal_source, signature
from metal_emulator import EmulatorError, MetalEmulator, compiler, generate_source
from metal_emulator.hook import emulate_metal
from test_kernels import SCALE, _close, _plan, _table

from mlx_dhsa import kernels, reference
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.kernels import KernelState, planning, sources
from mlx_dhsa.planners import step_config
from mlx_dhsa.quantized import QuantizedKV
from mlx_dhsa.selection import block_queries, chunk_scores, key_mask, select_chunks

pytestmark = pytest.mark.skipif(compiler() is None, reason="no host C++ compiler (clang++, g++)")


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """One emulator (and one cache of compiled instantiations) for the session."""
    return MetalEmulator(tmp_path_factory.mktemp("metal_emu"))


@pytest.fixture
def metal(monkeypatch, emulator):
    emulate_metal(monkeypatch, emulator)
    emulator.log = []
    return emulator


def _launched(emu) -> list[str]:
    """Kernel names launched since the fixture started, e.g. ["decode_attention", ...]."""
    return [name.split("_", 1)[1].rsplit("_", 1)[0] for name in emu.log]


def _check(out, ref32, ref_lp, dtype, cap):
    """test_kernels' rules: fp32 within 1e-4 (relative to the largest output), 16-bit
    within 2x (4x with a soft cap) the error of MLX's own low-precision reference."""
    assert out.dtype == dtype
    if dtype == mx.float32:
        _close(out, ref32)
    else:
        assert_within_baseline(out, ref32, ref_lp, factor=4.0 if cap else 2.0)


def _attention_both(q, k, v, off, window, cap, plan_window=None):
    """Sparse attention over the planner's keys and dense causal attention (in `window`), each
    through the emulated kernels against the pure-MLX reference. Quantized k and v
    (QuantizedKV): the reference runs over their dequantization (mx.dequantize), in fp32 and
    in the model's dtype."""
    dtype = q.dtype
    kq, vq = k, v  # what the kernels read
    if isinstance(k, QuantizedKV):
        k, v = k.dequantize(), v.dequantize()
        assert k.dtype == dtype
    L, S = q.shape[2], k.shape[2]
    q32, k32, v32 = (x.astype(mx.float32) for x in (q, k, v))
    plan = _plan(q32, k32, small_config(), off, plan_window)
    args = dict(scale=SCALE, softcap=cap)
    out = kernels.sparse_attention(q, kq, vq, plan, **args)
    _check(
        out,
        reference.sparse_attention(q32, k32, v32, plan, **args),
        reference.sparse_attention(q, k, v, plan, **args),
        dtype,
        cap,
    )
    mask = key_mask(off, L, S, window)
    out = kernels.dense_attention(q, kq, vq, q_offset=off, window=window, **args)
    _check(
        out,
        reference.dense_attention(q32, k32, v32, mask=mask, **args),
        reference.dense_attention(q, k, v, mask=mask, **args),
        dtype,
        cap,
    )


F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16

# (dtype, B, H, H_kv, L, S, D, q_offset, window, softcap, split): every dtype and head dim,
# GQA 1, 2 and 4 heads a KV head, ragged L and S, windows; split: keys split across groups
# (forced) and merged by the merge_splits launch.
ATTENTION_CASES = [
    (F32, 1, 4, 2, 17, 80, 64, 63, None, None, False),
    (F32, 2, 4, 2, 48, 150, 64, 102, 40, 50.0, True),
    (F32, 1, 8, 4, 33, 160, 256, 127, 64, 50.0, False),
    (F32, 1, 2, 2, 16, 200, 128, 184, 64, None, False),
    (F16, 1, 8, 4, 40, 120, 128, 80, None, 50.0, False),
    (F16, 1, 4, 4, 20, 100, 64, 80, 32, None, True),
    (BF16, 1, 8, 4, 40, 120, 256, 80, 96, None, False),
    (BF16, 1, 4, 2, 48, 150, 64, 102, None, 50.0, True),
]


@pytest.mark.parametrize("dtype,B,H,H_kv,L,S,D,off,window,cap,split", ATTENTION_CASES)
def test_attention_kernel(metal, monkeypatch, dtype, B, H, H_kv, L, S, D, off, window, cap, split):
    monkeypatch.setattr(kernels.attention, "MIN_SPLIT_TILES", 1 if split else 10**6)
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype, scale=2.0)
    _attention_both(q, k, v, off, window, cap, plan_window=window)
    launched = _launched(metal)
    assert launched.count("sparse_attention") == 2
    assert launched.count("merge_splits") == (2 if split else 0)


# (dtype, B, H, H_kv, S, D, q_offset, window, softcap): one query (decode steps) on
# decode_attention.metal, its splits merged by merge_splits (Metal's two launches): GQA 1,
# 2 and 8 heads a KV head, windows, keys past the query.
DECODE_CASES = [
    (F32, 1, 4, 2, 97, 64, 96, None, 50.0),
    (F32, 1, 8, 4, 300, 256, 299, 64, 50.0),
    (F32, 2, 8, 1, 500, 128, 499, None, None),
    (F16, 1, 4, 4, 400, 64, 350, 200, None),
    (BF16, 1, 8, 4, 600, 256, 599, None, 50.0),
]


@pytest.mark.parametrize("dtype,B,H,H_kv,S,D,off,window,cap", DECODE_CASES)
def test_decode_kernel_and_merge(metal, dtype, B, H, H_kv, S, D, off, window, cap):
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=1, S=S, D=D, dtype=dtype, scale=2.0)
    _attention_both(q, k, v, off, window, cap, plan_window=window)
    assert _launched(metal) == ["decode_attention", "merge_splits"] * 2


def test_strided_inputs(metal):
    """Views read in place through their strides (ensure_row_contiguous=False): a cache-like
    slice of a longer buffer, a query slice, a transposed layout; the bounds checks see only
    each view's span."""
    q_all, k_all, v_all = make_qkv(B=2, H=4, H_kv=2, L=90, S=170, D=64)
    q = q_all[:, :, 7:47]
    k = k_all[:, :, :160]
    v = mx.contiguous(v_all[:, :, :160].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    _attention_both(q, k, v, 120, 64, 50.0)


# (dtype, B, H, H_kv, L, S, D, q_offset, window, budget): test_kernels' PLAN_CASES, smaller.
PLAN_CASES = [
    (F32, 1, 4, 2, 64, 300, 64, 236, None, 48),
    (F32, 2, 4, 2, 37, 333, 64, 296, 40, 48),
    (F32, 1, 8, 4, 1, 517, 256, 516, None, 48),
    (F32, 2, 2, 1, 1, 200, 64, 199, 64, 48),
    (F32, 1, 4, 2, 20, 40, 64, 20, None, 48),
    (BF16, 1, 4, 4, 33, 1200, 64, 1167, None, 160),
    (F16, 1, 2, 1, 16, 129, 128, 113, None, 32),
]


@pytest.mark.parametrize("dtype,B,H,H_kv,L,S,D,off,window,budget", PLAN_CASES)
def test_plan_kernels(metal, dtype, B, H, H_kv, L, S, D, off, window, budget):
    """block_scores then select_keys (two launches on Metal): the reference's selection."""
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype)
    config = small_config(budget=budget)
    table = _table(k, config)
    ref = select_chunks(q, table, config, q_offset=off, window=window)
    out = kernels.select_chunks(q, table, config, q_offset=off, window=window)
    assert _launched(metal) == ["block_scores", "select_keys"]
    assert mx.array_equal(out.n_valid, ref.n_valid)
    assert mx.array_equal(out.indices, ref.indices)


@pytest.mark.parametrize("dtype,B,H,H_kv,L,S,D,off,window,budget", PLAN_CASES)
def test_plan_kernels_with_key_spread(metal, dtype, B, H, H_kv, L, S, D, off, window, budget):
    """key_spread on the two launches: the reference's selection (block_scores reads the
    closed chunks' spreads and adds their term)."""
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype)
    config = small_config(budget=budget, key_spread=2.0)
    table = _table(k, config)
    ref = select_chunks(q, table, config, q_offset=off, window=window, scale=0.3)
    out = kernels.select_chunks(q, table, config, q_offset=off, window=window, scale=0.3)
    assert _launched(metal) == ["block_scores", "select_keys"]
    assert mx.array_equal(out.n_valid, ref.n_valid)
    assert mx.array_equal(out.indices, ref.indices)


@pytest.mark.parametrize("L,S", [(37, 333), (1, 1230)])
def test_block_scores_add_the_spread_term(metal, L, S):
    """block_scores with a spread factor w: q_b . k_c + w * q_b^2 . v_c over the closed
    chunks within 1e-4 of the reference's math; the open chunk's score has no term."""
    config = small_config(key_spread=1.0)
    q, k, _ = make_qkv(B=2, H=4, H_kv=2, L=L, S=S, D=64)
    table = _table(k, config)
    n = table.n_closed
    out = planning.block_scores(q, table, config, scale=0.4)
    qb = block_queries(q, config.block_size)
    closed = table.summaries[:, :n].astype(mx.float32)
    spread = chunk_scores(qb * qb, table.spreads[:, :n].astype(mx.float32))
    _close(out[..., :n], chunk_scores(qb, closed) + 0.2 * spread)
    _close(out[..., n:], chunk_scores(qb, table.open_summary))
    assert mx.abs(spread).max().item() > 0.1  # the term is there to be missed


# PLAN_CASES and two decode steps: an empty open part (S a whole number of segments), and
# open pieces that straddle two groups' chunk tiles.
OPEN_PIECE_CASES = PLAN_CASES + [
    (F32, 1, 4, 2, 1, 256, 64, 255, None, 48),
    (BF16, 1, 4, 4, 1, 1230, 64, 1229, None, 160),
]
FUSED_CASES = [c for c in OPEN_PIECE_CASES if c[4] <= small_config().block_size]


def _plan_case(metal, config, dtype, B, H, H_kv, L, S, D, off, window):
    """The kernels' plan (as the backend launches it) equals the reference's, for one case."""
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype)
    table = _table(k, config)
    ref = select_chunks(q, table, config, q_offset=off, window=window)
    out = kernels.select_chunks(q, table, config, q_offset=off, window=window)
    assert mx.array_equal(out.n_valid, ref.n_valid)
    assert mx.array_equal(out.indices, ref.indices)


@pytest.mark.parametrize("dtype,B,H,H_kv,L,S,D,off,window,budget", OPEN_PIECE_CASES)
def test_plan_kernels_open_pieces(metal, dtype, B, H, H_kv, L, S, D, off, window, budget):
    """open_pieces (the open chunk as target_chunk-key pieces) on the two launches: the
    reference's selection (test_planners.test_open_pieces_change_plans: the pieces change
    such plans)."""
    config = small_config(budget=budget, open_pieces=True, key_spread=0.0)
    _plan_case(metal, config, dtype, B, H, H_kv, L, S, D, off, window)
    assert _launched(metal) == ["block_scores", "select_keys"]
    assert planning.open_layout(config) == (8, 8)  # chunk_limit 64, target_chunk 8


@pytest.mark.parametrize("fused", [False, True])
def test_plan_kernels_take_the_planted_open_pieces(metal, monkeypatch, fused):
    """Keys 264..279 (open pieces 1 and 2 of the open part 256..299) point along the queries:
    with open_pieces the kernels' plan (as the reference's) holds them all, where one open
    chunk would be taken from its first key, 256."""
    monkeypatch.setattr(kernels.backend(), "fused_plan", fused)
    config = small_config(open_pieces=True, summary="mean")
    k = 0.01 * mx.random.normal((1, 2, 300, 64))
    k[:, :, 264:280] = 1.0
    q = mx.ones((1, 4, 1, 64))
    table = _table(k, config)
    out = kernels.select_chunks(q, table, config, q_offset=299)
    ref = select_chunks(q, table, config, q_offset=299)
    assert mx.array_equal(out.indices, ref.indices) and mx.array_equal(out.n_valid, ref.n_valid)
    assert set(range(264, 280)) <= set(out.indices[0, 0].tolist())
    one = select_chunks(q, table, config.replace(open_pieces=False), q_offset=299)
    assert set(range(256, 264)) <= set(one.indices[0, 0].tolist())
    assert _launched(metal) == (["plan"] if fused else ["block_scores", "select_keys"])


def test_plan_self_check_catches_a_dropped_spread_term(metal, monkeypatch):
    """The planning self-check with key_spread compares block scores, not only plans (a
    kernel that ignores the spreads keeps most of a random plan's keys): it passes, and
    fails once block_scores drops the term."""
    config = small_config(key_spread=2.0)
    assert config.spread_scores
    assert planning._self_check(kernels.PlanLaunch.TWO, F32, 64, config) is None
    real = planning.block_scores
    monkeypatch.setattr(
        planning,
        "block_scores",
        lambda q, table, cfg, *a, **k: real(q, table, cfg.replace(key_spread=0.0), *a, **k),
    )
    why = planning._self_check(kernels.PlanLaunch.TWO, F32, 64, config)
    assert why is not None and "key-spread" in why


@pytest.mark.parametrize("open_pieces", [False, True])
def test_plan_self_check(metal, monkeypatch, open_pieces):
    """The planning self-check (run on a GPU before a launch's first use) passes on both
    launches, with one open chunk and with open pieces."""
    monkeypatch.setattr(kernels.backend(), "fused_plan", True)
    config = small_config(open_pieces=open_pieces)
    for launch in kernels.PlanLaunch:
        assert planning._self_check(launch, F32, 64, config) is None


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("L,S", [(37, 333), (1, 1230), (20, 40)])
def test_block_scores_open_pieces(metal, dtype, L, S):
    """block_scores' scores with open pieces (each summed whole by one warp) within 1e-4 of
    the reference's: the closed summaries' scores, then the pieces' (ChunkTable.open_pieces),
    the empty ones 0."""
    config = small_config(open_pieces=True, key_spread=0.0)  # the summaries alone
    q, k, _ = make_qkv(B=2, H=4, H_kv=2, L=L, S=S, D=64, dtype=dtype)
    table = _table(k, config)
    out = planning.block_scores(q, table, config)
    pieces = table.open_pieces(config.target_chunk, 8)
    summaries = mx.concatenate([table.summaries[:, : table.n_closed], pieces], axis=1)
    ref = chunk_scores(block_queries(q, config.block_size), summaries)
    assert out.shape == ref.shape == (2, -(-L // 16), table.n_closed + 8)
    _close(out, ref)


@pytest.mark.parametrize("open_pieces", [False, True])
@pytest.mark.parametrize("dtype,B,H,H_kv,L,S,D,off,window,budget", FUSED_CASES)
def test_fused_plan_kernel(
    metal, monkeypatch, open_pieces, dtype, B, H, H_kv, L, S, D, off, window, budget
):
    """The fused ``plan`` kernel (block_scores, hand-off, select_keys in one launch; CUDA's
    choice for one query block) on the emulator's groups, one after another: the reference's
    selection, with one open chunk and with open pieces."""
    monkeypatch.setattr(kernels.backend(), "fused_plan", True)
    config = small_config(budget=budget, open_pieces=open_pieces)
    _plan_case(metal, config, dtype, B, H, H_kv, L, S, D, off, window)
    assert _launched(metal) == ["plan"]


@pytest.mark.parametrize("fused", [False, True])
def test_open_pieces_over_decode_steps(metal, monkeypatch, fused):
    """A DHSACache's layer planning with open_pieces over prefill and decode steps, a
    segment closing and a trim: every plan equals the reference's over the table rebuilt
    from scratch, and no open-chunk running sum is carried (the pieces are summed whole)."""
    monkeypatch.setattr(kernels.backend(), "fused_plan", fused)
    open_pieces_over_cache_steps(kernels.select_chunks)
    assert ("plan" in _launched(metal)) == fused  # (prefill steps take two launches)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("budget,S,intervals", [(48, 400, 1024), (520, 2300, 2560)])
def test_refined_decode_plans_on_the_kernels(metal, monkeypatch, fused, budget, S, intervals):
    """decode_refine's widened plan (decode_refine x budget keys) runs on the planning kernels,
    in the interval buffer its size needs (MAX_IV 2560 past 1024 intervals): the refined plan
    equals the pure-MLX planner's."""
    from mlx_dhsa.planners import plan as dispatch
    from mlx_dhsa.refine import widened

    monkeypatch.setattr(kernels.backend(), "fused_plan", fused)
    config = small_config(budget=budget, decode_refine=4, decode_head_scores="mean")
    assert planning.max_intervals(widened(config, config.decode_refine)) == intervals
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=64)
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=64, scale=SCALE, softcap=None)
    launch = kernels.plan_launch(q.dtype, k.dtype, 64, 1, step_config(config, True))
    assert launch is not None
    plans = [
        dispatch(q, k, config=config, table=lambda: attn.chunk_view(k), offset=S - 1,
                 window=None, scale=SCALE, softcap=None, launch=run)  # fmt: skip
        for run in (launch, None)
    ]
    assert _launched(metal) == (["plan"] if fused else ["block_scores", "select_keys"])
    assert mx.array_equal(plans[0].indices, plans[1].indices)
    assert mx.array_equal(plans[0].n_valid, plans[1].n_valid)


@pytest.mark.parametrize(
    "dtype,B,H,H_kv,L,S,D,stride,window,cap",
    [
        (mx.float32, 1, 4, 2, 40, 200, 64, 1, None, None),
        (mx.float32, 2, 4, 1, 37, 160, 32, 3, 50, 30.0),  # short last block, window, cap
        (mx.float32, 1, 8, 8, 48, 300, 128, 16, None, None),  # one scoring query a block
        (mx.float16, 1, 4, 2, 40, 200, 64, 2, None, 30.0),
        (mx.bfloat16, 1, 6, 2, 33, 180, 64, 1, 60, None),  # 3 heads a KV head
    ],
)
def test_refine_scores_kernel(metal, dtype, B, H, H_kv, L, S, D, stride, window, cap):
    """refine_scores.metal against reference.refine_scores: every block's scoring queries
    (counted back from its last), padding slots, causality, window and soft cap; the
    tolerances of the attention kernels (fp32 1e-4 of the largest score; 16-bit within 2x
    the error of the reference in the model's dtype)."""
    from mlx_dhsa import reference
    from mlx_dhsa.kernels import refining

    block_size = 16
    NB = -(-L // block_size)
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D)
    wide = wide_plan(B, NB, 40, L, S, block_size, window)
    kernel = kernels.refine_kernel(dtype, dtype, D, H, H_kv, block_size, stride)
    assert kernel == refining.refine_config("metal", dtype, D, H, H_kv, block_size, stride)
    args = (stride, SCALE, cap)
    out = kernels.run_refine(kernel, wide, q.astype(dtype), k.astype(dtype), *args)
    assert _launched(metal) == ["refine_scores"]
    ref32 = reference.refine_scores(wide, q, k, *args)
    assert out.shape == ref32.shape == (B, NB, 40) and out.dtype == mx.float32
    if dtype == mx.float32:
        _close(out, ref32)
    else:
        ref_lp = reference.refine_scores(wide, q.astype(dtype), k.astype(dtype), *args)
        assert_within_baseline(out, ref32, ref_lp)
    # Each live scoring query spreads a probability of 1 per head over what it sees.
    live = [min(block_size, L - blk * block_size) for blk in range(NB)]
    sums = np.array(out.sum(axis=-1))
    want = np.array([H * -(-n // stride) for n in live], np.float32)
    np.testing.assert_allclose(sums, np.broadcast_to(want, sums.shape), rtol=1e-2)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_refine_scores_kernel_strided_inputs_and_cuda_tiles(metal, dtype):
    """Queries and keys read through their strides (a transposed buffer, a cache slice), and
    the CUDA launch geometry (16 rows a warp, 32-key tiles: two of Metal's 8-row matrix
    tiles a warp) on the Metal source, against the reference."""
    from mlx_dhsa import reference
    from mlx_dhsa.kernels import refining

    B, H, H_kv, L, S, D, block_size, stride = 2, 8, 2, 70, 260, 64, 32, 2
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S + 40, D=D)
    q = mx.contiguous(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # (B, H, L, D) view
    k = k[:, :, :S]  # a cache's keys: a slice of a longer buffer
    wide = wide_plan(B, -(-L // block_size), 60, L, S, block_size, 90)
    want = reference.refine_scores(wide, q, k, stride, SCALE, 30.0)
    for backend in ("metal", "cuda"):
        kernel = refining.refine_config(backend, dtype, D, H, H_kv, block_size, stride)
        assert kernel.warps * 32 >= kernel.bk
        out = kernels.run_refine(kernel, wide, q.astype(dtype), k.astype(dtype), stride,
                                 SCALE, 30.0)  # fmt: skip
        if dtype == F32:
            _close(out, want)
        else:
            ref_lp = reference.refine_scores(wide, q.astype(dtype), k.astype(dtype), stride,
                                             SCALE, 30.0)  # fmt: skip
            assert_within_baseline(out, want, ref_lp)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_refine_self_check(metal, monkeypatch, dtype):
    """The refine_scores self-check (run on a GPU before its first use) passes, and fails
    on a kernel that drops the window."""
    from mlx_dhsa.kernels import refining

    for reps, stride in ((2, 8), (4, 1)):
        kernel = refining.refine_config("metal", dtype, 64, reps, 1, 128, stride)
        assert refining._self_check(kernel, dtype, 64, reps, 128, stride) is None
    source = sources.kernel_source

    def no_window(name, backend, *args, **kw):
        header, body = source(name, backend, *args, **kw)
        return header, body.replace("(window <= 0 || kp > p - window)", "true")

    monkeypatch.setattr(sources, "kernel_source", no_window)
    emulate_metal(monkeypatch, metal)  # a fresh backend: builds the planted source
    kernel = refining.refine_config("metal", dtype, 64, 2, 1, 128, 8)
    assert refining._self_check(kernel, dtype, 64, 2, 128, 8) is not None


@pytest.mark.parametrize("stride", [1, 8])
def test_refined_prefill_plans_on_the_kernels(metal, stride):
    """prefill_refine's widened plan (prefill_refine x budget keys a block) runs on the planning
    kernels (two launches) and its candidates are scored on refine_scores.metal: the refined
    plan equals the pure-MLX planner's."""
    from mlx_dhsa.planners import plan as dispatch

    config = small_config(budget=48, prefill_refine=4, refine_stride=stride)
    S, L = 400, 40
    q, k, _ = make_qkv(H=4, H_kv=2, L=L, S=S, D=64)
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=64, scale=SCALE, softcap=None)
    launch = kernels.plan_launch(q.dtype, k.dtype, 64, L, step_config(config, False))
    refine = kernels.refine_kernel(q.dtype, k.dtype, 64, 4, 2, config.block_size, stride)
    assert launch is not None and refine is not None
    plans = [
        dispatch(q, k, config=config, table=lambda: attn.chunk_view(k), offset=S - L,
                 window=None, scale=SCALE, softcap=None, launch=run, refine_kernel=rk)  # fmt: skip
        for run, rk in ((launch, refine), (None, None))
    ]
    assert _launched(metal) == ["block_scores", "select_keys", "refine_scores"]
    assert mx.array_equal(plans[0].indices, plans[1].indices)
    assert mx.array_equal(plans[0].n_valid, plans[1].n_valid)
    plain = dispatch(q, k, config=config.replace(prefill_refine=1),
                     table=lambda: attn.chunk_view(k), offset=S - L, window=None, scale=SCALE,
                     softcap=None, launch=None)  # fmt: skip
    assert not mx.array_equal(plain.indices, plans[1].indices)  # the option changes the plan


def test_refined_prefill_layer_on_the_kernels(metal):
    """A patched layer with prefill refinement routes the candidate scores to the kernel and
    attends as the pure-MLX layer does (the same plans: fp32)."""
    config = small_config(budget=48, prefill_refine=4, refine_stride=4)
    S = 300
    q, k, v = make_qkv(H=4, H_kv=2, L=S, S=S, D=64)
    outs = []
    for use_kernel in (True, False):
        attn = DHSAAttention(config.replace(use_kernel=use_kernel), n_heads=4, n_kv_heads=2,
                             head_dim=64, scale=SCALE, softcap=30.0)  # fmt: skip
        outs.append(attn.attend(q, k, v, offset=0))
        assert (attn.last_route.refine is not None) == use_kernel
    assert "refine_scores" in _launched(metal)
    _close(outs[0], outs[1])


@pytest.mark.parametrize("refine", [1, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_head_max_plans_on_the_kernels(metal, monkeypatch, fused, refine):
    """decode_head_scores="max": block_scores scores each head as a block of one query and
    select_keys takes their best (two launches, also where the backend fuses): the plan equals
    the pure-MLX planner's, refined or not; prefill keeps the head mean."""
    from mlx_dhsa.planners import plan as dispatch

    monkeypatch.setattr(kernels.backend(), "fused_plan", fused)
    config = small_config(budget=48, decode_refine=refine, decode_head_scores="max")
    S = 400
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=64)
    q = q * mx.array([0.2, 0.2, 3.0, 0.2])[None, :, None, None]  # one head dominates
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=64, scale=SCALE, softcap=None)
    launch = kernels.plan_launch(q.dtype, k.dtype, 64, 1, step_config(config, True))
    plans = [
        dispatch(q, k, config=config, table=lambda: attn.chunk_view(k), offset=S - 1,
                 window=None, scale=SCALE, softcap=None, launch=run)  # fmt: skip
        for run in (launch, None)
    ]
    assert _launched(metal) == ["block_scores", "select_keys"]
    assert mx.array_equal(plans[0].indices, plans[1].indices)
    assert mx.array_equal(plans[0].n_valid, plans[1].n_valid)
    mean = dispatch(q, k, config=config.replace(decode_head_scores="mean"),
                    table=lambda: attn.chunk_view(k), offset=S - 1, window=None, scale=SCALE,
                    softcap=None, launch=None)  # fmt: skip
    assert not mx.array_equal(mean.indices, plans[1].indices)  # the option changes the plan
    prefill = kernels.plan_launch(q.dtype, k.dtype, 64, 8, config.replace(head_scores="max"))
    assert prefill is None  # head max on the kernels: one query only


# ---- planning over a quantized cache's table (keys from ChunkTable.keys_start on) ---------

# PLAN_CASES with at least one closed segment, and decode steps (fused cases among them).
KEYS_START_CASES = [c for c in OPEN_PIECE_CASES if c[5] >= 2 * small_config().chunk_limit]


@pytest.mark.parametrize("back", [0, 5])
@pytest.mark.parametrize("open_pieces", [False, True])
@pytest.mark.parametrize(
    "launch,dtype,B,H,H_kv,L,S,D,off,window,budget",
    [("two", *c) for c in KEYS_START_CASES]
    + [("fused", *c) for c in KEYS_START_CASES if c[4] <= small_config().block_size],
)
def test_plan_kernels_read_keys_from_keys_start(
    metal, monkeypatch, back, launch, open_pieces, dtype, B, H, H_kv, L, S, D, off, window, budget
):
    """A table holding its keys from ``open_start - back`` on (as a QuantizedDHSACache's:
    model-dtype keys from the first unchunked one): the kernels' plan equals the pure-MLX
    planner's over that table and over the whole table, on two launches and fused."""
    monkeypatch.setattr(kernels.backend(), "fused_plan", launch == "fused")
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype)
    config = small_config(budget=budget, open_pieces=open_pieces)
    whole = _table(k, config)
    table = planning.keys_from(whole, whole.open_start - back)
    assert table.keys_start > 0 and table.keys.shape[2] == S - table.keys_start
    ref = select_chunks(q, table, config, q_offset=off, window=window)
    full = select_chunks(q, whole, config, q_offset=off, window=window)
    out = kernels.select_chunks(q, table, config, q_offset=off, window=window)
    assert mx.array_equal(ref.indices, full.indices)
    assert mx.array_equal(out.n_valid, ref.n_valid)
    assert mx.array_equal(out.indices, ref.indices)
    assert _launched(metal) == (["plan"] if launch == "fused" else ["block_scores", "select_keys"])


@pytest.mark.parametrize("open_pieces", [False, True])
def test_block_scores_read_keys_from_keys_start(metal, open_pieces):
    """block_scores over a table holding keys from a few before its open chunk on: the
    scores (closed summaries, then the open chunk or its pieces) within 1e-4 of the
    reference's over the whole table; a table that does not hold the open keys (or holds
    them in another dtype) is one clear error."""
    config = small_config(open_pieces=open_pieces, key_spread=0.0)  # the summaries alone
    q, k, _ = make_qkv(B=2, H=4, H_kv=2, L=37, S=333, D=64)
    whole = _table(k, config)
    table = planning.keys_from(whole, -7)
    assert table.keys_start == whole.open_start - 7
    out = planning.block_scores(q, table, config)
    qb = block_queries(q, config.block_size)
    if open_pieces:
        summaries = mx.concatenate(
            [whole.summaries[:, : whole.n_closed], whole.open_pieces(config.target_chunk, 8)], 1
        )
    else:
        _, summaries = whole.materialize()
    _close(out, chunk_scores(qb, summaries))
    with pytest.raises(ValueError, match="keys_start must lie in"):
        planning.keys_from(whole, whole.open_start + 1)
    with pytest.raises(ValueError, match="queries' dtype"):
        planning.block_scores(q.astype(BF16), table, config)
    with pytest.raises(ValueError, match="queries' dtype"):
        # one key row short: the keys no longer run from keys_start to n_keys
        planning.block_scores(q, replace(table, keys=table.keys[:, :, 1:]), config)
    late = table.open_start + 1  # the open chunk's first key missing
    cut = replace(table, keys=table.keys[:, :, late - table.keys_start :], keys_start=late)
    with pytest.raises(ValueError, match="at most the open start"):
        planning.block_scores(q, cut, config)


# Steps of a layer's cache: prefill steps, decode steps, segments closing (64 keys), a trim
# inside the open segment and one into a closed segment.
CACHE_STEPS = [100, 27, 1, 1, 1, "trim 2", 1, 1, 40, 1, 1, "trim 70", 30, 1, 1]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("open_pieces", [False, True])
def test_plans_over_a_quantized_cache(metal, monkeypatch, fused, open_pieces):
    """A DHSA layer's QuantizedDHSACache (4-bit keys and values; chunk state from the
    model-dtype keys, which it keeps for the open segment only) planned on the kernels over
    prefill and decode steps, segments closing and trims: the table holds keys from
    ``keys_start`` > 0 on, the planning kernels take the call (``plan_launch`` with
    ``quantized``), and every plan equals the pure-MLX planner's over the same table; with
    one open chunk the layer's running open-chunk sum is carried between calls."""
    from mlx_dhsa.quantized_cache import QuantizedDHSACache

    monkeypatch.setattr(kernels.backend(), "fused_plan", fused)
    config = small_config(open_pieces=open_pieces)
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=64, scale=SCALE, softcap=None)
    cache = QuantizedDHSACache(group_size=64, bits=4)
    offsets, carried = [], 0
    for step in CACHE_STEPS:
        if isinstance(step, str):
            cache.trim(int(step.split()[1]))
            continue
        k, v = mx.random.normal((1, 2, step, 64)), mx.random.normal((1, 2, step, 64))
        keys = QuantizedKV.of(cache.update_and_fetch(k, v)[0], 4, 64)
        S = keys.shape[2]
        q = mx.random.normal((1, 4, step, 64))
        launch = kernels.plan_launch(q.dtype, q.dtype, 64, step, config, quantized=(4, 64))
        assert launch is not None
        if cache.kernel_state is None:
            cache.kernel_state = KernelState()
        state = cache.kernel_state
        table = attn.chunk_view(keys, cache)
        assert table.keys.dtype == q.dtype and table.keys_start <= table.open_start
        offsets.append(table.keys_start)
        carried += state.carried_sum(table.open_start, table.n_keys, 1) is not None
        out = kernels.run_plan(launch, q, table, config, q_offset=S - step, state=state)
        ref = select_chunks(q, table, config, q_offset=S - step)
        assert mx.array_equal(out.n_valid, ref.n_valid)
        assert mx.array_equal(out.indices, ref.indices)
        if open_pieces:
            assert state.open_total is None
        else:
            assert state.open_end == S
    assert max(offsets) >= 128  # the table's keys started past position 0
    assert (carried >= 5) != open_pieces  # the running sum was used, not only rebuilt
    assert ("plan" in _launched(metal)) == fused  # (prefill steps take two launches)


def test_patched_model_over_a_quantized_cache(metal):
    """A patched model with a 4-bit KV cache (kv_bits) on the emulated kernels: sparse
    prefill steps and decode plan on the planning kernels (two launches, as on a Mac) and
    give the greedy tokens of the pure-MLX path (use_kernel=False)."""
    from conftest import tiny_gemma2
    from mlx_lm.generate import generate_step

    import mlx_dhsa
    from mlx_dhsa.patching import dhsa_layers

    model = tiny_gemma2(n_layers=2)
    prompt = mx.random.randint(0, 1024, (200,))
    tokens = {}
    for use_kernel in (True, False):
        mlx_dhsa.unpatch(model)
        mlx_dhsa.patch(model, small_config(use_kernel=use_kernel, kv_bits=4, kv_group_size=32))
        gen = generate_step(prompt, model, max_tokens=8, prefill_step_size=64,
                            prompt_cache=mlx_dhsa.make_prompt_cache(model))  # fmt: skip
        tokens[use_kernel] = [int(t) for t, _ in gen]
        routes = [a.last_route for a in dhsa_layers(model) if a.window is None]
        assert {r.plan for r in routes} == {kernels.PlanLaunch.TWO if use_kernel else None}
    assert tokens[True] == tokens[False]
    launched = _launched(metal)
    assert "block_scores" in launched and "select_keys" in launched


def test_plan_kernels_ties_in_key_order(metal):
    """Equal scores: chunks are taken in key order (test_kernels' tie case)."""
    k = mx.ones((1, 2, 300, 64))
    q = mx.ones((1, 4, 16, 64))
    config = small_config(summary="mean")
    out = kernels.select_chunks(q, _table(k, config), config, q_offset=284, window=None)
    ref = select_chunks(q, _table(k, config), config, q_offset=284, window=None)
    assert mx.array_equal(out.n_valid, ref.n_valid)
    # The reference ranks ties in no set order (argpartition over chunk_cap's pieces).
    n = out.n_valid[0, 0].item()
    keys = out.indices[0, 0, :n].tolist()
    free = config.budget - config.sink - (config.local + 16)
    assert keys == list(range(config.sink)) + list(range(4, 4 + free)) + list(range(276, 300))


@pytest.mark.parametrize("quantized", [False, True])
def test_generated_source_is_mlx_s(emulator, quantized):
    """The emulator compiles the text MLX generates: equal to what MLX itself exported for
    the same kernel, template and inputs (tests/kernel_builds.py), for every kernel and
    every variant over quantized K/V (uint32 inputs, the scales' and biases' strides)."""
    names = ("sparse_attention", "decode_attention", "merge_splits", "block_scores", "select_keys")
    if quantized:
        names = kernels.sources.QUANTIZED_KERNELS
    for name in names:
        inputs, template, dtypes = instances(name, "metal", quantized)[-1]
        header, source = kernels.kernel_source(name, "metal", quantized)
        in_names, out_names = signature(name, quantized)
        _, text, _ = generate_source(
            "dhsa_check",
            in_names,
            out_names,
            source,
            header,
            [(x.dtype, x.size, x.ndim) for x in inputs],
            template,
            dtypes,
        )
        want = metal_source(name, inputs, template, dtypes, quantized)
        assert text == want + "\n", name  # (cut there)


# ---- quantized keys and values (mlx-lm's QuantizedKVCache) --------------------------------


def _quantized(k, v, bits, group, pad=24):
    """k and v quantized as QuantizedKVCache holds them: rows of a longer buffer, sliced (the
    kernels read the slices through their strides)."""
    B, H_kv, S, D = k.shape

    def q(x):
        full = mx.concatenate([x, mx.random.normal((B, H_kv, pad, D)).astype(x.dtype)], axis=2)
        packed, scales, biases = mx.quantize(full, group_size=group, bits=bits)
        return QuantizedKV(*(a[..., :S, :] for a in (packed, scales, biases)), bits, group)

    return q(k), q(v)


# (dtype, B, H, H_kv, L, S, D, q_offset, window, softcap, split, bits, group): with
# QUANT_DECODE_CASES every (bits, group, head dim) mlx-lm's cache makes (4 and 8 bits, groups
# 64 and 128, head dims 64, 128, 256) once, each kernel both bit widths, both group sizes and
# every head dim; GQA 1, 2, 4 and 8 heads a KV head; every dtype.
QUANT_ATTENTION_CASES = [
    (F32, 1, 4, 2, 17, 80, 64, 63, None, 50.0, False, 4, 64),
    (BF16, 1, 8, 4, 40, 120, 128, 80, 96, None, False, 8, 128),
    (F16, 1, 4, 4, 20, 100, 256, 80, 32, 50.0, True, 4, 128),
    (F32, 2, 4, 2, 48, 150, 256, 102, 40, None, True, 8, 64),
    (BF16, 1, 4, 2, 33, 90, 128, 57, None, 50.0, False, 4, 64),
    (F16, 1, 8, 2, 24, 110, 128, 86, None, 50.0, True, 4, 32),  # the 4-bit default group
]


@pytest.mark.parametrize(
    "dtype,B,H,H_kv,L,S,D,off,window,cap,split,bits,group", QUANT_ATTENTION_CASES
)
def test_quantized_attention_kernel(
    metal, monkeypatch, dtype, B, H, H_kv, L, S, D, off, window, cap, split, bits, group
):
    monkeypatch.setattr(kernels.attention, "MIN_SPLIT_TILES", 1 if split else 10**6)
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype, scale=2.0)
    kq, vq = _quantized(k, v, bits, group)
    _attention_both(q, kq, vq, off, window, cap, plan_window=window)
    launched = _launched(metal)
    assert launched.count("sparse_attention_q") == 2
    assert launched.count("merge_splits") == (2 if split else 0)


# (dtype, B, H, H_kv, S, D, q_offset, window, softcap, bits, group): decode steps.
QUANT_DECODE_CASES = [
    (F32, 1, 4, 2, 97, 64, 96, None, 50.0, 8, 64),
    (BF16, 1, 8, 1, 300, 128, 299, 64, 50.0, 8, 64),
    (F16, 2, 4, 4, 200, 128, 150, None, None, 4, 128),
    (F32, 1, 8, 4, 400, 256, 399, None, 50.0, 8, 128),
    (BF16, 1, 8, 4, 250, 256, 249, 100, None, 4, 64),
    (F32, 1, 2, 1, 120, 64, 119, None, None, 4, 32),  # group 32 (mx.quantize's smallest)
]


@pytest.mark.parametrize("dtype,B,H,H_kv,S,D,off,window,cap,bits,group", QUANT_DECODE_CASES)
def test_quantized_decode_kernel(metal, dtype, B, H, H_kv, S, D, off, window, cap, bits, group):
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=1, S=S, D=D, dtype=dtype, scale=2.0)
    kq, vq = _quantized(k, v, bits, group)
    _attention_both(q, kq, vq, off, window, cap, plan_window=window)
    assert _launched(metal) == ["decode_attention_q", "merge_splits"] * 2


def test_quantized_inputs_choose_the_quantized_variant(metal):
    """accepts_quantized names the cases; a mix of quantized and plain K/V, or K and V
    quantized differently, is one clear error; a kernel chosen for arrays refuses
    QuantizedKV."""
    for bits, group, D in ((4, 64, 64), (8, 128, 128), (4, 32, 256), (8, 64, 256)):
        assert kernels.accepts_quantized(bits, group, D)
    for bits, group, D in ((3, 64, 64), (4, 128, 64), (4, 64, 96), (8, 64, 512), (2, 32, 64)):
        assert not kernels.accepts_quantized(bits, group, D)
    assert kernels.accepts_quantized(4, 128) and not kernels.accepts_quantized(4, 256)
    q, k, v = make_qkv(H=4, H_kv=2, L=1, S=80, D=64)
    kq, vq = _quantized(k, v, 4, 64)
    args = dict(scale=SCALE, q_offset=79)
    with pytest.raises(ValueError, match="both be QuantizedKV"):
        kernels.dense_attention(q, kq, v, **args)
    with pytest.raises(ValueError, match="both be QuantizedKV"):
        kernels.dense_attention(q, kq, QuantizedKV.quantize(v, 8, 64), **args)
    plain = kernels.attention.attention_kernel((q.dtype,) * 3, 64, 4, 2, 1, 80, None)
    assert plain.quant is None
    with pytest.raises(ValueError, match="chosen for keys quantized as None"):
        kernels.run_dense(plain, q, kq, vq, **args)
    quant = kernels.attention.attention_kernel(
        (q.dtype,) * 3, 64, 4, 2, 1, 80, None, quantized=(4, 64)
    )
    assert quant.quant == (4, 64) and quant.tiles.stages == 1
    assert (
        kernels.attention.attention_kernel(
            (q.dtype,) * 3, 64, 4, 2, 1, 80, None, quantized=(4, 128)
        )
        is None
    )  # group larger than the head dim


# Planted bugs in the dequantizing load (common.h): the quantized tests must see them.
_PLANTED_DEQUANT = {
    # The values of a word read in reverse order (nibble i from the top instead of the bottom).
    "nibble order": (
        "float((x >> (BITS * i)) & MASK)",
        "float((x >> (BITS * (PER - 1 - i))) & MASK)",
    ),
    # Scale and bias swapped in the query-tile kernel's load.
    "scale and bias swapped": (
        "scale = dhsa_to_float<T>(u.scale);\n  const float bias = dhsa_to_float<T>(u.bias);",
        "scale = dhsa_to_float<T>(u.bias);\n  const float bias = dhsa_to_float<T>(u.scale);",
    ),
}


@pytest.mark.parametrize("bug", sorted(_PLANTED_DEQUANT))
def test_a_planted_dequantize_bug_is_caught(metal, monkeypatch, bug):
    old, new = _PLANTED_DEQUANT[bug]
    source = kernels.kernel_source

    def planted(name, backend, quantized=False):
        header, body = source(name, backend, quantized)
        assert old in header
        return header.replace(old, new), body

    monkeypatch.setattr(sources, "kernel_source", planted)
    emulate_metal(monkeypatch, metal)  # build again from the planted source
    q, k, v = make_qkv(H=4, H_kv=2, L=17, S=80, D=64)
    kq, vq = _quantized(k, v, 4, 64)
    with pytest.raises(AssertionError, match="max error"):
        _attention_both(q, kq, vq, 63, None, None)
    if bug == "nibble order":  # the decode kernel's load too
        q1 = q[:, :, :1]
        with pytest.raises(AssertionError, match="max error"):
            _attention_both(q1, kq, vq, 79, None, None)


# Quantized prefill over many key tiles with two K/V stages, which Metal does not choose (its
# loads are synchronous): the double-buffered load (the next tile's K and V units held in
# registers across this tile's products, then stored into the other stage) as CUDA runs it.
# (dtype, H, H_kv, L, S, D, q_offset, window, softcap, bits, group, budget, split): 20 and 32
# key tiles a plan block, ragged blocks, a window (tiles skipped at the front), splits.
QUANT_TWO_STAGE_CASES = [
    (BF16, 4, 2, 40, 700, 128, 660, None, 50.0, 4, 64, 320, False),
    (F32, 8, 4, 33, 500, 64, 467, 300, None, 8, 32, 256, True),
]


@pytest.fixture
def two_stages(monkeypatch):
    """Metal tile configs with two K/V stages for plans (where shared memory allows)."""
    monkeypatch.setitem(kernels.attention.STAGES, "metal", 2)
    kernels.attention.tile_config.cache_clear()
    yield
    kernels.attention.tile_config.cache_clear()


def _quantized_prefill(monkeypatch, dtype, H, H_kv, L, S, D, off, window, cap, bits, group,
                       budget, split):  # fmt: skip
    """Sparse attention over quantized K/V with a plan of ``budget`` keys a block, on two K/V
    stages, against the reference over the dequantized K/V."""
    monkeypatch.setattr(kernels.attention, "MIN_SPLIT_TILES", 4 if split else 10**6)
    q, k, v = make_qkv(H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype, scale=2.0)
    kq, vq = _quantized(k, v, bits, group)
    k, v = kq.dequantize(), vq.dequantize()
    q32, k32, v32 = (x.astype(mx.float32) for x in (q, k, v))
    plan = _plan(q32, k32, small_config(budget=budget), off, window)
    chosen = kernels.attention.attention_kernel(
        (dtype,) * 3, D, H, H_kv, L, S, plan.block_size, quantized=(bits, group)
    )
    assert chosen.tiles.stages == 2
    assert mx.max(plan.n_valid).item() >= 16 * chosen.tiles.bk  # many key tiles
    args = dict(scale=SCALE, softcap=cap)
    out = kernels.sparse_attention(q, kq, vq, plan, **args)
    ref32 = reference.sparse_attention(q32, k32, v32, plan, **args)
    _check(out, ref32, reference.sparse_attention(q, k, v, plan, **args), dtype, cap)


@pytest.mark.parametrize(
    "dtype,H,H_kv,L,S,D,off,window,cap,bits,group,budget,split", QUANT_TWO_STAGE_CASES
)
def test_quantized_prefill_two_stages(
    metal, monkeypatch, two_stages, dtype, H, H_kv, L, S, D, off, window, cap, bits, group,
    budget, split
):  # fmt: skip
    _quantized_prefill(
        monkeypatch, dtype, H, H_kv, L, S, D, off, window, cap, bits, group, budget, split
    )
    assert _launched(metal).count("merge_splits") == (1 if split else 0)


# Planted bugs in the two-stage quantized load (sparse_attention.metal): the test above must
# see them.
_PLANTED_TWO_STAGE = {
    # The next tile's V units stored into this tile's stage (other warps may still read it).
    "next V into this stage": (
        "DHSA_QSTORE(ks_next + BK * LDK, next);",
        "DHSA_QSTORE(vs, next);",
    ),
    # This tile's K units loaded again instead of the next tile's.
    "this tile's K again": (
        "DHSA_QLOAD(t + 1, next, k_rows);",
        "DHSA_QLOAD(t, next, k_rows);",
    ),
}


@pytest.mark.parametrize("bug", sorted(_PLANTED_TWO_STAGE))
def test_a_planted_two_stage_bug_is_caught(metal, monkeypatch, two_stages, bug):
    old, new = _PLANTED_TWO_STAGE[bug]
    source = kernels.kernel_source

    def planted(name, backend, quantized=False):
        header, body = source(name, backend, quantized)
        if quantized and name == "sparse_attention":
            assert old in body
            body = body.replace(old, new)
        return header, body

    monkeypatch.setattr(sources, "kernel_source", planted)
    emulate_metal(monkeypatch, metal)  # build again from the planted source
    with pytest.raises(AssertionError, match="max error"):
        _quantized_prefill(monkeypatch, *QUANT_TWO_STAGE_CASES[1])


# ---- the emulator itself: what it must catch ----------------------------------------------

_HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"


def _run(
    emu,
    source,
    inputs,
    out_shape,
    out_dtype=mx.float32,
    grid=(64, 1, 1),
    threadgroup=(64, 1, 1),
    names=("x",),
):
    kernel = emu.metal_kernel("emu_test", list(names), ["out"], source, header=_HEADER)
    return kernel(
        inputs=inputs,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[out_shape],
        output_dtypes=[out_dtype],
    )[0]


_NEIGHBOUR = """
threadgroup float s[64];
const uint i = thread_position_in_threadgroup.x;
s[i] = x[i];
{barrier}
out[i] = s[63 - i];
"""


def test_missing_barrier_is_caught(emulator):
    """Threads run as fibers up to their next barrier: a read of other threads' shared
    memory without one sees the poison (NaN), not their values."""
    x = mx.arange(64, dtype=mx.float32)
    ok = _run(
        emulator,
        _NEIGHBOUR.format(barrier="threadgroup_barrier(mem_flags::mem_threadgroup);"),
        [x],
        (64,),
    )
    assert mx.array_equal(ok, x[::-1])
    bad = _run(emulator, _NEIGHBOUR.format(barrier=""), [x], (64,))
    assert mx.isnan(bad).any().item()


def test_portable_fibers(tmp_path):
    """The ucontext fibers (used off x86-64 Linux, e.g. on a Mac) give the same answers."""
    emu = MetalEmulator(tmp_path, defines=("EMU_UCONTEXT",))
    x = mx.arange(64, dtype=mx.float32)
    src = _NEIGHBOUR.format(barrier="threadgroup_barrier(mem_flags::mem_threadgroup);")
    out = _run(emu, src + "out[i] += simd_shuffle_xor(x[i], ushort(1));", [x], (64,))
    assert mx.array_equal(out, x[::-1] + (mx.arange(64) ^ 1).astype(mx.float32))


def test_out_of_bounds_and_limits_are_errors(emulator):
    x = mx.arange(64, dtype=mx.float32)
    with pytest.raises(EmulatorError, match="out-of-bounds access to device buffer 'x'"):
        _run(emulator, "out[0] = x[thread_position_in_grid.x + 1];", [x], (64,))
    with pytest.raises(EmulatorError, match="out-of-bounds access to device buffer 'out'"):
        _run(emulator, "out[thread_position_in_grid.x + 64] = x[0];", [x], (64,))
    with pytest.raises(EmulatorError, match="threadgroup memory of 32772 bytes"):
        _run(emulator, "threadgroup float s[8193]; s[0] = 0; out[0] = x[0];", [x], (64,))
    with pytest.raises(ValueError, match="greater than"):
        _run(emulator, "out[0] = x[0];", [x], (64,), grid=(2048, 1, 1), threadgroup=(2048, 1, 1))
    with pytest.raises(EmulatorError, match="threadgroup_barrier"):
        _run(
            emulator,
            "if (thread_position_in_grid.x == 0) return;\n"
            "threadgroup_barrier(mem_flags::mem_threadgroup); out[0] = x[0];",
            [x],
            (64,),
        )


def test_simd_lane_rules(emulator):
    """shuffles by Metal's lane rules (up/down keep the edge lanes' own values), reductions
    per simd-group, and a read of an inactive lane is an error."""
    x = mx.arange(64, dtype=mx.float32)
    src = """
    const uint i = thread_position_in_grid.x;
    const float v = x[i];
    out[i * 6 + 0] = simd_shuffle_xor(v, ushort(5));
    out[i * 6 + 1] = simd_shuffle_down(v, ushort(3));
    out[i * 6 + 2] = simd_shuffle_up(v, ushort(3));
    out[i * 6 + 3] = simd_sum(v);
    out[i * 6 + 4] = simd_max(v);
    out[i * 6 + 5] = simd_broadcast(v, ushort(7));
    """
    out = np.array(_run(emulator, src, [x], (64 * 6,))).reshape(64, 6)
    i = np.arange(64)
    lane, base = i % 32, i - i % 32
    assert (out[:, 0] == base + (lane ^ 5)).all()
    assert (out[:, 1] == np.where(lane + 3 < 32, i + 3, i)).all()
    assert (out[:, 2] == np.where(lane >= 3, i - 3, i)).all()
    assert (out[:, 3] == np.where(i < 32, sum(range(32)), sum(range(32, 64)))).all()
    assert (out[:, 4] == base + 31).all()
    assert (out[:, 5] == base + 7).all()
    with pytest.raises(EmulatorError, match="reads lane 17, which is inactive"):
        _run(
            emulator,
            "const uint i = thread_position_in_grid.x;\n"
            "if (i % 32 < 16) { out[i] = simd_shuffle_xor(x[i], ushort(17)); }",
            [x],
            (64,),
        )


def test_simdgroup_matrix(emulator):
    """8 x 8 simdgroup matrices: load (and transposed load) from device memory, multiply-
    accumulate, store, against numpy; thread_elements follow MLX's fragment layout."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    src = """
    simdgroup_matrix<float, 8, 8> am, bm, cm, dm;
    simdgroup_load(am, a, 8);
    simdgroup_load(bm, b, 8, ulong2(0, 0), true);
    simdgroup_load(cm, c, 8);
    simdgroup_multiply_accumulate(dm, am, bm, cm);
    simdgroup_store(dm, out, 8);
    const uint l = thread_index_in_simdgroup;
    const uint r = (l / 4 & 4) + (l / 2 % 4), col = (l / 4 & 2) * 2 + (l % 2) * 2;
    out[64 + r * 8 + col] = am.thread_elements()[0];
    out[64 + r * 8 + col + 1] = am.thread_elements()[1];
    """
    ins = [mx.array(a), mx.array(b), mx.array(c)]
    out = np.array(
        _run(
            emulator,
            src,
            ins,
            (128,),
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            names=("a", "b", "c"),
        )
    )
    np.testing.assert_allclose(out[:64].reshape(8, 8), a @ b.T + c, rtol=1e-5, atol=1e-5)
    assert (out[64:].reshape(8, 8) == a).all()


def test_half_and_bfloat_round_to_nearest_even(emulator):
    """float -> half / bfloat conversions (ties, subnormals, overflow, nan) as MLX's."""
    vals = [
        0.0,
        -0.0,
        1.0,
        1.0 + 2**-11,
        1.0 + 3 * 2**-11,
        65504.0,
        65520.0,
        1e6,
        2**-24,
        2**-25,
        3 * 2**-26,
        6e-8,
        1.0 + 2**-8,
        1.0 + 3 * 2**-8,
        3.0e38,
        -7.25,
        np.inf,
        np.nan,
        0.1,
        1 / 3,
    ]
    x = mx.array(np.array(vals, np.float32))
    n = len(vals)
    for dtype in (mx.float16, mx.bfloat16):
        kernel = emulator.metal_kernel(
            "emu_round",
            ["x"],
            ["out"],
            "out[thread_position_in_grid.x] = " "T(x[thread_position_in_grid.x]);",
            header=_HEADER,
        )
        out = kernel(
            inputs=[x],
            template=[("T", dtype)],
            grid=(n, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(n,)],
            output_dtypes=[dtype],
        )[0]
        expect = x.astype(dtype)
        same = (out == expect) | (mx.isnan(out) & mx.isnan(expect))
        assert same.all().item(), (dtype, out, expect)


# ---- planted bugs in the Metal prelude: the tests above must see them ---------------------

_PLANTED = {
    # dhsa_row_sum pairs accumulator lanes differing in bit 3 (8) and bit 0: bit 2 is wrong.
    "wrong shuffle lane": ("return v + dhsa_shfl_xor(v, 8);", "return v + dhsa_shfl_xor(v, 4);"),
    # Threadgroup barriers that do nothing.
    "missing barrier": (
        "#define DHSA_BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)",
        "#define DHSA_BARRIER()",
    ),
}


@pytest.mark.parametrize("bug", sorted(_PLANTED))
def test_a_planted_prelude_bug_is_caught(metal, monkeypatch, bug):
    """The prelude with one planted bug: the emulated attention no longer matches."""
    old, new = _PLANTED[bug]
    source = kernels.kernel_source

    def planted(name, backend):
        header, body = source(name, backend)
        assert old in header
        return header.replace(old, new), body

    monkeypatch.setattr(sources, "kernel_source", planted)
    emulate_metal(monkeypatch, metal)  # build again from the planted source
    q, k, v = make_qkv(H=4, H_kv=2, L=17, S=80, D=64)
    with pytest.raises(AssertionError, match="max error"):
        mask = key_mask(63, 17, 80, None)
        out = kernels.dense_attention(q, k, v, scale=SCALE, softcap=None, q_offset=63)
        _close(out, reference.dense_attention(q, k, v, scale=SCALE, mask=mask))
