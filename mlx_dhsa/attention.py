"""DHSAAttention: a drop-in replacement for mlx-lm's Gemma2 attention module.

:func:`route` decides what runs for a call (mlx-lm's own module, dense or sparse attention,
on the kernels or the pure-MLX reference) from its shapes, dtypes, device and config; the
layer runs the :class:`Route` it returns and keeps it as ``last_route``.
"""

from collections import deque
from enum import Enum
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from . import kernels, planners, reference
from .cache import ChunkTable, ClosedChunks, ClosedSummaries, DHSACache
from .config import DHSAConfig
from .plan import Plan
from .quantized import QuantizedKV
from .quantized_cache import QuantizedDHSACache, WindowKVCache
from .selection import key_mask


class Path(Enum):
    """What computes an attention call."""

    BASE = "base"  # the wrapped mlx-lm module, op for op (dense decode steps it can run)
    DENSE_KERNEL = "dense kernel"  # causal (+ window) attention fused on the GPU
    DENSE_REFERENCE = "dense reference"  # pure MLX
    SPARSE_KERNEL = "sparse kernel"  # DHSA: plan, then attention over the plan on the GPU
    SPARSE_REFERENCE = "sparse reference"  # the same, attention in pure MLX


class Route(NamedTuple):
    """The decision for one attention call (made by :func:`route`)."""

    path: Path
    kernel: kernels.AttentionKernel | None = None  # launch of the (first) attention, if any
    plan: kernels.PlanLaunch | None = None  # planning kernels (method "dhsa"); None: pure MLX
    n_sparse: int = 0  # queries attended sparsely; the rest of the call attends densely
    tail: kernels.AttentionKernel | None = None  # launch of those dense queries, if any
    refine: kernels.RefineKernel | None = None  # prefill refinement's scores; None: pure MLX
    own_mask: bool = False  # dense: the call's own causal (+ window) mask, not the model's

    @property
    def label(self) -> str:
        """``"dense"``, ``"dhsa(kernel)"`` or ``"dhsa(reference)"``."""
        if self.path is Path.SPARSE_KERNEL:
            return "dhsa(kernel)"
        if self.path is Path.SPARSE_REFERENCE:
            return "dhsa(reference)"
        return "dense"


