"""Planning launches: block x chunk scores (block_scores.metal), the per-block selection
(select_keys.metal), or both in one launch (``plan``: block_scores, a hand-off, select_keys).

:func:`plan_launch` says whether and how a call plans on them; :func:`run_plan` launches what
it chose (None: the pure-MLX planner); :func:`select_chunks` does both.
"""

from dataclasses import replace
from enum import Enum
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx

from .. import selection
from ..cache import ChunkTable, ClosedChunks, ClosedSummaries
from ..chunking import open_slots
from ..config import DHSAConfig
from ..plan import Plan
from . import checks
from .sources import BlockScoreParams, SelectParams, backend, params
from .state import KernelState

SCORE_THREADS = 256  # NT of block_scores.metal (and of the fused plan kernel)
PLAN_GROUPS = 128  # block_scores splits the chunks until about this many groups run
# MAX_IV of select_keys.metal (key intervals one block can hold), the smallest that holds a
# config's plans (:func:`max_intervals`): 1024 (8 KB of threadgroup memory) holds every plan up
# to budget 4084 with 4-key shortest chunks; 2560 (20 KB) the widened decode plans of
# ``decode_refine`` (budget up to 10228), and beside the fused plan's scores (10 KB at D = 256)
# still fits Metal's 32 KB.
INTERVAL_SIZES = (1024, 2560)
MAX_INTERVALS = INTERVAL_SIZES[-1]
# NT of select_keys.metal. CUDA: 71 registers a thread at 512; at 1024 threads it would need
# 91, over a block's 64K registers.
SELECT_THREADS = 512
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


class PlanLaunch(Enum):
    """How the planning kernels run a call."""

    FUSED = "fused"  # one launch (``plan``): a call with one query block, where the backend can
    TWO = "two launches"  # block_scores, then select_keys


def plan_launch(
    dtype,
    keys_dtype,
    D: int,
    L: int,
    config: DHSAConfig,
    *,
    use_kernel: bool = True,
    quantized: tuple[int, int] | None = None,
) -> PlanLaunch | None:
    """How queries (B, H, L, D) of ``dtype`` over keys of ``keys_dtype`` plan on the kernels,
    or None for the pure-MLX planner (no backend active, inputs the kernels do not take, or
    a kernel that failed its self-check in this process). ``quantized``: the cache's keys are
    quantized, ``(bits, group_size)``; the kernels plan all the same: they read only the
    chunk table (closed summaries, and the open keys in the model's dtype, which a quantized
    cache's table holds from its first unchunked key on, ``ChunkTable.keys_start``), never
    the quantized keys, so ``keys_dtype`` is the model's dtype there too."""
    del quantized  # the same launch: see the docstring
    be = backend()
    if not be.active(use_kernel):
        return None
    head_max = config.head_scores == "max"  # one query only: each head scores as a block
    if not (dtype in DTYPES and dtype == keys_dtype and D % 32 == 0 and D <= 256 and L > 0) or not (
        _config_ok(config) and (not head_max or L == 1)
    ):
        return None
    fused = be.fused_plan and L <= config.block_size and not head_max
    launch = PlanLaunch.FUSED if fused else PlanLaunch.TWO
    if be.self_check:
        names = ("plan",) if launch is PlanLaunch.FUSED else ("block_scores", "select_keys")
        check = lambda: _self_check(launch, dtype, D, config)
        key = ("plan", launch, dtype, D, max_intervals(config))
        key += ("open_pieces",) if config.open_pieces else ()
        key += ("key_spread",) if config.spread_scores else ()
        key += ("head_max",) if head_max else ()
        if not checks.verified(be, key, names, check):
            return None
    return launch


