"""``mlx-dhsa convert-gguf`` and ``convert-predictor``: thin commands over the converters."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from ..boundaries.predictor import DEFAULT_HEADS, DEFAULT_WINDOW
from . import ui


def convert_gguf(
    source: Annotated[
        str, typer.Argument(help="A packaged model (gemma-3-270m, smollm2-135m) or a .gguf file.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output directory. [default: the mlx-dhsa cache]")
    ] = None,
    dtype: Annotated[
        Literal["float32", "float16", "bfloat16"], typer.Option(help="Weight dtype.")
    ] = "float16",
):
    """Convert a llama.cpp GGUF (gemma3 or llama) into an mlx-lm model directory."""
    from ..models.packaged import convert

    with ui.progress(f"Converting {source}", unit="tensors") as update:
        try:
            path = convert(
                source, out, dtype=dtype, progress=lambda done, total, _: update(done, total)
            )
        except (FileNotFoundError, ImportError, ValueError, KeyError) as e:
            ui.fail(str(e))
    ui.line(str(path))


def convert_predictor(
    source: Annotated[Path, typer.Argument(help="Predictor state_dict: .pt or .safetensors.")],
    out: Annotated[Path, typer.Argument(help="Output MLX weights (.safetensors; JSON beside).")],
    heads: Annotated[int, typer.Option(min=1, help="Encoder attention heads.")] = DEFAULT_HEADS,
    window: Annotated[int, typer.Option(min=1, help="Keys per side of a gap.")] = DEFAULT_WINDOW,
    residual: Annotated[bool, typer.Option(help="Encoder is LayerNorm(x + MHA(x)).")] = False,
):
    """Convert a boundary predictor state_dict to MLX weights (for boundaries="learned")."""
    from ..boundaries.convert import convert_predictor as convert

    try:
        path = convert(source, out, heads=heads, window=window, residual=residual)
    except (FileNotFoundError, ImportError, ValueError) as e:
        ui.fail(str(e))
    ui.line(str(path))
