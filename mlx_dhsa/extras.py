"""Optional dependencies: import one where it is used, or say which pip extra installs it."""

import importlib
from types import ModuleType

EXTRAS = {"matplotlib": "plot", "pypdf": "pdf"}  # module -> the mlx-dhsa extra that installs it


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a key of ``EXTRAS``) or raise a one-line :class:`MissingExtraError`.

    Args:
        module (str): the top-level module, e.g. ``"matplotlib"``.
        purpose (str): what needs it, for the message, e.g. ``"--plot"``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the module is there but one of its own imports is broken
            raise
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed: "
            f"pip install 'mlx-dhsa[{EXTRAS[module]}]'"
        ) from None
