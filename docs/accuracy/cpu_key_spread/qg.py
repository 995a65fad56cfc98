"""Prefill mass: where is the ranking loss? Chunks scored by estimated attention mass against
their mean keys (scoring="softmax", and "softmax_spread" with the per-KV-head key variance)
with 1, 8 or 128 representatives per block and head (128: every query exactly), beside DHSA
(the paper's score) and the chunk oracle. Before stop 33 (key_spread 0).

python qg.py TASK CONTEXT SEED BUDGET INDICES [MODEL]   e.g. multikey 4096 3 1024 2
(from /tmp, essays in /tmp/essays)."""

import sys

import mlx.core as mx

from mlx_dhsa import DHSAConfig
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import capture, layer_mass
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.loading import load

task, ctx, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idxs = [int(x) for x in sys.argv[5].split(",")]
model, tok = load(sys.argv[6] if len(sys.argv) > 6 else "gemma-3-270m", patch=False)
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
samples = build_samples(tok, task_ids, tasks=[task], contexts=[ctx], n=max(idxs) + 1, seed=seed)
base = DHSAConfig(budget=budget, decode_dense_below=0, key_spread=0.0)
configs = {"dhsa": base, "oracle": base.replace(method="oracle"), f"key_oracle@{budget}": None}
for g in (1, 8, 128):
    configs[f"softmax_g{g}"] = base.replace(scoring="softmax", query_groups=g)
    configs[f"spread_g{g}"] = base.replace(scoring="softmax_spread", query_groups=g)
res = {}
for i in idxs:
    for layer in capture(model, samples[i].prompt):
        out = {r.method: r.shares for r in layer_mass(layer, configs) if r.phase == "prefill"}
        for k, v in out.items():
            res.setdefault(k, []).extend(v)
        print(i, layer.layer, {k: round(sum(v) / len(v), 4) for k, v in out.items()}, flush=True)
print("ALL", {k: round(sum(v) / len(v), 4) for k, v in res.items()}, len(res["dhsa"]))
