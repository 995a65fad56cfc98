"""Decode-only attention mass (the harness's functions) on captured Q/K: answer steps and
8 positions of the prompt's second half (the harness's decode positions)."""

import json
import sys

import mlx.core as mx
import numpy as np

from mlx_dhsa import DHSAConfig
from mlx_dhsa.evaluation.mass import (
    LayerQK,
    block_key_mass,
    kept_share,
    key_oracle_share,
    plan_layer,
)
from mlx_dhsa.evaluation.methods import METHODS

# usage: decode_mass.py BUDGET[:combo] /tmp/acc16/data_8192_0 ...  (run_sample.py's outputs)
spec, files = sys.argv[1], sys.argv[2:]
budget, combo = int(spec.split(":")[0]), spec.endswith(":combo")
base = DHSAConfig(budget=budget, decode_dense_below=0, use_kernel=False)
cfgs = {
    m: base.replace(**METHODS[m])
    for m in ("dhsa", "dhsa_open", "block_sparse", "oracle", "dhsa_refine2", "dhsa_refine")
}
cfgs["dhsa_cap4"] = base.replace(chunk_cap=4)
cfgs["dhsa_softmax"] = base.replace(scoring="softmax")
if combo:  # the refine combinations of table 1
    cfgs = {m: base.replace(**METHODS[m]) for m in ("dhsa", "dhsa_refine")}
    cfgs["dhsa_refine_softmax"] = base.replace(decode_refine=4, scoring="softmax")
    cfgs["dhsa_refine_maxhead"] = base.replace(decode_refine=4, head_scores="max")
cfgs["key_oracle"] = None
out = []
for f in files:
    meta = json.load(open(f + ".json"))
    z = np.load(f + ".npz")
    P, n = meta["P"], len(meta["ans"])
    S = P
    step = max(1, (S - S // 2) // 8)
    harness = list(range(S - 1, S // 2, -step))[:8]
    answer = list(range(P - 1, P - 1 + n))
    for l in range(3):
        Q, K = mx.array(z[f"q{l}"]), mx.array(z[f"k{l}"])
        layer = LayerQK(l, Q, K, 1 / 16, None, 4, 1)
        for kind, positions in (("answer", answer), ("harness", harness[1:])):
            for p in positions:
                qp, kp = Q[:, :, p : p + 1], K[:, :, : p + 1]
                m = block_key_mass(qp, kp, offset=p, block_size=1, scale=1 / 16, softcap=None)
                w = mx.array([4.0])
                v0, v1 = meta["v0"], meta["v1"]
                vm = float(m[0, 0, v0:v1].sum().item()) / 4 if v1 <= p + 1 else 0.0
                for name, c in cfgs.items():
                    if c is None:
                        s = key_oracle_share(m, budget, w)
                    else:
                        plan = plan_layer(c, layer, qp, kp, p)
                        s = kept_share(plan, m, w)
                        idx = np.array(plan.indices[0, 0])[: int(plan.n_valid[0, 0].item())]
                        mk = np.array(m[0, 0])
                        vk = (
                            float(mk[idx[(idx >= v0) & (idx < v1)]].sum()) / 4 / vm
                            if vm > 0
                            else 1.0
                        )
                    out.append(
                        dict(
                            file=f,
                            layer=l,
                            kind=kind,
                            p=p,
                            method=name,
                            share=float(s.mean().item()),
                            vmass=vm,
                            vkept=(vk if c is not None else None),
                        )
                    )
        print(f, l, flush=True)
json.dump(out, open(f"/tmp/acc16/decode_mass_{spec.replace(':', '_')}_{len(files)}.json", "w"))
