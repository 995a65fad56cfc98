"""Decode-step attention mass at long context: DHSA head max (default) vs head mean vs
block-sparse, all with decode_refine=4 (as ks.py), pure MLX float32.
python dec.py TASK CONTEXT SEED BUDGET INDEX NSTEPS [MODEL]"""

import sys

import mlx.core as mx
import numpy as np

from mlx_dhsa import DHSAConfig
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import block_key_mass, capture, kept_share, plan_layer
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.loading import load

task, ctx, seed, budget, idx, n = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    int(sys.argv[5]),
    int(sys.argv[6]),
)
model, tok = load(sys.argv[7] if len(sys.argv) > 7 else "gemma-3-270m", patch=False)
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
s = build_samples(tok, task_ids, tasks=[task], contexts=[ctx], n=idx + 1, seed=seed)[idx]
base = DHSAConfig(budget=budget, decode_dense_below=0)
configs = {
    "dhsa_max": base,
    "dhsa_mean": base.replace(decode_head_scores="mean"),
    "dhsa_max_r1": base.replace(decode_refine=1),
    "dhsa_mean_r1": base.replace(decode_head_scores="mean", decode_refine=1),
    "block_sparse": base.replace(method="block_sparse"),
    "block_sparse_r1": base.replace(method="block_sparse", decode_refine=1),
}
L = len(s.prompt)
pos = [L // 2 + j * (L // 2) // n for j in range(n)]
res = {k: [] for k in configs}
for layer in capture(model, s.prompt):
    q, k = layer.queries, layer.keys
    H = q.shape[1]
    for p in pos:
        qp, kp = q[:, :, p : p + 1], k[:, :, : p + 1]
        m = block_key_mass(qp, kp, offset=p, block_size=1, scale=layer.scale, softcap=layer.softcap)
        w = mx.array([float(H)])
        for name, c in configs.items():
            res[name].append(kept_share(plan_layer(c, layer, qp, kp, p), m, w).mean().item())
    print(layer.layer, {k: round(float(np.mean(v)), 4) for k, v in res.items()}, flush=True)
rng = np.random.default_rng(0)
for name, v in res.items():
    d = np.array(v) - np.array(res["dhsa_max"])
    boot = d[rng.integers(0, len(d), (2000, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(
        "ALL",
        name,
        round(float(np.mean(v)), 4),
        f"minus dhsa_max {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]",
        len(d),
    )
