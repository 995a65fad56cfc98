"""Decode refinement (``DHSAConfig.decode_refine``, mlx_dhsa/refine.py): a decode step's plan
keeps the forced keys and the best candidates by exact logits, within the budget."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_qkv, small_config, tiny_gemma3
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dhsa import DHSAConfig, patch
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.config import ConfigError
from mlx_dhsa.planners import PLANNERS
from mlx_dhsa.planners import plan as dispatch
from mlx_dhsa.reference import dense_attention, sparse_attention
from mlx_dhsa.selection import key_mask

SCALE = 0.25


def _plan(config, q, k, offset, window=None):
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=16, scale=SCALE, softcap=None)
    return dispatch(q, k, config=config, table=lambda: attn.chunk_view(k), offset=offset,
                    window=window, scale=SCALE, softcap=None)  # fmt: skip


def _forced(config, p, window):
    lo = max(0, p - window + 1) if window else 0
    local = range(max(lo, p - config.local, min(config.sink, p + 1)), p + 1)
    return lo, set(range(lo, min(config.sink, p + 1))) | set(local)


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
    lo, forced = _forced(config, S - 1, window)
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
    _, forced = _forced(config, S - 1, None)
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
    wide = PLANNERS["dhsa"](q, qk.dequantize(), config=widened(config),
                            table=lambda: attn.chunk_view(qk.dequantize()), offset=S - 1,
                            window=None, scale=SCALE, softcap=None)  # fmt: skip
    got = refine_plan(wide, q, qk, config, scale=SCALE, softcap=None)
    want = refine_plan(wide, q, qk.dequantize(), config, scale=SCALE, softcap=None)
    assert mx.array_equal(got.indices, want.indices).item()
    assert mx.array_equal(got.n_valid, want.n_valid).item()


def test_decode_refine_must_be_positive():
    with pytest.raises(ConfigError, match="decode_refine must be a positive integer"):
        DHSAConfig(decode_refine=0)
    assert DHSAConfig().decode_refine == 4 and DHSAConfig.paper().decode_refine == 1


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
