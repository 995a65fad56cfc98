"""Where one DHSA layer spends its time: chunk state, planning, sparse attention, dense tail.

One Gemma2-2b-shaped attention layer (random keys, bf16) at a given context, timed part by
part. Each part runs ``--reps`` times back to back and is evaluated once, so a figure is the
GPU time of one call plus its launch cost, without a host round trip (``empty_op`` shows
that floor). Prefill: one 2048-query step at the end of the context; decode: one query.
``--min-groups`` sweeps the attention kernel's split threshold
(``kernels.attention.MIN_GROUPS``).

    python scripts/profile_planning.py --contexts 8192 32768 131072 --json parts.json
"""

import argparse
import json
import time

import mlx.core as mx

import mlx_dhsa
from mlx_dhsa import kernels, reference
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.cache import DHSACache
from mlx_dhsa.kernels import attention as launches
from mlx_dhsa.kernels import planning
from mlx_dhsa.selection import key_mask, select_chunks


def timed(fn, reps):
    """Milliseconds per call over ``reps`` back-to-back calls, after a warm-up call."""
    mx.eval(fn())
    tic = time.perf_counter()
    outs = [fn() for _ in range(reps)]
    mx.eval(outs)
    return (time.perf_counter() - tic) / reps * 1e3


def profile(S, L, reps, dtype, min_groups, reference_too=True):
    config = mlx_dhsa.DHSAConfig(decode_dense_below=0)  # profile the sparse decode step
    attn = DHSAAttention(config, n_heads=8, n_kv_heads=4, head_dim=256, scale=1 / 16, softcap=50.0)
    cache = DHSACache()
    k = mx.random.normal((1, 4, S - L, 256)).astype(dtype)
    cache.update_and_fetch(k, k)
    new = mx.random.normal((1, 4, L, 256)).astype(dtype)
    keys, values = cache.update_and_fetch(new, new)
    q = mx.random.normal((1, 8, L, 256)).astype(dtype)
    mx.eval(keys, values, q)
    n_sparse = L - min(config.dense_tail, L) if L > 1 else 1
    qs, off = q[:, :, :n_sparse], S - L
    args = dict(scale=1 / 16, softcap=50.0)

    def view():
        t = attn.chunk_view(keys, cache)
        return t.summaries, t.starts

    def plan_with(select):
        return lambda: select(qs, table, config, q_offset=off, window=None).indices

    table = attn.chunk_view(keys, cache)
    plan = kernels.select_chunks(qs, table, config, q_offset=off, window=None)
    parts = {"empty_op": timed(lambda: q + 1, reps), "chunk_view": timed(view, reps)}
    if kernels.backend().active():  # the two planning kernels on their own
        state = kernels.KernelState()
        scores = planning.block_scores(qs, table, config, state)
        parts["block_scores"] = timed(
            lambda: planning.block_scores(qs, table, config, state), reps)
        # Without a kernel state the open chunk is summed from its keys.
        parts["block_scores(open from keys)"] = timed(
            lambda: planning.block_scores(qs, table, config), reps)
        parts["select_keys"] = timed(
            lambda: planning.select_keys(
                scores, table, config, planning.select_params(table, config, n_sparse, off, None)
            )[0], reps)
    parts |= {
        "select(kernel)": timed(plan_with(kernels.select_chunks), reps),
        "dense(mlx-lm style)": timed(
            lambda: reference.dense_attention(
                q, keys, values, mask=key_mask(off, L, S, None), **args
            ),
            reps,
        ),
    }
    if reference_too:
        parts["select(reference)"] = timed(plan_with(select_chunks), reps)
    for g in min_groups:
        launches.MIN_GROUPS = g
        parts[f"sparse_attention(g{g})"] = timed(
            lambda: kernels.sparse_attention(qs, keys, values, plan, **args), reps)
        if L > 1:
            parts[f"dense_tail(g{g})"] = timed(
                lambda: kernels.dense_attention(q[:, :, n_sparse:], keys, values,
                                                q_offset=off + n_sparse, window=None, **args),
                reps,
            )
        parts[f"whole_layer(g{g})"] = timed(
            lambda: attn.attend(q, keys, values, offset=off, cache=cache), reps)
    return parts


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--queries", type=int, nargs="+", default=[2048, 1])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--min-groups", type=int, nargs="+", default=[launches.MIN_GROUPS])
    p.add_argument("--no-reference", action="store_true", help="skip the pure-MLX planner")
    p.add_argument("--open-keys", type=int, default=256,
                   help="decode rows: keys added to the context, which land in the open chunk")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    default_groups = launches.MIN_GROUPS
    for context in args.contexts:
        for L in args.queries:
            # Decode: put keys in the open chunk (a context that fills whole segments has none).
            S = context + (args.open_keys if L == 1 else 0)
            parts = profile(S, L, args.reps, mx.bfloat16, args.min_groups, not args.no_reference)
            launches.MIN_GROUPS = default_groups
            rows.append({"context": S, "queries": L, **parts})
            print(f"S={S:>6} L={L:>4} " + " ".join(f"{k}={v:.3f}ms" for k, v in parts.items()),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
