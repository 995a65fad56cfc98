"""Training labels for the boundary predictor from a model's own attention (design.md s. 5).

For the gap before key p, sum over the later queries t >= p + w - 1 (those that see all 2w
keys around the gap) the head-averaged attention mass on the w keys left of the gap
(p - w .. p - 1) and on the w keys right of it (p .. p + w - 1). The gap is a boundary when
the larger mass is at least ``ratio`` (2) times the smaller. Queries and post-RoPE keys come
from the layer's own projections, norms and RoPE: the layer's ``rope`` instance is swapped,
for one forward call, for a recorder that stops the forward once it has both (nothing after
that layer is computed). Attention is full causal with the model's scale and soft cap, in
query blocks, so no L x L matrix is ever held.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..reference import logits as _logits
from ..reference import masked_softmax as _masked_softmax


@dataclass
class GapLabels:
    """Keys of one layer and the attention-mass labels of their gaps (gap p precedes key p)."""

    keys: mx.array  # (B, H_kv, S, D) post-RoPE keys of the layer
    left: mx.array  # (B, S) mass later queries put on the w keys left of gap p
    right: mx.array  # (B, S) mass on the w keys right of gap p
    valid: mx.array  # (B, S) bool: w keys on both sides (p in w .. S - w)
    labels: mx.array  # (B, S) bool: valid and max(left, right) >= ratio * min(left, right)


class _Stop(Exception):
    """Raised by the recorder once queries and keys are captured: ends the forward early."""


class _RopeRecorder(nn.Module):
    """Stands in for a layer's RoPE module: records its outputs (queries, then keys)."""

    def __init__(self, rope: nn.Module, tape: list):
        super().__init__()
        self.rope = rope
        self._tape = tape

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        y = self.rope(x, offset=offset)
        self._tape.append(y)
        if len(self._tape) == 2:
            raise _Stop
        return y


def default_layer(model: nn.Module) -> int:
    """Index of the first full-attention layer (the one that owns shared DHSA boundaries)."""
    if getattr(model, "model_type", None) == "gemma2" and len(model.layers) > 1:
        return 1  # even layers slide (families.patch_gemma2); mlx-lm's layers do not say
    for i, layer in enumerate(model.layers):
        if not getattr(layer.self_attn, "is_sliding", False) and not getattr(
            layer, "use_sliding", False
        ):
            return i
    raise ValueError("the model has no full-attention layer")


def layer_queries_keys(model: nn.Module, tokens: mx.array, layer: int) -> tuple[mx.array, ...]:
    """Post-RoPE queries (B, H, S, D) and keys (B, H_kv, S, D) of ``model.layers[layer]``.

    Computed by the model itself (layers up to ``layer`` only); the layer's ``rope`` is
    restored afterwards, also on error.

    Raises:
        ValueError: the layer's attention does not apply RoPE to queries, then keys.
    """
    attn = model.layers[layer].self_attn
    rope, tape = attn.rope, []
    attn.rope = _RopeRecorder(rope, tape)
    try:
        model(tokens)
    except _Stop:
        pass
    finally:
        attn.rope = rope
    q, k = (tape + [None, None])[:2]
    n_heads, n_kv = getattr(attn, "n_heads", None), getattr(attn, "n_kv_heads", None)
    if k is None or (n_heads and q.shape[1] != n_heads) or (n_kv and k.shape[1] != n_kv):
        raise ValueError(
            f"layer {layer} ({type(attn).__name__}) does not apply RoPE to queries then keys; "
            "its keys cannot be captured"
        )
    return q, k


def gap_masses(
    q: mx.array,
    k: mx.array,
    *,
    scale: float,
    softcap: float | None = None,
    window: int = 4,
    query_block: int = 128,
) -> tuple[mx.array, mx.array]:
    """Attention mass later queries put left and right of every gap (full causal attention).

    Args:
        q (mx.array): post-RoPE queries, (B, H, S, D); H a multiple of H_kv (GQA).
        k (mx.array): post-RoPE keys, (B, H_kv, S, D).
        scale (float): the model's query scale.
        softcap (float, optional): the model's logit soft cap. Default: ``None``.
        window (int): keys per side (w). Default: ``4``.
        query_block (int): queries per pass; working memory ~ B * H * query_block * S.

    Returns:
        tuple[mx.array, mx.array]: left and right masses, each (B, S) float32, summed over the
        queries t >= p + w - 1 and averaged over heads; zero where p < w or p > S - w.
    """
    B, H, S, D = q.shape
    H_kv, w = k.shape[1], window
    q, k = q.astype(mx.float32), k.astype(mx.float32)
    left, right = mx.zeros((B, S)), mx.zeros((B, S))
    for t0 in range(0, S, query_block):
        t1 = min(S, t0 + query_block)
        n, P = t1 - t0, t1 - 2 * w + 1  # queries; gaps p = w .. t1 - w some query here sees
        if P <= 0:
            continue
        qb = q[:, :, t0:t1].reshape(B, H_kv, H // H_kv, n, D)
        t = t0 + mx.arange(n)[:, None]  # (n, 1) query positions
        scores = _logits(qb, mx.expand_dims(k[:, :, :t1], 2), scale, softcap)
        probs = _masked_softmax(scores, mx.arange(t1) <= t).mean(axis=(1, 2))  # (B, n, t1)
        csum = mx.pad(mx.cumsum(probs, axis=-1), [(0, 0), (0, 0), (1, 0)])  # sums of keys < j
        mid = csum[..., w : w + P]
        later = t >= mx.arange(w, w + P) + w - 1  # (n, P): query t sees the whole window
        pad = [(0, 0), (w, S - w - P)]
        left = left + mx.pad(((mid - csum[..., :P]) * later).sum(axis=1), pad)
        right = right + mx.pad(((csum[..., 2 * w : 2 * w + P] - mid) * later).sum(axis=1), pad)
        mx.eval(left, right)
    return left, right


def boundary_labels(
    model: nn.Module,
    tokens: mx.array,
    *,
    layer: int | None = None,
    window: int = 4,
    ratio: float = 2.0,
    query_block: int = 128,
) -> GapLabels:
    """Keys of one layer and boundary labels of their gaps from that layer's attention.

    Args:
        model (nn.Module): an mlx-lm model (gemma2, gemma3_text, llama families), unpatched.
        tokens (mx.array): token ids, (S,) or (B, S).
        layer (int, optional): layer index; ``None`` = :func:`default_layer`.
        window (int): keys per side of a gap (w). Default: ``4``.
        ratio (float): a gap is a boundary when the larger mass >= ratio x the smaller.
            Default: ``2.0``.
        query_block (int): queries per pass of :func:`gap_masses`. Default: ``128``.

    Returns:
        GapLabels: keys, masses, validity and labels, all aligned with gap index p.
    """
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    layer = default_layer(model) if layer is None else layer
    attn = model.layers[layer].self_attn
    q, k = layer_queries_keys(model, tokens, layer)
    softcap = getattr(attn, "attn_logit_softcapping", None)
    left, right = gap_masses(
        q, k, scale=attn.scale, softcap=softcap, window=window, query_block=query_block
    )
    S = tokens.shape[1]
    p = mx.arange(S)
    valid = mx.broadcast_to((p >= window) & (p <= S - window), left.shape)
    labels = valid & (mx.maximum(left, right) >= ratio * mx.minimum(left, right))
    return GapLabels(keys=k, left=left, right=right, valid=valid, labels=labels)
