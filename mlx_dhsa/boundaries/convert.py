"""Convert a boundary predictor state_dict (PyTorch ``.pt`` or ``.safetensors``) to MLX.

The released predictor is a PyTorch state_dict with the keys in :data:`STATE_DICT_KEYS`
(design.md section 5). A ``.pt`` file is read with ``torch.load(..., weights_only=True)`` only,
since a full pickle can run code; anything that is not a flat mapping of names to tensors is
refused. Names and shapes are checked before anything is written.
"""

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from .predictor import (
    DEFAULT_HEADS,
    DEFAULT_WINDOW,
    BoundaryPredictor,
    PredictorArgs,
    check_finite,
    save_predictor,
)

STATE_DICT_KEYS = (
    "enc.mha.in_proj_weight",
    "enc.mha.in_proj_bias",
    "enc.mha.out_proj.weight",
    "enc.mha.out_proj.bias",
    "enc.norm.weight",
    "enc.norm.bias",
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def expected_shapes(args: PredictorArgs) -> dict[str, tuple[int, ...]]:
    """Shape of every state_dict entry of a predictor with hyper-parameters ``args``."""
    C, H = args.channels, args.hidden
    return {
        "enc.mha.in_proj_weight": (3 * C, C),
        "enc.mha.in_proj_bias": (3 * C,),
        "enc.mha.out_proj.weight": (C, C),
        "enc.mha.out_proj.bias": (C,),
        "enc.norm.weight": (C,),
        "enc.norm.bias": (C,),
        "mlp.0.weight": (H, 4 * C + 1),
        "mlp.0.bias": (H,),
        "mlp.2.weight": (1, H),
        "mlp.2.bias": (1,),
    }


def _read_torch(path: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path.name} needs PyTorch: pip install 'mlx-dhsa[predictor]' (or torch), "
            "or save the state_dict as .safetensors"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code and custom classes
        raise ValueError(_torch_load_message(path, e)) from None
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected a state_dict (a flat mapping of names to tensors), "
            f"got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(
            f"{path}: expected a flat mapping of names to tensors; these entries are not "
            f"tensors: {bad[:8]}"
        )
    return {k: mx.array(v.detach().cpu().to(torch.float32).numpy()) for k, v in obj.items()}


def _torch_load_message(path: Path, error: Exception) -> str:
    """One line for a ``.pt`` that ``torch.load(weights_only=True)`` refused or could not read."""
    if "weights only" in str(error).lower() or "weights_only" in str(error):
        return (
            f"{path} holds code or Python objects, not plain tensors, so it was refused "
            "(torch.load weights_only=True; nothing in it was executed): save a plain "
            "state_dict of tensors, or .safetensors"
        )
    return f"{path} is not a readable PyTorch file ({type(error).__name__}): truncated or corrupt?"


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return dict(mx.load(str(path), format="safetensors"))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None


def read_state_dict(path: str | Path) -> dict[str, mx.array]:
    """Read a flat name -> tensor mapping from ``.pt``/``.pth``/``.bin`` or ``.safetensors``.

    Raises:
        FileNotFoundError: no such file.
        ImportError: a PyTorch file and no PyTorch installed.
        ValueError: an unknown suffix, or a file that is not a flat mapping of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such predictor file: {path}")
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    raise ValueError(
        f"{path}: expected a PyTorch state_dict ({', '.join(TORCH_SUFFIXES)}) or .safetensors"
    )


def check_state_dict(
    weights: Mapping[str, mx.array],
    *,
    heads: int = DEFAULT_HEADS,
    window: int = DEFAULT_WINDOW,
    residual: bool = False,
) -> PredictorArgs:
    """Check names and shapes against the released layout; infer channels and MLP width.

    Returns:
        PredictorArgs: the hyper-parameters the weights fit.

    Raises:
        ValueError: a missing or unexpected key, or a wrong shape; the message names it.
    """
    missing = [k for k in STATE_DICT_KEYS if k not in weights]
    unexpected = sorted(set(weights) - set(STATE_DICT_KEYS))
    if missing or unexpected:
        raise ValueError(
            f"not a boundary predictor state_dict: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    norm, mlp0 = weights["enc.norm.weight"], weights["mlp.0.weight"]
    if norm.ndim != 1 or mlp0.ndim != 2:
        raise ValueError(
            f"enc.norm.weight must be 1-D and mlp.0.weight 2-D, got shapes "
            f"{tuple(norm.shape)} and {tuple(mlp0.shape)}"
        )
    args = PredictorArgs(
        channels=norm.shape[0], heads=heads, window=window, hidden=mlp0.shape[0],
        residual=residual,
    )  # fmt: skip
    for key, shape in expected_shapes(args).items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(
                f"{key} has shape {tuple(weights[key].shape)}, expected {shape} "
                f"(channels {args.channels}, hidden {args.hidden})"
            )
    return args


def convert_predictor(
    in_path: str | Path,
    out_path: str | Path,
    *,
    heads: int = DEFAULT_HEADS,
    window: int = DEFAULT_WINDOW,
    residual: bool = False,
) -> Path:
    """Convert a boundary predictor state_dict into MLX safetensors plus a JSON beside it.

    Args:
        in_path (str | Path): PyTorch state_dict (``.pt``) or ``.safetensors`` with the keys
            of :data:`STATE_DICT_KEYS`.
        out_path (str | Path): output weights (``.safetensors`` is appended when missing);
            the hyper-parameters go to the same stem with ``.json``.
        heads (int): encoder heads (not visible in the shapes). Default: ``8``.
        window (int): keys per side of a gap. Default: ``4``.
        residual (bool): encoder is ``LayerNorm(x + MHA(x))``. Default: ``False``.

    Returns:
        Path: the weights file written.

    Raises:
        FileNotFoundError, ImportError, ValueError: as :func:`read_state_dict` and
            :func:`check_state_dict`; nothing is written then.
    """
    weights = read_state_dict(in_path)
    args = check_state_dict(weights, heads=heads, window=window, residual=residual)
    check_finite(weights, in_path)
    model = BoundaryPredictor(args)
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    return save_predictor(model, out_path)
