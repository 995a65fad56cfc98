"""Refinement launches: the candidate scores of prefill refinement (refine_scores.metal).

:func:`refine_kernel` says whether and how a prefill call's widened plan is scored on the
kernel; :func:`run_refine` launches it. The reference is
:func:`mlx_dhsa.reference.refine_scores`; ``mlx_dhsa.refine`` keeps the best-scoring keys.
"""

from functools import cache
from typing import NamedTuple

import mlx.core as mx

from .. import reference
from ..plan import Plan
from . import checks
from .attention import DTYPES, SMEM_LIMIT, TILES
from .sources import AttentionScalars, RefineParams, backend, params


class RefineKernel(NamedTuple):
    """How refine_scores.metal is launched for one dtype, head dim, GQA layout and stride."""

    warps: int  # WARPS: warps per group
    wrows: int  # WROWS: rows per warp
    bk: int  # BK: keys per tile
    qt: int  # scoring queries per query tile (qt x heads per KV head <= warps x wrows rows)
    smem: int  # dynamic shared memory bytes (the query staging, then the key tile)


@cache
def refine_config(
    backend_name: str, dtype, D: int, H: int, H_kv: int, block_size: int, stride: int
) -> RefineKernel | None:
    """The launch geometry, or None when refine_scores.metal cannot take these shapes. The
    tiles are the attention kernel's (``attention.TILES``); a query tile holds every query
    head of a KV head and as many of a block's ``ceil(block_size / stride)`` scoring queries
    as fit, with no more warps than those rows need (but at least a thread per key of a
    tile). All of its shared memory stays within 48 KB (CUDA's static limit) and the
    backend's."""
    if dtype not in DTYPES or D % 16 or D > 256 or H % H_kv or stride < 1:
        return None
    warps, wrows, bk = TILES[(backend_name, dtype.size)]
    reps, scoring = H // H_kv, -(-block_size // stride)
    if reps > warps * wrows:
        return None
    qt = min(scoring, warps * wrows // reps)
    warps = max(-(-reps * qt // wrows), -(-bk // 32))
    smem = max(warps * wrows, bk) * (D + 16 // dtype.size) * dtype.size
    static = (warps * wrows * bk + bk) * 4  # the column-sum tile and the key positions
    if smem + static > min(SMEM_LIMIT[backend_name], 48 * 1024):
        return None
    return RefineKernel(warps, wrows, bk, qt, smem)


def refine_kernel(
    dtype,
    keys_dtype,
    D: int,
    H: int,
    H_kv: int,
    block_size: int,
    stride: int,
    *,
    use_kernel: bool = True,
    quantized: tuple[int, int] | None = None,
) -> RefineKernel | None:
    """The launch that scores a prefill call's refinement candidates: queries (B, H, L, D) of
    ``dtype`` over keys (B, H_kv, S, D) of ``keys_dtype``, blocks of ``block_size``, every
    ``stride``-th query scoring; None for the reference (no backend active, shapes the kernel
    does not take, quantized keys, or a failed self-check in this process)."""
    be = backend()
    if not be.active(use_kernel) or quantized is not None or dtype != keys_dtype:
        return None
    kernel = refine_config(be.name, dtype, D, H, H_kv, block_size, stride)
    if kernel is None:
        return None
    if be.self_check:
        key = ("refine_scores", kernel, dtype, D, H // H_kv, block_size, stride)
        check = lambda: _self_check(kernel, dtype, D, H // H_kv, block_size, stride)
        if not checks.verified(be, key, ("refine_scores",), check):
            return None
    return kernel


def _self_check(
    kernel: RefineKernel, dtype, D: int, reps: int, block_size: int, stride: int
) -> str | None:
    """Score tiny random candidates (a batch of two, two KV heads; every other key; two
    blocks, the last one short and with fewer valid slots; a window; with and without a
    soft cap) with ``kernel`` and with the fp32 reference: None if they agree, else how
    they differ."""
    L = block_size + block_size // 2 + 1
    S = L + 6 * kernel.bk + 3
    q = mx.random.normal((2, 2 * reps, L, D), key=mx.random.key(0)).astype(dtype)
    k = mx.random.normal((2, 2, S, D), key=mx.random.key(1)).astype(dtype)
    K = S // 2
    index = mx.broadcast_to(mx.arange(S - 2 * K, S, 2, dtype=mx.int32), (2, 2, K))
    count = mx.array([[K, K - 3], [K - 1, K - 4]], mx.int32)
    wide = Plan(mx.contiguous(index), count, S - L, block_size, block_size // 2 + 5)
    tol = 1e-3 if dtype == mx.float32 else 1e-2
    for cap in (30.0, None):
        out = run_refine(kernel, wide, q, k, stride, D**-0.5, cap)
        ref = reference.refine_scores(
            wide, q.astype(mx.float32), k.astype(mx.float32), stride, D**-0.5, cap
        )
        problem = checks.mismatch(out, ref, tol)
        if problem is not None:
            return problem
    return None


def run_refine(
    kernel: RefineKernel,
    wide: Plan,
    queries: mx.array,
    keys: mx.array,
    stride: int,
    scale: float,
    softcap: float | None,
) -> mx.array:
    """:func:`mlx_dhsa.reference.refine_scores` on refine_scores.metal: (B, NB, K') float32."""
    B, H, L, D = queries.shape
    H_kv = keys.shape[1]
    NB, K = wide.indices.shape[1:]
    scoring = -(-wide.block_size // stride)  # scoring queries of a whole block
    n_qtiles = -(-scoring // kernel.qt)  # query tiles a group walks
    iparams = params(
        RefineParams(
            n_q=L,
            q_offset=wide.q_offset,
            window=wide.window or 0,
            block_size=wide.block_size,
            stride=stride,
            n_heads=H,
            n_kv=H_kv,
            n_blocks=NB,
            n_slots_max=K,
            qt=kernel.qt,
            n_qtiles=n_qtiles,
        )
    )
    fparams = params(AttentionScalars(scale=scale, cap=softcap or 0.0), mx.float32)
    be = backend()
    launch = be.kernel(
        "refine_scores",
        ["queries", "keys", "kv_index", "kv_count", "iparams", "fparams"],
        ["scores"],
        contiguous=False,  # queries and keys are read through their strides
        shared_memory=kernel.smem if be.name == "cuda" else 0,
    )
    index, count = (mx.contiguous(x.astype(mx.int32)) for x in (wide.indices, wide.n_valid))
    (scores,) = launch(
        inputs=[queries, keys, index, count, iparams, fparams],
        template=[
            ("T", queries.dtype),
            ("D", D),
            ("BK", kernel.bk),
            ("WARPS", kernel.warps),
            ("WROWS", kernel.wrows),
        ],
        grid=(NB * kernel.warps * 32, B * H_kv, 1),
        threadgroup=(kernel.warps * 32, 1, 1),
        output_shapes=[(B, H_kv, NB, K)],
        output_dtypes=[mx.float32],
    )
    return scores.sum(axis=1)
