"""Attention mass kept by DHSA's plans with DHSAConfig.key_spread (the built planner: the
harness's evaluation.mass.layer_mass, pure MLX, float32), every prefill block and 8 decode
steps in the prompt's second half, per layer; block-sparse and the oracles beside it.

python ks.py TASK CONTEXT SEED BUDGET INDICES SPREADS [MODEL] [LAYERS] [oracle,key_oracle,bs]
e.g. python ks.py multikey 8192 3 1024 2 0,1,2 gemma-3-270m 0,1,2 oracle,key_oracle,bs
(from /tmp, essays in /tmp/essays).
"""

import sys

import mlx.core as mx
import numpy as np

from mlx_dhsa import DHSAConfig
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import capture, layer_mass
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.loading import load

task, ctx, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idxs = [int(x) for x in sys.argv[5].split(",")]
spreads = [float(a) for a in sys.argv[6].split(",")]
model, tok = load(sys.argv[7] if len(sys.argv) > 7 else "gemma-3-270m", patch=False)
layers_kept = None if len(sys.argv) <= 8 else {int(x) for x in sys.argv[8].split(",")}
extra = sys.argv[9].split(",") if len(sys.argv) > 9 else []
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
samples = build_samples(tok, task_ids, tasks=[task], contexts=[ctx], n=max(idxs) + 1, seed=seed)
base = DHSAConfig(budget=budget, decode_dense_below=0)
configs = {f"spread{a}": base.replace(key_spread=a) for a in spreads}
if "oracle" in extra:
    configs["oracle"] = base.replace(method="oracle")
if "key_oracle" in extra:
    configs[f"key_oracle@{budget}"] = None
if "bs" in extra:
    configs["block_sparse"] = base.replace(method="block_sparse")
res = {}
L = len(samples[idxs[0]].prompt)
for i in idxs:
    for layer in capture(model, samples[i].prompt):
        if layers_kept is not None and layer.layer not in layers_kept:
            continue
        dec = [L // 2 + j * (L // 2) // 8 for j in range(8)]
        for r in layer_mass(layer, configs, decode_positions=dec):
            res.setdefault((r.method, r.phase), []).extend(r.shares)
        print(
            i,
            layer.layer,
            {f"{k[0]}/{k[1]}": round(sum(v) / len(v), 4) for k, v in res.items()},
            flush=True,
        )
for k, v in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print("ALL", k[1], k[0], round(sum(v) / len(v), 4), len(v))
# Paired differences to the first spread, over the same blocks / steps: bootstrap 95% intervals.
rng = np.random.default_rng(0)
first = f"spread{spreads[0]}"
for (name, phase), v in sorted(res.items()):
    if name == first:
        continue
    d = np.array(v) - np.array(res[(first, phase)])
    boot = d[rng.integers(0, len(d), (2000, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print("PAIRED", phase, f"{name} - {first}", f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]", len(d))
