"""Kernels against the reference. Tests marked ``gpu`` run on whichever GPU backend MLX has
(Metal on a Mac, CUDA on NVIDIA) and are skipped on CPU; the references always run on the CPU
stream, in exact fp32. The dispatch tests at the end run everywhere.

GPU run: ``python3 -m pytest tests -m gpu -q -x``."""

import itertools

import mlx.core as mx
import pytest
from conftest import (
    assert_within_baseline,
    make_qkv,
    open_pieces_over_cache_steps,
    small_config,
    wide_plan,
)

from mlx_dhsa import kernels, reference
from mlx_dhsa.attention import DHSAAttention, Path
from mlx_dhsa.cache import DHSACache
from mlx_dhsa.chunking import chunk_boundaries, chunk_summaries
from mlx_dhsa.kernels import KernelState, PlanLaunch, attention_kernel, plan_launch, planning
from mlx_dhsa.kernels import attention as launches
from mlx_dhsa.selection import block_queries, chunk_scores, key_mask, select, select_chunks

BACKEND = kernels.backend().name
gpu = pytest.mark.skipif(BACKEND is None, reason="no GPU backend (Metal or CUDA)")
SCALE = 0.0625


def _plan(q, k, config, q_offset, window):
    """The real planner, on the CPU: chunks, scores and selection for queries q at q_offset."""
    L = q.shape[2]
    chunks = chunk_boundaries(k, config)
    scores = chunk_scores(block_queries(q, config.block_size), chunk_summaries(k, chunks))
    return select(scores, chunks, config, n_queries=L, q_offset=q_offset, window=window)


def _on_gpu(fn, *args, **kw):
    with mx.stream(mx.gpu):
        out = fn(*args, **kw)
        mx.eval(out)
    return out


def _kernel(q, k, v, block_size=None, use_kernel=True):
    """The attention launch the kernels choose for these arrays on the GPU, where there is one
    (None: the reference)."""
    with mx.stream(mx.gpu if mx.is_available(mx.gpu) else mx.cpu):
        return attention_kernel(
            (q.dtype, k.dtype, v.dtype),
            q.shape[-1],
            q.shape[1],
            k.shape[1],
            q.shape[2],
            k.shape[2],
            block_size,
            use_kernel=use_kernel,
        )


def _close(out, ref, tol=1e-4):
    err = mx.abs(out.astype(mx.float32) - ref).max().item()
    assert err <= tol + tol * mx.abs(ref).max().item(), f"max error {err:.3g}"


def _both_kernels_match_reference(q, k, v, q_offset, dense_window=None):
    """Sparse attention over the planner's keys and dense causal attention (in a window, if
    given), soft cap 50, each on the GPU against the CPU reference."""
    L, S = q.shape[2], k.shape[2]
    plan = _plan(q, k, small_config(), q_offset, None)
    ref = reference.sparse_attention(q, k, v, plan, scale=SCALE, softcap=50.0)
    _close(_on_gpu(kernels.sparse_attention, q, k, v, plan, scale=SCALE, softcap=50.0), ref)
    ref = reference.dense_attention(
        q, k, v, scale=SCALE, softcap=50.0, mask=key_mask(q_offset, L, S, dense_window)
    )
    out = _on_gpu(
        kernels.dense_attention,
        q,
        k,
        v,
        scale=SCALE,
        softcap=50.0,
        q_offset=q_offset,
        window=dense_window,
    )
    _close(out, ref)


# (B, H, H_kv, L, S, D, q_offset, window, softcap): ragged L around the block size (16 in
# small_config), L = 1, GQA repeats 1 and 2, head dims 64 and 256, offsets and windows.
CASES = [
    (1, 4, 2, 64, 64, 64, 0, None, 50.0),
    (1, 2, 2, 17, 80, 64, 63, None, None),
    (2, 4, 2, 63, 130, 64, 67, 40, 50.0),
    (1, 4, 2, 1, 97, 64, 96, None, 50.0),
    (1, 8, 4, 33, 160, 256, 127, None, 50.0),
    (1, 2, 1, 16, 200, 256, 184, 64, None),
    (1, 8, 4, 1, 300, 256, 299, 64, 50.0),  # a decode step in a sliding window
    (2, 8, 1, 1, 1500, 128, 1499, None, 50.0),  # decode: 8 heads a KV head, many splits
    (1, 4, 4, 1, 700, 64, 650, 200, None),  # decode: no GQA, keys past the query
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_kv,L,S,D,off,window,cap", CASES)
def test_sparse_kernel_fp32(B, H, H_kv, L, S, D, off, window, cap):
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D)
    plan = _plan(q, k, small_config(), off, window)
    ref = reference.sparse_attention(q, k, v, plan, scale=SCALE, softcap=cap)
    out = _on_gpu(kernels.sparse_attention, q, k, v, plan, scale=SCALE, softcap=cap)
    assert _kernel(q, k, v, plan.block_size) is not None
    _close(out, ref)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_kv,L,S,D,off,window,cap", CASES)
def test_dense_kernel_fp32(B, H, H_kv, L, S, D, off, window, cap):
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D)
    mask = key_mask(off, L, S, window)
    ref = reference.dense_attention(q, k, v, scale=SCALE, softcap=cap, mask=mask)
    out = _on_gpu(
        kernels.dense_attention, q, k, v, scale=SCALE, softcap=cap, q_offset=off, window=window
    )
    assert _kernel(q, k, v) is not None
    _close(out, ref)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("min_groups", [1, 10**6])
