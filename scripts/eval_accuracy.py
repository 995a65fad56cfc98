"""Accuracy harness: DHSA against dense attention, the baselines and the oracles on real models.

Three measurements, every method on the same seeded samples (``mlx_dhsa.evaluation``):
1. mass: per layer and query block, the share of the dense attention mass each plan keeps,
   over prefill blocks and single-query decode plans, beside the chunk oracle and the
   key-level oracle (the ceiling at each budget); cheap and low-variance.
2. tasks: single-needle NIAH, multi-key NIAH, multi-value NIAH and cloze QA on the essays,
   greedy answers scored right/wrong, each cell with a bootstrap 95% interval and n.
3. perplexity by position on held-out essays (relative to dense, paired intervals).
Two settings: ``default`` (decode_dense_below as shipped) and ``sparse`` (sparse decode
forced, decode_dense_below=0). Writes OUT/results.jsonl (rows as they come), OUT/results.json,
OUT/results.md (tables) and OUT/mass.png.

    # the short CPU variant (CI-sized)
    python scripts/eval_accuracy.py --quick --out /tmp/acc
    # the full grid of issue 16 on a GPU (see docs/accuracy/README.md)
    python scripts/eval_accuracy.py --models gemma-3-270m,smollm2-135m \
        --contexts 1024,2048,4096,8192,16384 --budgets 512,1024,2048 --out acc
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_dhsa import DHSAConfig, load
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.methods import METHODS
from mlx_dhsa.evaluation.report import render
from mlx_dhsa.evaluation.runinfo import environment, model_dtype
from mlx_dhsa.evaluation.runner import (
    held_out_windows,
    mass_configs,
    run_mass,
    run_perplexity,
    run_tasks,
)
from mlx_dhsa.evaluation.tasks import TASKS, build_samples, split_tokens
from mlx_dhsa.patching import patch, unpatch

SETTINGS = {
    "default": {"decode_dense_below": DHSAConfig().decode_dense_below},
    "sparse": {"decode_dense_below": 0},
}
QUICK = dict(models="gemma-3-270m", contexts="2048", budgets="512", task_budgets="512",
             methods="dhsa,block_sparse", settings="sparse", samples=4, mass_samples=1,
             n_decode=4, ppl_context=2048, ppl_windows=1, tasks="niah,multikey")  # fmt: skip


def ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise SystemExit(f"{flag} takes positive integers, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models",
        default="gemma-3-270m",
        help="comma-separated model names (gemma-3-270m, smollm2-135m) or directories",
    )
    p.add_argument(
        "--model", default=None, help="one converted mlx-lm directory (overrides --models)"
    )
    p.add_argument("--haystack", type=Path, default=None, help="directory of essay .txt files")
    p.add_argument(
        "--methods",
        default="dhsa,block_sparse,oracle",
        help=f"sparse methods ({', '.join(m for m in METHODS if m != 'dense')}); "
        "dense always runs",
    )
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--task-methods", default=None, help="methods of tasks (default: --methods)")
    p.add_argument("--task-contexts", default=None, help="contexts of tasks (default: --contexts)")
    p.add_argument(
        "--mass-max-layers",
        type=int,
        default=None,
        help="diagnose at most this many patched layers, evenly spaced (default: all)",
    )
    p.add_argument("--budgets", default="512,1024", help="budgets of the mass diagnostic")
    p.add_argument("--task-budgets", default=None, help="budgets of the tasks (default: --budgets)")
    p.add_argument("--settings", default="default,sparse", help=f"of {', '.join(SETTINGS)}")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--samples", type=int, default=20, help="samples per task and context")
    p.add_argument("--mass-samples", type=int, default=2, help="prompts per context for mass")
    p.add_argument("--n-decode", type=int, default=16, help="decode positions per mass prompt")
    p.add_argument("--ppl-budgets", default=None, help="budgets of perplexity (default: tasks')")
    p.add_argument("--ppl-context", type=int, default=4096)
    p.add_argument("--ppl-windows", type=int, default=4, help="0 skips perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="default: float32 on CPU, the checkpoint's on GPU",
    )
    p.add_argument("--use-kernel", action="store_true", help="GPU kernels (else the reference)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: mass,tasks,ppl")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds, shared equally by the models; no new context starts after",
    )
    p.add_argument("--quick", action="store_true", help="the short CPU variant (CI-sized)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report-only", action="store_true", help="render OUT/results.jsonl")
    args = p.parse_args(argv)  # fmt: skip
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.model:
        args.models = args.model
    args.contexts = ints(args.contexts, "--contexts")
    args.budgets = ints(args.budgets, "--budgets")
    args.task_contexts = (
        ints(args.task_contexts, "--task-contexts") if args.task_contexts else args.contexts
    )
    args.task_methods = args.task_methods or args.methods
    args.task_budgets = (
        ints(args.task_budgets, "--task-budgets") if args.task_budgets else args.budgets
    )
    args.ppl_budgets = (
        ints(args.ppl_budgets, "--ppl-budgets") if args.ppl_budgets else args.task_budgets
    )
    args.settings = [s for s in args.settings.split(",") if s]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    for name in (m for m in f"{args.methods},{args.task_methods}".split(",") if m):
        if name not in METHODS or METHODS[name] is None:
            raise SystemExit(f"--methods: unknown sparse method {name!r}; choose from "
                             f"{', '.join(m for m in METHODS if METHODS[m] is not None)}")  # fmt: skip
    return args


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "results.jsonl"
    if args.report_only:
        rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        print(render(args.out, rows))
        return
    tic = time.perf_counter()
    deadline = tic + args.time_budget if args.time_budget else math.inf
    rows: list[dict] = []
    with log_path.open("w") as log_file:

        def log(row):
            rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            short = {
                k: v
                for k, v in row.items()
                if k not in ("reply", "shares", "segment_nll", "answers", "environment")
            }
            print(json.dumps(short), flush=True)  # fmt: skip

        log(
            dict(
                kind="meta",
                environment=environment(),
                args={k: str(v) for k, v in vars(args).items()},
            )
        )
        names = [m for m in args.models.split(",") if m]
        for i, model_name in enumerate(names):
            # Each model gets an equal share of what is left of the time budget.
            left = deadline - time.perf_counter()
            run_model(model_name, args, log, time.perf_counter() + left / (len(names) - i))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(render(args.out, rows))
    print(f"total {time.perf_counter() - tic:.0f} s", flush=True)


def run_model(model_name: str, args, log, deadline: float) -> None:
    model, tokenizer = load(model_name, patch=False)
    dtype = args.dtype or ("float32" if mx.default_device() == mx.cpu else None)
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    name = Path(model_name).name
    log(dict(kind="model", model=name, dtype=model_dtype(model)))
    ids = tokenizer.encode(niah.read_haystack(args.haystack), add_special_tokens=False)
    task_ids, held_out = split_tokens(ids)
    base = DHSAConfig(use_kernel=args.use_kernel)
    methods = {m: base.replace(**METHODS[m]) for m in args.methods.split(",") if m}
    task_methods = {m: base.replace(**METHODS[m]) for m in args.task_methods.split(",") if m}

    def tag(row):
        return log({**row, "model": name})

    if "ppl" not in args.skip and args.ppl_windows:
        windows = held_out_windows(held_out, args.ppl_context, args.ppl_windows,
                                   tokenizer.bos_token_id, args.seed)  # fmt: skip
        unpatch(model)
        run_perplexity(model, windows, method="dense", log=tag)
        for m, config in task_methods.items():
            for b in args.ppl_budgets:
                patch(model, config.replace(budget=b))
                run_perplexity(model, windows, method=f"{m}@{b}", log=tag)
                unpatch(model)
    order = args.contexts + [c for c in args.task_contexts if c not in args.contexts]
    for context in order:
        if time.perf_counter() > deadline:
            print(f"time budget spent: skipping {name} from context {context}", flush=True)
            break
        samples = build_samples(tokenizer, task_ids, tasks=args.tasks, contexts=[context],
                                n=args.samples, seed=args.seed)  # fmt: skip
        if "mass" not in args.skip and args.mass_samples and context in args.contexts:
            prompts = [s.prompt for s in samples if s.task in ("multikey", "niah")]
            prompts = (prompts or [s.prompt for s in samples])[: args.mass_samples]
            configs = {m: c.replace(decode_dense_below=0) for m, c in methods.items()}
            run_mass(model, prompts, mass_configs(configs, args.budgets),
                     settings={s: SETTINGS[s] for s in args.settings}, n_decode=args.n_decode,
                     context=context, max_layers=args.mass_max_layers, log=tag)  # fmt: skip
        if "tasks" in args.skip or context not in args.task_contexts:
            continue
        unpatch(model)
        run_tasks(model, tokenizer, samples, method="dense", setting="-", log=tag)
        for setting in args.settings:
            for m, config in task_methods.items():
                for b in args.task_budgets:
                    if time.perf_counter() > deadline:
                        print(f"time budget spent: skipping {name} {setting} {m}@{b} tasks at "
                              f"{context}", flush=True)  # fmt: skip
                        continue
                    patch(model, config.replace(budget=b, **SETTINGS[setting]))
                    run_tasks(model, tokenizer, samples, method=f"{m}@{b}", setting=setting,
                              log=tag)  # fmt: skip
                    unpatch(model)
        mx.clear_cache()


if __name__ == "__main__":
    sys.exit(main())
