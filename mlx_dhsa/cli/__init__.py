"""The ``mlx-dhsa`` command line and what only the commands use."""

from .app import app

__all__ = ["app"]
