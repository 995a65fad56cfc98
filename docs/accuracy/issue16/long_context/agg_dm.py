import json
import sys

import numpy as np


def boot(x, n=2000, seed=0):
    x = np.asarray(x, float)
    r = np.random.default_rng(seed)
    m = x[r.integers(0, len(x), (n, len(x)))].mean(1)
    return f"{x.mean():.3f} [{np.percentile(m, 2.5):.3f}, {np.percentile(m, 97.5):.3f}]"


rows = json.load(open(sys.argv[1]))
methods = list(dict.fromkeys(r["method"] for r in rows))
for kind in ("answer", "harness"):
    rr = [r for r in rows if r["kind"] == kind]
    n = len([r for r in rr if r["method"] == "dhsa"])
    print(f"## {kind} positions, n={n} (steps x layers x prompts)")
    key = {(r["file"], r["layer"], r["p"]): r["share"] for r in rr if r["method"] == "dhsa"}
    for m in methods:
        x = [r["share"] for r in rr if r["method"] == m]
        d = [r["share"] - key[(r["file"], r["layer"], r["p"])] for r in rr if r["method"] == m]
        imp = [
            r["vkept"]
            for r in rr
            if r["method"] == m and r["vmass"] >= 0.02 and r["vkept"] is not None
        ]
        miss = sum(v < 0.5 for v in imp)
        print(
            f"| {m} | {boot(x)} | {boot(d) if m != 'dhsa' else '-'} | "
            + (f"{boot(imp)} | {miss}/{len(imp)} |" if imp else "- | - |")
        )
