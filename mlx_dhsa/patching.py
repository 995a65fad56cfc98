"""Swap the attention modules of a loaded mlx-lm model for DHSAAttention (instances only)."""

from collections.abc import Callable
from functools import partial

import mlx.nn as nn

from .attention import DHSAAttention, SharedChunks
from .cache import make_prompt_cache
from .config import DHSAConfig
from .families import patch_gemma3_text, patch_llama

GEMMA2_SLIDING_WINDOW = 4096  # every released Gemma2; mlx-lm's ModelArgs drops the field


def _patch_gemma2(model: nn.Module, config: DHSAConfig) -> None:
    # HF Gemma2 marks even-index layers as sliding.
    window = getattr(model.args, "sliding_window", None) or GEMMA2_SLIDING_WINDOW
    shared = SharedChunks()
    for i, layer in enumerate(model.layers):
        layer.self_attn = DHSAAttention.from_base(
            layer.self_attn, config, window=window if i % 2 == 0 else None, shared=shared, owner=i == 0
        )


PATCHERS: dict[str, Callable[[nn.Module, DHSAConfig], None]] = {
    "gemma2": _patch_gemma2,
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
        ValueError: unsupported model type, already patched with another config, or a
            boundary predictor (``boundaries="learned"``) that is unusable or for another model.
        TypeError: an override that is not a DHSAConfig field.
    """
    config = (config or DHSAConfig()).replace(**overrides)
    model_type = getattr(model, "model_type", None)
    if model_type not in PATCHERS:
        raise ValueError(
            f"DHSA supports model types {sorted(PATCHERS)}, got {model_type!r}"
        )
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
    # mlx-lm's make_prompt_cache (used by generate) asks the model instance for its caches.
    model.make_cache = partial(make_prompt_cache, model)
    return model


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