def test_split_and_unsplit_agree(monkeypatch, min_groups):
    """Both launch shapes: one pass over the keys, or several splits merged by log-sum-exp."""
    monkeypatch.setattr(launches, "MIN_SPLIT_TILES", 1)
    monkeypatch.setattr(launches, "MIN_GROUPS", min_groups)
    q, k, v = make_qkv(H=4, H_kv=2, L=48, S=300, D=64)
    _both_kernels_match_reference(q, k, v, 252)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_strided_inputs(dtype):
    """Views are read in place: a cache-like slice of a longer buffer, a query slice and a
    (B, S, H_kv, D) layout transposed to (B, H_kv, S, D)."""
    q_all, k_all, v_all = make_qkv(B=2, H=4, H_kv=2, L=90, S=170, D=64)
    q = q_all[:, :, 7:47].astype(dtype)  # 40 queries at positions 120..159
    k = k_all[:, :, :160].astype(dtype)
    v = mx.contiguous(v_all[:, :, :160].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3).astype(dtype)
    plan = _plan(q, k, small_config(), 120, None)
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    ref = reference.sparse_attention(
        *(x.astype(mx.float32) for x in (q, k, v)), plan, scale=SCALE, softcap=50.0
    )
    _close(_on_gpu(kernels.sparse_attention, q, k, v, plan, scale=SCALE, softcap=50.0), ref, tol)
    ref = reference.dense_attention(
        *(x.astype(mx.float32) for x in (q, k, v)),
        scale=SCALE,
        softcap=50.0,
        mask=key_mask(120, 40, 160, 64),
    )
    out = _on_gpu(
        kernels.dense_attention, q, k, v, scale=SCALE, softcap=50.0, q_offset=120, window=64
    )
    _close(out, ref, tol)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("decode,fold", [(False, False), (True, False), (True, True)])
def test_one_query_on_either_kernel(decode, fold):
    """A decode step on decode_attention.metal (its splits merged by a second launch, or by
    its own last group), or on the query-tile kernel where the decode kernel cannot take the
    shapes (16 query heads a KV head): the same result as the reference."""
    if fold and BACKEND != "cuda":
        pytest.skip("the folded merge runs on CUDA only")
    H, H_kv = (8, 4) if decode else (16, 1)
    q, k, v = make_qkv(H=H, H_kv=H_kv, L=1, S=2000, D=256)
    with kernels.use_backend(BACKEND, fold_decode=fold):
        assert _kernel(q, k, v).decode == decode
        _both_kernels_match_reference(q, k, v, 1999, dense_window=512)
        # Independent launches in one graph (which may run side by side) each get their own
        # answer.
        qs = [q * (1 + i) for i in range(6)]
        with mx.stream(mx.gpu):
            outs = [
                kernels.dense_attention(x, k, v, scale=SCALE, softcap=50.0, q_offset=1999)
                for x in qs
            ]
            mx.eval(outs)
    for x, out in zip(qs, outs):
        mask = key_mask(1999, 1, 2000, None)
        _close(out, reference.dense_attention(x, k, v, scale=SCALE, softcap=50.0, mask=mask))


@gpu
@pytest.mark.gpu
def test_one_ticket_buffer_serves_consecutive_launches():
    """The folded merge leaves its counters zeroed: launches that follow one another (each
    query depending on the last output, as a layer's decode steps do) share one buffer, within
    one graph and across evals."""
    if not kernels.backend().fold_decode:
        pytest.skip("the folded merge runs on CUDA only")
    q, k, v = make_qkv(H=8, H_kv=4, L=1, S=3000, D=256)
    mask = key_mask(2999, 1, 3000, None)
    state = KernelState()
    tickets = state.tickets("attention", 4)
    with mx.stream(mx.gpu):
        for _ in range(2):  # two evals of three chained launches
            outs = []
            x = q
            for _ in range(3):
                outs.append(
                    kernels.dense_attention(
                        x, k, v, scale=SCALE, softcap=50.0, q_offset=2999, state=state
                    )
                )
                x = q + 0.5 * outs[-1]  # the next launch needs this one's output
            mx.eval(outs)
            x = q
            for out in outs:
                _close(
                    out, reference.dense_attention(x, k, v, scale=SCALE, softcap=50.0, mask=mask)
                )
                x = q + 0.5 * out
        assert state.tickets("attention", 4) is tickets
        assert tickets.tolist() == [0, 0, 0, 0]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("cap", [None, 50.0])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("L,S", [(80, 208), (1, 3000)])
def test_kernels_low_precision(dtype, cap, mode, L, S):
    q, k, v = make_qkv(H=8, H_kv=4, L=L, S=S, D=256, scale=2.0)
    factor = 4.0 if cap else 2.0
    if mode == "sparse":
        plan = _plan(q, k, small_config(), S - L, 96)
        fn = lambda *x, **kw: kernels.sparse_attention(*x, plan, **kw)  # noqa: E731
        ref = lambda *x, **kw: reference.sparse_attention(*x, plan, **kw)  # noqa: E731
    else:
        fn = lambda *x, **kw: kernels.dense_attention(*x, q_offset=S - L, **kw)  # noqa: E731
        mask = key_mask(S - L, L, S, None)
        ref = lambda *x, **kw: reference.dense_attention(*x, mask=mask, **kw)  # noqa: E731
    lp = [x.astype(dtype) for x in (q, k, v)]
    ref32 = ref(*[x.astype(mx.float32) for x in lp], scale=SCALE, softcap=cap)
    ref_lp = ref(*lp, scale=SCALE, softcap=cap)
    out = _on_gpu(fn, *lp, scale=SCALE, softcap=cap)
    assert out.dtype == dtype
    assert _kernel(*lp, small_config().block_size if mode == "sparse" else None) is not None
    assert_within_baseline(out, ref32, ref_lp, factor=factor)


