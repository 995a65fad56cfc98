import copy
import math

import mlx.core as mx
import numpy as np
from conftest import plain_caches, small_config
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

import mlx_dhsa
from mlx_dhsa import DHSACache, patch, unpatch
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.cache import SUMMARY_DTYPE
from mlx_dhsa.chunking import Chunks, chunk_spreads, chunk_summaries
from mlx_dhsa.patching import dhsa_layers


def _greedy(model, prompt, cache, steps):
    gen = generate_step(prompt, model, max_tokens=steps, prompt_cache=cache, prefill_step_size=64)
    return [int(t) for t, _ in gen]


def _record_plans(model) -> list:
    """Wrap each layer's plan() (instance attribute only); plans go to ``records[-1]``."""
    records = [[]]
    for a in dhsa_layers(model):

        def plan(*args, _orig=a.plan, **kwargs):
            p = _orig(*args, **kwargs)
            records[-1].append((p.indices, p.n_valid))
            return p

        object.__setattr__(a, "plan", plan)
    return records


def test_patched_models_make_dhsa_caches_and_window_caches(tiny_model):
    patch(tiny_model, small_config())
    kinds = [type(c).__name__ for c in make_prompt_cache(tiny_model)]
    assert kinds == ["WindowKVCache", "DHSACache"] * 2  # Gemma2: sliding layers first
    patch(unpatch(tiny_model), small_config(sliding_window=False))
    assert all(isinstance(c, DHSACache) for c in make_prompt_cache(tiny_model))


def test_full_budget_greedy_equals_dense_over_64_decode_steps(tiny_model):
    prompt = mx.random.randint(0, 1024, (150,))
    want = _greedy(tiny_model, prompt, make_prompt_cache(tiny_model), 64)
    patched = patch(copy.deepcopy(tiny_model), small_config(budget=4096, dense_below=0))
    assert _greedy(patched, prompt, mlx_dhsa.make_prompt_cache(patched), 64) == want


def test_dhsa_cache_and_plain_cache_give_identical_tokens_and_selections(tiny_model):
    patched = patch(tiny_model, small_config())
    prompt = mx.random.randint(0, 1024, (230,))
    records = _record_plans(patched)
    got = _greedy(patched, prompt, mlx_dhsa.make_prompt_cache(patched), 40)
    records.append([])
    assert _greedy(patched, prompt, plain_caches(patched), 40) == got
    rec_dhsa, rec_plain = records
    assert len(rec_dhsa) == len(rec_plain) > 40
    for (i1, n1), (i2, n2) in zip(rec_dhsa, rec_plain):
        assert mx.array_equal(i1, i2) and mx.array_equal(n1, n2)
    assert dhsa_layers(patched)[1].last_path == "dhsa(reference)"  # decode ran sparse


def test_saved_prompt_cache_continues_identically(tiny_model, tmp_path):
    patched = patch(tiny_model, small_config())
    prompt = mx.random.randint(0, 1024, (200,))
    cache = mlx_dhsa.make_prompt_cache(patched)
    _greedy(patched, prompt, cache, 1)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    nxt = mx.array([5])
    assert _greedy(patched, nxt, loaded, 20) == _greedy(patched, nxt, cache, 20)


def test_trimmed_dhsa_cache_continues_like_a_trimmed_plain_cache(tiny_model):
    # The plain cache rebuilds chunk state from its keys, so it is the reference after a trim.
    patched = patch(tiny_model, small_config())
    prompt = mx.random.randint(0, 1024, (260,))
    caches = [mlx_dhsa.make_prompt_cache(patched), plain_caches(patched)]
    for cache in caches:
        _greedy(patched, prompt, cache, 30)
        assert trim_prompt_cache(cache, 129) == 129  # back into a closed segment
    nxt = mx.random.randint(0, 1024, (100,))  # a multi-token step over the trimmed segments
    assert _greedy(patched, nxt, caches[0], 20) == _greedy(patched, nxt, caches[1], 20)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 90)),
            st.tuples(st.just("trim"), st.integers(1, 120)),
        ),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 1000),
)
def test_incremental_state_equals_recomputed(ops, seed):
    mx.random.seed(seed)
    cfg = small_config()
    attn = DHSAAttention(cfg, n_heads=2, n_kv_heads=1, head_dim=8, scale=1.0, softcap=None)
    cache = DHSACache()
    for op, n in ops:
        if op == "add":
            k = mx.random.normal((1, 1, n, 8))
            keys, _ = cache.update_and_fetch(k, k)
        elif cache.offset:
            cache.trim(n)
            continue
        else:
            continue
        chunks, sums = attn.chunk_view(keys, cache).materialize()
        want_chunks, want_sums = attn.chunk_view(keys, None).materialize()
        assert mx.array_equal(chunks.starts, want_chunks.starts)
        assert mx.array_equal(chunks.lengths, want_chunks.lengths)
        assert mx.allclose(sums, want_sums, atol=1e-5)


