"""Paired differences of a task run (eval_accuracy.py's results.jsonl): per task pooled over
contexts, and NIAH's mean over contexts against block-sparse's, bootstrap 95% intervals.
python paired.py RESULTS.jsonl [BASE=dense] [METHOD ...]"""

import json
import sys
from collections import defaultdict

from mlx_dhsa.evaluation.stats import bootstrap, paired_difference

rows = [json.loads(line) for line in open(sys.argv[1])]
rows = [r for r in rows if r["kind"] == "task"]
score = defaultdict(dict)  # method -> (task, context, index) -> score
for r in rows:
    score[r["method"]][(r["task"], r["context"], r["index"])] = r["score"]
base = sys.argv[2] if len(sys.argv) > 2 else "dense"
methods = sys.argv[3:] or [m for m in score if m != base]
tasks = sorted({k[0] for k in score[base]})
for m in methods:
    for task in tasks + ["all"]:
        keys = sorted(k for k in score[base] if task in ("all", k[0]) and k in score[m])
        a = [score[m][k] for k in keys]
        b = [score[base][k] for k in keys]
        won = sum(x > y for x, y in zip(a, b))
        lost = sum(x < y for x, y in zip(a, b))
        print(
            f"{m} - {base}, {task}: {paired_difference(a, b)} ("
            f"{m} {bootstrap(a)}, {base} {bootstrap(b)}; won {won}, lost {lost})"
        )
