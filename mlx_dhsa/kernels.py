"""GPU kernels and the one place that dispatches between them and the pure-MLX reference.

Kernel bodies live in ``metal/`` and are written once for both GPU backends: each build
prepends the backend's thread ids (``ids_<backend>.h``) to the body and passes the backend's
prelude plus ``common.h`` as the header, for ``mx.fast.metal_kernel`` on Macs and
``mx.fast.cuda_kernel`` on NVIDIA. Sources are read and kernels built once, at import;
sequence lengths, offsets and counts travel as runtime scalars, so a new prompt length never
compiles a new kernel. ``last_path`` records which path the most recent call took.
"""

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from . import reference, selection
from .cache import ChunkTable
from .chunking import Chunks, chunk_summaries as _reference_summaries
from .config import DHSAConfig
from .selection import Plan, chunk_scores as _reference_scores, key_mask

BACKENDS = ("metal", "cuda")
KERNELS = ("sparse_attention", "decode_attention", "merge_splits", "chunk_scores",
           "block_scores", "select_keys", "plan")
# Kernels assembled from several bodies, each in a scope of its own: the fused planning kernel
# runs block_scores, hands each query block to the group that finishes it last, and selects.
_PARTS = {"plan": ("block_scores", "plan_handoff", "select_keys")}

# (WARPS, WROWS, BK) per backend and element size: warps per group, query rows per warp, keys
# per tile. Shared memory is max(WARPS * WROWS, 2 * BK * STAGES) * (D + 16 / size) * size
# bytes, within the backend's limit: Metal's 32 KB of threadgroup memory; on CUDA the launch
# sizes it (dynamic shared memory), up to _SMEM_LIMIT so that two groups still share an SM.
_TILES = {
    ("cuda", 2): (4, 16, 32),
    ("cuda", 4): (2, 16, 16),
    ("metal", 2): (4, 8, 16),
    ("metal", 4): (2, 8, 8),
}
# K/V tiles in flight for sparse calls: CUDA loads the next tile (cp.async) while the matrix
# unit works on this one (32k prefill attention 9.9 -> 9.2 ms on the H200); Metal's loads are
# synchronous, so a second stage would only cost memory there. Dense (all-keys) calls keep one
# stage: there the second one's registers spill (nvcc) and it measured slower (42.9 -> 51.1 ms).
_STAGES = {"cuda": 2, "metal": 1}
_SMEM_LIMIT = {"cuda": 100 * 1024, "metal": 32 * 1024}
_SCORE_THREADS = 256  # threads per group in chunk_scores and block_scores
_MAX_INTERVALS = 1024  # select_keys MAX_IV: key intervals one block can hold (8 KB)
_PLAN_GROUPS = 128  # block_scores splits the chunks until about this many groups run
_MIN_GROUPS = 128  # fewer attention groups than this: split the keys across more groups
_MIN_SPLIT_TILES = 8  # key tiles per split at least (multi-query calls)
_MIN_SPLIT_TILES_DECODE = 2  # the same for one query: more, shorter splits hide load latency
# One query (a decode step): decode_attention.metal, warps walking keys (no matrix unit).
_DECODE_WARPS = 4  # NW: warps per group
_DECODE_KEYS = 4  # KB: keys a warp loads per step
_DECODE_STEP = _DECODE_WARPS * _DECODE_KEYS  # slots a group's warps read per step
_DECODE_GROUPS = 512  # split the keys until about this many groups run (4 per SM of an H200)
_DECODE_MIN_SPLIT = 64  # but give each split at least this many key slots
_DECODE_MAX_REPS = 8  # query heads per KV head that the kernel holds in registers
_MERGE_WARPS = 8  # NW of merge_splits.metal
_CARRY_OPEN_SUM = True  # block_scores adds new keys to the cache's running open-chunk sum
# Threads per group in select_keys. CUDA: 71 registers each at 512; at 1024 threads it needs
# 91, over a block's 64K registers.
_SELECT_THREADS = 512

