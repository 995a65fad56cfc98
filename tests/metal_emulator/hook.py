"""The one place that points mlx_dhsa.kernels at the Metal emulator (the interception point an
integrator adapts when kernels.py changes): backend "metal" with its Metal-only launch
choices (merge_splits as a second launch, block scores and selection as two launches), every
kernel built through ``factory.metal_kernel``, and kernels used although MLX's default device
is the CPU."""

from functools import lru_cache

import mlx.core as mx
from kernel_builds import SIGNATURES  # the kernels' argument names

from mlx_dhsa import kernels


def emulate_metal(monkeypatch, factory) -> None:
    """Make ``mlx_dhsa.kernels`` launch its Metal kernels on ``factory`` (a MetalEmulator) for
    the rest of the test; ``monkeypatch`` undoes it all."""
    monkeypatch.setattr(mx.fast, "metal_kernel", factory.metal_kernel)
    monkeypatch.setattr(kernels, "BACKEND", "metal")
    monkeypatch.setattr(kernels, "_DECODE_FOLD", False)  # as kernels.py sets them on a Mac
    monkeypatch.setattr(kernels, "_FUSED_PLAN", False)
    monkeypatch.setattr(kernels, "_ATTENTION", True)
    monkeypatch.setattr(kernels, "_on_gpu", lambda kernel, use_kernel: use_kernel and bool(kernel))
    # The kernels kernels.py builds at import (none without a GPU), built again as it does.
    built = {
        "_decode_kernel": ("decode_attention", False),
        "_merge_kernel": ("merge_splits", True),
        "_scores_kernel": ("chunk_scores", True),
        "_block_scores_kernel": ("block_scores", False),
        "_select_kernel": ("select_keys", True),
    }
    for attr, (name, contiguous) in built.items():
        ins, outs = SIGNATURES[name]
        monkeypatch.setattr(kernels, attr, kernels._build(name, ins, outs, contiguous=contiguous))
    monkeypatch.setattr(kernels, "_plan_kernel", None)  # CUDA only
    # Built per backend: fresh caches, so nothing built here outlives the test.
    monkeypatch.setattr(kernels, "_attention_kernel", _fresh(kernels._attention_kernel))
    monkeypatch.setattr(kernels, "_tile_config", _fresh(kernels._tile_config))


def _fresh(cached):
    """A new lru_cache around the function ``cached`` wraps."""
    return lru_cache(maxsize=None)(cached.__wrapped__)