def route(
    config: DHSAConfig,
    *,
    n_queries: int,
    n_keys: int,
    offset: int,
    dtypes: tuple,
    head_dim: int,
    n_heads: int,
    n_kv_heads: int,
    softcap: float | None,
    window: int | None,
    base: bool = False,
    per_sequence_mask: bool = False,
    quantized: tuple[int, int] | None = None,
    windowed: bool = False,
) -> Route:
    """What runs an attention call of ``n_queries`` queries at ``offset`` over ``n_keys`` keys.

    - Up to ``config.dense_limit`` visible keys (or a decode step below
      ``decode_dense_below``), and over a sliding layer's window cache (``windowed``),
      attention is dense. A decode step that mlx-lm's module can run
      (``base``: the layer wraps one and has a cache) stays there, unless its logits are
      soft-capped and a kernel is active: mlx-lm computes those op by op, the fused kernel in
      one launch (models without a cap decode with MLX's fused SDPA). Other dense calls run
      the fused kernel when it takes them (causal: no per-sequence mask, queries last), else
      the reference.
    - Longer calls are sparse: the first ``n_sparse`` queries attend over a plan, the last
      ``dense_tail`` of a multi-token call densely.

    Args:
        config (DHSAConfig): the layer's settings (``use_kernel`` among them).
        n_queries (int), n_keys (int), offset (int): L, S and the first query's position.
        dtypes (tuple): dtypes of queries, keys, values.
        head_dim (int), n_heads (int), n_kv_heads (int): D, H, H_kv.
        softcap (float, optional): the layer's logit soft cap.
        window (int, optional): the layer's sliding window (honoured if
            ``config.sliding_window``).
        base (bool): a decode step may run on the wrapped mlx-lm module. Default: ``False``.
        per_sequence_mask (bool): the mask differs across the batch (padded batches).
        quantized (tuple, optional): ``(bits, group_size)`` of quantized keys and values
            (mlx-lm's QuantizedKVCache). The attention kernels say what they take of them
            (``kernels.accepts_quantized``), else the reference runs (dense: MLX's quantized
            matmuls); the planning kernels read only the chunk table, whose open keys stay
            in the model's dtype (``ChunkTable.keys_start``), so they plan as without;
            mlx-lm's module (``BASE``) runs them only without a soft cap (mlx-lm's Gemma2
            cannot attend over a quantized cache).
        windowed (bool): the keys are a :class:`WindowKVCache`'s (the last ``window`` keys
            and the call's, positions counted from the first of them). Default: ``False``.

    Returns:
        Route: the decision; kernel launches are None where the reference runs.

    Raises:
        NotImplementedError: a sparse call with a per-sequence mask.
    """
    L, S = n_queries, n_keys
    window = window if config.sliding_window else None
    use_kernel, groups = config.use_kernel, config.decode_groups
    fused_decode = softcap is not None and kernels.attention_active(use_kernel, quantized)
    visible = min(S, window) if L == 1 and window is not None else S
    dense = windowed or visible <= config.dense_limit
    dense = dense or (L == 1 and not config.sparse_decode_at(visible))
    base = base and not (quantized is not None and softcap is not None)
    if L == 1 and base and dense and not fused_decode and visible == S:
        return Route(Path.BASE)
    shape = (dtypes, head_dim, n_heads, n_kv_heads)
    if dense:
        own = (L > 1 or fused_decode) and not per_sequence_mask and offset + L == S
        kernel = (
            kernels.attention_kernel(
                *shape, L, S, None, use_kernel=use_kernel, decode_groups=groups, quantized=quantized
            )
            if own
            else None
        )
        path = Path.DENSE_KERNEL if kernel is not None else Path.DENSE_REFERENCE
        return Route(path, kernel, own_mask=own)
    if per_sequence_mask:
        raise NotImplementedError(
            "DHSA sparse attention does not support per-sequence (padded batch) masks; "
            "run sequences one at a time, or raise the budget above the context length"
        )
    # Multi-token calls end with dense_tail queries that see every key; decode never does.
    n_sparse = L - min(config.dense_tail, L) if L > 1 else 1
    if n_sparse == 0:  # all of them: causal dense attention
        kernel = kernels.attention_kernel(
            *shape, L, S, None, use_kernel=use_kernel, decode_groups=groups, quantized=quantized
        )
        path = Path.DENSE_KERNEL if kernel is not None else Path.DENSE_REFERENCE
        return Route(path, kernel, own_mask=True)
    kernel = kernels.attention_kernel(
        *shape,
        n_sparse,
        S,
        config.block_size,
        use_kernel=use_kernel,
        decode_groups=groups,
        quantized=quantized,
    )
    plan = tail = refine = None
    # The planning kernels run the config the chunk plan runs (planners.plan): one planned
    # query plans as a decode step (decode_head_scores, decode_refine).
    if config.method == "dhsa":
        plan = kernels.plan_launch(
            dtypes[0],
            dtypes[1],
            head_dim,
            n_sparse,
            planners.step_config(config, n_sparse == 1),
            use_kernel=use_kernel,
            quantized=quantized,
        )
    if n_sparse > 1 and config.prefill_refine > 1:
        refine = kernels.refine_kernel(
            dtypes[0],
            dtypes[1],
            head_dim,
            n_heads,
            n_kv_heads,
            config.block_size,
            config.refine_stride,
            use_kernel=use_kernel,
            quantized=quantized,
        )
    if n_sparse < L:
        tail = kernels.attention_kernel(
            *shape, L - n_sparse, S, None, use_kernel=use_kernel, quantized=quantized
        )
    path = Path.SPARSE_KERNEL if kernel is not None else Path.SPARSE_REFERENCE
    return Route(path, kernel, plan, n_sparse, tail, refine=refine)


def _quantization(cache: Any) -> tuple[int, int] | None:
    """``(bits, group_size)`` of a quantized cache (mlx-lm's test: a ``bits`` attribute)."""
    return (cache.bits, cache.group_size) if hasattr(cache, "bits") else None


def _rows(x, start: int):
    """Key positions ``start..`` of keys or values, quantized or not."""
    return x.rows(start) if isinstance(x, QuantizedKV) else x[:, :, start:]


def _kernel_state(cache: Any) -> kernels.KernelState | None:
    """The kernel state a DHSACache holds for its layer (made on first use); None without."""
    if not isinstance(cache, (DHSACache, QuantizedDHSACache)):
        return None
    if cache.kernel_state is None:
        cache.kernel_state = kernels.KernelState()
    return cache.kernel_state


def _per_sequence(mask) -> bool:
    """A mask that differs across the batch (mlx-lm's padded batches).

    Any other mask mlx-lm builds for these models is the causal mask, which DHSA applies
    itself (with the layer's window); only per-sequence masks need the masked reference.
    """
    return isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[0] > 1