# One-query dense steps with a logit soft cap (Gemma2's dense and sliding-window decode) run
# decode_attention.metal: one kernel call (two on Metal: attention, merge) instead of mlx-lm's
# six ops (scale, two matmuls, soft cap, softmax). Decode on a fast GPU is bound by host work
# per launch (CUDA graph nodes, encoding, Python): see scripts/profile_timeline.py. False: MLX
# ops, as mlx-lm runs them.
FUSED_DECODE = True
# One-query calls (sparse and dense decode steps) on decode_attention.metal; False: on the
# query-tile kernel sparse_attention.metal, as before it existed (for A/B measurements).
DECODE_KERNEL = True

last_path: str = "none"  # "kernel" or "reference": set by every dispatching call
last_plan_path: str = "none"  # the same for select_chunks (planning)


def _metal_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here / "metal", here.parent / "metal"):  # installed wheel, then source checkout
        if (d / "sparse_attention.metal").is_file():
            return d
    raise FileNotFoundError(
        f"kernel sources not found in {here / 'metal'} or {here.parent / 'metal'}"
    )


_COMMENT = re.compile(r"[ \t]*//[^\n]*")


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    """File ``name`` of the kernel folder without its comments (MLX builds a custom kernel's
    whole source text on every call: fewer bytes, less host time a launch), lines kept so
    that compiler messages point at the right line."""
    text = _COMMENT.sub("", (_metal_dir() / name).read_text())
    return f'#line 1 "{name}"\n{text}'


def kernel_source(name: str, backend: str) -> tuple[str, str]:
    """The ``(header, source)`` pair that builds kernel ``name`` on ``backend``.

    Args:
        name (str): one of ``KERNELS``.
        backend (str): ``"metal"`` or ``"cuda"``.

    Returns:
        tuple[str, str]: header (prelude + common.h) and body (thread ids + kernel body).
    """
    if backend not in BACKENDS or name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r} or backend {backend!r}")
    header = _read(f"prelude_{backend}.h") + "\n" + _read("common.h")
    parts = _PARTS.get(name)
    if parts is None:
        body = _read(f"{name}.metal")
    else:
        first, handoff, last = (_read(f"{part}.metal") for part in parts)
        # The last part reads its own parameters, sel_params, under the name it uses alone.
        body = (f"{{\n{first}\n}}\n{handoff}\n{{\n"
                f"const DHSA_DEVICE int* iparams = sel_params;\n{last}\n}}")
    return header, _read(f"ids_{backend}.h") + "\n" + body


def _backend() -> str | None:
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


BACKEND = _backend()
# decode_attention.metal merges its own splits (FOLD: the last group of a KV head to finish
# does it, after a device-scope fence and an atomic ticket): one launch a decode step instead
# of two, which is what a host-bound decode step pays for. CUDA only: the Metal side of those
# fences has not run on a Mac, so Macs keep the merge_splits launch.
_DECODE_FOLD = BACKEND == "cuda"
# A call with one query block (decode) plans in one launch (plan: block_scores, hand-off,
# select_keys) instead of two; host-bound decode pays per launch. CUDA only, as _DECODE_FOLD.
_FUSED_PLAN = BACKEND == "cuda"


def _build(name: str, inputs: list[str], outputs: list[str], *, contiguous: bool = True,
           shared_memory: int = 0):
    if BACKEND is None:
        return None
    header, source = kernel_source(name, BACKEND)
    tag = hashlib.sha1((header + source).encode()).hexdigest()[:8]  # no stale JIT cache
    kwargs = dict(name=f"dhsa_{name}_{tag}", input_names=inputs, output_names=outputs,
                  source=source, header=header, ensure_row_contiguous=contiguous)
    if BACKEND == "metal":
        return mx.fast.metal_kernel(**kwargs)
    if shared_memory:
        kwargs["name"] += f"_{shared_memory}"
    return mx.fast.cuda_kernel(**kwargs, shared_memory=shared_memory)


