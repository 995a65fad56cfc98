"""``python -m mlx_dhsa``: the ``mlx-dhsa`` command, for environments without the script."""

from .cli import app

app(prog_name="mlx-dhsa")
