"""Accuracy of DHSA against dense attention and the baselines on a real model.

Needle in a haystack (the original test's Paul Graham essays and needle, scored by
``mlx_dhsa.evaluation.niah``) over context lengths x depths, and perplexity on held-out essays (the
essays at the end of the sorted list; NIAH's haystack is read from the start), for every
method in one process. Writes ``results.json`` (all raw results), ``results.md`` (tables) and
one heatmap PNG per method; ``results.jsonl`` grows as results arrive, so an interrupted run
keeps what it measured (``--report-only`` renders the tables from it).

    python scripts/eval_accuracy.py --model gemma-3-270m --out results/accuracy
    python scripts/eval_accuracy.py --contexts 1024,2048 --depths 0,50,100 \
        --methods dense,dhsa@512,block_sparse@512,streaming@512 --ppl-context 2048 --out /tmp/a
"""

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from mlx_dhsa import DHSAConfig, load
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.methods import Method, parse_methods
from mlx_dhsa.evaluation.perplexity import next_token_stats
from mlx_dhsa.evaluation.runinfo import environment, model_dtype

DEFAULT_METHODS = "dense,dhsa@1024,block_sparse@1024,streaming@1024,dhsa@512,dhsa@2048,oracle@1024"


def held_out_tokens(tokenizer, haystack: Path | None, n: int) -> list[int]:
    """``n`` tokens of the essays read from the end of the sorted list (disjoint from the
    NIAH haystack's first tokens)."""
    d = Path(haystack) if haystack else niah.haystack_dir()
    text = "".join(f.read_text(encoding="utf-8") for f in sorted(d.glob("*.txt"), reverse=True))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"held-out essays have {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def run_perplexity(model, tokenizer, methods, args, log) -> list[dict]:
    ids = held_out_tokens(tokenizer, args.haystack, args.ppl_context * args.ppl_windows)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    windows = [
        bos + ids[i * args.ppl_context : (i + 1) * args.ppl_context][: args.ppl_context - len(bos)]
        for i in range(args.ppl_windows)
    ]
    rows = []
    for m in methods:
        m.apply(model)
        tic = time.perf_counter()
        nll = [next_token_stats(model, mx.array(w)[None])[0] for w in windows]
        half = args.ppl_context // 2
        row = dict(
            kind="ppl", method=m.label, context=args.ppl_context, windows=args.ppl_windows,
            ppl=math.exp(mx.concatenate(nll).mean().item()),
            ppl_second_half=math.exp(mx.concatenate([x[half:] for x in nll]).mean().item()),
            seconds=time.perf_counter() - tic,
        )  # fmt: skip
        rows.append(row)
        log(row)
    Method("dense", None).apply(model)
    return rows


def run_niah(model, tokenizer, methods, args, log, deadline) -> list[dict]:
    haystack = niah.read_haystack(args.haystack)
    template = {"auto": None, "on": True, "off": False}[args.template]
    rows = []
    for c in args.contexts:
        if time.perf_counter() > deadline:
            print(f"time budget spent: skipping contexts from {c}", flush=True)
            break
        report = niah.run(
            model, tokenizer, haystack=haystack, methods=methods, contexts=[c],
            depths=args.depths, max_tokens=args.max_tokens, template=template,
            on_result=lambda r: (rows.append(dict(kind="niah", **asdict(r))), log(rows[-1])),
        )  # fmt: skip
        del report
    return rows


