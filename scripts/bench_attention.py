"""Kernel-level attention timing: DHSA vs dense, one Gemma2 layer, as mlx-lm's prefill runs it.

L queries attend causally to L keys in prefill steps of ``--step`` queries (mlx-lm's
``prefill_step_size``), each step over every key so far, one ``mx.eval`` per step. Methods:

- ``mlx_lm``: mlx-lm's Gemma2 math (scale, tanh soft cap, precise softmax; builds scores),
  i.e. ``reference.dense_attention``.
- ``sdpa``: ``mx.fast.scaled_dot_product_attention`` (causal, no soft cap: not usable for
  Gemma2, shown as MLX's fused speed).
- ``fused``: our dense kernel (``kernels.dense_attention``: causal, soft cap, fused).
- ``dhsa``: our sparse kernel over a DHSA plan per step (steps with at most ``budget`` keys
  run ``fused``, as the model does); planning (boundaries, chunk scores, selection) is timed
  apart, per budget.

Usage: python scripts/bench_attention.py --lengths 4096 32768 --budgets 1024 2048 4096 --json a.json
"""

import argparse
import json
import time

import mlx.core as mx

from mlx_dhsa import DHSAConfig, kernels, reference
from mlx_dhsa.chunking import chunk_boundaries, chunk_summaries
from mlx_dhsa.evaluation.runinfo import environment
from mlx_dhsa.selection import block_queries, chunk_scores, key_mask, select

H, H_KV, D, SCALE, SOFTCAP = 8, 4, 256, 256**-0.5, 50.0  # gemma-2-2b


def _steps(L: int, step: int):
    return [(i, min(i + step, L)) for i in range(0, L, step)]


def _mlx_lm(q, k, v, i, j):
    return reference.dense_attention(
        q[:, :, i:j],
        k[:, :, :j],
        v[:, :, :j],
        scale=SCALE,
        softcap=SOFTCAP,
        mask=key_mask(i, j - i, j, None),
    )


def _sdpa(q, k, v, i, j):
    return mx.fast.scaled_dot_product_attention(
        q[:, :, i:j], k[:, :, :j], v[:, :, :j], scale=SCALE, mask="causal"
    )


def _fused(q, k, v, i, j):
    return kernels.dense_attention(
        q[:, :, i:j], k[:, :, :j], v[:, :, :j], scale=SCALE, softcap=SOFTCAP, q_offset=i
    )


def _plan(q, k, i, j, config):
    kj = k[:, :, :j]
    chunks = chunk_boundaries(kj, config)
    scores = chunk_scores(
        block_queries(q[:, :, i:j], config.block_size), chunk_summaries(kj, chunks)
    )
    return select(scores, chunks, config, n_queries=j - i, q_offset=i)


def _timed(fn, steps, trials):
    """Mean seconds over trials of running fn on every step (one eval per step)."""
    total = 0.0
    for _ in range(trials):
        for i, j in steps:
            tic = time.perf_counter()
            mx.eval(fn(i, j))
            total += time.perf_counter() - tic
    return total / trials


def bench(L: int, budgets, step: int, trials: int, methods) -> dict:
    mx.random.seed(0)
    q = mx.random.normal((1, H, L, D)).astype(mx.bfloat16)
    k = mx.random.normal((1, H_KV, L, D)).astype(mx.bfloat16)
    v = mx.random.normal((1, H_KV, L, D)).astype(mx.bfloat16)
    mx.eval(q, k, v)
    steps = _steps(L, step)
    row = {"L": L, "step": step}
    fns = {"mlx_lm": _mlx_lm, "sdpa": _sdpa, "fused": _fused}
    for name in methods:
        if name in fns:
            mx.reset_peak_memory()
            row[name] = _timed(lambda i, j: fns[name](q, k, v, i, j), steps, trials)
            row[f"{name}_peak_gb"] = mx.get_peak_memory() / 1e9
    if "dhsa" in methods:
        for K in budgets:
            config = DHSAConfig(budget=K)
            plans = {(i, j): _plan(q, k, i, j, config) for i, j in steps if j > K}
            mx.eval([(p.indices, p.n_valid) for p in plans.values()])

            def attend(i, j):
                if (i, j) not in plans:
                    return _fused(q, k, v, i, j)
                return kernels.sparse_attention(
                    q[:, :, i:j],
                    k[:, :, :j],
                    v[:, :, :j],
                    plans[(i, j)],
                    scale=SCALE,
                    softcap=SOFTCAP,
                )

            mx.reset_peak_memory()
            row[f"dhsa_{K}"] = _timed(attend, steps, trials)
            row[f"dhsa_{K}_peak_gb"] = mx.get_peak_memory() / 1e9
            row[f"plan_{K}"] = _timed(
                lambda i, j: (
                    (lambda p: [p.indices, p.n_valid])(_plan(q, k, i, j, config))
                    if j > K
                    else mx.zeros(1)
                ),
                steps,
                trials,
            )
            kernel = kernels.attention_kernel(
                (q.dtype,) * 3, D, H, H_KV, step, L, config.block_size
            )
            row["path"] = "reference" if kernel is None else "kernel"
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--step", type=int, default=2048)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["mlx_lm", "sdpa", "fused", "dhsa"])
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()

    bench(4096, args.budgets[:1], args.step, 1, args.methods)  # warm-up: JIT compiles
    rows = []
    for L in args.lengths:
        rows.append(bench(L, args.budgets, args.step, args.trials, args.methods))
        r = rows[-1]
        base = r.get("mlx_lm")
        cells = [f"L={L:>6}"]
        for key in [m for m in ("mlx_lm", "sdpa", "fused") if m in r]:
            cells.append(f"{key} {r[key] * 1e3:8.1f} ms")
        for K in args.budgets if "dhsa" in args.methods else []:
            t = r[f"dhsa_{K}"]
            speed = f" ({base / t:4.1f}x)" if base else ""
            cells.append(f"dhsa@{K} {t * 1e3:7.1f} ms{speed} plan {r[f'plan_{K}'] * 1e3:6.1f} ms")
        print(" | ".join(cells), flush=True)
        if args.json:  # after every length, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"env": environment(), "bench": "attention", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
