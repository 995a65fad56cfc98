import copy

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import small_config, tiny_gemma2
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache

import mlx_dhsa
from mlx_dhsa import DHSAConfig, patch, unpatch
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.patching import dhsa_layers
from mlx_dhsa.quantized_cache import WindowKVCache

# budget >= S with dense_below=0: the sparse planner and attention run but keep every key.
FULL = dict(budget=4096, dense_below=0)


def _greedy(model, prompt, steps=16, prefill_step_size=64):
    cache = make_prompt_cache(model)
    gen = generate_step(
        prompt, model, max_tokens=steps, prompt_cache=cache, prefill_step_size=prefill_step_size
    )
    return [int(t) for t, _ in gen]


def test_full_budget_matches_unpatched_one_shot(tiny_model):
    tokens = mx.random.randint(0, 1024, (2, 150))
    dense = tiny_model(tokens)
    patched = patch(copy.deepcopy(tiny_model), small_config(**FULL))
    assert mx.allclose(patched(tokens), dense, atol=1e-4)
    assert all(a.last_path.startswith("dhsa") for a in dhsa_layers(patched))


def test_full_budget_matches_unpatched_chunked_prefill(tiny_model):
    tokens = mx.random.randint(0, 1024, (1, 230))
    patched = patch(copy.deepcopy(tiny_model), small_config(**FULL))
    c_dense, c_dhsa = make_prompt_cache(tiny_model), make_prompt_cache(patched)
    for i in range(0, 230, 70):  # queries offset into a cache that already holds keys
        step = tokens[:, i : i + 70]
        assert mx.allclose(patched(step, cache=c_dhsa), tiny_model(step, cache=c_dense), atol=1e-4)


def test_full_budget_greedy_tokens_equal_over_16_decode_steps(tiny_model):
    prompt = mx.random.randint(0, 1024, (300,))
    patched = patch(copy.deepcopy(tiny_model), small_config(**FULL))
    want = _greedy(tiny_model, prompt)
    assert _greedy(patched, prompt) == want
    assert _greedy(patched, prompt, prefill_step_size=1000) == want


def test_dense_decode_steps_are_mlx_lm_attention_op_for_op(tiny_model):
    """A dense decode step that sees every key runs the wrapped mlx-lm module itself."""
    patched = patch(copy.deepcopy(tiny_model), small_config(decode_dense_below=None))
    prompt = mx.random.randint(0, 1024, (1, 40))
    c_dense, c_dhsa = make_prompt_cache(tiny_model), make_prompt_cache(patched)
    tiny_model(prompt, cache=c_dense), patched(prompt, cache=c_dhsa)
    tok = prompt[:, -1:]
    assert mx.array_equal(patched(tok, cache=c_dhsa), tiny_model(tok, cache=c_dense))
    assert {a.last_path for a in dhsa_layers(patched)} == {"dense"}


def test_sparse_budget_generates_and_runs_the_sparse_path(tiny_model):
    prompt = mx.random.randint(0, 1024, (300,))
    patched = patch(copy.deepcopy(tiny_model), small_config())
    out = patched(prompt[None])
    assert not mx.isnan(out).any()
    assert [a.last_path for a in dhsa_layers(patched)] == ["dhsa(reference)"] * 4
    assert len(_greedy(patched, prompt, steps=4)) == 4


def test_sliding_layers_get_the_gemma2_window(tiny_model):
    patched = patch(copy.deepcopy(tiny_model))
    assert [a.window for a in dhsa_layers(patched)] == [4096, None, 4096, None]


def test_sliding_window_applies_beyond_the_window():
    # mlx-lm ignores Gemma2's window; DHSA honours it: equal inside the window, not beyond.
    model = tiny_gemma2(n_layers=2)
    tokens = mx.random.randint(0, 1024, (1, 96))
    patched = patch(copy.deepcopy(model), small_config(**FULL))
    for a in dhsa_layers(patched):
        a.window = 64 if a.window else None
    out, dense = patched(tokens), model(tokens)
    assert mx.allclose(out[:, :64], dense[:, :64], atol=1e-4)
    assert not mx.allclose(out[:, 64:], dense[:, 64:], atol=1e-3)


