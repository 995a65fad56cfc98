"""Decode speed: dense mlx-lm Gemma2 vs DHSA sparse decode, gemma-2-2b shapes, random weights.

The KV cache is filled with random keys/values of the target length (decode speed does not
depend on what the keys say), then each model decodes greedily, the methods taking turns
``--trials`` times (medians reported). Each trial runs every method back to back, so the ratio of
DHSA to dense within a trial (``paired`` speedup, median over trials) cancels the slow and fast
spells of a shared machine that a ratio of medians keeps. Methods: ``dense`` (mlx-lm),
``dhsa`` (the default config), ``dhsa_sparse`` (``--sparse``: sparse decode at every length,
to find where it starts to pay; the default ``decode_refine``), ``dhsa_refine`` (``--refine F``:
sparse decode with ``decode_refine=F``; 1 = the chunk ranking alone) and ``floor``
(``--floor``: attention scores skipped).
Tokens/s come from mlx-lm's own ``generate_step`` (which builds the next step's graph while
the GPU runs the current one): what ``mlx_lm.generate`` users see. Also reported: tokens/s
with a blocking eval per token (``sync``: graph building and GPU time add up) and the host
time to build one step's graph (``build``), which bounds decode speed from below when the GPU
is faster. Prints a table
and writes JSON, with an estimate of the bytes read per token (weights + KV) for each path.

    python scripts/bench_decode.py --lengths 4096 32768 65536 131072 --json decode.json
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

import mlx_dhsa
from mlx_dhsa.cache import SUMMARY_DTYPE
from mlx_dhsa.chunking import chunks_per_segment
from mlx_dhsa.cli.profiling import SHAPES, random_model
from mlx_dhsa.evaluation.floor import set_method
from mlx_dhsa.families import GEMMA2_SLIDING_WINDOW
from mlx_dhsa.patching import dhsa_layers


def decode_methods(config: mlx_dhsa.DHSAConfig, refine: int = 4) -> dict:
    """Method name -> (``set_method`` kind, config): dense, DHSA, DHSA with sparse decode
    forced at every length (the config's ``decode_refine``, and ``refine``), and the floor."""
    sparse = replace(config, decode_dense_below=0)
    return {
        "dense": ("dense", config),
        "dhsa": ("dhsa", config),
        "dhsa_sparse": ("dhsa", sparse),
        "dhsa_refine": ("dhsa", replace(sparse, decode_refine=refine)),
        "floor": ("floor", config),
    }


def fill(model, caches, S, dtype):
    """Give every cache S random keys and values."""
    a = model.args
    for c in caches:
        shape = (1, a.num_key_value_heads, S, a.head_dim)
        k = mx.random.normal(shape).astype(dtype)
        c.update_and_fetch(k, mx.random.normal(shape).astype(dtype))
        mx.eval(c.keys, c.values)


def filled_caches(model, methods, S, dtype, config):
    """One prompt cache per method, all holding the same S random keys and values.

    ``methods`` names ``set_method`` kinds, or maps names to (kind, config) pairs."""
    if not isinstance(methods, dict):
        methods = {m: (m, config) for m in methods}
    caches = {m: set_method(model, kind, cfg)() for m, (kind, cfg) in methods.items()}
    first, *rest = methods
    fill(model, caches[first], S, dtype)
    for m in rest:
        for c, d in zip(caches[m], caches[first]):
            c.update_and_fetch(d.keys[..., :S, :], d.values[..., :S, :])
    return caches


def decode(model, caches, steps, warmup):
    """Greedy decode through mlx-lm's generate_step: tokens/s over ``steps`` after ``warmup``."""
    gaps = decode_gaps(model, caches, steps, warmup)
    return len(gaps) / sum(gaps)


def decode_gaps(model, caches, steps, warmup):
    """The seconds between consecutive tokens of mlx-lm's generate_step, after ``warmup``."""
    gen = generate_step(mx.array([1]), model, max_tokens=warmup + steps, prompt_cache=caches)
    for _ in range(warmup):
        next(gen)
    times = [time.perf_counter()]
    for _ in gen:
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def decode_sync(model, caches, steps):
    """Greedy decode with a blocking eval per token: (tokens/s, ms to build one step's graph)."""
    tok, build = mx.array([[1]]), 0.0
    tic = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = model(tok, cache=caches)[:, -1].argmax(-1, keepdims=True)
        build += time.perf_counter() - t0
        mx.eval(tok)
    return steps / (time.perf_counter() - tic), build / steps * 1e3


def bytes_per_token(model, S, config, dtype_bytes):
    """Weights + KV read for one decode step, an estimate. Dense (mlx-lm's Gemma2) reads S keys
    and values on every layer. Sparse DHSA reads, on each global layer (odd index), the closed
    chunks' summaries (``cache.SUMMARY_DTYPE``), ``decode_refine x budget`` candidate keys (refinement) and its
    plan's ``budget`` keys and values; on each sliding layer its window's keys and values."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    a = model.args
    n_layers = len(model.layers)
    n_global = n_layers // 2
    window = getattr(a, "sliding_window", None) or GEMMA2_SLIDING_WINDOW
    row = a.num_key_value_heads * a.head_dim * dtype_bytes  # a key or a value of one layer
    slots = S // config.chunk_limit * chunks_per_segment(config)
    summaries = slots * a.head_dim * SUMMARY_DTYPE.size
    candidates = (
        min(S, config.budget * config.decode_refine) * row if config.decode_refine > 1 else 0
    )
    per_global = summaries + candidates + 2 * min(S, config.budget) * row
    sliding = (n_layers - n_global) * 2 * min(S, window) * row
    return weights + 2 * S * row * n_layers, weights + n_global * per_global + sliding


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 65536, 131072])
    p.add_argument("--budget", type=int, default=mlx_dhsa.DHSAConfig().budget)
    p.add_argument(
        "--decode-dense-below",
        type=int,
        default=mlx_dhsa.DHSAConfig().decode_dense_below,
        help="keys below which DHSA decodes densely (0: sparse whenever S > 2 x budget)",
    )
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--trials", type=int, default=3, help="alternating dense/DHSA runs; medians")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=None, help="fewer layers, for a smoke test")
    p.add_argument(
        "--model",
        default="gemma-2-2b",
        choices=sorted(SHAPES),
        help="architecture of the random-weight model (tiny: a smoke test)",
    )
    p.add_argument(
        "--sparse",
        action="store_true",
        help="also decode with DHSA's sparse decode forced (decode_dense_below=0)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="F",
        help="also decode with sparse decode forced and decode_refine=F (1: chunks alone)",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also decode with the attention scores skipped (bench_prefill's floor): "
        "the speed no attention method can beat",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dtype = getattr(mx, args.dtype)
    config = mlx_dhsa.DHSAConfig(budget=args.budget, decode_dense_below=args.decode_dense_below)
    layers = {} if args.layers is None else {"num_hidden_layers": args.layers}
    model = random_model(args.model, dtype, **layers)
    names = ["dense", "dhsa"] + ["dhsa_sparse"] * args.sparse + ["floor"] * args.floor
    names += ["dhsa_refine"] * (args.refine is not None)
    methods = {m: decode_methods(config, args.refine or 1)[m] for m in names}
    rows = []
    for S in args.lengths:
        # The caches live side by side; the methods take turns so that clock drift and
        # warm-up hit all alike.
        caches = filled_caches(model, methods, S, dtype, config)
        runs = {m: {"tps": [], "step_ms": [], "sync_tps": [], "build_ms": []} for m in methods}
        paths = {}
        for trial in range(args.trials):
            order = list(methods) if trial % 2 == 0 else list(methods)[::-1]
            for method in order:
                set_method(model, *methods[method])
                run = runs[method]
                gaps = decode_gaps(model, caches[method], args.steps, args.warmup)
                run["tps"].append(len(gaps) / sum(gaps))
                run["step_ms"].append(statistics.median(gaps) * 1e3)
                sync_tps, build_ms = decode_sync(model, caches[method], args.steps)
                run["sync_tps"].append(sync_tps)
                run["build_ms"].append(build_ms)
                if method.startswith("dhsa"):
                    paths[method] = dhsa_layers(model)[-1].last_path
        set_method(model, "dense", config)
        row = {"context": S, "runs": runs, "path": paths["dhsa"], "paths": paths}
        for m in methods:
            for k, v in runs[m].items():
                row[f"{m}_{k}"] = statistics.median(v)
        del caches
        mx.clear_cache()
        row["speedup"] = row["dhsa_tps"] / row["dense_tps"]
        for m in [m for m in methods if m.startswith("dhsa")]:  # ratios within each trial
            ratios = [a / b for a, b in zip(runs[m]["tps"], runs["dense"]["tps"])]
            row[f"{m}_paired"] = statistics.median(ratios)
        dense_b, dhsa_b = bytes_per_token(model, S, config, dtype.size)
        row["dense_gb_per_token"], row["dhsa_gb_per_token"] = dense_b / 1e9, dhsa_b / 1e9
        rows.append(row)
        print(
            f"context={S:>7} dense={row['dense_tps']:7.1f} tok/s dhsa={row['dhsa_tps']:7.1f} tok/s "
            f"speedup={row['speedup']:.2f}x (paired {row['dhsa_paired']:.2f}x) path={row['path']}"
            + (
                f" | sparse={row['dhsa_sparse_tps']:7.1f} tok/s ({row['dhsa_sparse_paired']:.2f}x)"
                if args.sparse
                else ""
            )
            + (
                f" | refine={row['dhsa_refine_tps']:7.1f} tok/s ({row['dhsa_refine_paired']:.2f}x)"
                if args.refine is not None
                else ""
            )
            + f" | sync dense="
            f"{row['dense_sync_tps']:.1f} dhsa={row['dhsa_sync_tps']:.1f} tok/s, build dense="
            f"{row['dense_build_ms']:.2f} dhsa={row['dhsa_build_ms']:.2f} ms | "
            f"bytes/token dense={row['dense_gb_per_token']:.2f} GB "
            f"dhsa={row['dhsa_gb_per_token']:.2f} GB"
            + (f" | floor={row['floor_tps']:.1f} tok/s" if args.floor else ""),
            flush=True,
        )
        if args.json:  # after every length, so a run cut short keeps what it measured
            env = {
                "device": str(mx.default_device()),
                "info": mx.device_info(),
                "mlx": mx.__version__,
                "dtype": args.dtype,
                "config": asdict(config),
                "steps": args.steps,
                "trials": args.trials,
                "loop": "mlx_lm.generate.generate_step",
            }
            with open(args.json, "w") as f:
                json.dump({"env": env, "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
