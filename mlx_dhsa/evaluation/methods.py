"""Attention methods compared by ``profile`` and ``niah``: a name -> DHSAConfig overrides registry.

A method is either the unpatched model (``dense``) or the model patched with the base config
plus a few overrides: every planner of ``planners.PLANNERS`` (dhsa and the baselines) by its
name. A spec may pin the budget: ``dhsa@1024``.
"""

from dataclasses import asdict, dataclass

import mlx.nn as nn

from ..config import DHSAConfig
from ..patching import patch, unpatch
from ..planners import PLANNERS

# The paper's selection fields (DHSAConfig.paper()), without its dense thresholds, so that a
# comparison changes only what is selected.
PAPER_SELECTION = {
    k: getattr(DHSAConfig.paper(), k)
    for k in ("sink", "local", "local_mode", "summary", "scoring", "head_scores", "target_chunk",
              "min_chunk", "nms_window", "boundary_window", "boundaries", "chunk_cap", "decode_refine",
              "prefill_refine", "decode_head_scores", "key_spread")
}  # fmt: skip

# name -> DHSAConfig overrides; None = the unpatched model (mlx-lm's own attention).
METHODS: dict[str, dict | None] = {
    "dense": None,
    # DHSA with its defaults (decode_refine=4); the baselines as published: decode steps
    # ranked by their own scores alone (decode_refine=1).
    **{name: {"method": name, "decode_refine": 1} for name in PLANNERS if name != "dhsa"},
    "dhsa": {"method": "dhsa"},
    "dhsa_mean": {"method": "dhsa", "summary": "mean"},  # plain-mean chunk summaries
    "dhsa_maxhead": {"method": "dhsa", "head_scores": "max"},  # best head's score per chunk
    "dhsa_mean_maxhead": {"method": "dhsa", "summary": "mean", "head_scores": "max"},
    # Issue 16: chunks ranked by estimated attention mass (plus key spread), pure-MLX planner.
    "dhsa_softmax": {"method": "dhsa", "scoring": "softmax"},
    "dhsa_spread": {"method": "dhsa", "scoring": "softmax_spread"},
    # The selection of the paper's released code (its local window is the block itself).
    "dhsa_paper": {"method": "dhsa", **PAPER_SELECTION},
    # The defaults before issue 16 (32-key chunks, mean x sqrt(n), 128 sinks).
    "dhsa_prev": {"method": "dhsa", **PAPER_SELECTION, "local_mode": "window"},
    "oracle_prev": {"method": "oracle", **PAPER_SELECTION, "local_mode": "window"},
    # Dynamic chunks without the cap on their length (the defaults before chunk_cap=8).
    "dhsa_nocap": {"method": "dhsa", "chunk_cap": None},
    "dhsa_cap": {"method": "dhsa", "chunk_cap": 8},
    "dhsa_spread_cap": {"method": "dhsa", "scoring": "softmax_spread", "chunk_cap": 8},
    # The open chunk scored as fixed 8-key pieces (the planning kernels implement it too).
    "dhsa_open": {"method": "dhsa", "chunk_cap": 8, "open_pieces": True},
    "dhsa_spread_open": {"method": "dhsa", "scoring": "softmax_spread", "chunk_cap": 8,
                         "open_pieces": True},  # fmt: skip
    # Long context (issue 16): decode steps re-rank the keys of the best chunks for f x budget
    # keys by their exact logits (refine.py; f = 4 is the default), or by chunks alone.
    "dhsa_refine": {"method": "dhsa", "decode_refine": 4},
    "dhsa_refine2": {"method": "dhsa", "decode_refine": 2},
    "dhsa_chunks": {"method": "dhsa", "decode_refine": 1},
    # Decode steps' chunk scores: the best head (the default since stop 29; the name stays
    # for the commands of docs/accuracy) or the heads' mean (the default before).
    "dhsa_decode_max": {"method": "dhsa", "decode_head_scores": "max"},
    "dhsa_decode_mean": {"method": "dhsa", "decode_head_scores": "mean"},
    # Prefill blocks refined the same way (f x budget candidates; every s-th query scores).
    **{f"dhsa_prefill{f}" + (f"_s{s}" if s > 1 else ""): {
        "method": "dhsa", "prefill_refine": f, "refine_stride": s}
       for f, s in ((2, 1), (4, 1), (4, 4), (4, 8), (4, 16), (8, 8))},  # fmt: skip
    # Prefill chunk scores without the keys' spread (the paper's score; the default before
    # stop 33), at the Gaussian estimate's weight (the default since stop 34) and at twice
    # it (the default of stop 33).
    "dhsa_nospread": {"method": "dhsa", "key_spread": 0.0},
    "dhsa_spread1": {"method": "dhsa", "key_spread": 1.0},
    "dhsa_spread2": {"method": "dhsa", "key_spread": 2.0},
    # Block-sparse as the issue measured it: 32-key blocks, 128 sinks.
    "block_sparse_32": {"method": "block_sparse", **PAPER_SELECTION, "local_mode": "window"},
}
DEFAULT_METHODS = "dense,dhsa"


