"""Whole-model prefill: mlx-lm dense vs DHSA on gemma-2-2b shapes with random weights.

Prefill runs through mlx-lm's own path (``mlx_lm.generate.generate_step`` with its default
``prefill_step_size``): the time is prompt-to-first-token, the memory ``mx.get_peak_memory``
over that call (weights included). Methods, all on the same model in one process:

- ``dense``: the unpatched mlx-lm model.
- ``dhsa``: ``mlx_dhsa.patch(model)`` with the default config (budget 2048) and DHSA caches.
- ``streaming``: the same patch with ``method="streaming"``: same attention kernels, a plan
  that needs no scoring; ``dhsa - streaming`` bounds the cost of DHSA's planning.
- ``floor``: attention scores skipped (projections, RoPE, KV cache, MLP, norms): the time
  no attention method can beat with mlx-lm's KVCache.
- ``floor_grow``: the same with ``DHSACache``, whose buffers grow geometrically instead of
  256 keys at a time (what DHSA's own floor is).
- ``floor_kv``: the floor with its attention output depending on the step's keys and values
  (as every attention's does), for nothing: how much of the floor's peak memory comes from the
  order MLX evaluates its graph in rather than from attention's work.
- any other name of the harness's registry (``mlx_dhsa.evaluation.methods.METHODS``), e.g.
  ``dhsa_prefill4_s8``: DHSA with those overrides on the default config.

Peak memory includes the work MLX has queued but the GPU has not finished: ``eval`` encodes
command batches ahead of the GPU until a cap on batches in flight (MAX_ACTIVE_TASKS in MLX's
transforms.cpp) or the memory limit stops it, each batch holding its buffers. A method with
more GPU work per layer runs further behind and peaks higher for the same live data.
``--memory-limit GB`` sets ``mx.set_memory_limit``, above which MLX waits for queued work
before encoding more: every method then peaks near what it really holds. Each run's peak is
kept (``peak_gb_all``); the report takes the largest.

Usage: python scripts/bench_prefill.py --lengths 4096 8192 --json p.json
"""

import argparse
import json
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_dhsa import DHSAConfig
from mlx_dhsa.cli.profiling import SHAPES, random_model
from mlx_dhsa.evaluation.floor import FLOOR_METHODS
from mlx_dhsa.evaluation.floor import set_method as _set_method
from mlx_dhsa.evaluation.methods import METHODS, parse_methods
from mlx_dhsa.evaluation.runinfo import attention_path, environment


def prefill(model, make_cache, n: int, vocab: int) -> dict:
    prompt = mx.random.randint(0, vocab, (n,))
    mx.eval(prompt)
    cache = make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()  # weights (and the prompt)
    steps = []  # peak after each prefill step: where the peak happens

    def progress(done, total):
        if done:
            steps.append(round(mx.get_peak_memory() / 1e9, 3))

    tic = time.perf_counter()
    seconds = None
    for _ in generate_step(
        prompt, model, prompt_cache=cache, max_tokens=1, prompt_progress_callback=progress
    ):
        seconds = time.perf_counter() - tic
    mx.synchronize()
    row = {
        "seconds": seconds,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "path": attention_path(model),
        "base_gb": base / 1e9,
        "peak_gb_steps": steps,
    }
    del cache
    mx.clear_cache()
    return row


def set_method(model, method: str):
    """``evaluation.floor.set_method``, also for the harness's named DHSA variants."""
    if method == "dense" or method in FLOOR_METHODS or method not in METHODS:
        return _set_method(model, method)
    config = parse_methods(method, DHSAConfig())[0].config
    return _set_method(model, config.method, config)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--methods", nargs="+", default=["dense", "dhsa", "streaming", "floor"])
    p.add_argument("--trials", type=int, default=1, help="runs per length (the minimum is kept)")
    p.add_argument("--trials-up-to", type=int, default=1 << 30, help="longer prompts run once")
    p.add_argument("--warmup", type=int, default=8192, help="warm-up prompt length")
    p.add_argument(
        "--model",
        default="gemma-2-2b",
        choices=sorted(SHAPES),
        help="architecture of the random-weight model (tiny: a smoke test)",
    )
    p.add_argument("--dtype", default="bfloat16", help="weights and activations (CPU: float32)")
    p.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        help="GB: mx.set_memory_limit, bounding the work queued ahead of the GPU",
    )
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()
    if args.memory_limit is not None:
        mx.set_memory_limit(int(args.memory_limit * 1e9))

    mx.random.seed(0)
    model = random_model(args.model, getattr(mx, args.dtype))
    vocab = model.args.vocab_size
    for method in args.methods:  # warm-up: JIT compiles kernels and graphs
        # 8k runs DHSA's sparse path (4k would stay dense); MLX's own ops still compile new
        # variants at larger sizes, which --trials 2 keeps out of the reported minimum.
        prefill(model, set_method(model, method), args.warmup, vocab)

    rows = []
    for n in args.lengths:
        row = {"tokens": n}
        for method in args.methods:
            make_cache = set_method(model, method)
            trials = args.trials if n <= args.trials_up_to else 1
            runs = [prefill(model, make_cache, n, vocab) for _ in range(trials)]
            row[method] = {
                "seconds": min(r["seconds"] for r in runs),
                "seconds_all": [r["seconds"] for r in runs],
                "peak_gb": max(r["peak_gb"] for r in runs),
                "peak_gb_all": [r["peak_gb"] for r in runs],
                "path": runs[-1]["path"],
                "base_gb": runs[-1]["base_gb"],
                "peak_gb_steps": runs[-1]["peak_gb_steps"],
            }
        rows.append(row)
        cells = [f"{n:>7} tok"]
        for method in args.methods:
            r = row[method]
            cells.append(f"{method} {r['seconds']:7.3f} s {r['peak_gb']:6.3f} GB")
        if "dense" in row and "dhsa" in row:
            cells.append(f"speedup {row['dense']['seconds'] / row['dhsa']['seconds']:4.2f}x")
        if "floor" in row and "dhsa" in row:
            cells.append(f"mem/floor {row['dhsa']['peak_gb'] / row['floor']['peak_gb']:4.2f}")
        print(" | ".join(cells), flush=True)
        if args.json:  # after every length, so a run cut short keeps what it measured
            report = {
                "env": environment(model=f"{args.model} (random weights)", dtype=args.dtype),
                "bench": "prefill",
                "prefill_step_size": 2048,
                "memory_limit_gb": args.memory_limit,
                "rows": rows,
            }
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
