"""Kernel-level timing of prefill refinement's candidate scores, one Gemma2 layer.

For a prompt of L tokens (random queries and keys of gemma-2-2b's shapes), the widened DHSA
plan of each refinement setting (``prefill_refine`` x budget candidate keys a block) is made
once; then the candidates' scores are timed on ``refine_scores.metal`` (``kernel``, where a
GPU backend runs) and on ``reference.refine_scores`` (``mlx``, MLX ops), beside the layer's
sparse attention over a plan of ``budget`` keys (``attention``) for scale, and the rest of
a refined plan's cost: the plan of ``budget`` keys (``plan``), the widened plan (``wide_plan``)
and ``refine.refine_plan`` on the widened plan (``refine_plan``: the scores, on the kernel
where one runs, and choosing the kept keys). Settings are ``F/S``: refinement
factor / ``refine_stride``.

Usage: python scripts/bench_refine.py --lengths 32768 --settings 4/8 8/8 4/4 --json r.json
"""

import argparse
import json
import time

import mlx.core as mx

from mlx_dhsa import DHSAConfig, kernels, reference, refine
from mlx_dhsa.attention import DHSAAttention
from mlx_dhsa.evaluation.runinfo import environment

H, H_KV, D, SCALE, SOFTCAP = 8, 4, 256, 256**-0.5, 50.0  # gemma-2-2b


def _time(fn, trials: int) -> float:
    """Seconds of the fastest of ``trials`` evaluated calls (after one warm-up call)."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best


def run(L: int, settings: list[tuple[int, int]], budget: int, dtype, trials: int) -> list[dict]:
    q = mx.random.normal((1, H, L, D), key=mx.random.key(0)).astype(dtype)
    k = mx.random.normal((1, H_KV, L, D), key=mx.random.key(1)).astype(dtype)
    v = mx.random.normal((1, H_KV, L, D), key=mx.random.key(2)).astype(dtype)
    config = DHSAConfig(budget=budget)
    attn = DHSAAttention(config, n_heads=H, n_kv_heads=H_KV, head_dim=D, scale=SCALE,
                         softcap=SOFTCAP)  # fmt: skip
    table = attn.chunk_view(k)
    mx.eval(table.summaries)
    plan_s = _time(lambda: kernels.select_chunks(q, table, config, q_offset=0).indices, trials)
    plan = kernels.select_chunks(q, table, config, q_offset=0)
    attention = _time(lambda: kernels.sparse_attention(q, k, v, plan, scale=SCALE,
                                                       softcap=SOFTCAP), trials)  # fmt: skip
    rows = []
    for f, stride in settings:
        wide_config = refine.widened(config, f)
        row = {"length": L, "budget": budget, "refine": f, "stride": stride, "plan_s": plan_s,
               "attention_s": attention, "kernel_s": None, "max_error": None}  # fmt: skip
        row["wide_plan_s"] = _time(
            lambda: kernels.select_chunks(q, table, wide_config, q_offset=0).indices, trials
        )
        wide = kernels.select_chunks(q, table, wide_config, q_offset=0)
        mx.eval(wide.indices, wide.n_valid)
        args = (wide, q, k, stride, SCALE, SOFTCAP)
        kernel = kernels.refine_kernel(dtype, dtype, D, H, H_KV, config.block_size, stride)
        row["mlx_s"] = _time(lambda: reference.refine_scores(*args), trials)
        if kernel is not None:
            row["kernel_s"] = _time(lambda: kernels.run_refine(kernel, *args), trials)
            ref = reference.refine_scores(*args)
            err = mx.abs(kernels.run_refine(kernel, *args) - ref).max() / ref.max()
            row["max_error"] = err.item()
        refined = config.replace(prefill_refine=f, refine_stride=stride)
        row["refine_plan_s"] = _time(
            lambda: refine.refine_plan(
                wide, q, k, refined, scale=SCALE, softcap=SOFTCAP, kernel=kernel
            ).indices,
            trials,
        )
        rows.append(row)
        ms = lambda x: "-" if x is None else f"{x * 1e3:8.2f} ms"  # noqa: E731
        print(f"{L:7d} tok | refine {f} stride {stride:3d} | kernel {ms(row['kernel_s'])} | "
              f"mlx {ms(row['mlx_s'])} | wide plan {ms(row['wide_plan_s'])} | refine_plan "
              f"{ms(row['refine_plan_s'])} | plan {ms(plan_s)} | sparse attention {ms(attention)}",
              flush=True)  # fmt: skip
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768])
    p.add_argument("--settings", nargs="+", default=["4/8", "8/8", "4/4"], help="F/S pairs")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", help="queries and keys (CPU: float32)")
    p.add_argument("--trials", type=int, default=3, help="timed calls (the fastest is kept)")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()
    dtype = getattr(mx, args.dtype) if mx.default_device() == mx.gpu else mx.float32
    settings = [tuple(int(x) for x in s.split("/")) for s in args.settings]
    rows = [r for L in args.lengths for r in run(L, settings, args.budget, dtype, args.trials)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
