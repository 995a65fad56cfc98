"""Refinement (``DHSAConfig.decode_refine`` / ``prefill_refine``, mlx_dhsa/refine.py): a decode
step's or a prefill block's plan keeps the forced keys and the best candidates by exact logits,
within the budget."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_qkv, small_config, tiny_gemma3
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dhsa import DHSAConfig, patch, reference
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.config import ConfigError
from mlx_dhsa.planners import PLANNERS, step_config
from mlx_dhsa.planners import plan as dispatch
from mlx_dhsa.reference import dense_attention, sparse_attention
from mlx_dhsa.selection import key_mask

SCALE = 0.25


def _plan(config, q, k, offset, window=None):
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=16, scale=SCALE, softcap=None)
    return dispatch(q, k, config=config, table=lambda: attn.chunk_view(k), offset=offset,
                    window=window, scale=SCALE, softcap=None)  # fmt: skip


def _forced(config, q0, q1, window):
    """First allowed key and the forced keys (sinks, local window) of queries q0..q1."""
    lo = max(0, q0 - window + 1) if window else 0
    sink_end = max(lo, min(config.sink, q1 + 1))
    return lo, set(range(lo, sink_end)) | set(range(max(q0 - config.local, lo, sink_end), q1 + 1))


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(sorted(PLANNERS)),
    S=st.integers(1, 300),
    refine=st.integers(1, 5),
    window=st.sampled_from([None, 40]),
    head=st.sampled_from(["mean", "max"]),
    seed=st.integers(0, 2**16),
)
def test_decode_refine_plan_invariants(method, S, refine, window, head, seed):
    mx.random.seed(seed)
    config = small_config(method=method, decode_refine=refine, decode_head_scores=head)
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=16)
    plan = _plan(config, q, k, S - 1, window)
    idx, n = np.array(plan.indices)[0, 0], int(plan.n_valid[0, 0].item())
    lo, forced = _forced(config, S - 1, S - 1, window)
    keys = idx[:n]
    assert plan.indices.shape == (1, 1, config.budget) and plan.indices.dtype == mx.int32
    assert n == min(config.budget, S - lo)  # the budget is filled
    assert (np.diff(keys) > 0).all() and (keys >= lo).all() and (keys <= S - 1).all()
    assert (idx[n:] == 0).all() and forced <= set(keys.tolist())


@pytest.mark.parametrize("refine", [1, 4])
def test_decode_head_max_shortlists_a_one_head_needle(refine):
    # Issue 16 at 16k: a needle that one head of four attends to ranks low by the heads'
    # mean score, and its chunk is not shortlisted; ranked by the best head it is.
    S, needle = 600, 200
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=16)
    v = q[0, 2, 0] / mx.linalg.norm(q[0, 2, 0])
    q = q.at[0, :, 0].add(mx.array([-2.0, -2.0, 3.0, -2.0])[:, None] * 4 * v)  # mean: < 0
    k = k.at[0, :, needle - 3 : needle + 3].add(6 * v)
    config = small_config(budget=48, decode_refine=refine)
    keep = {c: set(_plan(config.replace(decode_head_scores=c), q, k, S - 1).indices.tolist()[0][0])
            for c in ("mean", "max")}  # fmt: skip
    assert needle in keep["max"] and needle not in keep["mean"]


def test_refine_over_every_key_keeps_the_most_probable_keys():
    # Candidates = every key: the scored part is the keys of largest dense probability
    # (summed over heads), i.e. the key-level oracle outside the forced keys.
    S = 400
    config = small_config(decode_refine=S)
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=16, scale=1.5)
    plan = _plan(config, q, k, S - 1)
    n = int(plan.n_valid[0, 0].item())
    got = set(np.array(plan.indices)[0, 0, :n].tolist())
    _, forced = _forced(config, S - 1, S - 1, None)
    logits = SCALE * (q.reshape(2, 2, 16) @ k[0].swapaxes(-1, -2))  # (H_kv, rep, S)
    probs = np.array(mx.softmax(logits, axis=-1).sum(axis=(0, 1)))
    free = [i for i in np.argsort(-probs, kind="stable") if i not in forced]
    want = forced | set(free[: config.budget - len(forced)])
    assert got == want


def test_refine_one_is_the_plain_plan_and_prefill_is_unchanged():
    q, k, _ = make_qkv(H=4, H_kv=2, L=40, S=200, D=16)
    plain, refined = small_config(decode_refine=1), small_config(decode_refine=3)
    for L in (1, 40):  # decode (refine 1 vs plain), prefill (refine ignored)
        a = _plan(plain, q[:, :, -L:], k, 200 - L)
        b = _plan(refined if L > 1 else plain, q[:, :, -L:], k, 200 - L)
        assert mx.array_equal(a.indices, b.indices).item()
    a = _plan(plain, q[:, :, -1:], k, 199)
    b = _plan(refined, q[:, :, -1:], k, 199)
    assert not mx.array_equal(a.indices, b.indices).item()  # decode plans do change


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(sorted(PLANNERS)),
    S=st.integers(2, 300),
    L=st.integers(2, 70),
    refine=st.integers(1, 5),
    stride=st.sampled_from([1, 3, 16]),
    window=st.sampled_from([None, 40]),
    seed=st.integers(0, 2**16),
)
def test_prefill_refine_plan_invariants(method, S, L, refine, stride, window, seed):
    mx.random.seed(seed)
    L = min(L, S)
    config = small_config(method=method, prefill_refine=refine, refine_stride=stride)
    q, k, _ = make_qkv(H=4, H_kv=2, L=L, S=S, D=16)
    plan = _plan(config, q, k, S - L, window)
    bs = config.block_size
    assert plan.indices.shape == (1, -(-L // bs), config.budget)
    for blk, (idx, n) in enumerate(zip(np.array(plan.indices)[0], plan.n_valid.tolist()[0])):
        q0 = S - L + blk * bs
        q1 = min(q0 + bs, S) - 1
        lo, forced = _forced(config, q0, q1, window)
        keys = idx[:n]
        assert n == min(config.budget, q1 + 1 - lo)  # the budget is filled
        assert (np.diff(keys) > 0).all() and (keys >= lo).all() and (keys <= q1).all()
        assert (idx[n:] == 0).all() and forced <= set(keys.tolist())


@pytest.mark.parametrize("stride", [1, 3, 16])  # 16: the last block (8 queries) has one
def test_prefill_refine_over_every_key_keeps_each_blocks_most_probable_keys(stride):
    # Candidates = every key: a block's scored part is the keys of largest causal probability
    # summed over its scoring queries (every stride-th) and heads, outside the forced keys.
    S, L = 300, 40
    config = small_config(prefill_refine=S, refine_stride=stride)
    q, k, _ = make_qkv(H=4, H_kv=2, L=L, S=S, D=16, scale=1.5)
    plan = _plan(config, q, k, S - L)
    logits = SCALE * (q[0].reshape(2, 2, L, 16) @ k[0][:, None].swapaxes(-1, -2))  # (2, 2, L, S)
    pos = S - L + np.arange(L)
    logits = mx.where(mx.array(np.arange(S)[None] <= pos[:, None]), logits, -mx.inf)
    probs = np.array(mx.softmax(logits, axis=-1).sum(axis=(0, 1)))  # (L, S)
    bs = config.block_size
    for blk in range(-(-L // bs)):
        q0 = S - L + blk * bs
        q1 = min(q0 + bs, S) - 1
        _, forced = _forced(config, q0, q1, None)
        rows = [i - (S - L) for i in range(q1, q0 - 1, -stride)]  # back from the last
        score = probs[rows].sum(0)
        free = [i for i in np.argsort(-score, kind="stable") if i not in forced and i <= q1]
        n = int(plan.n_valid[0, blk].item())
        got = set(np.array(plan.indices)[0, blk, :n].tolist())
        assert got == forced | set(free[: config.budget - len(forced)])


def test_prefill_refine_keeps_a_key_that_half_the_block_attends_to():
    # Half the block's queries look for the needle (+v), half away from it (-v), so their mean
    # does not: by chunk score (the mean query's) decoy chunks along u, which no query attends
    # to much, outrank it and fill the budget; the needle still makes the 4 x budget shortlist,
    # and the queries' exact logits keep it.
    S, L, needle = 600, 16, 200
    q, k, _ = make_qkv(H=4, H_kv=2, L=L, S=S, D=16)
    u, v = mx.eye(16)[0], mx.eye(16)[1]
    sign = mx.where(mx.arange(L) % 2 == 0, 1.0, -1.0)[None, None, :, None]
    q = q + u + 4 * sign * v
    k = k.at[0, :, 300:396].add(1.5 * u)  # 12 decoy chunks: 96 keys, the scored room is 20
    k = k.at[0, :, needle - 3 : needle + 3].add(6 * v + 0.8 * u)
    keep = {f: set(_plan(small_config(prefill_refine=f), q, k, S - L).indices.tolist()[0][0])
            for f in (1, 4)}  # fmt: skip
    assert needle in keep[4] and needle not in keep[1]


def test_prefill_refine_in_groups_of_blocks_is_the_same_plan(monkeypatch):
    # A long prefill scores its candidates a few blocks at a time (MAX_REFINE_SCORES).
    q, k, _ = make_qkv(H=4, H_kv=2, L=100, S=300, D=16)
    config = small_config(prefill_refine=3, refine_stride=2)
    whole = _plan(config, q, k, 200)
    monkeypatch.setattr(reference, "MAX_REFINE_SCORES", 4 * 8 * 150 * 2)  # 2 blocks a group
    grouped = _plan(config, q, k, 200)
    assert mx.array_equal(whole.indices, grouped.indices).item()
    assert mx.array_equal(whole.n_valid, grouped.n_valid).item()


def test_prefill_refine_changes_prefill_plans_only():
    q, k, _ = make_qkv(H=4, H_kv=2, L=40, S=200, D=16)
    plain, refined = small_config(), small_config(prefill_refine=3, refine_stride=2)
    a, b = (_plan(c, q, k, 160) for c in (plain, refined))
    assert not mx.array_equal(a.indices, b.indices).item()
    a, b = (_plan(c, q[:, :, -1:], k, 199) for c in (plain, refined))
    assert mx.array_equal(a.indices, b.indices).item()


def test_refined_decode_attention_matches_dense_at_full_budget():
    S = 120
    config = small_config(budget=128, decode_refine=2)
    q, k, v = make_qkv(H=4, H_kv=2, L=1, S=S, D=16)
    plan = _plan(config, q, k, S - 1)
    out = sparse_attention(q, k, v, plan, scale=SCALE)
    dense = dense_attention(q, k, v, scale=SCALE, mask=key_mask(S - 1, 1, S, None))
    assert mx.allclose(out, dense, atol=1e-5).item()


def test_refine_over_quantized_keys_equals_refine_over_their_dequantized_values():
    # Only the candidates' rows are dequantized; the plan must be the one of the whole array.
    from mlx_dhsa.quantized import QuantizedKV
    from mlx_dhsa.refine import refine_plan, widened

    S = 300
    config = small_config(decode_refine=3)
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=S, D=64)
    qk = QuantizedKV.quantize(k, bits=4, group_size=32)
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=64, scale=SCALE, softcap=None)
    wide = PLANNERS["dhsa"](q, qk.dequantize(), config=widened(config, config.decode_refine),
                            table=lambda: attn.chunk_view(qk.dequantize()), offset=S - 1,
                            window=None, scale=SCALE, softcap=None)  # fmt: skip
    got = refine_plan(wide, q, qk, config, scale=SCALE, softcap=None)
    want = refine_plan(wide, q, qk.dequantize(), config, scale=SCALE, softcap=None)
    assert mx.array_equal(got.indices, want.indices).item()
    assert mx.array_equal(got.n_valid, want.n_valid).item()


def test_refine_settings_are_checked():
    with pytest.raises(ConfigError, match="decode_refine must be a positive integer"):
        DHSAConfig(decode_refine=0)
    with pytest.raises(ConfigError, match="prefill_refine must be a positive integer"):
        DHSAConfig(prefill_refine=0)
    with pytest.raises(ConfigError, match=r"refine_stride \(200\) must be at most block_size"):
        DHSAConfig(refine_stride=200)
    assert DHSAConfig().decode_refine == 4 and DHSAConfig.paper().decode_refine == 1
    assert DHSAConfig.paper().prefill_refine == 1


def test_patched_model_decodes_with_refine():
    model = patch(tiny_gemma3(), small_config(decode_refine=4))
    from mlx_dhsa.patching import dhsa_layers, make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.arange(200)[None], cache=cache))
    out = model(mx.array([[3]]), cache=cache)
    assert out.shape[:2] == (1, 1) and mx.isfinite(out).all().item()
    assert {a.last_path for a in dhsa_layers(model)} == {"dhsa(reference)"}


@pytest.mark.gpu
@pytest.mark.skipif(not mx.is_available(mx.gpu), reason="no GPU")
@pytest.mark.parametrize("head", ["mean", "max"])
def test_refined_decode_step_on_the_kernels_matches_the_cpu(head):
    """With the kernels active a refined decode step plans its widened plan on the planning
    kernels (decode_head_scores "mean" or "max"), rescores in MLX and attends on the sparse
    kernel: its logits equal the CPU reference path's."""
    from conftest import tiny_gemma2

    from mlx_dhsa.attention import Path
    from mlx_dhsa.patching import dhsa_layers, make_prompt_cache

    model = patch(tiny_gemma2(), small_config(decode_refine=4, decode_head_scores=head))
    prompt = mx.random.randint(0, 1024, (1, 300))
    caches = [make_prompt_cache(model) for _ in range(2)]
    for cache in caches:
        mx.eval(model(prompt, cache=cache))
    with mx.stream(mx.gpu):
        gpu_logits = model(prompt[:, -1:], cache=caches[0])
        mx.eval(gpu_logits)
    routes = {a.last_route.path for a in dhsa_layers(model) if a.window is None}
    assert routes == {Path.SPARSE_KERNEL}  # the global layers (sliding: window caches)
    with mx.stream(mx.cpu):
        cpu_logits = model(prompt[:, -1:], cache=caches[1])
        mx.eval(cpu_logits)
    err = mx.abs(gpu_logits - cpu_logits).max().item()
    assert err <= 1e-4 * (1 + mx.abs(cpu_logits).max().item()), f"max error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not mx.is_available(mx.gpu), reason="no GPU")
