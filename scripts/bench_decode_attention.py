"""One decode step's attention, one Gemma2 layer: host cost and GPU time per call, by method.

A decode step on a fast GPU is bound by host work per launched kernel (see the README), so this
times both sides of one layer's attention for a single query over S keys:

- ``build``: microseconds to build the call's graph (Python and MLX's op construction), no eval;
- ``eval``: microseconds per call when ``--calls`` independent calls are evaluated together
  (the GPU time of one call plus its share of launching them).

Methods: ``mlx_lm`` (mlx-lm's Gemma2 decode math: scale, two matmuls, tanh soft cap, softmax),
``dense`` / ``sparse`` (our kernels over all keys / over a ``--budget``-slot plan: one query
runs ``decode_attention.metal``). Without a GPU kernel the ``dense``/``sparse`` methods time the
pure-MLX reference (``path`` says which ran).

    python scripts/bench_decode_attention.py --lengths 4096 16384 131072 --json d.json
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_dhsa import kernels
from mlx_dhsa.evaluation.runinfo import environment
from mlx_dhsa.plan import Plan

SCALE, SOFTCAP = 256**-0.5, 50.0  # gemma-2-2b
METHODS = ("mlx_lm", "dense", "sparse")


def mlx_lm_decode(q, k, v):
    """mlx-lm's Gemma2 attention for one query (no mask): its ops, in its order."""
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    q = (q * SCALE).reshape(B, H_kv, H // H_kv, L, D)
    s = q @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    s = mx.tanh(s / SOFTCAP) * SOFTCAP
    p = mx.softmax(s, axis=-1, precise=True)
    return (p @ mx.expand_dims(v, 2)).reshape(B, H, L, D)


def methods(S: int, budget: int, heads: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """Method name -> a function of no arguments that builds one call's output."""
    q = mx.random.normal((1, heads, 1, head_dim)).astype(dtype)
    k = mx.random.normal((1, kv_heads, S, head_dim)).astype(dtype)
    v = mx.random.normal((1, kv_heads, S, head_dim)).astype(dtype)
    n = min(budget, S)
    index = mx.sort(mx.random.permutation(S)[:n]).astype(mx.int32).reshape(1, 1, n)
    plan = Plan(index, mx.array([[n]], mx.int32), q_offset=S - 1, block_size=128, window=None)
    mx.eval(q, k, v, plan.indices, plan.n_valid)

    dense = lambda: kernels.dense_attention(q, k, v, scale=SCALE, softcap=SOFTCAP,  # noqa: E731
                                            q_offset=S - 1)
    sparse = lambda: kernels.sparse_attention(q, k, v, plan, scale=SCALE,  # noqa: E731
                                              softcap=SOFTCAP)
    kernel = kernels.attention_kernel((dtype,) * 3, head_dim, heads, kv_heads, 1, S, None)
    path = "reference" if kernel is None else "kernel"
    return {"mlx_lm": (lambda: mlx_lm_decode(q, k, v), "mlx_lm"), "dense": (dense, path),
            "sparse": (sparse, path)}


def time_method(fn, path: str, calls: int, trials: int, builds: int) -> dict:
    """build and eval microseconds per call (medians over trials), and the path that ran."""
    for _ in range(3):
        mx.eval(fn())
    tic = time.perf_counter()
    outs = [fn() for _ in range(builds)]
    build = (time.perf_counter() - tic) / builds * 1e6
    del outs
    evals = []
    for _ in range(trials):
        outs = [fn() for _ in range(calls)]
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        evals.append((time.perf_counter() - tic) / calls * 1e6)
    return {"build_us": build, "eval_us": statistics.median(evals), "eval_us_min": min(evals),
            "path": path}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 131072])
    p.add_argument("--budget", type=int, default=2048, help="key slots of the sparse plan")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--calls", type=int, default=26, help="independent calls per eval (layers)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--builds", type=int, default=200, help="calls timed for the build cost")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dtype = getattr(mx, args.dtype)
    rows = []
    for S in args.lengths:
        fns = methods(S, args.budget, args.heads, args.kv_heads, args.head_dim, dtype)
        row = {"keys": S}
        for m in args.methods:
            row[m] = time_method(*fns[m], args.calls, args.trials, args.builds)
            print(f"S={S:7d} {m:<12} build {row[m]['build_us']:7.1f} us/call   "
                  f"eval {row[m]['eval_us']:8.1f} us/call   ({row[m]['path']})", flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(dtype=args.dtype), "budget": args.budget,
                       "calls": args.calls, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
