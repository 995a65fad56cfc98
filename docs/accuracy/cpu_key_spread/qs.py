"""Prefill mass with a query-side spread term, q_b . mu_c + alpha/2 * scale * var_q . mu_c^2
(var_q: the per-channel variance of the block's queries over positions and heads; the
diagonal Jensen correction of exp over the block's queries), alpha = 0 the paper's score.
Before stop 33 (key_spread 0).

python qs.py TASK CONTEXT SEED BUDGET INDICES ALPHAS [MODEL]   e.g. multikey 4096 3 1024 2
0,0.5,1,2 (from /tmp, essays in /tmp/essays)."""

import sys

import mlx.core as mx

from mlx_dhsa import DHSAConfig, selection
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import capture, layer_mass
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.loading import load

task, ctx, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idxs = [int(x) for x in sys.argv[5].split(",")]
alphas = [float(a) for a in sys.argv[6].split(",")]
model_name = sys.argv[7] if len(sys.argv) > 7 else "gemma-3-270m"
model, tok = load(model_name, patch=False)
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
samples = build_samples(tok, task_ids, tasks=[task], contexts=[ctx], n=max(idxs) + 1, seed=seed)
base = DHSAConfig(budget=budget, decode_dense_below=0, key_spread=0.0)
orig_bq, orig_cs = selection.block_queries, selection.chunk_scores
ALPHA = [0.0]
SCALE = [None]


def bq(queries, block_size, *, per_head=False):
    qb = orig_bq(queries, block_size, per_head=per_head)
    if per_head or ALPHA[0] == 0:
        return qb
    sq = orig_bq(queries.astype(mx.float32) ** 2, block_size, per_head=False)
    var = mx.maximum(sq - qb * qb, 0)
    return mx.concatenate([qb, (0.5 * ALPHA[0] * SCALE[0]) * var], axis=-1)


def cs(qb, summaries):
    D = summaries.shape[-1]
    if qb.shape[-1] == 2 * D:
        return orig_cs(qb[..., :D], summaries) + orig_cs(qb[..., D:], summaries * summaries)
    return orig_cs(qb, summaries)


selection.block_queries, selection.chunk_scores = bq, cs
res = {}
for i in idxs:
    for layer in capture(model, samples[i].prompt):
        SCALE[0] = getattr(layer, "scale", None) or layer.queries.shape[-1] ** -0.5
        for a in alphas:
            ALPHA[0] = a
            selection._select_fn.cache_clear()
            selection._compiled.cache_clear()
            configs = {f"a{a}": base}
            if a == alphas[0]:
                configs.update(
                    {"oracle": base.replace(method="oracle"), f"key_oracle@{budget}": None}
                )
            out = {r.method: r.shares for r in layer_mass(layer, configs) if r.phase == "prefill"}
            for k, v in out.items():
                res.setdefault(k, []).extend(v)
            print(
                i, layer.layer, {k: round(sum(v) / len(v), 4) for k, v in out.items()}, flush=True
            )
print("ALL", {k: round(sum(v) / len(v), 4) for k, v in res.items()}, len(res[f"a{alphas[0]}"]))
