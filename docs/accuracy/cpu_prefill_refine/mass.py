"""Attention mass kept by DHSA, the oracles and prefill_refine variants (prefill blocks).

python mass.py TASK CONTEXT SEED BUDGET INDICES F/S,... [MODEL] e.g.
python mass.py multikey 8192 3 1024 2 2/1,4/1,4/8,4/32,4/128,8/8 (F/S: prefill_refine /
refine_stride). /tmp/essays as in answers.py.
"""

import sys

import mlx.core as mx

from mlx_dhsa import DHSAConfig
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import capture, layer_mass
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.loading import load

task, ctx, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idxs = [int(x) for x in sys.argv[5].split(",")]
variants = [tuple(int(y) for y in x.split("/")) for x in sys.argv[6].split(",")]
model, tok = load(sys.argv[7] if len(sys.argv) > 7 else "gemma-3-270m", patch=False)
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
samples = build_samples(tok, task_ids, tasks=[task], contexts=[ctx], n=max(idxs) + 1, seed=seed)
base = DHSAConfig(budget=budget, decode_dense_below=0)
configs = {"dhsa": base, "oracle": base.replace(method="oracle"), f"key_oracle@{budget}": None}
configs.update({f"pr{f}/{s}": base.replace(prefill_refine=f, refine_stride=s) for f, s in variants})
res = {}
for i in idxs:
    for layer in capture(model, samples[i].prompt):
        out = {r.method: r.shares for r in layer_mass(layer, configs) if r.phase == "prefill"}
        for k, v in out.items():
            res.setdefault(k, []).extend(v)
        print(i, layer.layer, {k: round(sum(v) / len(v), 4) for k, v in out.items()}, flush=True)
print("ALL", {k: round(sum(v) / len(v), 4) for k, v in res.items()}, len(res["dhsa"]))
