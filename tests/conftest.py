import copy
import signal

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from mlx_lm.models import gemma2, gemma3_text, llama
from mlx_lm.models.cache import KVCache

import mlx_dhsa
from mlx_dhsa import DHSACache, DHSAConfig
from mlx_dhsa.cli.profiling import TINY_SPARSE, random_model
from mlx_dhsa.plan import Plan

# Small DHSA settings that make tiny inputs exercise every part of the planner: profiling's tiny
# sparse config, decoding sparsely too.
SMALL = dict(TINY_SPARSE, decode_dense_below=0)


@pytest.fixture(autouse=True)
def _seed_and_cpu():
    mx.random.seed(0)
    with mx.stream(mx.cpu):
        yield


def small_config(**overrides) -> DHSAConfig:
    return DHSAConfig(**{**SMALL, **overrides})


def tiny_gemma2(n_layers: int = 4, dtype=mx.float32, **args) -> gemma2.Model:
    """mlx-lm test sizes: hidden 128, head_dim 32, vocab 1024 (random weights, fp32)."""
    return random_model("tiny", dtype, num_hidden_layers=n_layers, **args)


def make_qkv(B=1, H=4, H_kv=2, L=64, S=None, D=32, dtype=mx.float32, scale=1.0):
    """Random q (B, H, L, D), k, v (B, H_kv, S, D) ~ N(0, scale^2)."""
    S = L if S is None else S
    q = scale * mx.random.normal((B, H, L, D))
    k = scale * mx.random.normal((B, H_kv, S, D))
    v = mx.random.normal((B, H_kv, S, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def assert_within_baseline(out, ref32, ref_lp, factor=2.0, atol=1e-5):
    """flash-attn rule: |out - ref32| <= factor * |ref_lp - ref32| + atol (max norms)."""
    err = mx.abs(out.astype(mx.float32) - ref32).max().item()
    base = mx.abs(ref_lp.astype(mx.float32) - ref32).max().item()
    assert err <= factor * base + atol, f"error {err:.3g} > {factor} x baseline {base:.3g} + {atol}"


@pytest.fixture
def tiny_model():
    return tiny_gemma2()


def plain_caches(model) -> list:
    """The patched model's prompt cache with a plain mlx-lm KVCache for every DHSACache: the
    reference that rebuilds the chunk state from its keys on every call (window caches stay)."""
    return [KVCache() if isinstance(c, DHSACache) else c for c in mlx_dhsa.make_prompt_cache(model)]


def clone(model):
    return copy.deepcopy(model)


def tiny_gemma3(n_layers: int = 4, dtype=mx.float32, **args) -> gemma3_text.Model:
    """Random gemma3_text: every 2nd layer global, window 32, head_dim 32, vocab 1024, fp32."""
    params = dict(
        model_type="gemma3_text",
        hidden_size=128,
        num_hidden_layers=n_layers,
        intermediate_size=256,
        num_attention_heads=4,
        head_dim=32,
        rms_norm_eps=1e-6,
        vocab_size=1024,
        num_key_value_heads=1,
        query_pre_attn_scalar=32.0,
        sliding_window=32,
        sliding_window_pattern=2,
    )
    model = gemma3_text.Model(gemma3_text.ModelArgs(**{**params, **args}))
    # Random norm weights: gemma3 uses 1 + w, so zeros would hide a missing QK norm.
    model.update(tree_map_with_path(
        lambda p, w: 0.3 * mx.random.normal(w.shape) if p.endswith("norm.weight") else w,
        model.parameters()))  # fmt: skip
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def tiny_llama(n_layers: int = 3, dtype=mx.float32, **args) -> llama.Model:
    """Random llama (SmolLM2-like GQA 4/2), head_dim 32, vocab 1024, fp32."""
    params = dict(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=n_layers,
        intermediate_size=256,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=1024,
        num_key_value_heads=2,
        rope_theta=10000.0,
    )
    model = llama.Model(llama.ModelArgs(**{**params, **args}))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def open_pieces_over_cache_steps(plan_on_kernels):
    """A DHSACache's layer planning with open_pieces over prefill and decode steps, a segment
    closing and a trim: each plan of ``plan_on_kernels`` (``kernels.select_chunks``'s
    signature) equals the reference's over the table rebuilt from scratch, and no open-chunk
    running sum is carried (the pieces are summed whole)."""
    from mlx_dhsa import DHSACache
    from mlx_dhsa.attention import DHSAAttention
    from mlx_dhsa.kernels import KernelState
    from mlx_dhsa.selection import select_chunks

    config = small_config(open_pieces=True)
    attn = DHSAAttention(config, n_heads=4, n_kv_heads=2, head_dim=64, scale=0.0625, softcap=None)
    cache = DHSACache()
    for step in [100, 27, 1, 1, "trim", 1, 40, 1, 1]:
        if step == "trim":
            cache.trim(3)
            continue
        new = mx.random.normal((1, 2, step, 64))
        keys, _ = cache.update_and_fetch(new, new)
        S = keys.shape[2]
        q = mx.random.normal((1, 4, step, 64))
        if cache.kernel_state is None:
            cache.kernel_state = KernelState()
        state = cache.kernel_state
        table = attn.chunk_view(keys, cache)
        out = plan_on_kernels(q, table, config, q_offset=S - step, state=state)
        ref = select_chunks(q, attn.chunk_view(keys), config, q_offset=S - step)
        assert mx.array_equal(out.n_valid, ref.n_valid)
        assert mx.array_equal(out.indices, ref.indices)
        assert state.open_total is None


def wide_plan(B, NB, K, L, S, block_size, window, seed=2):
    """A random widened plan of L queries (last at S - 1): each block's slots hold its own
    queries' keys (the local window a real plan forces) and random earlier ones, ascending;
    the last block fewer valid slots than the rest."""
    off = S - L
    rng = np.random.default_rng(seed)
    idx = np.zeros((B, NB, K), np.int32)
    for b in range(B):
        for blk in range(NB):
            q0, q1 = off + blk * block_size, min(off + (blk + 1) * block_size, S)
            own = np.arange(q0, q1)
            rest = rng.choice(np.arange(q0), K - len(own), replace=False)
            idx[b, blk] = np.sort(np.concatenate([rest, own]))
    count = np.full((B, NB), K, np.int32)
    count[:, -1] = K - 5  # (its padding slots hold real keys: the kernel must skip them)
    return Plan(mx.array(idx), mx.array(count), off, block_size, window)


def default_sigint() -> None:
    """``preexec_fn`` for a subprocess that a test stops with SIGINT: restore SIGINT's default
    action, which a shell's background job (``cmd &``, nohup) inherits as ignored; Python then
    installs its KeyboardInterrupt handler in the child as it does in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