# ---- quantized keys and values (mlx-lm's QuantizedKVCache; issue 18) ----------------------

# (bits, group_size, head dim): every case mlx-lm's quantized cache makes at groups 64 and 128.
QUANT_GRID = [
    (bits, group, D)
    for bits in (4, 8)
    for group in (32, 64, 128)
    for D in (64, 128, 256)
    if D % group == 0 and (group != 32 or bits == 4)  # 32: DHSAConfig's default at 4 bits
]


def _quantize_cache_like(x, bits, group, pad=40):
    """x (B, H_kv, S, D) quantized as QuantizedKVCache holds it: slices of a longer buffer."""
    from mlx_dhsa.quantized import QuantizedKV

    B, H_kv, S, D = x.shape
    full = mx.concatenate([x, mx.random.normal((B, H_kv, pad, D)).astype(x.dtype)], axis=2)
    packed, scales, biases = mx.quantize(full, group_size=group, bits=bits)
    return QuantizedKV(*(a[..., :S, :] for a in (packed, scales, biases)), bits, group)


def _dequantize_fp32(x):
    f32 = lambda a: a.astype(mx.float32)
    return mx.dequantize(x.packed, f32(x.scales), f32(x.biases), group_size=x.group_size,
                         bits=x.bits)  # fmt: skip


def _quantized_matches_oracle(dtype, bits, group, D, H, H_kv, L, S, cap, window=None, config=None):
    """Sparse (the planner's keys under ``config``, None: small_config()) and dense attention
    over quantized K/V on the GPU against the oracle: everything dequantized in fp32, then the
    reference (fp32: within 1e-4; 16-bit: within 2x, 4x with a soft cap, the error of the
    reference in that dtype over the values mx.dequantize gives in that dtype). Returns the
    plan and the kernel chosen for it."""
    q, k, v = make_qkv(H=H, H_kv=H_kv, L=L, S=S, D=D, scale=2.0)
    q = q.astype(dtype)
    kq, vq = (_quantize_cache_like(x.astype(dtype), bits, group) for x in (k, v))
    kd, vd = kq.dequantize(), vq.dequantize()
    # The oracle's keys and values are the cache's exact values (scale * w + bias in fp32),
    # which the kernels compute in registers; kd/vd round them to the dtype first.
    k32, v32 = (_dequantize_fp32(x) for x in (kq, vq))
    q32 = q.astype(mx.float32)
    plan = _plan(q32, k32, config or small_config(), S - L, window)
    mask = key_mask(S - L, L, S, window)
    args = dict(scale=SCALE, softcap=cap)
    calls = [
        (
            lambda *x: kernels.sparse_attention(*x, plan, **args),
            lambda *x: reference.sparse_attention(*x, plan, **args),
            plan.block_size,
        ),
        (
            lambda *x: kernels.dense_attention(*x, q_offset=S - L, window=window, **args),
            lambda *x: reference.dense_attention(*x, mask=mask, **args),
            None,
        ),
    ]
    sparse_kernel = None
    for kernel, ref, block_size in calls:
        with mx.stream(mx.gpu if mx.is_available(mx.gpu) else mx.cpu):
            chosen = attention_kernel(
                (dtype,) * 3, D, H, H_kv, L, S, block_size, quantized=(bits, group)
            )
        assert chosen is not None and chosen.quant == (bits, group)
        sparse_kernel = sparse_kernel or chosen
        out = _on_gpu(kernel, q, kq, vq)
        assert out.dtype == dtype
        ref32 = ref(q32, k32, v32)
        if dtype == mx.float32:
            _close(out, ref32)
        else:
            assert_within_baseline(out, ref32, ref(q, kd, vd), factor=4.0 if cap else 2.0)
    return plan, sparse_kernel


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,D", QUANT_GRID)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "H,H_kv,L,S,cap",
    [(8, 4, 80, 600, 50.0), (8, 4, 1, 3000, 50.0), (8, 1, 1, 2000, None), (4, 4, 33, 300, None)],
)
def test_quantized_kernels_match_the_oracle(bits, group, D, dtype, H, H_kv, L, S, cap):
    """Prefill-like query tiles and decode steps (GQA 2, 8 and none) over every bit width,
    group size and head dim."""
    _quantized_matches_oracle(dtype, bits, group, D, H, H_kv, L, S, cap)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("window", [None, 256])
def test_quantized_decode_merge_and_window(fold, window):
    """Decode over quantized K/V with the splits merged by a second launch or by the last group
    (CUDA), inside a sliding window; and group 32 (mx.quantize's smallest)."""
    if fold and BACKEND != "cuda":
        pytest.skip("the folded merge runs on CUDA only")
    with kernels.use_backend(BACKEND, fold_decode=fold):
        _quantized_matches_oracle(mx.bfloat16, 4, 64, 256, 8, 4, 1, 5000, 50.0, window)
        _quantized_matches_oracle(mx.float16, 8, 32, 128, 8, 2, 1, 1200, None, window)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,D", [(4, 64, 256), (8, 64, 128), (8, 64, 256)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("window,min_split_tiles", [(None, 10**6), (1536, None)])