# DHSA layers of a multi-token call whose GPU work may be queued ahead of the GPU (Pacer).
PREFILL_AHEAD = 2


class Pacer:
    """Keeps at most ``ahead`` DHSA layers of a multi-token call queued ahead of the GPU.

    MLX allocates an op's output when it encodes the op and frees the op's inputs when the
    GPU has run it; it stops encoding only while more than ten counted command batches (100
    ops or 1000 MB of inputs each on an H100: mlx/transforms.cpp, backend/cuda/eval.cpp) are
    in flight. The chunk state's ``mx.async_eval`` calls (cache.py, kernels/planning.py)
    commit a batch per layer that is not counted, and a layer over a 4-bit cache reads less
    than 1000 MB, so a prefill step need never wait: every layer's buffers of the step (MLP
    activations, the old buffers mlx-lm's cache growth copies) can be held at once (issue
    18). Each layer instead evaluates a one-element marker of its input and waits for the
    marker of the layer ``ahead`` calls back: about ``ahead + 1`` layers hold their buffers.
    """

    def __init__(self, ahead: int | None = None):
        self.ahead = PREFILL_AHEAD if ahead is None else ahead
        self._markers: deque = deque()

    def step(self, x: mx.array) -> None:
        """Schedule ``x`` (a layer's input) and wait for the layer ``ahead`` calls back."""
        marker = x[..., :1, :1].sum()  # a buffer of its own: holds nothing of x once done
        mx.async_eval(marker)
        self._markers.append(marker)
        while len(self._markers) > self.ahead:
            mx.eval(self._markers.popleft())


class SharedChunks:
    """What a model's DHSA layers share: the closed chunks published by the first DHSA layer
    and borrowed by the others, and the :class:`Pacer` of their multi-token calls.

    Within one forward call every layer sees the same key positions, so the owner (the first
    patched layer) brings its chunk state up to date and later layers borrow it when the
    batch and key counts match.
    """

    def __init__(self):
        self._key = None
        self._closed: ClosedChunks | None = None
        self.pacer = Pacer()

    def publish(self, batch: int, n_keys: int, closed: ClosedChunks) -> None:
        self._key, self._closed = (batch, n_keys), closed

    def get(self, batch: int, n_keys: int) -> ClosedChunks | None:
        return self._closed if self._key == (batch, n_keys) else None