@pytest.mark.parametrize("stride", [1, 8])
def test_refined_prefill_on_the_kernels_matches_the_cpu(stride):
    """With the kernels active a refined prefill plans its widened plan on the planning
    kernels, scores its candidates on refine_scores.metal and attends on the sparse kernel:
    the plan is the CPU reference planner's and the output the reference attention's over it. (A whole model's forward is
    not compared: TF32-like rounding moves its queries, and with them near-tied keys.)"""
    from mlx_dhsa import kernels
    from mlx_dhsa.attention import Path

    config = small_config(prefill_refine=4, refine_stride=stride, dense_tail=0)  # all planned
    L = S = 300
    q, k, v = make_qkv(H=4, H_kv=2, L=L, S=S, D=32)
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=32, scale=SCALE, softcap=None)
    step = step_config(config, False)
    with mx.stream(mx.gpu):
        launch = kernels.plan_launch(q.dtype, k.dtype, 32, L, step)
        assert launch is not None
        out = attn.attend(q, k, v, offset=0)
        route = attn.last_route
        assert route.refine is not None
        launched = dispatch(q, k, config=config, table=lambda: attn.chunk_view(k), offset=0,
                            window=None, scale=SCALE, softcap=None, launch=launch,
                            refine_kernel=route.refine)  # fmt: skip
        mx.eval(out, launched.indices)
    assert route.path is Path.SPARSE_KERNEL and route.plan is launch
    plan = _plan(config, q, k, 0)  # the pure-MLX planner, on the CPU
    assert mx.array_equal(launched.indices, plan.indices).item()
    ref = sparse_attention(q, k, v, plan, scale=SCALE)
    err = mx.abs(out - ref).max().item()
    assert err <= 1e-4 * (1 + mx.abs(ref).max().item()), f"max error {err:.3g}"