def test_quantized_prefill_over_many_key_tiles(
    monkeypatch, bits, group, D, dtype, window, min_split_tiles
):
    """A prefill step whose plan blocks hold 1024 keys (32 key tiles of the CUDA bf16 kernel),
    in one group each or split across groups (``min_split_tiles`` None: as launched), in a
    window or not: the quantized tiles' pipeline (two stages where tile_config gives them:
    the next tile's units held in registers across this tile's products) over many tiles,
    against the oracle. gemma-2's shapes (8 heads, 4 KV heads)."""
    if min_split_tiles is not None:
        monkeypatch.setattr(launches, "MIN_SPLIT_TILES", min_split_tiles)
    config = small_config(budget=1024, block_size=64)
    plan, kernel = _quantized_matches_oracle(
        dtype, bits, group, D, 8, 4, 200, 4096, 50.0, window, config
    )
    assert mx.min(plan.n_valid).item() >= 16 * kernel.tiles.bk
    units = launches.prefetch_units(kernel.tiles.warps, kernel.tiles.bk, D, bits)
    two = launches.STAGES[BACKEND] == 2 and units <= launches.PREFETCH_UNITS
    assert kernel.tiles.stages == (2 if two else 1)


def _table(k, config):
    """The chunk table a DHSA layer with a DHSACache holds for keys k (built on the CPU)."""
    attn = DHSAAttention(
        config, n_heads=1, n_kv_heads=1, head_dim=k.shape[-1], scale=SCALE, softcap=None
    )
    table = attn.chunk_view(k, DHSACache())
    mx.eval(table.starts, table.lengths, table.summaries)
    return table


# (B, H, H_kv, L, S, D, q_offset, window, budget): prefill steps at ragged offsets, decode
# (L = 1), sliding windows, fewer candidates than the budget (all taken), > 256 chunks.
PLAN_CASES = [
    (1, 4, 2, 64, 300, 64, 236, None, 48),
    (2, 4, 2, 37, 333, 64, 296, 40, 48),
    (1, 8, 4, 1, 517, 256, 516, None, 48),
    (2, 2, 1, 1, 200, 64, 199, 64, 48),
    (1, 4, 2, 20, 40, 64, 20, None, 48),
    (1, 4, 4, 33, 4000, 64, 3967, None, 160),
    (1, 2, 1, 16, 129, 32, 113, None, 32),
]


def _plan_matches_reference(fused, dtype, B, H, H_kv, L, S, D, off, window, config):
    """The planning kernels' plan (two launches, or fused where asked and possible) equals
    the reference's over the same chunk table."""
    if fused and BACKEND != "cuda":
        pytest.skip("the fused planning kernel runs on CUDA only")
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype)
    table = _table(k, config)
    ref = select_chunks(q, table, config, q_offset=off, window=window)
    with kernels.use_backend(BACKEND, fused_plan=fused):
        out = _on_gpu(kernels.select_chunks, q, table, config, q_offset=off, window=window)
        with mx.stream(mx.gpu):
            launch = plan_launch(dtype, dtype, D, L, config)
    assert launch is (PlanLaunch.FUSED if fused and L <= config.block_size else PlanLaunch.TWO)
    assert mx.array_equal(out.n_valid, ref.n_valid)
    assert mx.array_equal(out.indices, ref.indices)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("B,H,H_kv,L,S,D,off,window,budget", PLAN_CASES)
