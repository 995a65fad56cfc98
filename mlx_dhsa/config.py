import math
from dataclasses import dataclass, fields
from pathlib import Path

from .device import device_tuning
from .quantized import BITS as KV_BITS
from .quantized import GROUP_SIZES as KV_GROUP_SIZES

BOUNDARY_METHODS = ("shift", "fixed", "learned")
SUMMARIES = ("sqrt", "mean")
HEAD_SCORES = ("mean", "max")
LOCAL_MODES = ("window", "recent")
SCORINGS = ("paper", "softmax", "softmax_spread")
METHODS = ("dhsa", "block_sparse", "streaming", "oracle")  # the planners (planners.PLANNERS)


class ConfigError(ValueError):
    """A bad DHSAConfig value. The message names fields as written (``budget``); ``fields``
    lists them, so a front end can say them its own way (the CLI: ``--budget``)."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


# Type of every field that is not a plain positive int (checked before the values).
_OPTIONAL_INTS = (
    "kv_group_size",
    "dense_below",
    "max_chunk",
    "chunk_cap",
    "decode_dense_below",
    "decode_groups",
    "kv_bits",
)
_OPTIONAL_FLOATS = ("boundary_threshold", "predictor_threshold")
_BOOLS = ("share_boundaries", "sliding_window", "use_kernel", "open_pieces")
_STRINGS = (
    "boundaries",
    "summary",
    "head_scores",
    "decode_head_scores",
    "method",
    "local_mode",
    "scoring",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is not a budget


def check_types(config) -> None:
    """Raise :class:`ConfigError` for a field of the wrong type (before its value is read)."""
    for f in fields(config):
        name, value = f.name, getattr(config, f.name)
        if name in _BOOLS:
            ok, want = isinstance(value, bool), "True or False"
        elif name in _STRINGS:
            ok, want = isinstance(value, str), "a string"
        elif name in _OPTIONAL_FLOATS:
            ok = value is None or (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            want = "a finite number or None"
        elif name == "predictor_path":
            ok, want = value is None or isinstance(value, (str, Path)), "a path or None"
        elif name in _OPTIONAL_INTS:
            ok, want = value is None or _is_int(value), "an integer or None"
        elif f.type is int:
            ok, want = _is_int(value), "an integer"
        elif f.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok, want = ok and math.isfinite(value), "a finite number"
        else:
            continue  # a field this check does not know yet: its value check decides
        if not ok:
            raise ConfigError(f"{name} must be {want}, got {value!r}", name)


@dataclass(frozen=True)
class DHSAConfig:
    """Settings for Dynamic Hierarchical Sparse Attention.

    Paper notation: N_b -> ``budget``; query block size -> ``block_size``; boundary
    window w -> ``boundary_window``. Defaults follow the paper's released configuration
    (design.md section 3) except where issue 16's attention-mass diagnostic measured better
    selection at the same budget (docs/accuracy/README.md): 8-key chunks (the paper: 32),
    longer chunks cut into pieces of at most 8 keys (``chunk_cap``; the paper: none),
    plain-mean chunk summaries (the paper: mean x sqrt(n)), 16 sinks (the paper: 128) and
    prefill chunk scores that add their keys' spread (``key_spread``; the paper: none);
    and where its task harness did: sparse decode steps refined by exact logits
    (``decode_refine=4``) with chunks ranked by their best head (``decode_head_scores``).
    ``DHSAConfig.paper()`` is the released configuration exactly.
    """

    budget: int = 2048  # keys kept per query block (N_b), sinks and local window included
    block_size: int = 128  # queries per block (Bq); a block shares one selection
    sink: int = 16  # first keys always kept (attention sinks; the paper: 128)
    local: int = 128  # keys right before each query block always kept (plus the block itself)
    dense_tail: int = 64  # last queries of every multi-token call attend to all keys
    dense_below: int | None = None  # run dense while keys <= this; None = 2 * budget
    boundaries: str = "shift"  # "shift": key shift; "fixed": every target_chunk; "learned"
    summary: str = "mean"  # chunk summary: "mean" = plain mean; "sqrt" = mean x sqrt(n) (paper)
    head_scores: str = "mean"  # "mean": q_b averaged over heads (paper); "max": best head's score
    boundary_window: int = 4  # w: keys averaged on each side of a gap to score it
    nms_window: int = 4  # a chosen gap suppresses others this close (the paper: 8)
    min_chunk: int = 4  # shortest chunk (the paper: 8)
    target_chunk: int = 8  # average chunk length the boundary count aims at (the paper: 32)
    max_chunk: int | None = None  # longest chunk (forced cuts); None = 4 * block_size
    # Closed chunks longer than this are cut into equal pieces of at most this many keys
    # (None: not cut; the paper does not): dynamic boundaries at block-sparse granularity.
    chunk_cap: int | None = 8
    # Score the open chunk (keys after the last whole segment) as fixed target_chunk-key
    # pieces instead of one chunk (pure-MLX planner and planning kernels).
    open_pieces: bool = False
    boundary_threshold: float | None = None  # None = top-count by target_chunk; else min shift
    predictor_path: str | None = None  # boundaries="learned": MLX predictor .safetensors
    predictor_threshold: float | None = None  # "learned": least logit; None = the predictor's own
    # Decode stays dense up to this many keys; None: the device's (device.py: 98304 on the
    # H200, where it was measured; estimated elsewhere).
    decode_dense_below: int | None = None
    # decode_attention.metal splits a step's keys until about this many groups run; None: the
    # device's (device.py: 512 on the H200, 4 per SM, measured; estimated elsewhere).
    decode_groups: int | None = None
    share_boundaries: bool = True  # compute boundaries once (first patched layer) for all layers
    sliding_window: bool = True  # honour the model's sliding window on its sliding layers
    use_kernel: bool = True  # use the GPU kernels when a GPU backend is present
    method: str = "dhsa"  # planner (planners.PLANNERS): dhsa, block_sparse, streaming, oracle
    # "window": keep [q0 - local, q1] (local keys before the block, plus the block);
    # "recent": keep the last max(local, block) keys up to q1 (the paper's code: local counts
    # the block's own keys). Applies to every planner that scores chunks.
    local_mode: str = "window"
    # Chunk ranking of method="dhsa": "paper" = q_b . k_c with `summary` and `head_scores`;
    # "softmax" = estimated attention mass per key, per head and query group, normalised over
    # chunks (mlx_dhsa.scoring); "softmax_spread" adds the chunk's key spread to its logit.
    scoring: str = "paper"
    query_groups: int = 1  # scoring="softmax*": representatives per query block and head
    # Prefill plans of the "paper" scoring add a chunk's key spread to its score:
    # q_b . k_c + key_spread * scale / 2 * sum_d q_bd^2 v_cd, v_c the per-channel variance of
    # its keys (chunking.chunk_spreads; the log-mean-exp of Gaussian logits, divided by the
    # layer's logit scale): a chunk whose keys vary along the query may hold a key well above
    # its mean. 0 = the paper's score; 1 (the default) = the Gaussian estimate. A larger
    # weight keeps more attention mass and costs perplexity (issue 16, gemma-3-270m, budget
    # 1024, docs/accuracy/README.md): at 0 / 1 / 2, prefill mass at 8k 0.799 / 0.816 / 0.820,
    # perplexity at 8k +1.73% / +1.90% / +2.27% over dense; task scores did not separate 0
    # from 2. Decode steps ignore it (they refine by exact logits), as do head_scores="max"
    # and the other planners and scorings (spread_scores). It assumes plain-mean summaries:
    # with summary="sqrt" the two terms are on different scales.
    key_spread: float = 1.0
    # Sparse decode steps: the planner chooses chunks for decode_refine x budget keys, then
    # the best of those keys by the step's exact logits fill the scored budget
    # (mlx_dhsa.refine). 1 = off (the chunk ranking alone, as the paper).
    decode_refine: int = 4
    # Prefill query blocks likewise: chunks for prefill_refine x budget keys, then the best
    # of those keys by the block's exact logits (every refine_stride-th query of the block
    # scores them). 1 = off, the default: reading every candidate key costs about
    # prefill_refine times the sparse attention it feeds (design.md section 3).
    prefill_refine: int = 1
    refine_stride: int = 1
    # How a sparse decode step's chunk scores combine the query heads (as head_scores, which
    # prefill keeps): "max" ranks a chunk by its best head, so a needle that one head of
    # several attends to is shortlisted; "mean" (the paper's head average) lost 0.044 of NIAH
    # at 16k against it (issue 16, docs/accuracy/README.md).
    decode_head_scores: str = "max"
    # Quantized KV cache of the DHSA layers (mlx-lm's QuantizedKVCache storage): bits per
    # element (4 or 8; None: the model's dtype) and elements per scale/bias group (None: 32 at
    # 4 bits, where group 64 lost NIAH needles that group 32 keeps, docs/accuracy/quantized_kv;
    # 64 at 8 bits, mlx-lm's default). See kv_group.
    kv_bits: int | None = None
    kv_group_size: int | None = None

    def __post_init__(self):
        check_types(self)
        for name in (
            "budget",
            "block_size",
            "boundary_window",
            "min_chunk",
            "target_chunk",
            "decode_refine",
            "prefill_refine",
            "refine_stride",
        ):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", name)
        for name in ("sink", "local", "dense_tail", "nms_window"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}", name)
        if self.decode_dense_below is not None and self.decode_dense_below < 0:
            raise ConfigError(
                f"decode_dense_below must be >= 0 or None, got {self.decode_dense_below}",
                "decode_dense_below",
            )
        if self.decode_groups is not None and (
            not isinstance(self.decode_groups, int) or self.decode_groups <= 0
        ):
            raise ConfigError(
                f"decode_groups must be a positive integer or None, got {self.decode_groups!r}",
                "decode_groups",
            )
        if self.chunk_cap is not None and self.chunk_cap <= 0:
            raise ConfigError(
                f"chunk_cap must be a positive integer or None, got {self.chunk_cap}", "chunk_cap"
            )
        if self.dense_below is not None and self.dense_below < 0:
            raise ConfigError(
                f"dense_below must be >= 0 or None, got {self.dense_below}", "dense_below"
            )
        if self.boundaries not in BOUNDARY_METHODS:
            raise ConfigError(
                f"boundaries must be one of {BOUNDARY_METHODS}, got {self.boundaries!r}",
                "boundaries",
            )
        if self.head_scores not in HEAD_SCORES:
            raise ConfigError(
                f"head_scores must be one of {HEAD_SCORES}, got {self.head_scores!r}",
                "head_scores",
            )
        for name, choices in (
            ("local_mode", LOCAL_MODES),
            ("scoring", SCORINGS),
            ("decode_head_scores", HEAD_SCORES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name} must be one of {choices}, got {getattr(self, name)!r}", name
                )
        if self.key_spread < 0:
            raise ConfigError(
                f"key_spread must be >= 0 (0: the paper's chunk score), got {self.key_spread!r}",
                "key_spread",
            )
        groups = self.query_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            groups = None
        if groups is None or groups > self.block_size or self.block_size % groups:
            raise ConfigError(
                "query_groups must be a positive integer dividing "
                f"block_size ({self.block_size}), got {self.query_groups!r}",
                "query_groups",
                "block_size",
            )
        if self.refine_stride > self.block_size:
            raise ConfigError(
                f"refine_stride ({self.refine_stride}) must be at most block_size "
                f"({self.block_size}): every refine_stride-th query of a block scores its keys",
                "refine_stride",
                "block_size",
            )
        if self.summary not in SUMMARIES:
            raise ConfigError(
                f"summary must be one of {SUMMARIES}, got {self.summary!r}", "summary"
            )
        if self.boundaries == "learned" and self.predictor_path is None:
            raise ConfigError(
                'boundaries="learned" needs predictor_path (an MLX predictor '
                ".safetensors; `mlx-dhsa convert-predictor IN OUT` makes one from a state_dict)",
                "boundaries",
                "predictor_path",
            )
        if self.predictor_path is not None and not Path(self.predictor_path).expanduser().is_file():
            raise ConfigError(
                f"predictor_path is not a file: {str(self.predictor_path)!r}", "predictor_path"
            )
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise ConfigError(
                f"kv_bits must be one of {KV_BITS} or None, got {self.kv_bits}", "kv_bits"
            )
        if self.kv_group_size is not None and self.kv_group_size not in KV_GROUP_SIZES:
            raise ConfigError(
                f"kv_group_size must be one of {KV_GROUP_SIZES} or None, "
                f"got {self.kv_group_size}",
                "kv_group_size",
            )
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}", "method")
        forced = self.sink + self.local + self.block_size
        if self.local_mode == "recent":
            forced = self.sink + max(self.local, self.block_size)
        if self.budget < forced:
            what = "local + block_size" if self.local_mode == "window" else "max(local, block_size)"
            raise ConfigError(
                f"budget ({self.budget}) must be at least sink + {what} "
                f"({self.sink}, {self.local}, {self.block_size}: {forced}): those keys are "
                "always kept. Raise budget or lower sink, local or block_size.",
                "budget",
                "sink",
                "local",
                "block_size",
            )
        if self.min_chunk < self.boundary_window:
            raise ConfigError(
                f"min_chunk ({self.min_chunk}) must be at least boundary_window "
                f"({self.boundary_window}) so that segments chunk independently",
                "min_chunk",
                "boundary_window",
            )
        if not self.min_chunk <= self.target_chunk <= self.chunk_limit:
            raise _chunk_order_error(self)

    @property
    def dense_limit(self) -> int:
        """Key count up to which attention stays dense (``dense_below`` or ``2 * budget``).

        Below twice the budget sparsity saves at most half of the attention work, which
        measured less than planning costs on the H200 (README, prefill).
        """
        return 2 * self.budget if self.dense_below is None else self.dense_below

    def sparse_decode_at(self, n_keys: int) -> bool:
        """Whether a decode step over ``n_keys`` keys attends sparsely.

        A sparse step costs two kernel calls per layer on CUDA (planning, attention; four on
        Metal: scores, selection, attention, merge), a dense one a single call; decode on the
        H200 is bound by host work per call, so below ``decode_dense_below`` keys reading the
        whole cache is as fast or faster there (see README, decode).
        """
        limit = self.decode_dense_below
        if limit is None:
            limit = device_tuning().decode_dense_below
        return n_keys > max(limit, self.dense_limit)

    @property
    def spread_scores(self) -> bool:
        """Whether prefill plans add the key-spread term (``key_spread``): DHSA's planner with
        the paper's scoring and head-averaged scores (per-head scores, as decode steps use, and
        the other planners and scorings have no such term), so the cache stores spreads."""
        return (
            self.key_spread > 0
            and self.method == "dhsa"
            and self.scoring == "paper"
            and self.head_scores == "mean"
        )

    @property
    def kv_group(self) -> int:
        """Elements per scale and bias of the quantized KV cache: ``kv_group_size``, or 32 at
        4 bits and 64 otherwise when it is None."""
        if self.kv_group_size is not None:
            return self.kv_group_size
        return 32 if self.kv_bits == 4 else 64

    @property
    def chunk_limit(self) -> int:
        """The longest chunk allowed (``max_chunk`` or ``4 * block_size``)."""
        return self.max_chunk if self.max_chunk is not None else 4 * self.block_size

    @classmethod
    def paper(cls, budget: int = 2048, **overrides) -> "DHSAConfig":
        """The paper's released configuration (design.md section 3), ``overrides`` on top.

        Its local window is the block's own 128 keys (``local_mode="recent"``), inputs of at
        most ``budget`` keys run dense, decode is dense (the released code has none), chunks
        are ranked by ``q_b . mean(k) x sqrt(n)``.
        """
        return cls(**{**dict(
            budget=budget, block_size=128, sink=128, local=128, local_mode="recent",
            dense_tail=64, dense_below=budget, decode_dense_below=None, boundaries="shift",
            summary="sqrt", head_scores="mean", scoring="paper", query_groups=1, key_spread=0.0,
            boundary_window=4, nms_window=8, min_chunk=8, target_chunk=32, max_chunk=None, chunk_cap=None, open_pieces=False,
            boundary_threshold=None, share_boundaries=True, method="dhsa", decode_refine=1,
            prefill_refine=1, refine_stride=1, decode_head_scores="mean",
        ), **overrides})  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "DHSAConfig":
        """Build a config from a dict, ignoring unknown keys (as mlx-lm's ``from_dict``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **overrides) -> "DHSAConfig":
        """A copy with ``overrides`` applied; unknown names raise ``TypeError`` listing the fields."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown DHSAConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **overrides})


def _chunk_order_error(c: DHSAConfig) -> ConfigError:
    """min_chunk <= target_chunk <= max_chunk failed: say which side, and the default's rule."""
    limit = (
        f"max_chunk ({c.max_chunk})"
        if c.max_chunk is not None
        else f"max_chunk (default 4 x block_size = {c.chunk_limit})"
    )
    if c.min_chunk > c.target_chunk:
        fix = "lower min_chunk or raise target_chunk"
    elif c.max_chunk is None:
        least = -(-c.target_chunk // 4)
        fix = f"raise block_size to at least {least}, or set max_chunk, or lower target_chunk"
    else:
        fix = "raise max_chunk or lower target_chunk"
    return ConfigError(
        f"chunk lengths need min_chunk <= target_chunk <= max_chunk; got min_chunk {c.min_chunk}, "
        f"target_chunk {c.target_chunk}, {limit}: {fix}",
        "min_chunk",
        "target_chunk",
        "max_chunk",
        "block_size",
    )