def test_closed_summaries_are_the_float32_summaries_rounded_to_summary_dtype():
    """The cache stores closed chunks' summaries in SUMMARY_DTYPE (float16): exactly the
    float32 summaries of the same chunks rounded once; the open chunk's stays float32."""
    mx.random.seed(3)
    cfg = small_config()
    attn = DHSAAttention(cfg, n_heads=2, n_kv_heads=2, head_dim=8, scale=1.0, softcap=None)
    keys = 4 * mx.random.normal((1, 2, 3 * cfg.chunk_limit + 5, 8))
    table = attn.chunk_view(keys, DHSACache())
    n = table.n_closed
    assert table.summaries.dtype == SUMMARY_DTYPE == mx.float16 and n > 0
    closed = Chunks(table.starts[:, :n], table.lengths[:, :n], table.segment)
    want = chunk_summaries(keys, closed, summary=cfg.summary)
    assert want.dtype == mx.float32
    assert mx.array_equal(table.summaries[:, :n], want.astype(SUMMARY_DTYPE))
    chunks, sums = table.materialize()
    assert sums.dtype == mx.float32 and table.open_summary.dtype == mx.float32
    # Past float16's range they saturate instead of becoming inf (and NaN scores).
    big = attn.chunk_view(1e6 * keys, DHSACache()).summaries[:, :n]
    assert mx.isfinite(big).all() and mx.abs(big).max().item() == 65504.0


def test_key_spread_stores_the_closed_chunks_key_variances():
    """With key_spread the table holds each closed chunk's within-head key variance
    (chunk_spreads), rounded once to SUMMARY_DTYPE, kept across calls; without it none."""
    mx.random.seed(4)
    cfg = small_config(key_spread=1.0)
    attn = DHSAAttention(cfg, n_heads=4, n_kv_heads=2, head_dim=8, scale=1.0, softcap=None)
    keys = 3 * mx.random.normal((1, 2, 3 * cfg.chunk_limit + 5, 8))
    cache = DHSACache()
    attn.chunk_view(keys[:, :, : cfg.chunk_limit + 3], cache)  # one segment, then the rest
    table = attn.chunk_view(keys, cache)
    n = table.n_closed
    assert n > 0 and table.spreads.dtype == SUMMARY_DTYPE
    closed = Chunks(table.starts[:, :n], table.lengths[:, :n], table.segment)
    want = chunk_spreads(keys, closed)
    assert (want >= 0).all() and want.max().item() > 1.0
    assert mx.array_equal(table.spreads[:, :n], want.astype(SUMMARY_DTYPE))
    plain = DHSAAttention(small_config(key_spread=0.0), n_heads=4, n_kv_heads=2, head_dim=8, scale=1.0,
                          softcap=None)  # fmt: skip
    assert plain.chunk_view(keys, DHSACache()).spreads is None


def test_chunk_spreads_are_the_within_head_variances():
    """chunk_spreads: per head, the variance of the chunk's keys; then the heads' mean (the
    spread of the heads' means is not counted)."""
    keys = mx.random.normal((2, 3, 40, 8))
    keys[:, 1] += 5.0  # head 1's keys sit far from the others': no spread within a head
    keys[..., 3] += 300.0  # an outlier channel: float32 E[k^2] - E[k]^2 would lose it
    starts = mx.array([[0, 5, 13, 32], [0, 8, 16, 24]], mx.int32)
    lengths = mx.array([[5, 8, 19, 8], [8, 8, 8, 1]], mx.int32)
    got = chunk_spreads(keys, Chunks(starts, lengths, 64))
    k = np.array(keys)
    for b in range(2):
        for c in range(4):
            s0, n = int(starts[b, c]), int(lengths[b, c])
            want = k[b, :, s0 : s0 + n].var(axis=1).mean(axis=0)
            np.testing.assert_allclose(np.array(got[b, c]), want, rtol=1e-4, atol=1e-5)


def test_cache_grows_geometrically_and_saves_only_its_keys():
    """A long prefill in 256-key steps re-allocates O(log S) times, not once per step, and
    over-allocates by at most the growth factor; the saved state holds `offset` keys."""
    cache, capacities = DHSACache(), set()
    for i in range(64):
        k = mx.full((1, 2, 256, 8), float(i))
        keys, _ = cache.update_and_fetch(k, k)
        capacities.add(cache.keys.shape[2])
        assert keys.shape[2] == cache.offset == 256 * (i + 1)
        assert cache.keys.shape[2] <= max(cache.growth * cache.offset, cache.offset) + cache.step
    # Geometric: at most log(64) / log(growth) + 1 sizes (mlx-lm's KVCache: 64).
    assert len(capacities) <= math.log(64) / math.log(cache.growth) + 1 < 64
    assert mx.array_equal(keys[0, 0, ::256, 0], mx.arange(64).astype(mx.float32))
    k, v, offset = cache.state
    assert k.shape[2] == v.shape[2] == offset == 64 * 256


def test_kernel_state_is_held_unopened_and_dropped_on_trim():
    from mlx_dhsa.kernels import KernelState

    cache = DHSACache()
    state = cache.kernel_state = KernelState()
    t = state.tickets("attention", 4)
    assert t.dtype == mx.int32 and t.tolist() == [0, 0, 0, 0]
    assert state.tickets("attention", 2) is t and state.tickets("attention", 8).size == 8
    p = state.tickets("plan", 1)  # the planning kernel's counters: a buffer of their own
    assert p.tolist() == [0] and p is not state.tickets("attention", 8)
    cache.update_and_fetch(mx.zeros((1, 1, 8, 4)), mx.zeros((1, 1, 8, 4)))
    cache.chunk_state(small_config())  # first chunking keeps it
    assert cache.kernel_state is state
    cache.trim(2)  # trimmed keys are overwritten: the kernels start afresh
    assert cache.kernel_state is None
