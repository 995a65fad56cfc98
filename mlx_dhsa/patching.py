"""Swap the attention modules of a loaded mlx-lm model for DHSAAttention (instances only)."""

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .attention import DHSAAttention
from .cache import DHSACache
from .config import DHSAConfig
from .families import patch_gemma2, patch_gemma3_text, patch_llama
from .quantized_cache import QuantizedDHSACache, WindowKVCache

PATCHERS: dict[str, Callable[[nn.Module, DHSAConfig], None]] = {
    "gemma2": patch_gemma2,
    "gemma3_text": patch_gemma3_text,
    "llama": patch_llama,
    "mistral": patch_llama,
    "qwen2": patch_llama,
}


def dhsa_layers(model: nn.Module) -> list[DHSAAttention]:
    """The DHSAAttention modules of ``model`` (empty if it is not patched)."""
    layers = getattr(model, "layers", [])
    return [l.self_attn for l in layers if isinstance(getattr(l, "self_attn", None), DHSAAttention)]


def patch(model: nn.Module, config: DHSAConfig | None = None, **overrides) -> nn.Module:
    """Replace the model's attention with DHSA, in place.

    Args:
        model (nn.Module): an mlx-lm model of a supported type (see ``PATCHERS``).
        config (DHSAConfig, optional): settings; ``None`` means ``DHSAConfig()``.
        **overrides: DHSAConfig fields to change, e.g. ``budget=1024``.

    Returns:
        nn.Module: the same model. Patching again with the same config does nothing.

    Raises:
        ValueError: unsupported model type, already patched with another config, a
            boundary predictor (``boundaries="learned"``) that is unusable or for another model,
            or a ``kv_group_size`` that does not divide the head dimension.
        TypeError: an override that is not a DHSAConfig field.
    """
    config = (config or DHSAConfig()).replace(**overrides)
    model_type = getattr(model, "model_type", None)
    if model_type not in PATCHERS:
        raise ValueError(f"DHSA supports model types {sorted(PATCHERS)}, got {model_type!r}")
    patched = dhsa_layers(model)
    if patched:
        if all(a.config == config for a in patched):
            return model
        raise ValueError(
            f"model is already patched with {patched[0].config}; call "
            "mlx_dhsa.unpatch(model) first to patch it with other settings"
        )
    _check_predictor(model, config)
    PATCHERS[model_type](model, config)
    problem = _quantized_cache_problem(model)
    if problem:
        unpatch(model)
        raise ValueError(problem)
    # mlx-lm's make_prompt_cache (used by generate) asks the model instance for its caches.
    model.make_cache = partial(make_prompt_cache, model)
    return model


def _quantized_cache_problem(model: nn.Module) -> str | None:
    """Why the patched layers' ``kv_bits`` cache cannot be built, or None."""
    for attn in dhsa_layers(model):
        group = attn.config.kv_group
        if attn.config.kv_bits is not None and attn.head_dim % group:
            sizes = [g for g in (32, 64, 128) if attn.head_dim % g == 0]
            return (
                f"kv_group_size {group} does not divide the model's head dimension "
                f"({attn.head_dim}): use --kv-group-size {' or '.join(map(str, sizes))}"
            )
    return None


def _check_predictor(model: nn.Module, config: DHSAConfig) -> None:
    """Load the learned boundary predictor now, so that a bad file fails here, not mid-prefill."""
    if config.boundaries != "learned":
        return
    from .boundaries.predictor import PredictorError, check_fits, load_predictor

    predictor = load_predictor(config.predictor_path)
    k_proj = model.layers[0].self_attn.k_proj
    check_fits(predictor, k_proj.weight.shape[0], config.predictor_path)  # H_kv * head_dim
    if predictor.args.window > config.min_chunk:
        raise PredictorError(
            f"the boundary predictor reads {predictor.args.window} keys per side, more than "
            f"min_chunk ({config.min_chunk}): raise min_chunk"
        )


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's original attention modules, in place (a no-op if not patched)."""
    for layer in model.layers:
        if isinstance(getattr(layer, "self_attn", None), DHSAAttention):
            layer.self_attn = layer.self_attn._base
    vars(model).pop("make_cache", None)
    return model


def make_prompt_cache(model: nn.Module, max_kv_size: int | None = None) -> list[Any]:
    """The model's prompt cache with a DHSACache for every DHSA layer.

    Other layers (e.g. Gemma3's sliding layers) keep the cache the model makes for them; a
    rotating one becomes a :class:`WindowKVCache`, which ``kv_bits`` leaves unquantized
    (mlx-lm cannot quantize it). DHSA layers with a sliding window (Gemma2's even layers)
    get a WindowKVCache of their window: they attend densely over it and hold only the last
    ``window`` keys (plus a step's). With ``kv_bits`` in the layers' config the other DHSA
    layers get a :class:`QuantizedDHSACache` from the first token.

    Args:
        model (nn.Module): a model patched with :func:`mlx_dhsa.patch`.
        max_kv_size (int, optional): not supported with DHSA layers (it would rotate keys).

    Returns:
        list: one cache per layer, for ``mlx_lm.generate`` / ``stream_generate``.
    """
    if max_kv_size is not None:
        raise ValueError(
            "max_kv_size (a rotating KV cache) is not supported by DHSA layers: DHSA already "
            "bounds attention cost by its budget; drop max_kv_size"
        )
    make = getattr(type(model), "make_cache", None)
    caches = make(model) if make is not None else [KVCache() for _ in model.layers]
    out = []
    for layer, c in zip(model.layers, caches):
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, DHSAAttention):
            out.append(WindowKVCache.of(c) if type(c) is RotatingKVCache else c)
        elif attn.window is not None and attn.config.sliding_window:
            out.append(WindowKVCache(max_size=attn.window))
        elif attn.config.kv_bits is not None:
            group = attn.config.kv_group
            if attn.head_dim % group:
                raise ValueError(
                    f"kv_group_size ({group}) must divide the head dimension ({attn.head_dim})"
                )
            out.append(QuantizedDHSACache(group, attn.config.kv_bits))
        else:
            out.append(DHSACache())
    return out