def test_plan_kernels_match_reference(fused, dtype, B, H, H_kv, L, S, D, off, window, budget):
    """Two launches (scores, selection) or, for one query block on CUDA, one (plan)."""
    _plan_matches_reference(
        fused, dtype, B, H, H_kv, L, S, D, off, window, small_config(budget=budget)
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("B,H,H_kv,L,S,D,off,window,budget", PLAN_CASES)
def test_plan_kernels_with_key_spread(fused, B, H, H_kv, L, S, D, off, window, budget):
    """key_spread: block_scores adds the closed chunks' spread term (bf16 queries and keys,
    float16 summaries and spreads): the reference's plan."""
    config = small_config(budget=budget, key_spread=1.0)
    _plan_matches_reference(fused, mx.bfloat16, B, H, H_kv, L, S, D, off, window, config)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("D", [64, 256])
def test_wide_decode_plans_match_reference(fused, D):
    """A decode plan past 1024 key intervals (decode_refine's widened plans: select_keys'
    MAX_IV 2560, beside the fused kernel's scores at D = 256): the reference's plan."""
    config = small_config(budget=4 * 520)
    assert planning.max_intervals(config) == planning.MAX_INTERVALS
    _plan_matches_reference(fused, mx.bfloat16, 1, 8, 4, 1, 4600, D, 4599, None, config)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("B,H,H_kv,L,S,D,off,window,budget", PLAN_CASES + [
    (1, 4, 2, 1, 256, 64, 255, None, 48),  # an empty open part
    (1, 8, 4, 1, 4050, 128, 4049, None, 160),  # open pieces across two groups' tiles
])  # fmt: skip
def test_plan_kernels_open_pieces(fused, dtype, B, H, H_kv, L, S, D, off, window, budget):
    """open_pieces (the open chunk as target_chunk-key pieces, summed by the kernel): the
    reference's plan, on either launch."""
    config = small_config(budget=budget, open_pieces=True, key_spread=0.0)
    _plan_matches_reference(fused, dtype, B, H, H_kv, L, S, D, off, window, config)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_plan_kernels_take_the_planted_open_pieces(fused):
    """Keys 264..279 (open pieces 1 and 2 of the open part 256..299) point along the query:
    the kernels' plan with open_pieces holds them all, as the reference's."""
    if fused and BACKEND != "cuda":
        pytest.skip("the fused planning kernel runs on CUDA only")
    config = small_config(open_pieces=True, summary="mean")
    k = 0.01 * mx.random.normal((1, 2, 300, 64))
    k[:, :, 264:280] = 1.0
    q = mx.ones((1, 4, 1, 64))
    table = _table(k, config)
    ref = select_chunks(q, table, config, q_offset=299)
    with kernels.use_backend(BACKEND, fused_plan=fused):
        out = _on_gpu(kernels.select_chunks, q, table, config, q_offset=299)
    assert mx.array_equal(out.indices, ref.indices) and mx.array_equal(out.n_valid, ref.n_valid)
    assert set(range(264, 280)) <= set(out.indices[0, 0].tolist())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_open_pieces_plans_over_cache_steps(fused):
    """A DHSACache's layer planning with open_pieces over prefill and decode steps, a segment
    closing and a trim: each plan equals the reference's over the table rebuilt from
    scratch, and no open-chunk running sum is carried."""
    if fused and BACKEND != "cuda":
        pytest.skip("the fused planning kernel runs on CUDA only")
    with kernels.use_backend(BACKEND, fused_plan=fused):
        open_pieces_over_cache_steps(lambda *a, **kw: _on_gpu(kernels.select_chunks, *a, **kw))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("open_pieces", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("B,H,H_kv,L,S,D,off,window,budget", [c for c in PLAN_CASES if c[4] >= 128])
def test_plan_kernels_read_keys_from_keys_start(
    fused, open_pieces, dtype, B, H, H_kv, L, S, D, off, window, budget
):
    """A table holding its keys from 5 before its open chunk on (as a QuantizedDHSACache's):
    the reference's plan over it (and over the whole table), on either launch."""
    if fused and BACKEND != "cuda":
        pytest.skip("the fused planning kernel runs on CUDA only")
    q, k, _ = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, dtype=dtype)
    config = small_config(budget=budget, open_pieces=open_pieces)
    whole = _table(k, config)
    table = planning.keys_from(whole, -5)
    assert table.keys_start > 0
    ref = select_chunks(q, table, config, q_offset=off, window=window)
    assert mx.array_equal(ref.indices, select_chunks(q, whole, config, q_offset=off,
                                                     window=window).indices)  # fmt: skip
    with kernels.use_backend(BACKEND, fused_plan=fused):
        out = _on_gpu(kernels.select_chunks, q, table, config, q_offset=off, window=window)
    assert mx.array_equal(out.n_valid, ref.n_valid)
    assert mx.array_equal(out.indices, ref.indices)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("open_pieces", [False, True])
@pytest.mark.parametrize("dtype,bits,group,D", [(mx.float32, 4, 64, 64), (mx.bfloat16, 8, 128, 128),
                                                (mx.float16, 4, 32, 128)])  # fmt: skip
def test_plans_over_a_quantized_cache(fused, open_pieces, dtype, bits, group, D):
    """A DHSA layer's QuantizedDHSACache (chunk state from the model-dtype keys, kept for the
    open segment only) planned on the kernels over prefill and decode steps, segments closing
    and trims: plan_launch takes the calls, the table's keys start past 0, and every plan
    equals the pure-MLX planner's over the same table (on the CPU); with one open chunk the
    running open-chunk sum is carried between calls."""
    from mlx_dhsa.quantized import QuantizedKV
    from mlx_dhsa.quantized_cache import QuantizedDHSACache

    if fused and BACKEND != "cuda":
        pytest.skip("the fused planning kernel runs on CUDA only")
    config = small_config(open_pieces=open_pieces)
    attn = DHSAAttention(config, n_heads=8, n_kv_heads=2, head_dim=D, scale=SCALE, softcap=None)
    cache = QuantizedDHSACache(group_size=group, bits=bits)
    steps = [100, 27, 1, 1, 1, "trim 2", 1, 1, 40, 1, 1, "trim 70", 30] + [1] * 70 + [300, 1, 1]
    offsets, carried = [], 0
    with kernels.use_backend(BACKEND, fused_plan=fused):
        for step in steps:
            if isinstance(step, str):
                cache.trim(int(step.split()[1]))
                continue
            k, v = (mx.random.normal((1, 2, step, D)).astype(dtype) for _ in range(2))
            keys = QuantizedKV.of(cache.update_and_fetch(k, v)[0], bits, group)
            S = keys.shape[2]
            q = mx.random.normal((1, 8, step, D)).astype(dtype)
            with mx.stream(mx.gpu):
                launch = plan_launch(dtype, dtype, D, step, config, quantized=(bits, group))
            assert launch is (PlanLaunch.FUSED if fused and step == 1 else PlanLaunch.TWO)
            if cache.kernel_state is None:
                cache.kernel_state = KernelState()
            state = cache.kernel_state
            table = attn.chunk_view(keys, cache)
            mx.eval(table.starts, table.lengths, table.summaries, table.keys)
            offsets.append(table.keys_start)
            carried += state.carried_sum(table.open_start, table.n_keys, 1) is not None
            out = _on_gpu(kernels.run_plan, launch, q, table, config, q_offset=S - step,
                          state=state)  # fmt: skip
            ref = select_chunks(q, table, config, q_offset=S - step)
            assert mx.array_equal(out.n_valid, ref.n_valid)
            assert mx.array_equal(out.indices, ref.indices)
    assert max(offsets) >= 256
    assert (carried >= 50) != open_pieces


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_patched_model_plans_on_kernels_over_a_quantized_cache(bits):
    """End to end on the GPU with a quantized KV cache (kv_bits): sparse prefill and decode
    plan on the planning kernels (Route.plan) and give the greedy tokens of the pure-MLX
    path (use_kernel=False)."""
    from conftest import tiny_gemma2
    from mlx_lm.generate import generate_step

    import mlx_dhsa
    from mlx_dhsa.quantized_cache import QuantizedDHSACache

    model = tiny_gemma2()
    prompt = mx.random.randint(0, 1024, (300,))
    tokens = {}
    for use_kernel in (True, False):
        mlx_dhsa.unpatch(model)
        config = small_config(use_kernel=use_kernel, kv_bits=bits, kv_group_size=32)
        mlx_dhsa.patch(model, config)
        cache = mlx_dhsa.make_prompt_cache(model)
        assert all(isinstance(c, QuantizedDHSACache) for c in cache[1::2])  # global layers
        with mx.stream(mx.gpu):
            gen = generate_step(prompt, model, max_tokens=24, prefill_step_size=64,
                                prompt_cache=cache)  # fmt: skip
            tokens[use_kernel] = [int(t) for t, _ in gen]
        layers = mlx_dhsa.patching.dhsa_layers(model)
        routes = [a.last_route for a in layers if a.window is None]
        assert {r.plan is not None for r in routes} == {use_kernel}
        assert {r.path for r in routes} == {
            Path.SPARSE_KERNEL if use_kernel else Path.SPARSE_REFERENCE
        }
    assert tokens[True] == tokens[False]


@gpu
@pytest.mark.gpu
def test_fused_plans_share_one_ticket_buffer():
    """The fused planning kernel leaves its counters zeroed: a decode-like chain of launches
    (each query depending on the last plan) shares one buffer, within a graph and across
    evals, and every plan equals the reference's; many chunk tiles, so many groups hand off."""
    if not kernels.backend().fused_plan:
        pytest.skip("the fused planning kernel runs on CUDA only")
    q, k, _ = make_qkv(H=8, H_kv=4, L=1, S=6000, D=128)
    config = small_config(budget=256)
    table = _table(k, config)
    state = KernelState()
    tickets = state.tickets("plan", 1)
    shift = mx.random.normal(q.shape)  # each next query differs: other chunks win
    for _ in range(2):
        with mx.stream(mx.gpu):
            plans, x = [], q
            for i in range(3):
                plans.append(kernels.select_chunks(x, table, config, q_offset=5999, state=state))
                x = q + shift * (1 + i + plans[-1].n_valid[0, 0] % 2).astype(q.dtype)
            mx.eval([p.indices for p in plans])
        for i, plan in enumerate(plans):
            x = q if i == 0 else q + shift * (i + plans[i - 1].n_valid[0, 0] % 2).astype(q.dtype)
            ref = select_chunks(x, table, config, q_offset=5999, window=None)
            assert mx.array_equal(plan.indices, ref.indices)
    assert state.tickets("plan", 1) is tickets and tickets.tolist() == [0]


@gpu
@pytest.mark.gpu
def test_block_scores_carry_the_open_chunk_sum():
    """A DHSACache keeps the open chunk's key sum between calls (the kernel reads only new
    keys): over prefill steps, decode steps, a segment closing and a trim, the scores equal
    those of the chunk table rebuilt from scratch."""
    config = small_config(key_spread=0.0)  # the summaries' scores alone
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=64, scale=SCALE, softcap=None)
    cache = DHSACache()
    carried = 0
    for step in [100, 37, 1, 1, 1, "trim", 1, 1, 40, 1, 1]:
        if step == "trim":
            cache.trim(3)  # drops the kernel state
            continue
        new = mx.random.normal((1, 2, step, 64))
        keys, _ = cache.update_and_fetch(new, new)
        q = mx.random.normal((1, 4, step, 64))
        table = attn.chunk_view(keys, cache)
        if cache.kernel_state is None:
            cache.kernel_state = KernelState()
        state = cache.kernel_state
        carried += state.carried_sum(table.open_start, table.n_keys, 1) is not None
        out = _on_gpu(planning.block_scores, q, table, config, state)
        assert state.open_end == keys.shape[2]
        _, summaries = attn.chunk_view(keys).materialize()  # no cache: from scratch
        _close(out, chunk_scores(block_queries(q, config.block_size), summaries))
    assert carried >= 5  # the running sum was used, not only rebuilt


