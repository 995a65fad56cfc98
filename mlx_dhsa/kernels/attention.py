"""Attention launches: sparse_attention.metal (query tiles on the matrix unit, over a plan or
all keys), decode_attention.metal (one query, warps walking keys) and merge_splits.metal.

:func:`attention_kernel` says whether and how a call runs on them; ``run_*`` launch what it
chose (None: the pure-MLX reference); :func:`sparse_attention` / :func:`dense_attention` do
both.

Keys and values may be :class:`mlx_dhsa.quantized.QuantizedKV` (mlx-lm's quantized cache): the
same kernels, built with ``DHSA_QUANTIZED_KV``, read the packed words, scales and biases and
dequantize each key as it is gathered (:func:`accepts_quantized` says which cases they take).
"""

from functools import cache
from typing import NamedTuple

import mlx.core as mx

from .. import reference
from ..device import device_tuning
from ..plan import Plan
from ..quantized import QuantizedKV
from ..selection import key_mask
from . import checks
from .sources import (
    QUANTIZED_KV_INPUTS,
    AttentionScalars,
    DecodeParams,
    MergeParams,
    SparseParams,
    backend,
    params,
)
from .state import KernelState

# (WARPS, WROWS, BK) per backend and element size: warps per group, query rows per warp, keys
# per tile. Shared memory is max(WARPS * WROWS, 2 * BK * STAGES) * (D + 16 / size) * size
# bytes, within the backend's limit: Metal's 32 KB of threadgroup memory; on CUDA the launch
# sizes it (dynamic shared memory), up to SMEM_LIMIT so that two groups still share an SM.
TILES = {
    ("cuda", 2): (4, 16, 32),
    ("cuda", 4): (2, 16, 16),
    ("metal", 2): (4, 8, 16),
    ("metal", 4): (2, 8, 8),
}
# K/V tiles in flight for calls with a plan: CUDA loads the next tile (cp.async; over
# quantized K/V into registers, dequantized into the other stage after this tile's products)
# while the matrix unit works on this one; Metal's loads are synchronous, so a second stage
# would only cost memory there. All-keys calls keep one stage: there nvcc spills the second
# one's registers (docs/benchmarks.md has both measurements).
STAGES = {"cuda": 2, "metal": 1}
# Over quantized K/V a second stage holds the next tile's K (then V) units (16 bytes of words
# and their scale and bias) in registers across this tile's products: at most this many a
# thread, else one stage (bf16 at head dim 256 and 8 bits, 4 units: nvcc spills the loaded
# words, and each spill waits for its load).
PREFETCH_UNITS = 2
SMEM_LIMIT = {"cuda": 100 * 1024, "metal": 32 * 1024}
MIN_GROUPS = 128  # fewer attention groups than this: split the keys across more groups
MIN_SPLIT_TILES = 8  # key tiles per split at least (multi-query calls)
MIN_SPLIT_TILES_DECODE = 2  # the same for one query: more, shorter splits hide load latency
# One query (a decode step): decode_attention.metal.
DECODE_WARPS = 4  # NW: warps per group
DECODE_KEYS = 4  # KB: keys a warp loads per step
DECODE_STEP = DECODE_WARPS * DECODE_KEYS  # slots a group's warps read per step
DECODE_MIN_SPLIT = 64  # but give each split at least this many key slots
DECODE_MAX_REPS = 8  # query heads per KV head that the kernel holds in registers
MERGE_WARPS = 8  # NW of merge_splits.metal
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
QUANT_BITS = (4, 8)  # mx.quantize's bit widths the kernels read (mlx-lm's quantized KV cache)
QUANT_GROUPS = (32, 64, 128)


class Tiles(NamedTuple):
    """How sparse_attention.metal is launched for one dtype, head dim and GQA layout."""

    warps: int  # WARPS: warps per group
    wrows: int  # WROWS: query rows per warp
    bk: int  # BK: keys per tile
    qt: int  # queries per group (qt x heads per KV head <= warps x wrows rows)
    stages: int  # STAGES: K/V tiles in shared memory at once
    smem: int  # shared memory bytes


class AttentionKernel(NamedTuple):
    """The kernel launch an attention call runs: the query-tile geometry, and whether its one
    query runs on decode_attention.metal instead."""

    tiles: Tiles
    decode: bool
    groups: int = 0  # decode: split the keys until about this many groups run
    quant: tuple[int, int] | None = None  # (bits, group_size) of quantized K/V, else None


