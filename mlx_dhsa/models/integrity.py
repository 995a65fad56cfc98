"""Check that a ``.safetensors`` file is complete before MLX reads it.

A file cut short (a full disk, a killed copy or download) makes ``mx.load`` fail deep inside
mlx-lm with "corrupt file?"; the header says how long the file must be, so a truncated file is
found in microseconds and reported by name.
"""

import json
import struct
from pathlib import Path

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header


class SafetensorsError(ValueError):
    """A ``.safetensors`` file that is truncated or has no valid header; names the file."""


def check_safetensors(path: str | Path) -> None:
    """Raise :class:`SafetensorsError` unless ``path`` holds every byte its header promises.

    Args:
        path (str | Path): a ``.safetensors`` file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= _MAX_HEADER:
            raise SafetensorsError(f"{path} is not a safetensors file (no valid header)")
        if n > size - 8:
            raise SafetensorsError(f"{path} is truncated: {size:,} bytes, inside its header")
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise SafetensorsError(f"{path} has a corrupt safetensors header") from None
    expected = 8 + n + end
    if size < expected:
        raise SafetensorsError(f"{path} is truncated: {size:,} of {expected:,} bytes")


def check_model_dir(path: str | Path) -> None:
    """Check every ``*.safetensors`` of a model directory; see :func:`check_safetensors`."""
    for weights in sorted(Path(path).glob("*.safetensors")):
        check_safetensors(weights)
