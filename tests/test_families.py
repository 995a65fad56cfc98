import mlx.core as mx
import pytest
from conftest import clone, small_config, tiny_gemma3, tiny_llama
from mlx_lm.models import qwen2

from mlx_dhsa import patch, unpatch
from mlx_dhsa.families import Gemma3Attention
from mlx_dhsa.patching import dhsa_layers

# budget >= S and dense_below=0: the sparse path runs and must reproduce dense attention.
FULL = dict(budget=256, dense_below=0)


def tiny_qwen2():
    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=128, num_hidden_layers=2,
                           intermediate_size=256, num_attention_heads=4, rms_norm_eps=1e-6,
                           vocab_size=1024, num_key_value_heads=2)  # fmt: skip
    model = qwen2.Model(args)
    mx.eval(model.parameters())
    return model


MODELS = {
    "gemma3_text": tiny_gemma3,
    "llama": tiny_llama,
    "mistral": lambda: tiny_llama(model_type="mistral"),
    "qwen2": tiny_qwen2,
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_full_budget_matches_unpatched(family):
    model = MODELS[family]()
    tokens = mx.random.randint(0, 1024, (1, 96))
    dense = model(tokens)
    patched = patch(clone(model), small_config(**FULL))
    out = patched(tokens)
    assert all(a.last_path.startswith("dhsa") for a in dhsa_layers(patched))
    assert mx.allclose(out, dense, atol=1e-4).item()


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_chunked_prefill_and_decode_with_cache_match_unpatched(family):
    model = MODELS[family]()
    tokens = mx.random.randint(0, 1024, (1, 100))
    patched = patch(clone(model), small_config(**FULL))
    ref_cache, cache = model.make_cache(), patched.make_cache()
    for a, b in [(0, 40), (40, 80), (80, 99), (99, 100)]:  # prefill steps, then one decode
        ref = model(tokens[:, a:b], cache=ref_cache)
        out = patched(tokens[:, a:b], cache=cache)
        assert mx.allclose(out, ref, atol=1e-4).item(), (a, b)


def test_gemma3_patches_only_global_layers():
    model = tiny_gemma3(n_layers=4)
    sliding = [model.layers[i].self_attn for i in (0, 2)]
    patch(model, small_config())
    layers = dhsa_layers(model)
    assert [type(a) for a in layers] == [Gemma3Attention, Gemma3Attention]
    assert [model.layers[i].self_attn for i in (0, 2)] == sliding
    assert layers[0].window is None and layers[0].attn_logit_softcapping is None
    cache = model.make_cache()
    # The sliding layers' RotatingKVCache, as a WindowKVCache (kept unquantized by kv_bits).
    assert type(cache[0]).__name__ == "WindowKVCache" and type(cache[1]).__name__ == "DHSACache"
    unpatch(model)
    assert not dhsa_layers(model)


def test_llama_sliding_layers_keep_their_attention():
    model = tiny_llama(n_layers=3, layer_types=["sliding_attention", "full_attention"] * 1
                       + ["full_attention"], sliding_window=16)  # fmt: skip
    base = model.layers[0].self_attn
    patch(model, small_config())
    assert model.layers[0].self_attn is base
    assert len(dhsa_layers(model)) == 2


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
@pytest.mark.parametrize("method", ["dhsa", "block_sparse", "streaming", "oracle"])
def test_small_budget_runs_every_planner(family, method):
    model = MODELS[family]()
    tokens = mx.random.randint(0, 1024, (1, 128))
    patched = patch(clone(model), small_config(method=method))
    out = patched(tokens)
    assert out.shape == (1, 128, 1024) and mx.isfinite(out).all().item()
    assert all(a.last_path.startswith("dhsa") for a in dhsa_layers(patched))


@pytest.mark.parametrize(
    "family,fused", [("llama", False), ("gemma3_text", False), ("gemma2", True)]
)
def test_fused_decode_only_where_mlx_lm_has_no_fused_attention(monkeypatch, family, fused):
    """With a GPU kernel present, a dense decode step leaves soft-cap-free models to mlx-lm's
    module (MLX's fused SDPA); Gemma2's hand-written soft-capped attention moves to the kernel."""
    from conftest import tiny_gemma2

    from mlx_dhsa import kernels
    from mlx_dhsa.attention import Path

    model = tiny_gemma2() if family == "gemma2" else MODELS[family]()
    patched = patch(model, small_config(decode_dense_below=None))
    layers = dhsa_layers(patched)
    fake = kernels.use_backend("cuda", lambda **kw: None, any_device=True, self_check=False)
    with fake:  # decides only, builds nothing
        paths = {a.route(1, 40, 39, (mx.float32,) * 3, base=True).path for a in layers}
    assert paths == {Path.DENSE_KERNEL if fused else Path.BASE}
    assert {a.route(1, 40, 39, (mx.float32,) * 3, base=True).path for a in layers} == {Path.BASE}
