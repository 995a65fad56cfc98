"""DHSA inside MLX's own distributed inference: mlx-lm's sharding, ``mx.distributed``.

A model too large for one Mac is split by ``mlx.launch`` ranks with mlx-lm's tensor
parallelism (each model's ``shard()``: every rank keeps ``1/N`` of the query and KV heads and
the MLP's rows, and ``o_proj`` / ``down_proj`` sum over the group) or pipeline parallelism
(``model.model.pipeline``: each rank runs a contiguous range of layers, with all their heads).
mlx-lm has neither for gemma2 and gemma3_text; the project adds both (``SHARDERS``,
``PIPELINERS``). Nothing here communicates: the collectives are mlx-lm's sharded layers and
pipeline stages.

Under tensor parallelism each rank's DHSA layers plan from the heads it holds: chunk
boundaries from its KV heads, block x chunk scores from its query heads. Plans differ from a
one-machine plan (docs/scaling.md measures what that does to accuracy); at ``budget >= S``
every plan keeps every key and the sharded model equals the one-process model. Under pipeline
parallelism a layer plans as on one machine, except that each stage's first DHSA layer finds
the shared chunk boundaries for the stage's layers (one process: the model's first).

Patching before or after splitting gives the same model: ``DHSAAttention`` passes what
``shard()`` replaces to the module it wraps, and :func:`pipeline` patches the stage afresh.
"""

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import DHSAConfig
from .families import shard_gemma
from .patching import dhsa_layers, unpatch
from .patching import patch as patch_model
from .pipelines import pipeline_gemma

# Tensor-parallel shard() for the families whose mlx-lm model has none.
SHARDERS: dict[str, Callable[[nn.Module, mx.distributed.Group], None]] = {
    "gemma2": shard_gemma,
    "gemma3_text": shard_gemma,
}


# Pipeline parallelism for the families whose mlx-lm model has no ``model.pipeline``.
PIPELINERS: dict[str, Callable[..., None]] = {
    "gemma2": pipeline_gemma,
    "gemma3_text": pipeline_gemma,
}


class ShardingError(ValueError):
    """The model cannot be split this way; the message says why and what can."""


def world() -> mx.distributed.Group:
    """The group ``mlx.launch`` started (size 1 when run alone)."""
    return mx.distributed.init()


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's attention projections are split across a group already."""
    from mlx.nn.layers import distributed as dist

    kinds = (dist.AllToShardedLinear, dist.QuantizedAllToShardedLinear)
    layers = [l for l in getattr(model, "layers", []) if l is not None]
    return bool(layers) and isinstance(getattr(layers[0].self_attn, "q_proj", None), kinds)


def is_pipelined(model: nn.Module) -> bool:
    """Whether the model runs only some of its layers (a pipeline stage of several)."""
    return getattr(getattr(model, "model", None), "pipeline_size", 1) > 1


def can_pipeline(model: nn.Module) -> bool:
    """Whether :func:`pipeline` knows how to split this model (mlx-lm's or a project hook)."""
    inner = getattr(model, "model", None)
    return callable(getattr(inner, "pipeline", None)) or (
        getattr(model, "model_type", None) in PIPELINERS
    )


def can_shard(model: nn.Module) -> bool:
    """Whether :func:`shard` knows how to split this model (its own or a project shard())."""
    return callable(getattr(model, "shard", None)) or getattr(model, "model_type", None) in SHARDERS


def shard(model: nn.Module, group: mx.distributed.Group | None = None) -> nn.Module:
    """Split the model across ``group`` by tensor parallelism, in place; patched or not.

    Uses the model's own ``shard()`` (mlx-lm: llama, mistral, qwen2, ...) or the project's
    for gemma2 and gemma3_text (``SHARDERS``). A group of one leaves the model as it is.

    Raises:
        ShardingError: no shard() for this model type, heads that do not divide by the group
            size, a model sharded already, or DHSA layers with learned boundaries (the
            predictor reads every KV head; a rank holds some).
    """
    group = group or world()
    N = group.size()
    if N == 1:
        return model
    model_type = getattr(model, "model_type", None)
    if not can_shard(model):
        raise ShardingError(
            f"{model_type!r} has no tensor-parallel shard() in mlx-lm or mlx-dhsa (which adds "
            f"one for {sorted(SHARDERS)})"
        )
    if is_sharded(model) or is_pipelined(model):
        raise ShardingError("the model is split already: split it once, after loading")
    for attn in (l.self_attn for l in model.layers if l is not None):
        if attn.n_heads % N or attn.n_kv_heads % N:
            raise ShardingError(
                f"{attn.n_heads} query / {attn.n_kv_heads} KV heads cannot be split {N} ways: "
                f"use a group size that divides {attn.n_kv_heads}, or pipeline parallelism"
            )
    if any(a.config.boundaries == "learned" for a in dhsa_layers(model)):
        raise ShardingError(
            "learned boundaries read every KV head, and a tensor-parallel rank holds "
            f"1/{N} of them: use boundaries='shift' (the default) or 'fixed'"
        )
    if callable(getattr(model, "shard", None)):
        model.shard(group)
    else:
        SHARDERS[model_type](model, group)
    return model


