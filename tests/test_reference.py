import gc

import mlx.core as mx
import pytest
from conftest import make_qkv, small_config
from mlx_lm.models import gemma2

from mlx_dhsa import reference
from mlx_dhsa.chunking import chunk_boundaries, chunk_summaries
from mlx_dhsa.plan import Plan
from mlx_dhsa.selection import block_queries, chunk_scores, indices_to_mask, select

SCALE, CAP = 32**-0.5, 50.0


def _plan_for(q, k, cfg, offset, window):
    chunks = chunk_boundaries(k, cfg)
    scores = chunk_scores(block_queries(q, cfg.block_size), chunk_summaries(k, chunks))
    return select(scores, chunks, cfg, n_queries=q.shape[2], q_offset=offset, window=window)


@pytest.mark.parametrize("L", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("offset", [0, 37])
@pytest.mark.parametrize("H, H_kv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("window", [None, 24])
def test_sparse_equals_dense_with_the_plan_as_mask(L, offset, H, H_kv, window):
    cfg = small_config()
    S = offset + L
    q, k, v = make_qkv(B=2, H=H, H_kv=H_kv, L=L, S=S, scale=5.0)  # |s| > 50 happens: cap active
    plan = _plan_for(q, k, cfg, offset, window)
    mask = indices_to_mask(plan, L, S)  # (B, L, S)
    sparse = reference.sparse_attention(q, k, v, plan, scale=SCALE, softcap=CAP)
    dense = reference.dense_attention(q, k, v, mask=mask[:, None], scale=SCALE, softcap=CAP)
    # fp32, two summation orders (gathered rows vs masked full rows; the BLAS decides): up to
    # 1.3e-5 apart under OpenBLAS. A wrong or missing key moves outputs by ~0.1.
    assert mx.allclose(sparse, dense, atol=3e-5), mx.abs(sparse - dense).max()


def test_softcap_is_active_in_these_inputs():
    q, k, _ = make_qkv(L=64, scale=5.0)
    s = (q * SCALE).reshape(1, 2, 2, 64, 32) @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    assert (mx.abs(s) > CAP).any()


def test_rows_with_no_allowed_key_are_zero_not_nan():
    q, k, v = make_qkv(L=4, S=8)
    plan = Plan(
        indices=mx.array([[[7, 0, 0, 0]]], mx.int32),
        n_valid=mx.array([[1]], mx.int32),
        q_offset=4,
        block_size=4,
        window=None,
    )  # key 7 is in the future of queries 4-6
    out = reference.sparse_attention(q, k, v, plan, scale=SCALE, softcap=CAP)
    assert not mx.isnan(out).any()
    assert mx.array_equal(out[:, :, :3], mx.zeros_like(out[:, :, :3]))
    assert mx.allclose(out[:, :, 3], mx.repeat(v[:, :, 7], 2, axis=1), atol=1e-6)  # only key 7


def test_first_token_attends_to_itself():
    q, k, v = make_qkv(L=20)
    cfg = small_config()
    out = reference.sparse_attention(
        q, k, v, _plan_for(q, k, cfg, 0, None), scale=SCALE, softcap=CAP
    )
    v0 = mx.repeat(v[:, :, :1], 2, axis=1)  # GQA: heads 0,1 -> kv 0; 2,3 -> kv 1
    assert mx.allclose(out[:, :, :1], v0, atol=1e-6)


def test_dense_matches_mlx_lm_gemma2_attention():
    args = gemma2.ModelArgs(
        model_type="gemma2",
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=4,
        head_dim=32,
        rms_norm_eps=1e-6,
        vocab_size=16,
        num_key_value_heads=2,
        query_pre_attn_scalar=32.0,
    )
    attn = gemma2.Attention(args)
    x = 4 * mx.random.normal((1, 30, 64))
    want = attn(x, mask=mx.tril(mx.ones((30, 30), mx.bool_)))
    B, L, _ = x.shape
    q = attn.rope(attn.q_proj(x).reshape(B, L, 4, 32).transpose(0, 2, 1, 3))
    k = attn.rope(attn.k_proj(x).reshape(B, L, 2, 32).transpose(0, 2, 1, 3))
    v = attn.v_proj(x).reshape(B, L, 2, 32).transpose(0, 2, 1, 3)
    out = reference.dense_attention(
        q, k, v, scale=attn.scale, softcap=CAP, mask=mx.tril(mx.ones((30, 30), mx.bool_))
    )
    got = attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
    assert mx.allclose(got, want, atol=1e-5)


def _peak_bytes(L, cfg):
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()  # arrays other tests left alive are not ours
    q, k, v = make_qkv(H=4, H_kv=2, L=L, D=32)
    plan = _plan_for(q, k, cfg, 0, None)
    mx.eval(q, k, v, plan.indices, plan.n_valid)
    mx.reset_peak_memory()  # inputs stay counted: they are part of the working set
    mx.eval(reference.sparse_attention(q, k, v, plan, scale=SCALE, softcap=CAP))
    return mx.get_peak_memory() - base


def test_peak_memory_grows_like_L_times_budget(monkeypatch):
    # Small groups so that the L x budget terms dominate, as at real sizes.
    monkeypatch.setattr(reference, "MAX_GROUP_SCORES", 1 << 16)
    cfg = small_config(budget=64, block_size=16)
    # 4x the queries: about 2.6x the peak (fixed terms included), L x S would give ~16x. At
    # 2x the allocator's noise put the ratio on either side of a tight bound (1.48 once).
    small, large = _peak_bytes(4096, cfg), _peak_bytes(16384, cfg)
    assert 1.5 < large / small < 6, (small, large)
    assert large < 4 * 16384 * 16384 * 4 / 64  # far below one fp32 (H, L, S) score tensor