def render(out: Path, meta: dict, rows: list[dict], plots: bool = True) -> str:
    """Tables (markdown) from the raw rows; heatmap PNGs per method when ``plots``."""
    labels = [m["label"] for m in meta["methods"]]
    nrows = [r for r in rows if r["kind"] == "niah"]
    contexts = sorted({r["context"] for r in nrows})
    depths = sorted({r["depth"] for r in nrows})
    lines = [f"Model `{meta['model']}`, {meta['environment'].get('device', '')}, "
             f"dtype {meta['dtype']}, attention path: {meta['attention_path']}.", ""]  # fmt: skip
    if nrows:
        lines += [f"**NIAH** (mean score over depths {', '.join(f'{d:g}%' for d in depths)}; "
                  "score = fraction of the answer's words in the greedy reply)", "",
                  "| method | " + " | ".join(str(c) for c in contexts) + " | mean |",
                  "|---" * (len(contexts) + 2) + "|"]  # fmt: skip
        for label in labels:
            by_c = {c: [r["score"] for r in nrows if r["method"] == label and r["context"] == c]
                    for c in contexts}  # fmt: skip
            cells = [f"{statistics.fmean(v):.2f}" if v else "-" for v in by_c.values()]
            scores = [s for v in by_c.values() for s in v]
            mean = f"{statistics.fmean(scores):.3f}" if scores else "-"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    prows = [r for r in rows if r["kind"] == "ppl"]
    if prows:
        dense = next((r for r in prows if r["method"] == "dense"), None)
        rel = lambda r, k: f" ({100 * (r[k] / dense[k] - 1):+.1f}%)" if dense else ""  # noqa: E731
        p = prows[0]
        lines += [f"**Perplexity** on held-out essays ({p['windows']} windows of {p['context']} "
                  "tokens, one forward each; second half = positions past the middle)", "",
                  "| method | ppl | ppl, second half |", "|---|---|---|"]  # fmt: skip
        for r in prows:
            lines.append(f"| {r['method']} | {r['ppl']:.3f}{rel(r, 'ppl')} | "
                         f"{r['ppl_second_half']:.3f}{rel(r, 'ppl_second_half')} |")  # fmt: skip
        lines.append("")
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    if plots and nrows:
        report = niah.NIAHReport(meta["environment"], [Method(l, None) for l in labels],
                                 contexts, depths,
                                 [niah.NIAHResult(**{k: v for k, v in r.items() if k != "kind"})
                                  for r in nrows])  # fmt: skip
        for label in labels:
            if any(r["method"] == label for r in nrows):
                niah.heatmap(report, label, out / f"niah_{label.replace('@', '_')}.png")
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument(
        "--template",
        choices=("auto", "on", "off"),
        default="off",
        help="chat template for NIAH prompts (off: 'Question: ... Answer:', for base models)",
    )
    p.add_argument("--ppl-context", type=int, default=4096)
    p.add_argument("--ppl-windows", type=int, default=4, help="0 skips perplexity")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="default: float32 on CPU, the checkpoint's on GPU",
    )
    p.add_argument("--use-kernel", action="store_true", help="GPU kernels instead of the reference")
    p.add_argument(
        "--decode-dense-below",
        type=int,
        default=DHSAConfig().decode_dense_below,
        help="decode stays dense up to this many keys (0: sparse decode, tests the selection)",
    )
    p.add_argument("--haystack", type=Path, default=None)
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds; stop starting contexts after"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report-only", action="store_true", help="render from OUT/results.jsonl")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "results.jsonl"
    if args.report_only:
        lines = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
        print(render(args.out, lines[0], lines[1:], plots=not args.no_plots))
        return
    args.contexts = [int(c) for c in args.contexts.split(",") if c]  # "": perplexity only
    args.depths = [float(d) for d in args.depths.split(",")]
    tic = time.perf_counter()
    deadline = tic + args.time_budget if args.time_budget else math.inf
    model, tokenizer = load(args.model, patch=False)
    dtype = args.dtype or ("float32" if mx.default_device() == mx.cpu else None)
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    base = DHSAConfig(use_kernel=args.use_kernel, decode_dense_below=args.decode_dense_below)
    methods = parse_methods(args.methods, base)
    meta = dict(
        kind="meta", model=args.model, dtype=model_dtype(model), methods=[m.as_dict() for m in methods],
        environment=environment(), attention_path="kernel" if args.use_kernel else "reference",
        args={k: str(v) for k, v in vars(args).items()},
    )  # fmt: skip
    with log_path.open("w") as log_file:

        def log(row):
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "reply"}), flush=True)

        log(meta)
        rows = run_perplexity(model, tokenizer, methods, args, log) if args.ppl_windows else []
        rows += run_niah(model, tokenizer, methods, args, log, deadline)
    (args.out / "results.json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    print(render(args.out, meta, rows, plots=not args.no_plots))
    print(f"total {time.perf_counter() - tic:.0f} s", flush=True)


if __name__ == "__main__":
    main()