def test_window_cache_holds_the_window_and_attends_as_a_full_cache():
    # Gemma2's sliding layers get a WindowKVCache of their window: the same logits as full
    # caches under the window mask, over prefill steps longer than the window and decode
    # steps past it, while holding at most the window and one step's keys.
    model = tiny_gemma2(n_layers=2)
    model.args.sliding_window = 48
    patched = patch(model, small_config(**FULL))
    tokens = mx.random.randint(0, 1024, (1, 140))
    windowed = mlx_dhsa.make_prompt_cache(patched)
    assert isinstance(windowed[0], WindowKVCache) and windowed[0].max_size == 48
    full = [KVCache() for _ in patched.layers]
    steps = [(0, 30), (30, 100)] + [(i, i + 1) for i in range(100, 120)] + [(120, 140)]
    for a, b in steps:
        want, got = patched(tokens[:, a:b], cache=full), patched(tokens[:, a:b], cache=windowed)
        assert mx.allclose(got, want, atol=1e-4), (a, b)
        assert windowed[0].keys.shape[2] <= 48 - 1 + (b - a) and windowed[0].offset == b
    assert dhsa_layers(patched)[0].last_path == "dense"  # full: the sparse path, every key


def test_windowed_layers_before_the_owner_never_borrow_stale_chunks():
    # Gemma2's layer 0 (windowed) runs before the owner (layer 1) publishes: with full
    # caches it chunks its own keys, so a second sequence of the same length gives what a
    # fresh model gives.
    model = tiny_gemma2(n_layers=4)
    model.args.sliding_window = 200
    config = small_config()
    patched, fresh = patch(copy.deepcopy(model), config), patch(copy.deepcopy(model), config)
    a, b = (mx.random.randint(0, 1024, (1, 300)) for _ in range(2))
    patched(a)
    assert mx.array_equal(patched(b), fresh(b))
    assert dhsa_layers(patched)[0].last_path == "dhsa(reference)"


def test_quantized_model_patches_and_generates(tiny_model):
    nn.quantize(tiny_model, group_size=32, bits=4)
    patched = patch(tiny_model, small_config())
    assert isinstance(patched.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert len(_greedy(patched, mx.random.randint(0, 1024, (200,)), steps=4)) == 4


def test_patch_shares_weights_and_unpatch_restores(tiny_model):
    base = tiny_model.layers[1].self_attn
    names = [k for k, _ in tree_flatten(tiny_model.parameters())]
    patch(tiny_model, small_config())
    attn = tiny_model.layers[1].self_attn
    assert isinstance(attn, DHSAAttention) and attn.q_proj is base.q_proj
    assert [k for k, _ in tree_flatten(tiny_model.parameters())] == names  # same weight paths
    unpatch(tiny_model)
    assert tiny_model.layers[1].self_attn is base


def test_patch_is_idempotent_and_refuses_other_settings(tiny_model):
    patch(tiny_model, small_config())
    first = tiny_model.layers[0].self_attn
    patch(tiny_model, small_config())
    assert tiny_model.layers[0].self_attn is first
    with pytest.raises(ValueError, match="already patched"):
        patch(tiny_model, small_config(budget=64))


def test_unsupported_model_type_lists_supported():
    model = tiny_gemma2(n_layers=1)
    model.model_type = "mamba"
    with pytest.raises(ValueError, match=r"supports model types \['gemma2'"):
        patch(model)


def test_override_typo_is_a_clear_error(tiny_model):
    with pytest.raises(TypeError, match="unknown DHSAConfig field"):
        patch(tiny_model, budgte=1024)


def test_padded_batch_mask_is_refused_on_the_sparse_path():
    attn = DHSAAttention(
        small_config(), n_heads=2, n_kv_heads=1, head_dim=8, scale=1.0, softcap=50.0
    )
    q, k = mx.random.normal((2, 2, 100, 8)), mx.random.normal((2, 1, 100, 8))
    mask = mx.ones((2, 1, 100, 100), mx.bool_)
    with pytest.raises(NotImplementedError, match="padded batch"):
        attn.attend(q, k, k, mask=mask)


def test_default_config_is_used_when_none_given(tiny_model):
    patch(tiny_model)
    assert tiny_model.layers[0].self_attn.config == DHSAConfig()