@lru_cache(maxsize=None)
def _attention_kernel(smem: int):
    """sparse_attention.metal, built for ``smem`` bytes of shared memory (CUDA sizes it at
    launch: one build per tile configuration; Metal declares it in the body)."""
    return _build(
        "sparse_attention",
        ["queries", "keys", "values", "kv_index", "kv_count", "iparams", "fparams"],
        ["out", "part", "lse"],
        contiguous=False,  # q, k, v are read through their strides: cache slices need no copy
        shared_memory=smem if BACKEND == "cuda" else 0,
    )


_ATTENTION = BACKEND is not None  # the attention kernels exist (built on first use)
_decode_kernel = _build(
    "decode_attention",
    ["queries", "keys", "values", "kv_index", "kv_count", "tickets", "iparams", "fparams"],
    ["part", "lse", "out"],
    contiguous=False,
)
_merge_kernel = _build("merge_splits", ["part", "lse", "iparams"], ["out"])
_scores_kernel = _build(
    "chunk_scores", ["keys", "starts", "lengths", "block_q", "iparams"], ["summaries", "scores"]
)
_block_scores_kernel = _build(
    "block_scores", ["queries", "keys", "summaries", "open_prev", "iparams"],
    ["scores", "open_sum"],
    contiguous=False,  # queries and keys are read through their strides
)
_select_kernel = _build(
    "select_keys", ["scores", "starts", "lengths", "iparams"], ["indices", "n_valid"]
)
_plan_kernel = _build(
    "plan",
    ["queries", "keys", "summaries", "open_prev", "iparams", "starts", "lengths", "sel_params",
     "tickets"],
    ["scores", "open_sum", "indices", "n_valid"],
    contiguous=False,  # queries and keys are read through their strides
)


@lru_cache(maxsize=64)
def _params(values: tuple, dtype=mx.int32) -> mx.array:
    """The small parameter array for ``values``, made once per distinct tuple.

    Within a decode step every global layer passes the same sizes, so one host array serves
    them all instead of a fresh host allocation and transfer per layer and kernel.
    """
    return mx.array(values, dtype)


def _on_gpu(kernel, use_kernel: bool) -> bool:
    return use_kernel and bool(kernel) and mx.default_device() == mx.gpu


def fused_decode(use_kernel: bool = True) -> bool:
    """Whether a one-query dense attention step runs on the fused kernel (``FUSED_DECODE``
    and a GPU kernel present), rather than on MLX ops."""
    return FUSED_DECODE and _on_gpu(_ATTENTION, use_kernel)


class Tiles(NamedTuple):
    """How sparse_attention.metal is launched for one dtype, head dim and GQA layout."""

    warps: int  # WARPS: warps per group
    wrows: int  # WROWS: query rows per warp
    bk: int  # BK: keys per tile
    qt: int  # queries per group (qt x heads per KV head <= warps x wrows rows)
    stages: int  # STAGES: K/V tiles in shared memory at once
    smem: int  # shared memory bytes


def _tiles(q: mx.array, k: mx.array, v: mx.array, block_size: int | None):
    """The Tiles for these inputs (a plan's ``block_size``, None for all keys), or None when
    the kernel cannot take them."""
    if not q.dtype == k.dtype == v.dtype or q.shape[2] == 0 or k.shape[2] == 0:
        return None
    return _tile_config(q.dtype, q.shape[-1], q.shape[1], k.shape[1], block_size)