def _self_check(launch: PlanLaunch, dtype, D: int, config: DHSAConfig) -> str | None:
    """Plan tiny random queries over a few segments of keys with ``launch`` and with the
    reference: None if they agree (up to near-ties in the scores), else how they differ.
    With open pieces, half a segment more keys: pieces before the local window compete.
    The table holds its keys from a few before the open chunk on, as a quantized cache's
    does (``ChunkTable.keys_start``): the kernels must read the open keys at that offset.
    With the key-spread term (which moves few keys of random plans) the closed chunks'
    scores must also match the reference's within 1e-3."""
    S = 2 * config.chunk_limit + config.budget + 37
    if config.open_pieces:
        S += config.chunk_limit // 2
    L = 1 if launch is PlanLaunch.FUSED or config.head_scores == "max" else config.block_size + 5
    q = mx.random.normal((1, 2, L, D), key=mx.random.key(0)).astype(dtype)
    k = mx.random.normal((1, 1, S, D), key=mx.random.key(1)).astype(dtype)
    table = keys_from(ClosedSummaries().table(k, ClosedChunks().sync(k, config), config), -3)
    out = run_plan(launch, q, table, config, q_offset=S - L)
    ref = selection.select_chunks(q, table, config, q_offset=S - L)
    if not mx.array_equal(out.n_valid, ref.n_valid).item():
        return "key counts differ from the reference"
    weight = selection.spread_weight(config, table, None, D)
    if weight and launch is PlanLaunch.TWO:
        # The spread term moves few keys of random plans: check the closed chunks' scores.
        n = table.n_closed
        qb = selection.block_queries(q, config.block_size)
        want = selection.chunk_scores(qb, table.summaries[:, :n].astype(mx.float32))
        want += weight * selection.chunk_scores(qb * qb, table.spreads[:, :n].astype(mx.float32))
        err = mx.abs(block_scores(q, table, config)[..., :n] - want).max().item()
        if not err <= 1e-3 * (1.0 + mx.abs(want).max().item()):
            return f"block scores with the key-spread term are off by {err:.3g}"
    got, want = out.indices.tolist()[0], ref.indices.tolist()[0]
    for blk, n in enumerate(ref.n_valid.tolist()[0]):
        shared = len(set(got[blk][:n]) & set(want[blk][:n]))
        if shared < 0.9 * n:  # near-tied chunks may rank differently; garbage does not agree
            return f"block {blk} shares {shared} of {n} keys with the reference"
    return None


@lru_cache(maxsize=64)
def _config_ok(config: DHSAConfig) -> bool:
    """Whether the kernels plan with these settings: the paper's scoring (head scores "max"
    for one query only: :func:`plan_launch`), the "window" local range, and at most
    MAX_INTERVALS key intervals a block."""
    return (
        config.scoring == "paper"
        and config.local_mode == "window"
        and max_intervals(config) is not None
    )


def max_intervals(config: DHSAConfig) -> int | None:
    """select_keys' MAX_IV for ``config``: the smallest of INTERVAL_SIZES that holds the key
    intervals of one block's plan (sinks, taken chunks, local window), None if none does."""
    need = selection.max_chunks_taken(config) + 2
    return next((n for n in INTERVAL_SIZES if need <= n), None)


def keys_from(table: ChunkTable, start: int) -> ChunkTable:
    """``table`` holding only its keys from position ``start`` on (at most its open start;
    negative: that many before it), as a quantized cache's table does."""
    if start < 0:
        start = max(table.open_start + start, 0)
    if not table.keys_start <= start <= table.open_start:
        raise ValueError(
            f"keys_start must lie in [{table.keys_start}, {table.open_start}], got {start}"
        )
    keys = table.keys[:, :, start - table.keys_start :]
    return replace(table, keys=keys, keys_start=start)


def open_layout(config: DHSAConfig) -> tuple[int, int]:
    """(chunk slots after the closed ones, keys per open piece) as the kernels take them:
    ``(1, 0)`` for one open chunk, ``(open_slots, target_chunk)`` with ``open_pieces``."""
    return (open_slots(config), config.target_chunk) if config.open_pieces else (1, 0)


class _ScoreLaunch(NamedTuple):
    """How block_scores.metal (also the first part of ``plan``) is launched."""

    inputs: list
    grid: tuple
    shapes: list  # of its outputs: scores (B, NB, N), open_sum (B, D)
    pieces: bool  # the open chunk as pieces: open_sum is not written