def pipeline(
    model: nn.Module, group: mx.distributed.Group | None = None, split: list[int] | None = None
) -> nn.Module:
    """Split the model across ``group`` by pipeline parallelism, in place; patched or not.

    Rank ``r`` keeps a contiguous range of layers (rank 0 the last ones; ``split``: layers per
    rank, rank 0 first, default even) with every head, as mlx-lm's ``model.model.pipeline``;
    gemma2 and gemma3_text get the project's (``PIPELINERS``). A patched model is patched
    again on its stage, with the same config. A group of one leaves the model as it is.

    Raises:
        ShardingError: no pipeline for this model type, fewer layers than ranks, a bad
            ``split``, or a model split already.
    """
    group = group or world()
    N = group.size()
    if N == 1:
        return model
    model_type = getattr(model, "model_type", None)
    if not can_pipeline(model):
        raise ShardingError(
            f"{model_type!r} has no pipeline parallelism in mlx-lm or mlx-dhsa (which adds "
            f"it for {sorted(PIPELINERS)})"
        )
    if is_sharded(model) or is_pipelined(model):
        raise ShardingError("the model is split already: split it once, after loading")
    n_layers = len(model.layers)
    if n_layers < N:
        raise ShardingError(f"{n_layers} layers cannot be split over {N} pipeline stages")
    if split is not None and (
        len(split) != N or any(s <= 0 for s in split) or sum(split) != n_layers
    ):
        raise ShardingError(
            f"split {split} must be {N} positive layer counts summing to {n_layers}"
        )
    patched = dhsa_layers(model)
    config = patched[0].config if patched else None
    unpatch(model)
    if callable(getattr(model.model, "pipeline", None)):
        model.model.pipeline(group, split)
    else:
        PIPELINERS[model_type](model, group, split)
    if config is not None:
        patch_model(model, config)
    return model


_pipeline = pipeline  # sharded_load's argument of that name hides the function


def sharded_load(
    path_or_alias: str,
    config: DHSAConfig | None = None,
    *,
    group: mx.distributed.Group | None = None,
    pipeline: bool = False,
    patch: bool = True,
    float32_on_cpu: bool = True,
    tokenizer_config: dict | None = None,
    **overrides: Any,
) -> tuple[nn.Module, Any]:
    """:func:`mlx_dhsa.load` for ``mlx.launch`` ranks: load lazily, split across ``group``
    (default: the launched group) by tensor parallelism (:func:`shard`) or, with
    ``pipeline=True``, by pipeline parallelism (:func:`pipeline`), materialise only this
    rank's weights, patch.

    Like ``mlx_lm.utils.sharded_load`` (its ``tensor_group`` or ``pipeline_group``), plus
    gemma2 / gemma3_text.

    Returns:
        tuple: ``(model, tokenizer)``; the same as :func:`mlx_dhsa.load` on a group of one.
    """
    import mlx_lm

    from .loading import _float32_on_cpu, check_weights, resolve

    config = (config or DHSAConfig()).replace(**overrides)
    group = group or world()
    repo = resolve(path_or_alias)
    check_weights(repo)
    model, tokenizer = mlx_lm.load(repo, tokenizer_config=tokenizer_config or {}, lazy=True)
    (_pipeline if pipeline else shard)(model, group)
    if float32_on_cpu:
        _float32_on_cpu(model)
    mx.eval(model.parameters())
    if patch:
        patch_model(model, config)
    barrier(group)
    return model, tokenizer


def barrier(group: mx.distributed.Group | None = None) -> None:
    """Wait for every rank (a one-element all_sum on the CPU stream, as mlx-lm does)."""
    group = group or world()
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
