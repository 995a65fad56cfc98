"""The learned boundary predictor (paper, "dynamic chunking"; design.md section 5).

For the gap before key p, a windowed encoder reads the ``window`` keys left of it
(p - w .. p - 1) and the ``window`` keys right of it (p .. p + w - 1): one multi-head
self-attention over the 2w tokens (no positional encoding), then LayerNorm. The left and right
outputs are mean-pooled to l and r, fused as [l, r, |l - r|, l * r, cos(l, r)] (4C + 1) and
scored by an MLP (4C + 1 -> hidden -> 1). Parameter names equal the released PyTorch
state_dict keys (``enc.mha.in_proj_weight``, ..., ``mlp.2.bias``), so converted weights load
with ``load_weights`` unchanged.
"""

import functools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

# Gaps scored per pass of gap_logits; bounds the windowed activations to about
# GAP_BLOCK * 2w * 3C floats per batch row.
GAP_BLOCK = 2048
DEFAULT_HEADS = 8  # the released predictor's encoder heads
DEFAULT_WINDOW = 4  # keys per side of a gap (w)


class PredictorError(ValueError):
    """A predictor file that cannot be used (unreadable, inconsistent, non-finite, or made for
    another model); the message names the file."""


@dataclass(frozen=True)
class PredictorArgs:
    """Hyper-parameters of a :class:`BoundaryPredictor`, stored beside its weights as JSON."""

    channels: int  # C = H_kv * head_dim of the keys it reads
    heads: int = DEFAULT_HEADS  # attention heads of the window encoder
    window: int = DEFAULT_WINDOW  # keys on each side of a gap (w)
    hidden: int = 256  # MLP width
    residual: bool = False  # encoder: LayerNorm(x + MHA(x)) instead of LayerNorm(MHA(x))
    threshold: float = 1.1  # least logit of a boundary (the paper's); a trained file may differ

    def __post_init__(self):
        if self.channels <= 0 or self.heads <= 0 or self.channels % self.heads:
            raise ValueError(
                f"predictor channels ({self.channels}) must be a positive multiple of "
                f"heads ({self.heads})"
            )
        if self.window <= 0 or self.hidden <= 0:
            raise ValueError(f"predictor window and hidden must be positive, got {self}")


