"""Paired differences of attention mass kept between methods of a harness run (eval_accuracy.py's
mass rows), over the same blocks / decode steps, bootstrap 95% intervals.
python mass_paired.py RESULTS.jsonl METHOD BASE..."""

import json
import sys
from collections import defaultdict

from mlx_dhsa.evaluation.stats import paired_difference

shares = defaultdict(list)  # (method, context, phase) -> shares over layers and blocks
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] == "mass":
        shares[r["method"], r["context"], r["phase"]].extend(r["shares"])
method, bases = sys.argv[2], sys.argv[3:]
for (m, context, phase), a in sorted(shares.items(), key=lambda kv: (kv[0][2], kv[0][1])):
    if m != method:
        continue
    for base in bases:
        b = shares[base, context, phase]
        print(f"{context} {phase}: {method} - {base}: {paired_difference(a, b)}")
