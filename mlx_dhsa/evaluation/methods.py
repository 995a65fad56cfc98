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

# name -> DHSAConfig overrides; None = the unpatched model (mlx-lm's own attention).
METHODS: dict[str, dict | None] = {
    "dense": None,
    **{name: {"method": name} for name in PLANNERS},
    "dhsa_mean": {"method": "dhsa", "summary": "mean"},  # plain-mean chunk summaries
    "dhsa_maxhead": {"method": "dhsa", "head_scores": "max"},  # best head's score per chunk
    "dhsa_mean_maxhead": {"method": "dhsa", "summary": "mean", "head_scores": "max"},
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