def accepts_quantized(bits: int, group_size: int, D: int | None = None) -> bool:
    """Whether the attention kernels of the current backend read keys and values quantized
    with ``bits`` and ``group_size`` at head dim ``D`` (None: at some head dim)
    (:class:`~mlx_dhsa.quantized.QuantizedKV`) directly. Shapes and dtypes are checked per
    call as for plain arrays (:func:`attention_kernel` with ``quantized=``, which returns None
    for a case this rejects, or if the variant fails its self-check)."""
    if backend().name is None or bits not in QUANT_BITS or group_size not in QUANT_GROUPS:
        return False
    return D is None or (D % group_size == 0 and D % 32 == 0 and D <= 256)


def attention_active(use_kernel: bool = True, quantized: tuple[int, int] | None = None) -> bool:
    """Whether the attention kernels run now (:meth:`Backend.active`) for keys and values
    quantized as ``quantized``, ``(bits, group_size)`` (None: arrays), at some head dim."""
    return backend().active(use_kernel) and (quantized is None or accepts_quantized(*quantized))


@cache
def tile_config(
    backend_name: str,
    dtype,
    D: int,
    H: int,
    H_kv: int,
    block_size: int | None,
    bits: int | None = None,
):
    """Tiles for a plan with ``block_size`` (None: all keys, one K/V stage), or None when
    sparse_attention.metal cannot take these shapes; ``bits``: of quantized keys and values
    (None: arrays), which keep one stage where a thread's share of a tile passes
    ``PREFETCH_UNITS``."""
    if dtype not in DTYPES or D % 16 or D > 256 or H % H_kv:
        return None
    warps, wrows, bk = TILES[(backend_name, dtype.size)]
    rows = warps * wrows
    qt = 1 << ((rows // (H // H_kv)).bit_length() - 1) if H // H_kv <= rows else 0
    while block_size is not None and qt and block_size % qt:
        qt //= 2
    if qt == 0:
        return None
    most = STAGES[backend_name] if block_size is not None else 1
    if bits is not None and prefetch_units(warps, bk, D, bits) > PREFETCH_UNITS:
        most = 1
    for stages in range(most, 0, -1):
        smem = max(rows, 2 * bk * stages) * (D + 16 // dtype.size) * dtype.size
        if smem <= SMEM_LIMIT[backend_name]:  # (+ the stages x bk key positions, declared apart)
            return Tiles(warps, wrows, bk, qt, stages, smem)
    return None


def prefetch_units(warps: int, bk: int, D: int, bits: int) -> int:
    """A thread's 16-byte units of one quantized K (or V) tile in sparse_attention.metal."""
    return -(-bk * D * bits // (128 * warps * 32))


@cache
def decode_ok(dtype, D: int, H: int, H_kv: int) -> bool:
    """Whether decode_attention.metal takes one query of these shapes."""
    return (
        dtype in DTYPES
        and D % 32 == 0
        and D <= 256
        and H % H_kv == 0
        and (H // H_kv <= DECODE_MAX_REPS)
    )


def quant_template(quant: tuple[int, int] | None) -> list:
    """Template parameters of a launch over quantized K/V, ``(bits, group_size)`` (None: [])."""
    return [] if quant is None else [("BITS", quant[0]), ("GROUP", quant[1])]


def sparse_template(dtype, D: int, tiles: Tiles, *, all_keys: bool, split: bool, quant=None):
    """Template parameters of a sparse_attention.metal launch."""
    return [
        ("T", dtype),
        ("D", D),
        ("BK", tiles.bk),
        ("WARPS", tiles.warps),
        ("WROWS", tiles.wrows),
        ("ALL_KEYS", all_keys),
        ("SPLIT", split),
        ("STAGES", tiles.stages),
        *quant_template(quant),
    ]


def decode_template(dtype, D: int, reps: int, *, all_keys: bool, fold: bool, quant=None):
    """Template parameters of a decode_attention.metal launch."""
    return [
        ("T", dtype),
        ("D", D),
        ("REPS", reps),
        ("NW", DECODE_WARPS),
        ("KB", DECODE_KEYS),
        ("ALL_KEYS", all_keys),
        ("FOLD", fold),
        *quant_template(quant),
    ]


def attention_kernel(
    dtypes: tuple,
    D: int,
    H: int,
    H_kv: int,
    L: int,
    S: int,
    block_size: int | None,
    *,
    use_kernel: bool = True,
    decode_groups: int | None = None,
    quantized: tuple[int, int] | None = None,
) -> AttentionKernel | None:
    """The kernel launch for queries (B, H, L, D) over keys and values (B, H_kv, S, D) of
    ``dtypes`` (q, k, v), with a plan of ``block_size`` (None: all keys), one-query calls
    split into about ``decode_groups`` groups (None: the device's), or None for the
    reference: no backend active, shapes the kernels do not take, or a kernel that failed
    its self-check in this process (:mod:`.checks`). ``quantized``: ``(bits, group_size)``
    when keys and values are :class:`~mlx_dhsa.quantized.QuantizedKV` (their dtype: that of
    the scales), None for plain arrays."""
    be = backend()
    if not be.active(use_kernel) or L == 0 or S == 0 or not dtypes[0] == dtypes[1] == dtypes[2]:
        return None
    if quantized is not None and not accepts_quantized(*quantized, D):
        return None
    dtype = dtypes[0]
    bits = None if quantized is None else quantized[0]
    tiles = tile_config(be.name, dtype, D, H, H_kv, block_size, bits)
    if tiles is None:
        return None
    decode = L == 1 and decode_ok(dtype, D, H, H_kv)
    groups = (decode_groups or device_tuning().decode_groups) if decode else 0
    kernel = AttentionKernel(tiles, decode, groups, quantized)
    if be.self_check:
        names = ("decode_attention",) if kernel.decode else ("sparse_attention",)
        if not (kernel.decode and be.fold_decode):
            names += ("merge_splits",)
        reps, all_keys = H // H_kv, block_size is None
        key = ("attention", kernel, dtype, D, reps, all_keys)
        check = lambda: _self_check(kernel, dtype, D, reps, block_size)
        if not checks.verified(be, key, names, check):
            return None
    return kernel


def _self_check(kernel: AttentionKernel, dtype, D: int, reps: int, block_size: int | None):
    """Run ``kernel`` on tiny inputs of its instantiation (one pass over the keys, then enough
    key tiles to split and merge) against the reference: None if it matched, else why not."""
    tol = 1e-3 if dtype == mx.float32 else 5e-2
    L = 1 if kernel.decode else 2 * kernel.tiles.qt + 3  # a ragged last query tile
    for i, S in enumerate((max(97, L), max(40 * kernel.tiles.bk, L))):
        q, k, v = (
            mx.random.normal(shape, key=mx.random.key(3 * i + j)).astype(dtype)
            for j, shape in enumerate(((1, reps, L, D), (1, 1, S, D), (1, 1, S, D)))
        )
        if kernel.quant is not None:  # the reference sees what the kernel dequantizes
            k, v = (QuantizedKV.quantize(x, *kernel.quant) for x in (k, v))
            ref_in = [q.astype(mx.float32), *(x.dequantize().astype(mx.float32) for x in (k, v))]
        else:
            ref_in = [x.astype(mx.float32) for x in (q, k, v)]
        args = dict(q_offset=S - L, window=None, scale=D**-0.5, softcap=30.0, state=None)
        if block_size is None:
            none = _no_plan()
            out = _attention(kernel, q, k, v, none, none, all_keys=True, block_size=1, **args)
            mask = key_mask(S - L, L, S, None)
            ref = reference.dense_attention(*ref_in, scale=D**-0.5, softcap=30.0, mask=mask)
        else:
            NB, K = -(-L // block_size), S // 2
            index = mx.broadcast_to(mx.arange(0, 2 * K, 2, dtype=mx.int32), (1, NB, K))
            index, count = mx.contiguous(index), mx.full((1, NB), K, mx.int32)
            out = _attention(
                kernel, q, k, v, index, count, all_keys=False, block_size=block_size, **args
            )
            plan = Plan(index, count, S - L, block_size, None)
            ref = reference.sparse_attention(*ref_in, plan, scale=D**-0.5, softcap=30.0)
        problem = checks.mismatch(out, ref, tol)
        if problem is not None:
            return problem
    return None


def quantization(k, v) -> tuple[int, int] | None:
    """``(bits, group_size)`` when keys and values are both :class:`QuantizedKV` with the same
    quantization, None when both are arrays; an error for a mix."""
    qk, qv = isinstance(k, QuantizedKV), isinstance(v, QuantizedKV)
    if not qk and not qv:
        return None
    if not (qk and qv) or (k.bits, k.group_size) != (v.bits, v.group_size):
        raise ValueError(
            "keys and values must both be QuantizedKV with the same bits and group size, "
            "or both arrays"
        )
    return (k.bits, k.group_size)


def _kernel_for(q: mx.array, k, v, block_size: int | None, use_kernel):
    return attention_kernel(
        (q.dtype, k.dtype, v.dtype),
        q.shape[-1],
        q.shape[1],
        k.shape[1],
        q.shape[2],
        k.shape[2],
        block_size,
        use_kernel=use_kernel,
        quantized=quantization(k, v),
    )


def _kv_inputs(kernel: AttentionKernel, k, v) -> tuple[list[str], list]:
    """The K/V input names and arrays of ``kernel``'s launch."""
    quant = quantization(k, v)
    if quant != kernel.quant:
        raise ValueError(
            f"the attention kernel was chosen for keys quantized as {kernel.quant} "
            f"(None: arrays), got {quant}"
        )
    if quant is None:
        return ["keys", "values"], [k, v]
    return QUANTIZED_KV_INPUTS, [*k.triple(), *v.triple()]


def _dequantized(k, v) -> tuple[mx.array, mx.array]:
    """Plain keys and values for the reference (QuantizedKV dequantized whole)."""
    if quantization(k, v) is None:
        return k, v
    return k.dequantize(), v.dequantize()


@cache
def _no_plan() -> mx.array:
    """The placeholder index/count array of an all-keys call, made once."""
    x = mx.zeros((1, 1), mx.int32)
    mx.eval(x)
    return x


def decode_splits(n_slots: int, heads: int, groups: int) -> tuple[int, int]:
    """(n_splits, per_split) for ``n_slots`` key slots of each of ``heads`` (batch x KV
    heads): about ``groups`` groups, at least ``DECODE_MIN_SPLIT`` slots a split, splits a
    whole number of warp steps long, none of them empty."""
    n_splits = max(1, min(-(-groups // heads), -(-n_slots // DECODE_MIN_SPLIT)))
    per_split = -(-n_slots // n_splits)
    per_split = -(-per_split // DECODE_STEP) * DECODE_STEP
    return -(-n_slots // per_split), per_split


def _decode(kernel, q, k, v, index, count, *, all_keys, q_offset, window, fparams, state):
    """One query per head over many keys (decode_attention.metal), splits merged."""
    groups = kernel.groups
    B, H, _, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if all_keys:
        lo = max(q_offset - window + 1, 0) if window else 0
        n_slots = max(min(S, q_offset + 1) - lo, 1)
    else:
        n_slots = max(index.shape[-1], 1)
    n_splits, per_split = decode_splits(n_slots, B * H_kv, groups)
    iparams = params(
        DecodeParams(
            n_k=S,
            q_pos=q_offset,
            window=window or 0,
            n_heads=H,
            n_kv=H_kv,
            n_blocks=count.shape[1],
            n_slots_max=index.shape[-1],
            n_splits=n_splits,
            per_split=per_split,
            n_batch=B,
        )
    )
    be = backend()
    kv_names, kv = _kv_inputs(kernel, k, v)
    fold = be.fold_decode
    if not fold:
        tickets = _no_plan()
    elif state is not None:
        tickets = state.tickets("attention", B * H_kv)
    else:  # launches that MLX may run side by side must share nothing
        tickets = mx.zeros((B * H_kv,), mx.int32)
    launch = be.kernel(
        "decode_attention",
        ["queries", *kv_names, "kv_index", "kv_count", "tickets", "iparams", "fparams"],
        ["part", "lse", "out"],
        contiguous=False,  # q, k, v are read through their strides: cache slices need no copy
        quantized=kernel.quant is not None,
    )
    part, lse, out = launch(
        inputs=[q, *kv, index, count, tickets, iparams, fparams],
        template=decode_template(
            q.dtype, D, H // H_kv, all_keys=all_keys, fold=fold, quant=kernel.quant
        ),
        grid=(n_splits * DECODE_WARPS * 32, B * H_kv, 1),
        threadgroup=(DECODE_WARPS * 32, 1, 1),
        output_shapes=[(n_splits, B, H, D), (n_splits, B, H), (B, H, 1, D) if fold else (1,)],
        output_dtypes=[mx.float32, mx.float32, q.dtype],
    )
    if fold:
        return out
    return merge(part, lse, n_splits, B * H, D, q.dtype).reshape(B, H, 1, D)


def merge(part, lse, n_splits: int, R: int, D: int, dtype) -> mx.array:
    """(R, D) from per-split outputs and log-sum-exps (merge_splits.metal)."""
    kernel = backend().kernel("merge_splits", ["part", "lse", "iparams"], ["out"])
    return kernel(
        inputs=[part, lse, params(MergeParams(n_splits=n_splits, n_rows=R))],
        template=[("T", dtype), ("D", D), ("NW", MERGE_WARPS)],
        grid=(MERGE_WARPS * 32 * -(-D // 32), R, 1),
        threadgroup=(MERGE_WARPS * 32, 1, 1),
        output_shapes=[(R, D)],
        output_dtypes=[dtype],
    )[0]


def _attention(
    kernel: AttentionKernel,
    q,
    k,
    v,
    index,
    count,
    *,
    all_keys,
    q_offset,
    window,
    block_size,
    scale,
    softcap,
    state,
):
    B, H, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    fparams = params(AttentionScalars(scale=scale, cap=softcap or 0.0), mx.float32)
    if kernel.decode:
        return _decode(
            kernel,
            q,
            k,
            v,
            index,
            count,
            all_keys=all_keys,
            q_offset=q_offset,
            window=window,
            fparams=fparams,
            state=state,
        )
    tiles = kernel.tiles
    n_qtiles = -(-L // tiles.qt)
    groups = n_qtiles * B * H_kv
    key_tiles = -(-(S if all_keys else index.shape[-1]) // tiles.bk)
    n_splits = 1
    if groups < MIN_GROUPS:
        min_tiles = MIN_SPLIT_TILES if L > 1 else MIN_SPLIT_TILES_DECODE
        n_splits = max(1, min(-(-2 * MIN_GROUPS // groups), key_tiles // min_tiles))
    split = n_splits > 1
    iparams = params(
        SparseParams(
            n_q=L,
            n_k=S,
            q_offset=q_offset,
            window=window or 0,
            block_size=block_size,
            n_heads=H,
            n_kv=H_kv,
            n_blocks=count.shape[1],
            n_slots_max=index.shape[-1],
            qt=tiles.qt,
            n_splits=n_splits,
            n_batch=B,
        )
    )
    shapes = (
        [(1,), (n_splits, B, H, L, D), (n_splits, B, H, L)] if split else [(B, H, L, D), (1,), (1,)]
    )
    be = backend()
    kv_names, kv = _kv_inputs(kernel, k, v)
    launch = be.kernel(
        "sparse_attention",
        ["queries", *kv_names, "kv_index", "kv_count", "iparams", "fparams"],
        ["out", "part", "lse"],
        contiguous=False,  # q, k, v are read through their strides: cache slices need no copy
        shared_memory=tiles.smem if be.name == "cuda" else 0,
        quantized=kernel.quant is not None,
    )
    out, part, lse = launch(
        inputs=[q, *kv, index, count, iparams, fparams],
        template=sparse_template(
            q.dtype, D, tiles, all_keys=all_keys, split=split, quant=kernel.quant
        ),
        grid=(n_qtiles * tiles.warps * 32, B * H_kv, n_splits),
        threadgroup=(tiles.warps * 32, 1, 1),
        output_shapes=shapes,
        output_dtypes=[q.dtype, mx.float32, mx.float32],
    )
    if not split:
        return out
    return merge(part, lse, n_splits, B * H * L, D, q.dtype).reshape(B, H, L, D)


def run_sparse(
    kernel: AttentionKernel | None,
    q: mx.array,
    k: mx.array | QuantizedKV,
    v: mx.array | QuantizedKV,
    plan: Plan,
    *,
    scale: float,
    softcap: float | None = None,
    state: KernelState | None = None,
) -> mx.array:
    """Sparse attention over ``plan`` on ``kernel`` (from :func:`attention_kernel` with the
    plan's block size), or on the reference when it is None. ``k`` and ``v`` may be
    :class:`QuantizedKV` (the kernel chosen for them)."""
    if kernel is None:
        k, v = _dequantized(k, v)
        return reference.sparse_attention(q, k, v, plan, scale=scale, softcap=softcap)
    index, count = plan.indices, plan.n_valid
    if state is None or not state.take_planned(index):  # the kernels read both as int32 rows
        index, count = (mx.contiguous(x.astype(mx.int32)) for x in (index, count))
    return _attention(
        kernel,
        q,
        k,
        v,
        index,
        count,
        all_keys=False,
        q_offset=plan.q_offset,
        window=plan.window,
        block_size=plan.block_size,
        scale=scale,
        softcap=softcap,
        state=state,
    )


def run_dense(
    kernel: AttentionKernel | None,
    q: mx.array,
    k: mx.array | QuantizedKV,
    v: mx.array | QuantizedKV,
    *,
    scale: float,
    softcap: float | None = None,
    q_offset: int = 0,
    window: int | None = None,
    state: KernelState | None = None,
) -> mx.array:
    """Causal (and sliding-window) dense attention on ``kernel`` (from
    :func:`attention_kernel` without a block size), or on the reference when it is None.
    ``k`` and ``v`` may be :class:`QuantizedKV` (the kernel chosen for them)."""
    if kernel is None:
        k, v = _dequantized(k, v)
        mask = key_mask(q_offset, q.shape[2], k.shape[2], window)
        return reference.dense_attention(q, k, v, scale=scale, softcap=softcap, mask=mask)
    none = _no_plan()
    return _attention(
        kernel,
        q,
        k,
        v,
        none,
        none,
        all_keys=True,
        q_offset=q_offset,
        window=window,
        block_size=1,
        scale=scale,
        softcap=softcap,
        state=state,
    )


def sparse_attention(
    q: mx.array,
    k: mx.array | QuantizedKV,
    v: mx.array | QuantizedKV,
    plan: Plan,
    *,
    scale: float,
    softcap: float | None = None,
    use_kernel: bool = True,
    state: KernelState | None = None,
) -> mx.array:
    """:func:`mlx_dhsa.reference.sparse_attention`, on the GPU kernel when one takes it.

    Args and returns as the reference; ``use_kernel=False`` forces the reference. ``state``:
    the layer's :class:`KernelState` (ticket buffers, the plan it made), if it has one.
    ``k`` and ``v`` may be :class:`~mlx_dhsa.quantized.QuantizedKV`: the kernels dequantize
    each gathered key (the fallback dequantizes them whole).
    """
    kernel = _kernel_for(q, k, v, plan.block_size, use_kernel)
    return run_sparse(kernel, q, k, v, plan, scale=scale, softcap=softcap, state=state)


def dense_attention(
    q: mx.array,
    k: mx.array | QuantizedKV,
    v: mx.array | QuantizedKV,
    *,
    scale: float,
    softcap: float | None = None,
    q_offset: int = 0,
    window: int | None = None,
    use_kernel: bool = True,
    state: KernelState | None = None,
) -> mx.array:
    """Causal (and sliding-window) dense attention, fused on the GPU when a kernel takes it.

    Query i sits at position ``q_offset + i`` and sees keys ``k <= q_offset + i`` (and
    ``k > q_offset + i - window``): :func:`mlx_dhsa.reference.dense_attention` with the mask
    :func:`mlx_dhsa.selection.key_mask`, which is the fallback.

    Args:
        q (mx.array): queries, (B, H, L, D).
        k (mx.array | QuantizedKV): keys, (B, H_kv, S, D).
        v (mx.array | QuantizedKV): values, (B, H_kv, S, D).
        scale (float): query scale.
        softcap (float, optional): logit soft cap. Default: ``None``.
        q_offset (int): position of the first query. Default: ``0``.
        window (int, optional): sliding window. Default: ``None``.
        use_kernel (bool): ``False`` forces the reference. Default: ``True``.
        state (KernelState, optional): the layer's kernel state; its ticket buffer serves
            consecutive one-query launches. Default: ``None`` (fresh zeros per launch).

    Returns:
        mx.array: (B, H, L, D).
    """
    kernel = _kernel_for(q, k, v, None, use_kernel)
    return run_dense(
        kernel, q, k, v, scale=scale, softcap=softcap, q_offset=q_offset, window=window, state=state
    )