@gpu
@pytest.mark.gpu
def test_plan_kernels_ties_in_key_order():
    """Equal scores (identical keys, mean summaries): chunks are taken in key order."""
    k = mx.ones((1, 2, 300, 64))
    q = mx.ones((1, 4, 16, 64))
    config = small_config(summary="mean")
    out = _on_gpu(kernels.select_chunks, q, _table(k, config), config, q_offset=284, window=None)
    ref = select_chunks(q, _table(k, config), config, q_offset=284, window=None)
    assert mx.array_equal(out.n_valid, ref.n_valid)
    n = out.n_valid[0, 0].item()
    keys = out.indices[0, 0, :n].tolist()
    free = config.budget - config.sink - (config.local + 16)
    assert keys == list(range(config.sink)) + list(range(4, 4 + free)) + list(range(276, 300))


@gpu
@pytest.mark.gpu
def test_plan_kernels_fall_back_for_max_head_scores():
    q, k, _ = make_qkv(L=16, S=200, D=64)
    config = small_config(head_scores="max")
    with mx.stream(mx.gpu):
        assert plan_launch(q.dtype, k.dtype, 64, 16, config) is None
    out = _on_gpu(kernels.select_chunks, q, _table(k, config), config, q_offset=184, window=None)
    ref = select_chunks(q, _table(k, config), config, q_offset=184, window=None)
    assert mx.array_equal(out.indices, ref.indices)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 256])