@dataclass(frozen=True)
class Method:
    """One entry of a comparison.

    Args:
        label (str): the spec as given, e.g. ``"dhsa@1024"``; names rows, lines and files.
        config (DHSAConfig or None): what to patch with; ``None`` = unpatched (dense).
    """

    label: str
    config: DHSAConfig | None

    def apply(self, model: nn.Module) -> nn.Module:
        """Unpatch ``model``, then patch it with this method's config (if any); in place."""
        unpatch(model)
        return model if self.config is None else patch(model, self.config)

    def as_dict(self) -> dict:
        """The label and the config as a dict (``None`` for dense), for JSON reports."""
        return {"label": self.label, "config": None if self.config is None else asdict(self.config)}


# A dense row over a quantized cache: DHSA's dense path (mlx-lm's Gemma2 cannot attend over
# QuantizedKVCache; without a soft cap decode steps run mlx-lm's own module).
DENSE_ALWAYS = {"dense_below": 1 << 30, "decode_dense_below": 1 << 30}


def with_quantized_kv(methods: list[Method], base: DHSAConfig, bits: int, group_size: int):
    """``methods`` followed by each of them over a ``bits``-bit KV cache (label ``+kv{bits}``).

    ``dense`` becomes the model patched to stay dense (``DENSE_ALWAYS``), so that every model
    type runs on the quantized cache.
    """
    kv = dict(kv_bits=bits, kv_group_size=group_size)
    out = list(methods)
    for m in methods:
        config = base.replace(**DENSE_ALWAYS) if m.config is None else m.config
        out.append(Method(f"{m.label}+kv{bits}", config.replace(**kv)))
    return out


def parse_methods(specs: str, base: DHSAConfig) -> list[Method]:
    """Parse ``"dense,dhsa,dhsa@512"`` into methods built on ``base``.

    Args:
        specs (str): comma-separated ``name`` or ``name@budget`` entries.
        base (DHSAConfig): the config the overrides apply to.

    Returns:
        list[Method]: in the given order, duplicates removed.

    Raises:
        ValueError: an unknown name, a malformed budget, or a config the overrides make invalid.
    """
    methods: dict[str, Method] = {}
    for spec in (s.strip() for s in specs.split(",")):
        if not spec or spec in methods:
            continue
        name, _, budget = spec.partition("@")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        overrides = METHODS[name]
        if overrides is None:
            if budget:
                raise ValueError(f"method {name!r} takes no budget (got {spec!r})")
            methods[spec] = Method(spec, None)
            continue
        if budget:
            if not budget.isdigit():
                raise ValueError(f"budget in {spec!r} must be a positive integer")
            overrides = {**overrides, "budget": int(budget)}
        methods[spec] = Method(spec, base.replace(**overrides))
    if not methods:
        raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
    return list(methods.values())