class _MultiheadAttention(nn.Module):
    """PyTorch ``nn.MultiheadAttention`` layout: packed q/k/v input projection, out_proj."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        # PyTorch's initialisation: Xavier-uniform packed projection, zero biases.
        self.in_proj_weight = nn.init.glorot_uniform()(mx.zeros((3 * channels, channels)))
        self.in_proj_bias = mx.zeros((3 * channels,))
        self.out_proj = nn.Linear(channels, channels)
        self.out_proj.bias = mx.zeros((channels,))

    def project(self, x: mx.array) -> mx.array:
        """Packed q/k/v of every token: (..., C) -> (..., 3C)."""
        return mx.addmm(self.in_proj_bias, x, self.in_proj_weight.T)

    def attend(self, qkv: mx.array) -> mx.array:
        """Self-attention inside each window: qkv (N, T, 3C) -> (N, T, C)."""
        N, T, C3 = qkv.shape
        C = C3 // 3
        qkv = qkv.reshape(N, T, 3, self.heads, C // self.heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, heads, T, C / heads)
        scores = (q @ k.swapaxes(-1, -2)) * (C // self.heads) ** -0.5
        out = mx.softmax(scores, axis=-1) @ v
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(N, T, C))


class _WindowEncoder(nn.Module):
    def __init__(self, args: PredictorArgs):
        super().__init__()
        self.residual = args.residual
        self.mha = _MultiheadAttention(args.channels, args.heads)
        self.norm = nn.LayerNorm(args.channels)


class BoundaryPredictor(nn.Module):
    """Logit per gap that a chunk boundary belongs there (design.md section 5).

    Args:
        args (PredictorArgs): channels, heads, window, hidden width, encoder wiring.
    """

    def __init__(self, args: PredictorArgs):
        super().__init__()
        self.args = args
        self.enc = _WindowEncoder(args)
        C = args.channels
        self.mlp = [nn.Linear(4 * C + 1, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1)]

    def _score(self, x: mx.array | None, qkv: mx.array) -> mx.array:
        """Logits of windows: tokens x (N, 2w, C) (used if residual), projections qkv
        (N, 2w, 3C) -> (N,)."""
        w = self.args.window
        h = self.enc.mha.attend(qkv)
        if self.args.residual:
            h = h + x
        h = self.enc.norm(h)
        left, right = h[:, :w].mean(axis=1), h[:, w:].mean(axis=1)  # (N, C)
        norms = mx.maximum(mx.linalg.norm(left, axis=-1), 1e-8) * mx.maximum(
            mx.linalg.norm(right, axis=-1), 1e-8
        )
        cos = ((left * right).sum(-1) / norms)[:, None]
        z = mx.concatenate([left, right, mx.abs(left - right), left * right, cos], axis=-1)
        for layer in self.mlp:
            z = layer(z)
        return z[:, 0]

    def __call__(self, windows: mx.array) -> mx.array:
        """Logits of explicit windows.

        Args:
            windows (mx.array): (N, 2w, C); tokens 0..w-1 left of the gap, w..2w-1 right.

        Returns:
            mx.array: (N,) logits.
        """
        return self._score(windows, self.enc.mha.project(windows))

    def gap_logits(self, keys: mx.array) -> mx.array:
        """Logit of every gap of a key sequence, aligned with ``chunking.gap_scores``.

        Every token is projected once; the 2w-token windows are then strided slices of the
        projections (no Python loop over positions).

        Args:
            keys (mx.array): post-RoPE keys, (B, H_kv, S, D) with H_kv * D == channels.

        Returns:
            mx.array: (B, S) float32; entry p scores the gap before key p. Gaps without w keys
            on both sides (p < w or p > S - w) are ``-inf``.

        Raises:
            ValueError: the keys have H_kv * D != channels.
        """
        B, H_kv, S, D = keys.shape
        C, w = self.args.channels, self.args.window
        if H_kv * D != C:
            raise ValueError(
                f"boundary predictor reads {C} channels, got keys with {H_kv} KV heads x {D} "
                f"= {H_kv * D}: it was trained for another model"
            )
        G = S - 2 * w + 1  # complete windows: gaps p = w .. S - w
        if G <= 0:
            return mx.full((B, S), -mx.inf)
        dtype = self.enc.mha.in_proj_weight.dtype
        x = keys.transpose(0, 2, 1, 3).reshape(B, S, C).astype(dtype)
        qkv = self.enc.mha.project(x)  # (B, S, 3C), each token once
        parts = []
        for g0 in range(0, G, GAP_BLOCK):
            n = min(GAP_BLOCK, G - g0)
            # Token j of the window of gap (w + g0 + i) is token g0 + i + j.
            xw = None
            if self.args.residual:
                xw = mx.stack([x[:, g0 + j : g0 + j + n] for j in range(2 * w)], axis=2)
                xw = xw.reshape(B * n, 2 * w, C)
            qw = mx.stack([qkv[:, g0 + j : g0 + j + n] for j in range(2 * w)], axis=2)
            logits = self._score(xw, qw.reshape(B * n, 2 * w, 3 * C))
            parts.append(logits.reshape(B, n))
        pad_lo, pad_hi = mx.full((B, w), -mx.inf), mx.full((B, w - 1), -mx.inf)
        return mx.concatenate([pad_lo, *parts, pad_hi], axis=1).astype(mx.float32)


def packaged_predictor(model: str) -> Path:
    """Path of a predictor shipped with the package (``mlx_dhsa/data/<model>.safetensors``).

    Use it as ``DHSAConfig(boundaries="learned", predictor_path=str(packaged_predictor(m)))``.

    Raises:
        FileNotFoundError: no predictor for ``model`` is shipped; the message lists those that are.
    """
    data = Path(__file__).resolve().parent.parent / "data"
    path = data / f"{model}.safetensors"
    if not path.is_file():
        shipped = sorted(p.stem for p in data.glob("*.safetensors"))
        raise FileNotFoundError(f"no boundary predictor shipped for {model!r}; shipped: {shipped}")
    return path


def args_path(weights: str | Path) -> Path:
    """The JSON of hyper-parameters that sits beside ``weights`` (same stem, ``.json``)."""
    return Path(weights).with_suffix(".json")


def save_predictor(model: BoundaryPredictor, path: str | Path) -> Path:
    """Write ``model``'s weights (MLX safetensors) and its hyper-parameters (JSON beside).

    Args:
        model (BoundaryPredictor): the predictor.
        path (str | Path): weights file; ``.safetensors`` is appended when missing.

    Returns:
        Path: the weights file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(path))
    args_path(path).write_text(json.dumps(asdict(model.args), indent=2) + "\n")
    return path


