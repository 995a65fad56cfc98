"""Never crash on a Mac: a kernel that fails to build or launch, or computes something wrong,
fails its first-use self-check; it is switched off for the process with one warning and the
calls it would have run take the pure-MLX path (here: broken kernels injected through the
backend's factory, on the CPU)."""

import warnings

import mlx.core as mx
import pytest
from conftest import make_qkv, small_config, tiny_gemma2
from mlx_lm.generate import generate_step

import mlx_dhsa
from mlx_dhsa import kernels
from mlx_dhsa.attention import Path
from mlx_dhsa.patching import dhsa_layers


def _raising(**build):
    def launch(**kw):
        raise RuntimeError(f"[metal::Device] Unable to build {build['name']}: error: bad source")

    return launch


def _wrong(**build):
    def launch(*, output_shapes, output_dtypes, **kw):
        return [mx.ones(s, d) for s, d in zip(output_shapes, output_dtypes)]

    return launch


def _choices(config, D=64):
    q, k, _ = make_qkv(H=4, H_kv=2, L=1, S=300, D=D)
    attn = kernels.attention_kernel((q.dtype,) * 3, D, 4, 2, 1, 300, None)
    sparse = kernels.attention_kernel((q.dtype,) * 3, D, 4, 2, 40, 300, config.block_size)
    plan = kernels.plan_launch(q.dtype, k.dtype, D, 40, config)
    return attn, sparse, plan


@pytest.mark.parametrize("factory", [_raising, _wrong])
@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_broken_kernels_fall_back_with_one_warning_each(backend, factory):
    config = small_config()
    with kernels.use_backend(backend, factory, any_device=True):
        assert set(kernels.kernel_status().values()) == {"unused"}
        with pytest.warns(RuntimeWarning, match="self-check") as caught:
            assert _choices(config) == (None, None, None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # switched off once: no second warning
            assert _choices(config) == (None, None, None)
            assert _choices(config, D=128) == (None, None, None)
        status = kernels.kernel_status()
    # One warning per failed check: decode attention (with the merge launch on Metal, whose
    # failure also switches the tile kernel off there), tile attention (CUDA), planning (two
    # launches: 40 queries).
    assert len(caught) == (3 if backend == "cuda" else 2)
    used = {"decode_attention", "sparse_attention", "merge_splits", "block_scores", "select_keys"}
    assert {n for n, s in status.items() if s.startswith("off")} == used
    assert all(status[n] == "unused" for n in set(status) - used)
    reason = "Unable to build" if factory is _raising else "max error|differ|shares"
    assert any(__import__("re").search(reason, s) for s in status.values())


def test_a_patched_model_with_broken_kernels_generates_like_the_reference():
    model = tiny_gemma2()
    prompt = mx.random.randint(0, 1024, (300,))
    tokens = {}
    for broken in (True, False):
        mlx_dhsa.unpatch(model)
        mlx_dhsa.patch(model, small_config(use_kernel=broken))
        with kernels.use_backend("metal" if broken else None, _wrong, any_device=True):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gen = generate_step(
                    prompt,
                    model,
                    max_tokens=8,
                    prefill_step_size=64,
                    prompt_cache=mlx_dhsa.make_prompt_cache(model),
                )
                tokens[broken] = [int(t) for t, _ in gen]
            routes = {a.last_route.path for a in dhsa_layers(model) if a.window is None}
        assert routes == {Path.SPARSE_REFERENCE}  # the global layers (sliding: window caches)
        # Once per failed check, not per layer or step: the tile kernel and its merge (the
        # first, dense, prefill step), then planning; decode needs the merge, already off.
        assert len(caught) == (2 if broken else 0)
    assert tokens[True] == tokens[False]


def test_status_without_a_backend():
    with kernels.use_backend(None):
        assert set(kernels.kernel_status().values()) == {"no GPU backend"}