def _score_launch(
    queries, table: ChunkTable, config: DHSAConfig, state, scale: float | None = None
) -> _ScoreLaunch:
    """block_scores.metal's inputs, grid and output shapes for these queries."""
    B, H, L, D = queries.shape
    keys, cap = table.keys, table.starts.shape[1]
    if (
        keys.dtype != queries.dtype
        or keys.shape[2] != table.n_keys - table.keys_start
        or not 0 <= table.keys_start <= table.open_start
    ):
        raise ValueError(
            f"the planning kernels take the table's keys in the queries' dtype "
            f"({queries.dtype}) from position keys_start ({table.keys_start}, at most the "
            f"open start {table.open_start}) to {table.n_keys}; got {keys.dtype} keys, "
            f"{keys.shape[2]} rows"
        )
    n_open, piece = open_layout(config)
    NB, N = -(-L // config.block_size), table.n_closed + n_open
    warps = SCORE_THREADS // 32
    # Enough groups to fill the GPU: split the chunks when there are few blocks (decode).
    tiles = max(1, min(-(-PLAN_GROUPS // (NB * B)), -(-N // warps)))
    per_group = -(-N // tiles)
    per_group = -(-per_group // warps) * warps  # whole warps
    tiles = -(-N // per_group)
    # One open chunk: only keys past those already summed in the layer's running sum (kept
    # by position: the same whether the table's keys start at 0 or later). Open pieces are
    # summed whole, a warp each (fewer than a segment of keys in all).
    carried = None
    if state is not None and not piece:
        carried = state.carried_sum(table.open_start, table.n_keys, B)
    # Without a carried sum open_prev is not read: any float32 buffer stands in (one dtype,
    # so one compiled variant).
    prev, prev_end = carried if carried is not None else (_no_prev(), table.open_start)
    iparams = BlockScoreParams(
        n_q=L,
        n_heads=H,
        n_kv=keys.shape[1],
        block_size=config.block_size,
        n_closed=table.n_closed,
        open_start=table.open_start,
        n_k=table.n_keys,
        cap=cap,
        per_group=per_group,
        sqrt_norm=int(table.summary == "sqrt"),
        prev_end=prev_end,
        n_open=n_open,
        open_piece=piece,
        keys_start=table.keys_start,
    )
    # The closed chunks' spread term: its factor (0: none, spreads then not read: the
    # summaries stand in, so the launch keeps one signature).
    weight = selection.spread_weight(config, table, scale, D)
    spreads = table.spreads if weight else table.summaries
    return _ScoreLaunch(
        [queries, keys, table.summaries, spreads, prev, params(iparams), _weight(weight)],
        (tiles * SCORE_THREADS, NB, B),
        [(B, NB, N), (B, D)],
        piece > 0,
    )


@lru_cache(maxsize=64)
def _weight(weight: float) -> mx.array:
    """block_scores' fparams, [spread factor] (float32, made once a value)."""
    x = mx.array([weight], mx.float32)
    mx.eval(x)
    return x


@lru_cache(maxsize=1)
def _no_prev() -> mx.array:
    """block_scores' open_prev when nothing was carried (never read), made once. 8 elements:
    MLX's Metal kernels take smaller inputs in the constant address space, a second variant."""
    x = mx.zeros((8,), mx.float32)
    mx.eval(x)
    return x


def _carry(state: KernelState | None, table: ChunkTable, launch: _ScoreLaunch, open_sum, L: int):
    """Keep block_scores' open-chunk key sum for the layer's next call (one open chunk)."""
    if state is None or launch.pieces:
        return
    state.carry(table.open_start, table.n_keys, open_sum)
    if L > 1:
        # Prefill evaluates only the caches: keep the running sum from holding this step's
        # graph (and its key buffers) alive until the next step.
        mx.async_eval(open_sum)


_SCORE_INPUTS = ["queries", "keys", "summaries", "spreads", "open_prev", "iparams", "fparams"]


def block_scores(
    queries,
    table: ChunkTable,
    config: DHSAConfig,
    state: KernelState | None = None,
    scale: float | None = None,
) -> mx.array:
    """(B, NB, n_closed + n_open) block x chunk scores, the open chunk (or its pieces) last,
    the closed chunks' with their spread term (``selection.spread_weight``; block_scores.metal)."""
    launch = _score_launch(queries, table, config, state, scale)
    kernel = backend().kernel(
        "block_scores",
        _SCORE_INPUTS,
        ["scores", "open_sum"],
        contiguous=False,  # queries and keys are read through their strides
    )
    scores, open_sum = kernel(
        inputs=launch.inputs,
        template=[("T", queries.dtype), ("D", queries.shape[-1]), ("NT", SCORE_THREADS)],
        grid=launch.grid,
        threadgroup=(SCORE_THREADS, 1, 1),
        output_shapes=launch.shapes,
        output_dtypes=[mx.float32, mx.float32],
    )
    _carry(state, table, launch, open_sum, queries.shape[2])
    return scores


def select_params(
    table: ChunkTable, config: DHSAConfig, n_queries: int, q_offset: int, window: int | None
) -> mx.array:
    """select_keys.metal's iparams."""
    n_open, piece = open_layout(config)
    return params(
        SelectParams(
            n_q=n_queries,
            q_offset=q_offset,
            block_size=config.block_size,
            window=window or 0,
            sink=config.sink,
            local=config.local,
            budget=config.budget,
            n_closed=table.n_closed,
            open_start=table.open_start,
            n_k=table.n_keys,
            cap=table.starts.shape[1],
            n_open=n_open,
            open_piece=piece,
        )
    )


def select_keys(
    scores: mx.array, table: ChunkTable, config: DHSAConfig, select: mx.array
) -> tuple[mx.array, mx.array]:
    """(indices (B, NB, budget), n_valid (B, NB)) from block x chunk scores (select_keys.metal)."""
    B, NB, _ = scores.shape
    kernel = backend().kernel(
        "select_keys", ["scores", "starts", "lengths", "iparams"], ["indices", "n_valid"]
    )
    return kernel(
        inputs=[scores, table.starts, table.lengths, select],
        template=[("MAX_IV", max_intervals(config)), ("NT", SELECT_THREADS)],
        grid=(SELECT_THREADS, NB, B),
        threadgroup=(SELECT_THREADS, 1, 1),
        output_shapes=[(B, NB, config.budget), (B, NB)],
        output_dtypes=[mx.int32, mx.int32],
    )


def _fused(
    queries,
    table: ChunkTable,
    config: DHSAConfig,
    select: mx.array,
    state: KernelState | None,
    scale: float | None = None,
) -> tuple[mx.array, mx.array]:
    """Scores and selection in one launch (``plan``): (indices, n_valid) as select_keys."""
    launch = _score_launch(queries, table, config, state, scale)
    B, NB, _ = launch.shapes[0]
    if state is not None:
        tickets = state.tickets("plan", B * NB)
    else:  # launches that MLX may run side by side must share nothing
        tickets = mx.zeros((B * NB,), mx.int32)
    kernel = backend().kernel(
        "plan",
        [*_SCORE_INPUTS, "starts", "lengths", "sel_params", "tickets"],
        ["scores", "open_sum", "indices", "n_valid"],
        contiguous=False,  # queries and keys are read through their strides
    )
    # table.starts / lengths are whole (contiguous) buffers, as the launch assumes.
    _, open_sum, indices, n_valid = kernel(
        inputs=[*launch.inputs, table.starts, table.lengths, select, tickets],
        template=[
            ("T", queries.dtype),
            ("D", queries.shape[-1]),
            ("MAX_IV", max_intervals(config)),
            ("NT", SCORE_THREADS),
        ],
        grid=launch.grid,
        threadgroup=(SCORE_THREADS, 1, 1),
        output_shapes=[*launch.shapes, (B, NB, config.budget), (B, NB)],
        output_dtypes=[mx.float32, mx.float32, mx.int32, mx.int32],
    )
    _carry(state, table, launch, open_sum, queries.shape[2])
    return indices, n_valid


@lru_cache(maxsize=64)
def _one_query_blocks(config: DHSAConfig) -> DHSAConfig:
    """``config`` with blocks of one query (the same chunk limit): block_scores then scores
    each row of the queries it is given on its own."""
    return config.replace(block_size=1, max_chunk=config.chunk_limit)


def run_plan(
    launch: PlanLaunch | None,
    queries: mx.array,
    table: ChunkTable,
    config: DHSAConfig,
    *,
    q_offset: int,
    window: int | None = None,
    scale: float | None = None,
    state: KernelState | None = None,
) -> Plan:
    """:func:`mlx_dhsa.selection.select_chunks` as ``launch`` says (None: that function).

    The kernels' selection equals the reference's up to score ties, which they break in key
    order. ``state``: the layer's :class:`KernelState` (carried open-chunk sum, ticket
    buffer), if it has one; it records the plan, whose arrays the attention kernel then reads
    as they are.
    """
    if launch is None:
        return selection.select_chunks(
            queries, table, config, q_offset=q_offset, window=window, scale=scale
        )
    select = select_params(table, config, queries.shape[2], q_offset, window)
    if launch is PlanLaunch.FUSED:
        indices, n_valid = _fused(queries, table, config, select, state, scale)
    elif config.head_scores == "max":  # one query: each head a block of one, best head kept
        heads = queries.transpose(0, 2, 1, 3)
        scores = block_scores(heads, table, _one_query_blocks(config), state)
        indices, n_valid = select_keys(scores.max(axis=1, keepdims=True), table, config, select)
    else:
        scores = block_scores(queries, table, config, state, scale)
        indices, n_valid = select_keys(scores, table, config, select)
    if state is not None:
        state.planned(indices)
    return Plan(indices, n_valid, q_offset=q_offset, block_size=config.block_size, window=window)


def select_chunks(
    queries: mx.array,
    table: ChunkTable,
    config: DHSAConfig,
    *,
    q_offset: int,
    window: int | None = None,
    scale: float | None = None,
    use_kernel: bool = True,
    state: KernelState | None = None,
) -> Plan:
    """:func:`mlx_dhsa.selection.select_chunks` on the GPU kernels when they take the inputs:
    block x chunk scores (the open chunk summarised in the same pass), then the per-block
    selection; in one launch for a call with one query block where the backend allows it
    (:class:`PlanLaunch`). Args and returns as the reference; ``use_kernel=False`` forces
    the reference."""
    launch = plan_launch(
        queries.dtype,
        table.keys.dtype,
        queries.shape[-1],
        queries.shape[2],
        config,
        use_kernel=use_kernel,
    )
    return run_plan(
        launch, queries, table, config, q_offset=q_offset, window=window, scale=scale, state=state
    )
