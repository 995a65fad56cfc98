"""Paired perplexity ratio of two methods over the same 128-position segments of harness runs
(eval_accuracy.py's ppl rows, in every *.jsonl here; the windows of each run's seed, pooled
over seeds), bootstrap 95% interval.
python ppl_paired.py METHOD BASE"""

import json
import sys
from pathlib import Path

import numpy as np

nll = {}  # (seed, method) -> per-segment NLL
for path in sorted(Path(__file__).parent.glob("*.jsonl")):
    rows = [json.loads(line) for line in open(path)]
    seed = next(r["args"]["seed"] for r in rows if r["kind"] == "meta")
    for r in rows:
        if r["kind"] == "ppl":
            nll[seed, r["method"]] = np.array(r["segment_nll"], dtype=np.float64).ravel()
method, base = sys.argv[1], sys.argv[2]
seeds = sorted(s for s, m in nll if m == method and (s, base) in nll)
d = np.concatenate([nll[s, method] - nll[s, base] for s in seeds])
rng = np.random.default_rng(0)
boot = d[rng.integers(0, len(d), (5000, len(d)))].mean(axis=1)
lo, hi = np.exp(np.percentile(boot, [2.5, 97.5])) - 1
print(
    f"{method} / {base}: {np.exp(d.mean()) - 1:+.2%} [{lo:+.2%}, {hi:+.2%}] "
    f"(n={len(d)} segments, seeds {', '.join(seeds)})"
)
