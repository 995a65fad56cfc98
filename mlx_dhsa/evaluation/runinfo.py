"""What ran and where: the attention path DHSA layers took, the machine and versions."""

import platform
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .._version import __version__
from ..patching import dhsa_layers


def attention_path(model: nn.Module) -> str:
    """Which attention the latest forward call ran: ``dhsa(kernel)``, ``dhsa(reference)``
    (joined with ``+`` if layers differ) or ``dense`` (also for an unpatched model)."""
    sparse = sorted({a.last_path for a in dhsa_layers(model) if a.last_path.startswith("dhsa")})
    return "+".join(sparse) if sparse else "dense"


class PrefillPaths:
    """A ``prompt_progress_callback`` that records the attention path of every prefill step.

    mlx-lm calls it after each prompt chunk; the last call (done == total) comes after the
    first decode step and is not counted. ``callback`` (optional) is called through.
    """

    def __init__(self, model: nn.Module, callback: Callable[[int, int], Any] | None = None):
        self.model, self.callback, self.paths = model, callback, set()

    def __call__(self, done: int, total: int):
        if 0 < done < total:
            self.paths.add(attention_path(self.model))
        if self.callback is not None:
            self.callback(done, total)

    @property
    def path(self) -> str:
        """The sparse paths seen (joined with ``+``), else ``dense``."""
        sparse = sorted({p for ps in self.paths for p in ps.split("+") if p.startswith("dhsa")})
        return "+".join(sparse) if sparse else "dense"


def model_dtype(model: nn.Module) -> str:
    """The dtype of the model's first floating-point parameter (``float16``, ...)."""
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).removeprefix("mlx.core.")
    return "unknown"


def backends() -> list[str]:
    """The MLX backends this machine has: ``Metal``, ``CUDA``, ``CPU``."""
    cuda = getattr(mx, "cuda", None)
    found = [("Metal", mx.metal.is_available()), ("CUDA", cuda is not None and cuda.is_available())]
    return [name for name, ok in found if ok] + ["CPU"]


def environment(**extra: Any) -> dict:
    """Device, backends and versions, plus ``extra`` (model name, dtype, ...)."""
    import mlx_lm

    try:
        info = mx.device_info()
    except RuntimeError:
        info = {}
    return {
        "device": str(mx.default_device()),
        "device_name": info.get("device_name", platform.processor() or platform.machine()),
        "backends": backends(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_dhsa": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
    }
