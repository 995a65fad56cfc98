"""Attention mass kept by a plan: the cheap, low-variance diagnostic for selection work.

For one layer with post-RoPE queries (B, H, L, D) and keys (B, H_kv, S, D), the dense
softmax gives every (head, query, key) a probability. A plan keeps, for query i, the keys of
its block; the share it keeps is ``sum_h sum_{k in plan(i)} p_hik / H``, averaged over the
queries of a block. ``block_key_mass`` sums the probabilities per block and key once (in
groups of blocks, the one place this builds L x S); every plan's share is then a gather.

- prefill: every query block whose visible keys exceed the budget (the others keep all keys),
  planned in one call as a prefill step at offset 0 would;
- decode: single-query plans at chosen positions (keys up to the query), as a sparse decode
  step plans them.

The key-level oracle keeps each block's ``budget`` keys of largest mass: the ceiling of any
plan shared by a block's queries and heads at that budget.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..config import DHSAConfig
from ..reference import logits as _logits
from ..reference import masked_softmax as _masked_softmax
from ..selection import Plan, key_mask

MAX_PROBS = 1 << 24  # probabilities held at once while summing block x key mass

KEY_ORACLE = "key_oracle"


@dataclass
class LayerQK:
    """What one attention layer saw in a dense forward: post-RoPE queries and keys."""

    layer: int  # index of the layer in the model
    queries: mx.array  # (B, H, L, D)
    keys: mx.array  # (B, H_kv, S, D)
    scale: float
    softcap: float | None
    n_heads: int
    n_kv_heads: int


def block_key_mass(
    queries: mx.array,
    keys: mx.array,
    *,
    offset: int,
    block_size: int,
    scale: float,
    softcap: float | None,
) -> mx.array:
    """Dense attention probability summed per query block and key, over queries and heads.

    Args:
        queries (mx.array): (B, H, L, D) at positions ``offset..``.
        keys (mx.array): (B, H_kv, S, D), causal to the queries.
        offset (int): position of the first query.
        block_size (int): queries per block (1 for decode steps).
        scale (float), softcap (float or None): the layer's attention math.

    Returns:
        mx.array: (B, NB, S) float32; a block's row sums to its queries x heads.
    """
    B, H, L, D = queries.shape
    H_kv, S = keys.shape[1], keys.shape[2]
    NB = -(-L // block_size)
    G = max(1, MAX_PROBS // (B * H * block_size * S))
    k = mx.expand_dims(keys, 2)
    out = []
    for b0 in range(0, NB, G):
        i0, i1 = b0 * block_size, min((b0 + G) * block_size, L)
        q = queries[:, :, i0:i1].reshape(B, H_kv, H // H_kv, i1 - i0, D)
        mask = key_mask(offset + i0, i1 - i0, S, None)
        probs = _masked_softmax(_logits(q, k, scale, softcap).astype(mx.float32), mask)
        probs = probs.sum(axis=(1, 2))  # (B, n, S)
        nb = -(-(i1 - i0) // block_size)
        probs = mx.pad(probs, [(0, 0), (0, nb * block_size - (i1 - i0)), (0, 0)])
        out.append(probs.reshape(B, nb, block_size, S).sum(axis=2))
        mx.eval(out[-1])
    return mx.concatenate(out, axis=1) if len(out) > 1 else out[0]


def kept_share(plan: Plan, mass: mx.array, weight: mx.array) -> mx.array:
    """Share of each block's mass that ``plan`` keeps, (B, NB).

    Args:
        plan (Plan): (B, NB, K) indices and counts (keys past a query get no mass anyway).
        mass (mx.array): (B, NB, S) from :func:`block_key_mass`.
        weight (mx.array): (NB,) queries x heads of each block (its row sum).
    """
    K = plan.indices.shape[-1]
    valid = mx.arange(K) < plan.n_valid[..., None]
    got = mx.take_along_axis(mass, plan.indices.astype(mx.int32), axis=-1)
    return mx.where(valid, got, 0).sum(-1) / weight


def key_oracle_share(mass: mx.array, budget: int, weight: mx.array) -> mx.array:
    """Share kept by the ``budget`` keys of largest mass per block, (B, NB)."""
    S = mass.shape[-1]
    if budget >= S:
        return mass.sum(-1) / weight
    top = mx.sort(mass, axis=-1)[..., S - budget :]
    return top.sum(-1) / weight


PlanFn = Callable[[DHSAConfig, LayerQK, mx.array, mx.array, int], Plan]


def plan_layer(config: DHSAConfig, layer: LayerQK, queries: mx.array, keys: mx.array, offset: int):
    """The plan ``config.method`` makes for these queries of ``layer`` (pure-MLX planner).

    A DHSA attention module is built for the layer (no cache, global attention), so every
    planner runs the code a patched model runs.
    """
    from ..attention import DHSAAttention

    attn = DHSAAttention(
        config.replace(use_kernel=False),
        n_heads=layer.n_heads,
        n_kv_heads=layer.n_kv_heads,
        head_dim=queries.shape[-1],
        scale=layer.scale,
        softcap=layer.softcap,
    )
    return attn.plan(queries, keys, offset=offset, window=None, cache=None)


@dataclass
class MassRow:
    """Mean share of true attention mass kept, for one (method, layer, phase)."""

    method: str
    budget: int
    layer: int
    phase: str  # "prefill" (query blocks) or "decode" (single queries)
    shares: list[float] = field(default_factory=list)  # one per block / decode step


def layer_mass(
    layer: LayerQK,
    configs: dict[str, DHSAConfig | None],
    *,
    decode_positions: Sequence[int] = (),
    plan_fn: PlanFn = plan_layer,
) -> list[MassRow]:
    """Shares of the dense attention mass that each method's plans keep in ``layer``.

    Args:
        layer (LayerQK): the captured queries and keys (queries at positions 0..L-1).
        configs (dict): label -> config; ``None`` = the key-level oracle (its budget is taken
            from the label's ``@budget`` suffix, e.g. ``"key_oracle@512"``).
        decode_positions (Sequence[int]): query positions planned as single-query decode steps.
        plan_fn (callable): makes a plan (tests pass a brute-force one).

    Returns:
        list[MassRow]: one prefill and (if any positions) one decode row per method.
    """
    q, k = layer.queries, layer.keys
    _, H, L, _ = q.shape
    rows = []
    block_sizes = {c.block_size for c in configs.values() if c is not None} or {128}
    masses = {
        bs: block_key_mass(q, k, offset=0, block_size=bs, scale=layer.scale, softcap=layer.softcap)
        for bs in block_sizes
    }
    for label, config in configs.items():
        budget = config.budget if config is not None else int(label.rsplit("@", 1)[1])
        bs = config.block_size if config is not None else min(block_sizes)
        mass = masses[bs]
        NB = mass.shape[1]
        q1 = mx.minimum((mx.arange(NB) + 1) * bs, L)
        weight = (q1 - mx.arange(NB) * bs).astype(mx.float32) * H
        selective = [b for b in range(NB) if int(q1[b].item()) > budget]
        if config is None:
            share = key_oracle_share(mass, budget, weight)
        else:
            share = kept_share(plan_fn(config, layer, q, k, 0), mass, weight)
        share = share.mean(0)  # over the batch
        rows.append(MassRow(label, budget, layer.layer, "prefill",
                            [share[b].item() for b in selective]))  # fmt: skip
        if decode_positions:
            shares = []
            for p in decode_positions:
                qp, kp = q[:, :, p : p + 1], k[:, :, : p + 1]
                m = block_key_mass(qp, kp, offset=p, block_size=1, scale=layer.scale,
                                   softcap=layer.softcap)  # fmt: skip
                w = mx.array([float(H)])
                if config is None:
                    s = key_oracle_share(m, budget, w)
                else:
                    s = kept_share(plan_fn(config, layer, qp, kp, p), m, w)
                shares.append(s.mean().item())
            rows.append(MassRow(label, budget, layer.layer, "decode", shares))
    return rows


class _Recorder:
    """Records each DHSA layer's post-RoPE queries and keys while the model runs dense."""

    def __init__(self, model: nn.Module):
        from ..patching import dhsa_layers

        self.layers = {id(a): (i, a) for i, a in enumerate(dhsa_layers(model))}
        self.seen: list[LayerQK] = []

    def __call__(self, attn, queries, keys):
        i, _ = self.layers[id(attn)]
        mx.eval(queries, keys)
        self.seen.append(LayerQK(i, queries, keys, attn.scale, attn.attn_logit_softcapping,
                                 attn.n_heads, attn.n_kv_heads))  # fmt: skip


def capture(model: nn.Module, tokens: Sequence[int]) -> list[LayerQK]:
    """Post-RoPE queries and keys of every DHSA-patched layer for one dense forward.

    The model is patched with a config that keeps every call dense (the attention output is
    dense attention's) and unpatched afterwards. Layer indices count the patched layers.
    """
    from ..patching import dhsa_layers, patch, unpatch

    unpatch(model)
    patch(model, DHSAConfig(dense_below=1 << 30, decode_dense_below=None, use_kernel=False))
    recorder = _Recorder(model)

    def recording(attn):
        def attend(queries, keys, values, **kwargs):
            recorder(attn, queries, keys)
            return type(attn).attend(attn, queries, keys, values, **kwargs)

        return attend

    try:
        for attn in dhsa_layers(model):  # patch the instances, not the class
            object.__setattr__(attn, "attend", recording(attn))
        mx.eval(model.model(mx.array([int(t) for t in tokens])[None]))
    finally:
        unpatch(model)
    return recorder.seen