def test_decode_head_max_plans_on_the_kernels(D):
    """One query with head scores "max" (decode_head_scores): block_scores with each head a
    block, the best head's score, select_keys; the plan equals the reference's."""
    q, k, _ = make_qkv(L=1, S=400, D=D)
    config = small_config(head_scores="max")
    with mx.stream(mx.gpu):
        assert plan_launch(q.dtype, k.dtype, D, 1, config) is PlanLaunch.TWO
    out = _on_gpu(kernels.select_chunks, q, _table(k, config), config, q_offset=399, window=None)
    ref = select_chunks(q, _table(k, config), config, q_offset=399, window=None)
    assert mx.array_equal(out.indices, ref.indices) and mx.array_equal(out.n_valid, ref.n_valid)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("open_pieces, window", [(False, None), (True, None), (False, 96)])
def test_patched_model_on_kernels_generates_like_the_reference(open_pieces, window):
    """End to end on the GPU: sparse prefill steps and sparse decode through the kernels give
    the greedy tokens of the pure-MLX path (use_kernel=False), also with open pieces, and
    with a sliding window the prompt passes (the sliding layers' window caches rotate)."""
    from conftest import tiny_gemma2
    from mlx_lm.generate import generate_step

    import mlx_dhsa

    model = tiny_gemma2()
    if window:
        model.args.sliding_window = window
    prompt = mx.random.randint(0, 1024, (300,))
    tokens = {}
    for use_kernel in (True, False):
        mlx_dhsa.unpatch(model)
        mlx_dhsa.patch(model, small_config(use_kernel=use_kernel, open_pieces=open_pieces))
        with mx.stream(mx.gpu):
            gen = generate_step(
                prompt,
                model,
                max_tokens=24,
                prefill_step_size=64,
                prompt_cache=mlx_dhsa.make_prompt_cache(model),
            )
            tokens[use_kernel] = [int(t) for t, _ in gen]
        layers = mlx_dhsa.patching.dhsa_layers(model)
        routes = [a.last_route for a in layers if a.window is None]  # sliding: dense, windowed
        assert {r.path for r in routes} == {
            Path.SPARSE_KERNEL if use_kernel else Path.SPARSE_REFERENCE
        }
        assert {r.plan is not None for r in routes} == {use_kernel}
    assert tokens[True] == tokens[False]


@gpu
@pytest.mark.gpu
def test_dense_decode_steps_on_the_fused_kernel():
    """Dense decode steps (a global layer over every key, a sliding layer over its window) on
    the fused kernel give the logits of mlx-lm's ops (the reference path, on the CPU)."""
    from conftest import tiny_gemma2

    import mlx_dhsa

    model = mlx_dhsa.patch(tiny_gemma2(), small_config(decode_dense_below=None))
    for a in mlx_dhsa.patching.dhsa_layers(model):
        a.window = 32 if a.window else None  # the 81-key step reads the last 32 keys
    prompt = mx.random.randint(0, 1024, (1, 80))
    caches = [mlx_dhsa.make_prompt_cache(model) for _ in range(2)]
    for cache in caches:
        mx.eval(model(prompt, cache=cache))
    gpu_logits = _on_gpu(model, prompt[:, -1:], cache=caches[0])
    routes = [a.last_route for a in mlx_dhsa.patching.dhsa_layers(model)]
    assert {r.path for r in routes} == {Path.DENSE_KERNEL}
    assert {a.last_path for a in mlx_dhsa.patching.dhsa_layers(model)} == {"dense"}
    with mx.stream(mx.cpu):
        cpu_logits = model(prompt[:, -1:], cache=caches[1])
        mx.eval(cpu_logits)
    _close(gpu_logits, cpu_logits)


