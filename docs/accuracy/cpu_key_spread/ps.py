"""Prefill mass: paper scoring (head-mean query, raw dot product) plus a key-spread term
alpha * s/2 * q_b^2 . var_c (var: per-channel variance of the chunk's keys), the cheapest form
a kernel could carry (one more D-vector per chunk); the prototype of DHSAConfig.key_spread,
computed in the planner's pure-MLX mass path (scoring.mass_scores replaced).

python ps.py TASK CONTEXT SEED BUDGET INDICES ALPHAS [MODEL] [LAYERS] [pooled|within]
pooled: the variance over every key of every KV head (the heads' means differing counts);
within: per KV head, then the heads' mean (what DHSAConfig.key_spread stores).
e.g. python ps.py multikey 4096 3 1024 2 0,1,2 smollm2-135m 0,3,6 within (from /tmp, essays in
/tmp/essays).
"""

import sys

import mlx.core as mx

from mlx_dhsa import DHSAConfig, planners, scoring
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import capture, layer_mass
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.loading import load
from mlx_dhsa.selection import block_queries

task, ctx, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idxs = [int(x) for x in sys.argv[5].split(",")]
alphas = [float(a) for a in sys.argv[6].split(",")]
model, tok = load(sys.argv[7] if len(sys.argv) > 7 else "gemma-3-270m", patch=False)
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
samples = build_samples(tok, task_ids, tasks=[task], contexts=[ctx], n=max(idxs) + 1, seed=seed)
base = DHSAConfig(budget=budget, decode_dense_below=0, key_spread=0.0)
orig = planners.mass_scores
ALPHA = {}
LAYERS = None if len(sys.argv) <= 8 else {int(x) for x in sys.argv[8].split(",")}
WITHIN = len(sys.argv) > 9 and sys.argv[9] == "within"


def mass_scores(queries, keys, chunks, config, *, q_offset, scale):
    if config.query_groups not in ALPHA:
        return orig(queries, keys, chunks, config, q_offset=q_offset, scale=scale)
    a = ALPHA[config.query_groups]
    if queries.shape[2] == 1:  # decode: unchanged (not measured here)
        a = 0.0
    qb = block_queries(queries, config.block_size)  # (B, NB, D)
    mean, var = scoring.chunk_moments(keys, chunks, spread=True)  # (B, H_kv, N_c, D)
    mu = mean.mean(axis=1)
    v = var.mean(axis=1) if WITHIN else (var + mean * mean).mean(axis=1) - mu * mu
    return qb @ mu.swapaxes(-1, -2) + (0.5 * a * scale) * ((qb * qb) @ v.swapaxes(-1, -2))


planners.mass_scores = mass_scores
configs = {"dhsa": base}
for j, a in enumerate(alphas):
    g = [1, 2, 4, 8, 16, 32, 64][j]
    ALPHA[g] = a
    configs[f"paper_spread{a}"] = base.replace(scoring="softmax_spread", query_groups=g)
res = {}
for i in idxs:
    for layer in capture(model, samples[i].prompt):
        if LAYERS is not None and layer.layer not in LAYERS:
            continue
        out = {r.method: r.shares for r in layer_mass(layer, configs) if r.phase == "prefill"}
        for k, v in out.items():
            res.setdefault(k, []).extend(v)
        print(i, layer.layer, {k: round(sum(v) / len(v), 4) for k, v in out.items()}, flush=True)
print("ALL", {k: round(sum(v) / len(v), 4) for k, v in res.items()}, len(res["dhsa"]))