@lru_cache(maxsize=None)
def _tile_config(dtype, D: int, H: int, H_kv: int, block_size: int | None):
    """Tiles for a plan with ``block_size`` (None: all keys, one K/V stage)."""
    if dtype not in (mx.float32, mx.float16, mx.bfloat16) or D % 16 or D > 256 or H % H_kv:
        return None
    warps, wrows, bk = _TILES[(BACKEND, dtype.size)]
    rows = warps * wrows
    qt = 1 << ((rows // (H // H_kv)).bit_length() - 1) if H // H_kv <= rows else 0
    while block_size is not None and qt and block_size % qt:
        qt //= 2
    if qt == 0:
        return None
    for stages in range(_STAGES[BACKEND] if block_size is not None else 1, 0, -1):
        smem = max(rows, 2 * bk * stages) * (D + 16 // dtype.size) * dtype.size
        if smem <= _SMEM_LIMIT[BACKEND]:  # (+ the stages x bk key positions, declared apart)
            return Tiles(warps, wrows, bk, qt, stages, smem)
    return None


@lru_cache(maxsize=None)
def _no_plan() -> mx.array:
    """The placeholder index/count array of an all-keys call, made once."""
    x = mx.zeros((1, 1), mx.int32)
    mx.eval(x)
    return x


@lru_cache(maxsize=None)
def _decode_ok(dtype, D: int, H: int, H_kv: int) -> bool:
    """Whether decode_attention.metal takes one query of these shapes."""
    return (
        dtype in (mx.float32, mx.float16, mx.bfloat16)
        and D % 32 == 0
        and D <= 256
        and H % H_kv == 0
        and H // H_kv <= _DECODE_MAX_REPS
    )


def _decode_splits(n_slots: int, heads: int) -> tuple[int, int]:
    """(n_splits, per_split) for ``n_slots`` key slots of each of ``heads`` (batch x KV
    heads): about ``_DECODE_GROUPS`` groups, at least ``_DECODE_MIN_SPLIT`` slots a split,
    splits a whole number of warp steps long, none of them empty."""
    n_splits = max(1, min(-(-_DECODE_GROUPS // heads), -(-n_slots // _DECODE_MIN_SPLIT)))
    per_split = -(-n_slots // n_splits)
    per_split = -(-per_split // _DECODE_STEP) * _DECODE_STEP
    return -(-n_slots // per_split), per_split


def _decode(q, k, v, index, count, *, all_keys, q_offset, window, fparams, tickets=None):
    """One query per head over many keys (decode_attention.metal), splits merged."""
    B, H, _, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if all_keys:
        lo = max(q_offset - window + 1, 0) if window else 0
        n_slots = max(min(S, q_offset + 1) - lo, 1)
    else:
        n_slots = max(index.shape[-1], 1)
    n_splits, per_split = _decode_splits(n_slots, B * H_kv)
    iparams = _params((S, q_offset, window or 0, H, H_kv, count.shape[1], index.shape[-1],
                       n_splits, per_split, B))
    fold = _DECODE_FOLD
    tickets = _ticket_buffer(tickets, B * H_kv) if fold else _no_plan()
    part, lse, out = _decode_kernel(
        inputs=[q, k, v, index, count, tickets, iparams, fparams],
        template=[("T", q.dtype), ("D", D), ("REPS", H // H_kv), ("NW", _DECODE_WARPS),
                  ("KB", _DECODE_KEYS), ("ALL_KEYS", all_keys), ("FOLD", fold)],
        grid=(n_splits * _DECODE_WARPS * 32, B * H_kv, 1),
        threadgroup=(_DECODE_WARPS * 32, 1, 1),
        output_shapes=[(n_splits, B, H, D), (n_splits, B, H), (B, H, 1, D) if fold else (1,)],
        output_dtypes=[mx.float32, mx.float32, q.dtype],
    )
    if fold:
        return out
    return _merge(part, lse, n_splits, B * H, D, q.dtype).reshape(B, H, 1, D)


def _ticket_buffer(tickets: mx.array | None, n: int) -> mx.array:
    """The caller's zeroed counters if they hold ``n``, else fresh zeros (launches that MLX
    may run side by side must share nothing)."""
    if tickets is None or tickets.size < n:
        return mx.zeros((n,), mx.int32)
    return tickets


def _merge(part, lse, n_splits: int, R: int, D: int, dtype) -> mx.array:
    """(R, D) from per-split outputs and log-sum-exps (merge_splits.metal)."""
    return _merge_kernel(
        inputs=[part, lse, _params((n_splits, R))],
        template=[("T", dtype), ("D", D)],
        grid=(_MERGE_WARPS * 32 * -(-D // 32), R, 1),
        threadgroup=(_MERGE_WARPS * 32, 1, 1),
        output_shapes=[(R, D)],
        output_dtypes=[dtype],
    )[0]


def _attention(q, k, v, index, count, *, tiles, all_keys, q_offset, window, block_size,
               scale, softcap, tickets=None):
    B, H, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    fparams = _params((scale, softcap or 0.0), mx.float32)
    if L == 1 and DECODE_KERNEL and _decode_ok(q.dtype, D, H, H_kv):
        return _decode(q, k, v, index, count, all_keys=all_keys, q_offset=q_offset,
                       window=window, fparams=fparams, tickets=tickets)
    warps, wrows, bk, qt = tiles.warps, tiles.wrows, tiles.bk, tiles.qt
    n_qtiles = -(-L // qt)
    groups = n_qtiles * B * H_kv
    key_tiles = -(-(S if all_keys else index.shape[-1]) // bk)
    n_splits = 1
    if groups < _MIN_GROUPS:
        min_tiles = _MIN_SPLIT_TILES if L > 1 else _MIN_SPLIT_TILES_DECODE
        n_splits = max(1, min(-(-2 * _MIN_GROUPS // groups), key_tiles // min_tiles))
    split = n_splits > 1
    NB = count.shape[1]
    iparams = _params(
        (L, S, q_offset, window or 0, block_size, H, H_kv, NB, index.shape[-1], qt, n_splits, B)
    )
    shapes = [(1,), (n_splits, B, H, L, D), (n_splits, B, H, L)] if split else [
        (B, H, L, D), (1,), (1,)]
    out, part, lse = _attention_kernel(tiles.smem)(
        inputs=[q, k, v, index, count, iparams, fparams],
        template=[("T", q.dtype), ("D", D), ("BK", bk), ("WARPS", warps), ("WROWS", wrows),
                  ("ALL_KEYS", all_keys), ("SPLIT", split), ("STAGES", tiles.stages)],
        grid=(n_qtiles * warps * 32, B * H_kv, n_splits),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=shapes,
        output_dtypes=[q.dtype, mx.float32, mx.float32],
    )
    if not split:
        return out
    return _merge(part, lse, n_splits, B * H * L, D, q.dtype).reshape(B, H, L, D)


def sparse_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    plan: Plan,
    *,
    scale: float,
    softcap: float | None = None,
    use_kernel: bool = True,
    tickets: mx.array | None = None,
) -> mx.array:
    """:func:`mlx_dhsa.reference.sparse_attention`, on the GPU kernel when one is available.

    Args and returns as the reference; ``use_kernel=False`` forces the reference.
    ``tickets``: see :func:`dense_attention`.
    """
    global last_path
    tiles = _tiles(q, k, v, plan.block_size) if _on_gpu(_ATTENTION, use_kernel) else None
    if tiles is None:
        last_path = "reference"
        return reference.sparse_attention(q, k, v, plan, scale=scale, softcap=softcap)
    last_path = "kernel"
    index, count = plan.indices, plan.n_valid
    if not plan.contiguous:  # the kernels read both as int32 rows
        index, count = (mx.contiguous(x.astype(mx.int32)) for x in (index, count))
    return _attention(
        q, k, v, index, count, tiles=tiles,
        all_keys=False, q_offset=plan.q_offset, window=plan.window,
        block_size=plan.block_size, scale=scale, softcap=softcap, tickets=tickets,
    )


def dense_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    softcap: float | None = None,
    q_offset: int = 0,
    window: int | None = None,
    use_kernel: bool = True,
    tickets: mx.array | None = None,
) -> mx.array:
    """Causal (and sliding-window) dense attention, fused on the GPU when a kernel exists.

    Query i sits at position ``q_offset + i`` and sees keys ``k <= q_offset + i`` (and
    ``k > q_offset + i - window``): :func:`mlx_dhsa.reference.dense_attention` with the mask
    :func:`mlx_dhsa.selection.key_mask`, which is the fallback.

    Args:
        q (mx.array): queries, (B, H, L, D).
        k (mx.array): keys, (B, H_kv, S, D).
        v (mx.array): values, (B, H_kv, S, D).
        scale (float): query scale.
        softcap (float, optional): logit soft cap. Default: ``None``.
        q_offset (int): position of the first query. Default: ``0``.
        window (int, optional): sliding window. Default: ``None``.
        use_kernel (bool): ``False`` forces the reference. Default: ``True``.
        tickets (mx.array, optional): for one-query calls, a zeroed int32 buffer of at least
            ``B * H_kv`` counters that the decode kernel takes and leaves zeroed, so that a
            caller whose launches run one after another (a layer's decode steps:
            ``DHSACache.decode_tickets``) saves zeroing a fresh one per call. Launches that
            can run side by side must not share it. Default: ``None`` (fresh zeros).

    Returns:
        mx.array: (B, H, L, D).
    """
    global last_path
    tiles = _tiles(q, k, v, None) if _on_gpu(_ATTENTION, use_kernel) else None
    if tiles is None:
        last_path = "reference"
        mask = key_mask(q_offset, q.shape[2], k.shape[2], window)
        return reference.dense_attention(q, k, v, scale=scale, softcap=softcap, mask=mask)
    last_path = "kernel"
    none = _no_plan()
    return _attention(
        q, k, v, none, none, tiles=tiles, all_keys=True, q_offset=q_offset, window=window,
        block_size=1, scale=scale, softcap=softcap, tickets=tickets,
    )


def _summaries_and_scores(qb: mx.array, keys: mx.array, chunks: Chunks):
    B, H_kv, S, D = keys.shape
    N_c, NB = chunks.starts.shape[1], qb.shape[1]
    return _scores_kernel(
        inputs=[keys, chunks.starts.astype(mx.int32), chunks.lengths.astype(mx.int32),
                qb.astype(mx.float32), mx.array([S, H_kv, N_c, NB], mx.int32)],
        template=[("T", keys.dtype), ("D", D)],
        grid=(_SCORE_THREADS, N_c, B),
        threadgroup=(_SCORE_THREADS, 1, 1),
        output_shapes=[(B, N_c, D), (B, NB, N_c)],
        output_dtypes=[mx.float32, mx.float32],
    )


def _scores_ok(keys: mx.array, chunks: Chunks) -> bool:
    return keys.dtype in (mx.float32, mx.float16, mx.bfloat16) and chunks.starts.shape[1] > 0


def chunk_scores(
    qb: mx.array, keys: mx.array, chunks: Chunks, *, use_kernel: bool = True
) -> mx.array:
    """Block x chunk scores from the keys in one pass (chunk summaries fused in).

    Equal to ``selection.chunk_scores(qb, chunking.chunk_summaries(keys, chunks))``.

    Args:
        qb (mx.array): block representatives, (B, NB, D).
        keys (mx.array): post-RoPE keys, (B, H_kv, S, D).
        chunks (Chunks): the chunking of those keys.
        use_kernel (bool): ``False`` forces the reference. Default: ``True``.

    Returns:
        mx.array: (B, NB, N_c) float32.
    """
    global last_path
    if _on_gpu(_scores_kernel, use_kernel) and _scores_ok(keys, chunks) and qb.shape[1] > 0:
        last_path = "kernel"
        return _summaries_and_scores(qb, keys, chunks)[1]
    last_path = "reference"
    return _reference_scores(qb, _reference_summaries(keys, chunks))


def chunk_summaries(keys: mx.array, chunks: Chunks, *, use_kernel: bool = True) -> mx.array:
    """:func:`mlx_dhsa.chunking.chunk_summaries` on the chunk-scores kernel: (B, N_c, D) f32."""
    global last_path
    if _on_gpu(_scores_kernel, use_kernel) and _scores_ok(keys, chunks):
        last_path = "kernel"
        qb = mx.zeros((keys.shape[0], 1, keys.shape[-1]), mx.float32)
        return _summaries_and_scores(qb, keys, chunks)[0]
    last_path = "reference"
    return _reference_summaries(keys, chunks)


def _plan_ok(queries: mx.array, table: ChunkTable, config: DHSAConfig) -> bool:
    """Whether the planning kernels take these inputs (else the reference plans)."""
    D = queries.shape[-1]
    return (
        config.head_scores == "mean"
        and config.local_mode == "window"  # "recent": the reference plans (not in the kernels)
        and queries.dtype in (mx.float32, mx.float16, mx.bfloat16)
        and queries.dtype == table.keys.dtype
        and D % 32 == 0
        and D <= 256
        and queries.shape[2] > 0
        and selection._max_chunks_taken(config) + 2 <= _MAX_INTERVALS
    )


def select_chunks(
    queries: mx.array,
    table: ChunkTable,
    config: DHSAConfig,
    *,
    q_offset: int,
    window: int | None = None,
    use_kernel: bool = True,
    tickets: mx.array | None = None,
) -> Plan:
    """:func:`mlx_dhsa.selection.select_chunks` on the GPU: block x chunk scores (with the
    open chunk summarised in the same pass), then the per-block selection.

    On CUDA a call with one query block (a decode step) runs both in one launch (the
    assembled ``plan`` kernel: the group that finishes a block's scores selects its keys);
    otherwise two launches (block_scores.metal, select_keys.metal). The selection equals the
    reference's up to score ties, which the kernels break in key order. Args and returns as
    the reference; ``use_kernel=False`` forces the reference. ``tickets``: a zeroed int32
    buffer of at least ``B`` counters that the fused launch takes and leaves zeroed
    (``DHSACache.plan_tickets``), as for :func:`dense_attention`; None: fresh zeros.
    """
    global last_plan_path
    if not (_on_gpu(_select_kernel, use_kernel) and _plan_ok(queries, table, config)):
        last_plan_path = "reference"
        return selection.select_chunks(queries, table, config, q_offset=q_offset, window=window)
    last_plan_path = "kernel"
    L = queries.shape[2]
    select = _select_params(table, config, L, q_offset, window)
    if _FUSED_PLAN and L <= config.block_size:
        indices, n_valid = _plan(queries, table, config, select, tickets)
    else:
        scores = _block_scores(queries, table, config)
        indices, n_valid = _select_keys(scores, table, config, select)
    return Plan(indices, n_valid, q_offset=q_offset, block_size=config.block_size, window=window,
                contiguous=True)


class _ScoreLaunch(NamedTuple):
    """How block_scores.metal (also the first part of ``plan``) is launched."""

    inputs: list
    grid: tuple
    shapes: list  # of its outputs: scores (B, NB, N), open_sum (B, D)


def _score_launch(queries: mx.array, table: ChunkTable, config: DHSAConfig) -> _ScoreLaunch:
    """block_scores.metal's inputs, grid and output shapes for these queries."""
    B, H, L, D = queries.shape
    keys, cap = table.keys, table.starts.shape[1]
    NB, N = -(-L // config.block_size), table.n_closed + 1
    warps = _SCORE_THREADS // 32
    # Enough groups to fill the GPU: split the chunks when there are few blocks (decode).
    tiles = max(1, min(-(-_PLAN_GROUPS // (NB * B)), -(-N // warps)))
    per_group = -(-N // tiles)
    per_group = -(-per_group // warps) * warps  # whole warps
    tiles = -(-N // per_group)
    # The open chunk: only keys past those already summed in the cache's running sum.
    state, summaries = table.open_sum, table.summaries  # summaries: a contiguous buffer
    state = state if _CARRY_OPEN_SUM else None
    carried = state is not None and state.usable(table.open_start, table.n_keys)
    prev, prev_end = (state.total, state.end) if carried else (summaries, table.open_start)
    iparams = (L, H, keys.shape[1], config.block_size, table.n_closed, table.open_start,
               table.n_keys, cap, per_group, int(table.summary == "sqrt"), prev_end)
    return _ScoreLaunch([queries, keys, summaries, prev, _params(iparams)],
                        (tiles * _SCORE_THREADS, NB, B), [(B, NB, N), (B, D)])


def _carry_open_sum(table: ChunkTable, open_sum: mx.array, L: int) -> None:
    """Keep block_scores' open-chunk key sum in the cache for the next call."""
    state = table.open_sum if _CARRY_OPEN_SUM else None
    if state is not None:
        state.start, state.end, state.total = table.open_start, table.n_keys, open_sum
        if L > 1:
            # Prefill evaluates only the caches: keep the running sum from holding this
            # step's graph (and its key buffers) alive until the next step.
            mx.async_eval(open_sum)


def _block_scores(queries: mx.array, table: ChunkTable, config: DHSAConfig) -> mx.array:
    """(B, NB, n_closed + 1) block x chunk scores, the open chunk last (block_scores.metal)."""
    launch = _score_launch(queries, table, config)
    scores, open_sum = _block_scores_kernel(
        inputs=launch.inputs,
        template=[("T", queries.dtype), ("D", queries.shape[-1])],
        grid=launch.grid,
        threadgroup=(_SCORE_THREADS, 1, 1),
        output_shapes=launch.shapes,
        output_dtypes=[mx.float32, mx.float32],
    )
    _carry_open_sum(table, open_sum, queries.shape[2])
    return scores


def _select_params(table: ChunkTable, config: DHSAConfig, n_queries: int, q_offset: int,
                   window: int | None) -> mx.array:
    """select_keys.metal's iparams."""
    return _params((n_queries, q_offset, config.block_size, window or 0, config.sink,
                    config.local, config.budget, table.n_closed, table.open_start,
                    table.n_keys, table.starts.shape[1]))


def _select_keys(scores: mx.array, table: ChunkTable, config: DHSAConfig,
                 select: mx.array) -> tuple[mx.array, mx.array]:
    """(indices (B, NB, budget), n_valid (B, NB)) from block x chunk scores (select_keys.metal)."""
    B, NB, _ = scores.shape
    return _select_kernel(
        inputs=[scores, table.starts, table.lengths, select],
        template=[("MAX_IV", _MAX_INTERVALS), ("NT", _SELECT_THREADS)],
        grid=(_SELECT_THREADS, NB, B),
        threadgroup=(_SELECT_THREADS, 1, 1),
        output_shapes=[(B, NB, config.budget), (B, NB)],
        output_dtypes=[mx.int32, mx.int32],
    )


def _plan(queries: mx.array, table: ChunkTable, config: DHSAConfig, select: mx.array,
          tickets: mx.array | None) -> tuple[mx.array, mx.array]:
    """Scores and selection in one launch (``plan``): (indices, n_valid) as _select_keys."""
    launch = _score_launch(queries, table, config)
    B, NB, _ = launch.shapes[0]
    tickets = _ticket_buffer(tickets, B * NB)
    # table.starts / lengths are whole (contiguous) buffers, as the launch assumes.
    _, open_sum, indices, n_valid = _plan_kernel(
        inputs=[*launch.inputs, table.starts, table.lengths, select, tickets],
        template=[("T", queries.dtype), ("D", queries.shape[-1]), ("MAX_IV", _MAX_INTERVALS),
                  ("NT", _SCORE_THREADS)],
        grid=launch.grid,
        threadgroup=(_SCORE_THREADS, 1, 1),
        output_shapes=[*launch.shapes, (B, NB, config.budget), (B, NB)],
        output_dtypes=[mx.float32, mx.float32, mx.int32, mx.int32],
    )
    _carry_open_sum(table, open_sum, queries.shape[2])
    return indices, n_valid