def load_predictor(path: str | Path) -> BoundaryPredictor:
    """Load a predictor written by :func:`save_predictor` or ``mlx-dhsa convert-predictor``.

    Loaded once per file: later calls with the same unchanged file return the same module.

    Args:
        path (str | Path): the ``.safetensors`` weights; the JSON beside gives its
            hyper-parameters.

    Returns:
        BoundaryPredictor: evaluated, in eval mode.

    Raises:
        FileNotFoundError: the weights or their JSON are missing.
        PredictorError: the files are not a predictor (not safetensors, a JSON without its
            hyper-parameters, weights that do not fit them) or hold NaN or infinite weights.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"boundary predictor weights not found: {path}")
    stat = path.stat()
    return _load_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> BoundaryPredictor:
    meta = args_path(path)
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} (the predictor's hyper-parameters) is missing; write both files with "
            "`mlx-dhsa convert-predictor`"
        )
    model = BoundaryPredictor(_read_args(meta))
    try:
        model.load_weights(path, strict=True)
    except (RuntimeError, ValueError) as e:  # not safetensors, or names/shapes off
        raise PredictorError(f"{path} is not a boundary predictor's weights: {e}") from None
    model.set_dtype(mx.float32)  # weights may be stored in half precision
    model.eval()
    mx.eval(model.parameters())
    check_finite(model.parameters(), path)
    return model


def _read_args(meta: Path) -> PredictorArgs:
    try:
        args = json.loads(meta.read_text())
        return PredictorArgs(**args)
    except (ValueError, TypeError) as e:  # bad JSON, unknown or missing keys, bad values
        names = ", ".join(f.name for f in fields(PredictorArgs))
        raise PredictorError(
            f"{meta} does not hold a predictor's hyper-parameters ({names}): {e}"
        ) from None


def check_finite(weights, path: str | Path) -> None:
    """Raise :class:`PredictorError` if any weight (a tree of arrays) is NaN or infinite."""
    from mlx.utils import tree_flatten

    bad = [k for k, v in tree_flatten(weights) if not mx.all(mx.isfinite(v)).item()]
    if bad:
        raise PredictorError(f"{path}: NaN or infinite values in {bad[:4]}; retrain or re-export")


def check_fits(predictor: BoundaryPredictor, channels: int, path: str | Path) -> None:
    """Raise :class:`PredictorError` unless ``predictor`` reads keys of ``channels``
    (= H_kv * head_dim of the model it is used with)."""
    if predictor.args.channels != channels:
        raise PredictorError(
            f"{path} was trained for keys of {predictor.args.channels} channels, but this "
            f"model's have {channels} (KV heads x head_dim): use a predictor for this model"
        )
