"""Dispatch between GPU kernels and the pure-MLX reference.

The kernels (bodies in ``metal/``) are built once at import for the backend present; until a
kernel exists for a job, or on the CPU, the reference runs. ``last_path`` records which path
the most recent call took, so the CLI and ``profile`` can report it.
"""

import mlx.core as mx

from . import reference
from .selection import Plan

last_path: str = "none"  # "kernel" or "reference": set by every sparse_attention call


def sparse_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    plan: Plan,
    *,
    scale: float,
    softcap: float | None = None,
    use_kernel: bool = True,
) -> mx.array:
    """:func:`reference.sparse_attention`, on a GPU kernel when one is available.

    Args and returns as :func:`mlx_dhsa.reference.sparse_attention`; ``use_kernel=False``
    forces the reference.
    """
    global last_path
    last_path = "reference"
    return reference.sparse_attention(q, k, v, plan, scale=scale, softcap=softcap)
