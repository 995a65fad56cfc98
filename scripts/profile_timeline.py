"""GPU timeline of decode steps: where a token's time goes, from CUDA's own trace.

mlx-lm decode is bound by host work on fast GPUs, so tokens/s alone cannot say which part of
a step costs what. This traces ``--steps`` decode steps of each method through mlx-lm's
``generate_step`` with ``torch.profiler`` (CUPTI sees every kernel and CUDA API call of the
process, MLX's included) and prints, per method and token: wall time, GPU kernel time, the
number of kernels, and the CUDA API calls that cost the host the most (graph instantiation,
launches, stream captures). CUDA only; needs a CUDA build of PyTorch beside MLX's CUDA
backend. gemma-2-2b shapes with random weights, the caches filled with ``--context`` keys.

    python scripts/profile_timeline.py --context 16384 --methods dense dhsa_sparse floor
"""

import argparse
import json
import time
from collections import defaultdict

import mlx.core as mx

import mlx_dhsa
from mlx_dhsa.cli.profiling import SHAPES, random_model

from bench_decode import decode_gaps, decode_methods, filled_caches
from bench_prefill import set_method


def require_cupti(script: str) -> None:
    """Exit with what ``script`` needs unless MLX runs on CUDA beside a CUDA build of PyTorch."""
    try:
        import torch
    except ImportError:
        torch = None
    if not mx.cuda.is_available() or torch is None or not torch.cuda.is_available():
        raise SystemExit(f"{script} needs MLX's CUDA backend and a CUDA build of PyTorch (for "
                         "its CUPTI profiler); on a Mac, use Xcode's Metal trace")


def profiled(fn, host: bool = True):
    """Run fn under torch.profiler: (seconds, events), CUDA API calls too when ``host``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    activities = [ProfilerActivity.CPU] * host + [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        tic = time.perf_counter()
        fn()
        seconds = time.perf_counter() - tic
    return seconds, prof.events()


def trace(fn):
    """Run fn under torch.profiler; returns (seconds, kernel events, CUDA API events)."""
    seconds, events = profiled(fn)
    kernels, api = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    for e in events:
        us = e.time_range.elapsed_us()
        table = kernels if e.device_type.name == "CUDA" else api
        table[e.name][0] += 1
        table[e.name][1] += us
    return seconds, kernels, api


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=["dense", "dhsa", "dhsa_sparse", "floor"],
                   choices=["dense", "dhsa", "dhsa_sparse", "floor"])
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--model", default="gemma-2-2b", choices=sorted(SHAPES))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    require_cupti("profile_timeline")
    config = mlx_dhsa.DHSAConfig()
    methods = {m: decode_methods(config)[m] for m in args.methods}
    model = random_model(args.model, mx.bfloat16)
    caches = filled_caches(model, methods, args.context, mx.bfloat16, config)
    report = {"context": args.context, "steps": args.steps, "methods": {}}
    for m, (kind, cfg) in methods.items():
        set_method(model, kind, cfg)
        decode_gaps(model, caches[m], 8, 2)  # warm-up: JIT and graph caches
        seconds, kernels, api = trace(lambda: decode_gaps(model, caches[m], args.steps, 0))
        n = args.steps + 1  # generate_step evaluates one step ahead
        gpu_us = sum(us for _, us in kernels.values())
        launches = sum(c for c, _ in kernels.values())
        print(f"\n== {m}: {seconds / args.steps * 1e3:.2f} ms/token wall, GPU kernels "
              f"{gpu_us / n / 1e3:.2f} ms/token in {launches / n:.0f} kernels", flush=True)
        top_api = sorted(api.items(), key=lambda kv: -kv[1][1])[: args.top]
        for name, (count, us) in top_api:
            print(f"   host {name[:60]:<60} {count / n:7.1f} x/token {us / n:9.1f} us/token")
        top_k = sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.top]
        for name, (count, us) in top_k:
            print(f"   gpu  {name[:60]:<60} {count / n:7.1f} x/token {us / n:9.1f} us/token")
        report["methods"][m] = {
            "ms_per_token": seconds / args.steps * 1e3, "gpu_ms_per_token": gpu_us / n / 1e3,
            "kernels_per_token": launches / n,
            "api": {k: v for k, v in top_api}, "kernels": {k: v for k, v in top_k}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
