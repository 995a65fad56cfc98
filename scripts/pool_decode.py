"""Pool the paired decode speedups of several bench_decode.py runs.

Host-bound decode moves with the speed of a shared host from one trial to the next (see
docs/benchmarks.md, decode), so one run's median is a sample of the host's speed then. This
reads ``bench_decode.py --json`` files, pairs each trial's DHSA tokens/s with the same trial's
dense tokens/s, and prints per context and DHSA method the median, quartiles and range of all
trials' ratios together, with the runs' own medians.

    python scripts/pool_decode.py benchmarks/h200/decode/decode*.json
"""

import argparse
import json
import statistics


def pooled(paths: list[str]) -> dict:
    """{(context, method): {"ratios": [...], "run_medians": [...]}} over the runs in ``paths``."""
    out = {}
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        for row in rows:
            runs = row["runs"]
            dense = runs["dense"]["tps"]
            for method in (m for m in runs if m.startswith("dhsa")):
                ratios = [a / b for a, b in zip(runs[method]["tps"], dense)]
                entry = out.setdefault((row["context"], method), {"ratios": [], "run_medians": []})
                entry["ratios"] += ratios
                entry["run_medians"].append(statistics.median(ratios))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="bench_decode.py JSON files")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    table = pooled(args.runs)
    rows = []
    print(
        f"{'context':>8} {'method':<12} {'trials':>6} {'median':>7} {'q1-q3':>12} "
        f"{'range':>12}  run medians"
    )
    for (context, method), entry in sorted(table.items()):
        r = sorted(entry["ratios"])
        q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0], r[0], r[0])
        row = {
            "context": context,
            "method": method,
            "trials": len(r),
            "median": statistics.median(r),
            "q1": q1,
            "q3": q3,
            "min": r[0],
            "max": r[-1],
            "run_medians": entry["run_medians"],
        }
        rows.append(row)
        print(
            f"{context:>8} {method:<12} {len(r):>6} {row['median']:6.2f}x "
            f"{q1:5.2f}-{q3:4.2f}x {r[0]:5.2f}-{r[-1]:4.2f}x  "
            + " ".join(f"{m:.2f}x" for m in entry["run_medians"])
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