def test_dispatch_falls_back_on_cpu():
    q, k, v = make_qkv(L=20, S=40)
    plan = _plan(q, k, small_config(), 20, None)
    assert _kernel(q, k, v, plan.block_size) is None
    out = kernels.sparse_attention(q, k, v, plan, scale=SCALE, softcap=50.0)
    ref = reference.sparse_attention(q, k, v, plan, scale=SCALE, softcap=50.0)
    assert mx.array_equal(out, ref)
    out = kernels.dense_attention(q, k, v, scale=SCALE, q_offset=20, window=8)
    mask = key_mask(20, 20, 40, 8)
    assert mx.array_equal(out, reference.dense_attention(q, k, v, scale=SCALE, mask=mask))
    config = small_config()
    table = _table(k, config)
    assert plan_launch(q.dtype, k.dtype, q.shape[-1], 20, config) is None
    out = kernels.select_chunks(q, table, config, q_offset=20, window=None)
    ref = select_chunks(q, table, config, q_offset=20, window=None)
    assert mx.array_equal(out.indices, ref.indices)


@gpu
@pytest.mark.gpu
def test_use_kernel_false_forces_reference():
    q, k, v = make_qkv(L=20, S=40, D=64)
    assert _kernel(q, k, v) is not None and _kernel(q, k, v, use_kernel=False) is None
    with mx.stream(mx.gpu):
        assert (
            plan_launch(q.dtype, k.dtype, 64, 20, small_config(use_kernel=False), use_kernel=False)
            is None
        )


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_tile_configs_fit_each_backend(backend):
    """The attention kernel's tiles for every supported dtype, head dim and GQA layout, over
    arrays and quantized K/V, fit the backend's shared memory, and a group's queries never
    straddle a plan block. CUDA keeps two K/V stages for plans even at head dim 256 (dynamic
    shared memory past the 48 KB static limit), over quantized K/V where a thread's share of
    a tile is at most PREFETCH_UNITS (gemma-2's bf16 at 4 bits: two; at 8 bits: one);
    all-keys calls keep one."""
    tile_config = launches.tile_config
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        for D in (64, 128, 256):
            for H, H_kv in ((8, 4), (4, 4), (32, 8)):
                for block_size, bits in itertools.product((None, 128, 16), (None, 4, 8)):
                    t = tile_config(backend, dtype, D, H, H_kv, block_size, bits)
                    rows, size = t.warps * t.wrows, dtype.size
                    smem = max(rows, 2 * t.bk * t.stages) * (D + 16 // size) * size
                    assert t.smem == smem <= launches.SMEM_LIMIT[backend]
                    units = 0 if bits is None else launches.prefetch_units(t.warps, t.bk, D, bits)
                    two = block_size and units <= launches.PREFETCH_UNITS
                    assert t.stages == (launches.STAGES[backend] if two else 1)
                    assert t.qt * (H // H_kv) <= rows
                    assert block_size is None or block_size % t.qt == 0
    if backend == "cuda":
        assert tile_config(backend, mx.bfloat16, 256, 8, 4, 128, 4).stages == 2
        assert tile_config(backend, mx.bfloat16, 256, 8, 4, 128, 8).stages == 1
        assert tile_config(backend, mx.bfloat16, 128, 8, 4, 128, 8).stages == 2
    assert tile_config(backend, mx.int32, 64, 8, 4, None) is None
    assert tile_config(backend, mx.float32, 72, 8, 4, None) is None  # D % 16
    assert tile_config(backend, mx.float32, 64, 6, 4, None) is None  # H % H_kv


@pytest.mark.parametrize("n_slots", [1, 15, 16, 64, 65, 2048, 4096, 16385, 131072])
@pytest.mark.parametrize("heads", [1, 4, 16, 1024])
def test_decode_splits_cover_every_slot_once(n_slots, heads):
    """decode_attention.metal's splits: whole warp steps, none empty, all slots covered, about
    512 groups (the H200's), and no more splits than DECODE_MIN_SPLIT-slot pieces."""
    n_splits, per = launches.decode_splits(n_slots, heads, 512)
    assert per % launches.DECODE_STEP == 0
    assert (n_splits - 1) * per < n_slots <= n_splits * per
    assert n_splits == 1 or n_splits * heads <= 512 + heads
    assert n_splits <= -(-n_slots // launches.DECODE_MIN_SPLIT)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "H,H_kv,D,stride,window,cap",
    [(8, 4, 256, 8, None, 50.0), (4, 1, 256, 1, None, None), (8, 8, 64, 16, 700, None)],
)
def test_refine_scores_kernel(dtype, H, H_kv, D, stride, window, cap):
    """refine_scores.metal on the GPU against reference.refine_scores (CPU, fp32) at model
    shapes (blocks of 128, 1024 candidates a block, a short last block); fp32 within 1e-4 of
    the largest score, 16-bit within 2x the error of the reference in that dtype."""
    L, S, K, block_size = 300, 2000, 1024, 128
    q, k, _ = make_qkv(H=H, H_kv=H_kv, L=L, S=S, D=D, scale=0.5)
    wide = wide_plan(1, -(-L // block_size), K, L, S, block_size, window)
    args = (stride, D**-0.5, cap)
    with mx.stream(mx.gpu):
        kernel = kernels.refine_kernel(dtype, dtype, D, H, H_kv, block_size, stride)
        assert kernel is not None
        out = kernels.run_refine(kernel, wide, q.astype(dtype), k.astype(dtype), *args)
        mx.eval(out)
    with mx.stream(mx.cpu):
        ref32 = reference.refine_scores(wide, q, k, *args)
        if dtype == mx.float32:
            _close(out, ref32)
        else:
            ref_lp = reference.refine_scores(wide, q.astype(dtype), k.astype(dtype), *args)
            assert_within_baseline(out, ref32, ref_lp)
