"""Decode ablation: which part of the sparse decode step costs what, in one process.

gemma-2-2b shapes with random weights, the caches filled with ``--context`` random keys.
Variants (dense mlx-lm, DHSA, DHSA with one kernel setting changed) decode in turn for
``--trials`` rounds, each through mlx-lm's ``generate_step`` and with a blocking eval per
token; medians of tokens/s and of the host time to build one step's graph.

    python scripts/profile_decode.py --context 131072 --trials 3 --json ablation.json
"""

import argparse
import json
import statistics

import mlx.core as mx

import mlx_dhsa
from mlx_dhsa import kernels
from mlx_dhsa.device import device_tuning
from mlx_dhsa.kernels import attention as launches
from mlx_dhsa.kernels import planning
from mlx_dhsa.cli.profiling import SHAPES, random_model

from bench_decode import decode, decode_sync, filled_caches
from bench_prefill import set_method

def _reused_plans():
    """kernels.run_plan that plans each layer once and then returns that plan: what a decode
    step costs without its planning (scores + selection)."""
    plans, run = {}, kernels.run_plan

    def run_plan(launch, queries, table, config, *, state=None, **kw):
        key = id(state)  # one per layer
        if key not in plans:
            plans[key] = run(launch, queries, table, config, state=state, **kw)
        return plans[key]

    return run_plan


def _tuned(groups: int):
    """The device's tuning with ``decode_groups`` changed."""
    return device_tuning()._replace(decode_groups=groups)


def _fresh(values, dtype=mx.int32):
    return mx.array(tuple(values), dtype)


# name -> {(object, attribute): value} (None: the unpatched mlx-lm model)
VARIANTS = {
    "dense": None,
    "dhsa": {},
    "dhsa, 128 decode groups": {(launches, "device_tuning"): lambda: _tuned(128)},
    "dhsa, merge launched": {(kernels.backend(), "fold_decode"): False},
    "dhsa, select_keys 256 threads": {(planning, "SELECT_THREADS"): 256},
    "dhsa, plan reused (no planning)": {(kernels, "run_plan"): _reused_plans()},
    "dhsa, fresh parameter arrays": {(launches, "params"): _fresh, (planning, "params"): _fresh},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--decode-dense-below", type=int, default=0,
                   help="DHSAConfig.decode_dense_below (0: global layers decode sparsely)")
    p.add_argument("--model", default="gemma-2-2b", choices=sorted(SHAPES),
                   help="architecture of the random-weight model (tiny: a smoke test)")
    p.add_argument("--cprofile", type=int, default=0, metavar="STEPS",
                   help="instead: profile the host side of STEPS DHSA decode steps (cProfile)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    config = mlx_dhsa.DHSAConfig(decode_dense_below=args.decode_dense_below)
    model = random_model(args.model, mx.bfloat16)
    caches = filled_caches(model, ("dense", "dhsa"), args.context, mx.bfloat16, config)
    set_method(model, "dhsa", config)
    if args.cprofile:
        import cProfile
        import pstats

        decode_sync(model, caches["dhsa"], 4)
        prof, tok = cProfile.Profile(), mx.array([[1]])
        for _ in range(args.cprofile):  # graph building only; the eval stays outside
            prof.enable()
            out = model(tok, cache=caches["dhsa"])
            prof.disable()
            mx.eval(out)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    defaults = {k: getattr(*k) for v in VARIANTS.values() if v for k in v}
    runs = {name: {"tps": [], "sync_tps": [], "build_ms": []} for name in args.variants}
    for trial in range(args.trials):
        for name in args.variants if trial % 2 == 0 else args.variants[::-1]:
            settings = VARIANTS[name]
            method = "dense" if settings is None else "dhsa"
            set_method(model, method, config)
            for (obj, attr), v in {**defaults, **(settings or {})}.items():
                setattr(obj, attr, v)
            cache = caches[method]
            runs[name]["tps"].append(decode(model, cache, args.steps, args.warmup))
            sync_tps, build_ms = decode_sync(model, cache, args.steps)
            runs[name]["sync_tps"].append(sync_tps)
            runs[name]["build_ms"].append(build_ms)
    rows = []
    for name in args.variants:
        row = {"variant": name, **{k: statistics.median(v) for k, v in runs[name].items()},
               "runs": runs[name]}
        rows.append(row)
        print(f"{name:<34} {row['tps']:6.1f} tok/s (sync {row['sync_tps']:6.1f}) "
              f"build {row['build_ms']:.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "steps": args.steps, "trials": args.trials,
                       "device": str(mx.default_device()), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