class DHSAAttention(nn.Module):
    """Gemma2 attention whose multi-token calls attend only to DHSA-selected keys.

    Same signature and projections as ``mlx_lm.models.gemma2.Attention``. Calls over at most
    ``dense_limit`` keys run dense attention with the model's mask; longer calls plan per
    query block and run sparse attention, the last ``dense_tail`` queries of a multi-token
    call dense. A decode step (one query) keeps sinks, local window and the best chunks.
    """

    def __init__(
        self,
        config: DHSAConfig,
        *,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        scale: float,
        softcap: float | None,
        window: int | None = None,
        shared: SharedChunks | None = None,
        owner: bool = True,
    ):
        super().__init__()
        self.config = config
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.repeats = n_heads // n_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.attn_logit_softcapping = softcap
        self.window = window  # sliding window of this layer (None = global)
        self._shared = shared if shared is not None else SharedChunks()
        self._owner = owner
        self._set_route(None)

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        config: DHSAConfig,
        *,
        window: int | None = None,
        shared: SharedChunks | None = None,
        owner: bool = True,
    ) -> "DHSAAttention":
        """Wrap an mlx-lm Gemma2 ``Attention``, sharing its projections and RoPE by reference."""
        attn = cls(
            config,
            n_heads=base.n_heads,
            n_kv_heads=base.n_kv_heads,
            head_dim=getattr(base, "head_dim", base.q_proj.weight.shape[0] // base.n_heads),
            scale=base.scale,
            softcap=getattr(base, "attn_logit_softcapping", None),
            window=window,
            shared=shared,
            owner=owner,
        )
        # Share, don't copy: keeps quantized projections and weight paths intact.
        attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (
            base.q_proj,
            base.k_proj,
            base.v_proj,
            base.o_proj,
        )
        attn.rope = base.rope
        object.__setattr__(attn, "_base", base)  # kept out of the parameter tree, for unpatch
        return attn

    # What mlx-lm's shard() (and mlx_dhsa.distributed.shard) replace on an attention module:
    # passed on to the wrapped module, so that patching before or after sharding is the same.
    _MIRRORED = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads"})

    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(key, value)
        base = self.__dict__.get("_base")
        if base is not None and key in self._MIRRORED:
            setattr(base, key, value)

    @property
    def last_path(self) -> str:
        """What ran the last call: ``"dense"``, ``"dhsa(kernel)"``, ``"dhsa(reference)"``
        (``"none"`` before the first)."""
        return "none" if self.last_route is None else self.last_route.label

    def _set_route(self, r: Route | None) -> None:
        # Outside the module's parameter tree (a tuple would join it), and without
        # nn.Module.__setattr__'s cost, paid per layer and token.
        object.__setattr__(self, "last_route", r)

    def route(
        self,
        n_queries: int,
        n_keys: int,
        offset: int,
        dtypes: tuple,
        *,
        base: bool = False,
        mask: Any = None,
        quantized: tuple[int, int] | None = None,
        windowed: bool = False,
    ) -> Route:
        """:func:`route` for a call of this layer."""
        return route(
            self.config,
            n_queries=n_queries,
            n_keys=n_keys,
            offset=offset,
            dtypes=dtypes,
            head_dim=self.head_dim,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            softcap=self.attn_logit_softcapping,
            window=self.window,
            base=base,
            per_sequence_mask=_per_sequence(mask),
            quantized=quantized,
            windowed=windowed,
        )

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        offset = 0 if cache is None else cache.offset
        if L > 1 and cache is not None:
            self._shared.pacer.step(x)
        # Decided before the projections (mlx-lm's module makes its own); queries, keys and
        # values take x's dtype, which attend checks.
        base = L == 1 and cache is not None and self.__dict__.get("_base") is not None
        quantized = _quantization(cache)
        windowed = isinstance(cache, WindowKVCache)
        # Attention counts positions from the first key the cache returns (RoPE does not).
        first = max(0, offset - cache.max_size + 1) if windowed else 0
        r = self.route(
            L,
            offset + L - first,
            offset - first,
            (x.dtype,) * 3,
            base=base,
            mask=mask,
            quantized=quantized,
            windowed=windowed,
        )
        if r.path is Path.BASE:
            self._set_route(r)
            out = self._base(x, mask=mask, cache=cache)
            self.sync_chunks(cache)
            return out
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries, keys = self.qk_norm(queries, keys)

        if cache is not None:
            queries = self.rope(queries, offset=offset)
            keys = self.rope(keys, offset=offset)
            keys, values = cache.update_and_fetch(keys, values)
            if quantized is not None:
                keys, values = (QuantizedKV.of(x, *quantized) for x in (keys, values))
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)

        if (queries.dtype, keys.dtype, values.dtype) != (x.dtype,) * 3 or (
            keys.shape[2] != offset + L - first
        ):
            r = None  # not what the route assumed: attend decides again
        first = offset + L - keys.shape[2]
        output = self.attend(
            queries, keys, values, mask=mask, offset=offset - first, cache=cache, route=r
        )
        self.sync_chunks(cache)
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)

    def sync_chunks(self, cache: Any) -> None:
        """Chunk the segments of a :class:`QuantizedDHSACache` that closed in this call, so
        that it can drop their model-dtype keys (dense calls included; a no-op otherwise)."""
        if not isinstance(cache, QuantizedDHSACache) or cache.keys is None:
            return
        closed, summaries = cache.chunk_state(self.config)
        seg = self.config.chunk_limit
        if cache.offset // seg * seg > summaries.n_keys:
            self.chunk_view(cache.quantized()[0], cache)

    def qk_norm(self, queries: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        """Per-head query/key normalisation before RoPE: none for Gemma2 (Gemma3 has one)."""
        return queries, keys

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        mask: mx.array | str | None = None,
        offset: int = 0,
        cache: Any = None,
        route: Route | None = None,
    ) -> mx.array:
        """Attention of post-RoPE queries (B, H, L, D) at positions ``offset..`` over keys
        and values (B, H_kv, S, D) (``cache`` holds them, if given; positions count from the
        first key, also in a window cache); returns (B, H, L, D).
        ``route``: the decision for these arrays, if made already (see :func:`route`)."""
        L, S = queries.shape[2], keys.shape[2]
        if route is None:
            dtypes = (queries.dtype, keys.dtype, values.dtype)
            quantized = (keys.bits, keys.group_size) if isinstance(keys, QuantizedKV) else None
            windowed = isinstance(cache, WindowKVCache)
            route = self.route(
                L, S, offset, dtypes, mask=mask, quantized=quantized, windowed=windowed
            )
        self._set_route(route)
        config = self.config
        window = self.window if config.sliding_window else None
        args = dict(scale=self.scale, softcap=self.attn_logit_softcapping)
        state = _kernel_state(cache)
        if route.path is Path.DENSE_KERNEL:
            return kernels.run_dense(
                route.kernel,
                queries,
                keys,
                values,
                q_offset=offset,
                window=window,
                state=state,
                **args,
            )
        if route.path is Path.DENSE_REFERENCE:
            if route.own_mask:
                return kernels.run_dense(
                    None, queries, keys, values, q_offset=offset, window=window, **args
                )
            if L == 1 and window is not None and S > window:
                # A dense decode step on a sliding layer reads only the last `window` keys:
                # drop the rest instead of masking them.
                keys, values = _rows(keys, S - window), _rows(values, S - window)
                mask = mask[..., S - window :] if isinstance(mask, mx.array) else mask
                offset, S = offset - (S - window), window
            return reference.dense_attention(
                queries, keys, values, mask=self._dense_mask(mask, offset, L, S, window), **args
            )
        n_sparse = route.n_sparse
        q = queries if n_sparse == L else queries[:, :, :n_sparse]
        plan = self.plan(
            q,
            keys,
            offset=offset,
            window=window,
            cache=cache,
            launch=route.plan,
            refine=route.refine,
            state=state,
        )
        outputs = [kernels.run_sparse(route.kernel, q, keys, values, plan, state=state, **args)]
        if n_sparse < L:
            outputs.append(
                kernels.run_dense(
                    route.tail,
                    queries[:, :, n_sparse:],
                    keys,
                    values,
                    q_offset=offset + n_sparse,
                    window=window,
                    **args,
                )
            )
        return mx.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]

    def plan(
        self,
        queries: mx.array,
        keys: mx.array,
        *,
        offset: int,
        window: int | None,
        cache: Any = None,
        launch: kernels.PlanLaunch | None = None,
        refine: kernels.RefineKernel | None = None,
        state: kernels.KernelState | None = None,
    ) -> Plan:
        """Select keys for the query blocks of ``queries`` (B, H, L, D) at ``offset`` with the
        planner ``config.method`` names (``planners.PLANNERS``), on the planning kernels as
        ``launch`` says and prefill refinement's scores on ``refine`` (None: pure MLX)."""
        return planners.plan(
            queries,
            keys,
            config=self.config,
            table=lambda: self.chunk_view(keys, cache),
            offset=offset,
            window=window,
            scale=self.scale,
            softcap=self.attn_logit_softcapping,
            launch=launch,
            refine_kernel=refine,
            state=state,
        )

    def chunk_view(self, keys, cache: Any = None) -> ChunkTable:
        """The chunks of ``keys`` (B, H_kv, S, D) and their summaries, as a ChunkTable.

        A DHSACache (or QuantizedDHSACache) keeps closed chunks and summaries between calls;
        any other cache (or none) rebuilds them from the keys, with the same result. Shared
        boundaries come from the first DHSA layer of the model. Quantized keys are chunked
        from the model-dtype keys a QuantizedDHSACache keeps (or its dequantized keys: see
        ``chunk_source``); the table then holds only the keys from the first unchunked one.
        """
        config = self.config
        B, S = keys.shape[0], keys.shape[2]
        if isinstance(cache, (DHSACache, QuantizedDHSACache)):
            closed, summaries = cache.chunk_state(config)
        else:
            closed, summaries = ClosedChunks(), ClosedSummaries()
        borrowed = None
        if config.share_boundaries and not self._owner:
            borrowed = self._shared.get(B, S)
        start = 0
        if isinstance(keys, QuantizedKV):
            if isinstance(cache, QuantizedDHSACache):
                start = min(summaries.n_keys, S // config.chunk_limit * config.chunk_limit)
                if borrowed is None:
                    start = min(start, closed.n_keys)
                keys = cache.fp_keys(start)
            else:  # a plain QuantizedKVCache: fresh state from every dequantized key
                keys = keys.dequantize()
        if borrowed is not None:
            closed = borrowed
        else:
            closed.sync(keys, config, start)
            if config.share_boundaries and self._owner:
                self._shared.publish(B, S, closed)
        table = summaries.table(keys, closed, config, start)
        if isinstance(cache, QuantizedDHSACache):
            cache.release(table.open_start)
        return table

    @staticmethod
    def _dense_mask(mask, offset: int, L: int, S: int, window: int | None):
        if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
            mask = mask > mx.finfo(mask.dtype).min / 2  # additive mask -> bool
        if window is not None and S > window:
            causal = key_mask(offset, L, S, window)
            return causal if not isinstance(mask, mx.array) else mask & causal
        if isinstance(mask, str) or (mask is None and L > 1):
            return key_mask(offset, L, S, None)
        return mask
