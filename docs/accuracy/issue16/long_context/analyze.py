"""Offline: where is the needle lost at the answer's decode steps? Reads run_sample.py's npz/json."""

import glob
import json
import sys

import mlx.core as mx
import numpy as np

from mlx_dhsa import DHSAConfig
from mlx_dhsa.chunking import Chunks, chunk_boundaries, split_open
from mlx_dhsa.selection import select

SCALE = 1 / 16


def chunk_stats(K, starts, lengths):
    nz = lengths > 0
    st, ln = starts[nz], lengths[nz]
    mean = np.add.reduceat(K, st, axis=0) / ln[:, None]
    mn = np.minimum.reduceat(K, st, axis=0)
    mxx = np.maximum.reduceat(K, st, axis=0)
    return st, ln, mean, mn, mxx


def lse(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis, keepdims=True))


def scores_for(rule, q, st, ln, mean, mn, mxx, probs):
    logn = np.log(ln)[None]
    if rule == "mean":
        return q.mean(0) @ mean.T
    if rule == "maxhead":
        return (q @ mean.T).max(0)
    lm = SCALE * (q @ mean.T)  # (H, C)
    logz = lse(lm + logn)  # (H, 1)
    if rule == "softmax":
        return np.exp(lm - logz).sum(0)
    if rule.startswith("quest"):
        ub = SCALE * (np.maximum(q[:, None] * mn[None], q[:, None] * mxx[None]).sum(-1))  # (H, C)
        if rule == "quest_max":
            return ub.max(0)
        if rule == "quest_meanq":
            qb = q.mean(0)
            return np.maximum(qb * mn, qb * mxx).sum(-1)
        if rule == "quest_soft":  # per-head upper bound on a key's prob, summed over heads
            return np.exp(ub - logz).sum(0)
        if rule == "quest_softmax":  # per head softmax over chunk upper bounds (self-normalised)
            return np.exp(ub - lse(ub + logn)).sum(0)
        if rule == "quest_half":
            return np.exp(0.5 * (ub + lm) - logz).sum(0)
    if rule == "oracle":
        cs = np.concatenate([[0], np.cumsum(probs.sum(0))])
        return (cs[st + ln] - cs[st]) / ln
    if rule == "keymax":  # exact: best key's prob per head, summed (needs every key: a ceiling)
        return np.maximum.reduceat(probs, st, axis=1).sum(0)
    raise ValueError(rule)


MODS = {
    "open": dict(open_pieces=True),
    "cap4": dict(chunk_cap=4),
    "l32s4": dict(local=32, sink=4),
    "l64": dict(local=64),
    "s4": dict(sink=4),
}


class _V(dict):
    def __missing__(self, name):
        rule, *mods = name.split("+")
        over = {}
        for m in mods:
            over.update(MODS[m])
        return (rule, over)


VARIANTS = _V()


def analyze(meta, z, budget, variants, steps=None):
    P, v0, v1, n0, n1 = meta["P"], meta["v0"], meta["v1"], meta["n0"], meta["n1"]
    nsteps = len(meta["ans"])
    base = DHSAConfig(budget=budget, decode_dense_below=0, use_kernel=False)
    rows = []
    chunk_cache = {}
    for layer in range(3):
        Q, K = z[f"q{layer}"][0], z[f"k{layer}"][0, 0]  # (H, S, D), (S, D)
        for j in range(nsteps):
            p = P - 1 + j
            q = Q[:, p]  # (H, D)
            Kp = K[: p + 1]
            lg = SCALE * (q @ Kp.T)
            probs = np.exp(lg - lse(lg))  # (H, S)
            H = q.shape[0]
            vmass = probs[:, v0:v1].sum() / H
            nmass = probs[:, n0:n1].sum() / H
            for name in variants:
                rule, over = VARIANTS[name]
                cfg = base.replace(**over)
                ck = (p, cfg.chunk_cap, cfg.open_pieces)
                if ck not in chunk_cache:
                    ch = chunk_boundaries(mx.array(z["k0"][:, :, : p + 1]), cfg)
                    if cfg.open_pieces:
                        ch = split_open(ch, p + 1, cfg.target_chunk)
                    chunk_cache[ck] = (np.array(ch.starts[0]), np.array(ch.lengths[0]), ch.segment)
                cst, cln, seg = chunk_cache[ck]
                st, ln, mean, mn, mxx = chunk_stats(Kp, cst, cln)
                refine = 0
                if rule.startswith("refine"):
                    refine, rule_ = int(rule[6:]), "mean"
                else:
                    rule_ = rule
                sc = scores_for(rule_, q, st, ln, mean, mn, mxx, probs)
                ch = Chunks(
                    mx.array(st[None].astype(np.int32)), mx.array(ln[None].astype(np.int32)), seg
                )
                forced = min(cfg.sink, p + 1) + (p + 1 - max(p - cfg.local, min(cfg.sink, p + 1)))
                room = cfg.budget - forced
                c2 = cfg.replace(budget=forced + refine * room) if refine else cfg
                plan = select(
                    mx.array(sc[None, None].astype(np.float32)), ch, c2, n_queries=1, q_offset=p
                )
                idx = np.array(plan.indices[0, 0])[: int(plan.n_valid[0, 0].item())]
                keep = np.zeros(p + 1, bool)
                keep[idx] = True
                if refine:  # exact per-key scores over the candidates, keep the best `room`
                    fk = np.zeros(p + 1, bool)
                    fk[: min(cfg.sink, p + 1)] = True
                    fk[max(p - cfg.local, min(cfg.sink, p + 1)) :] = True
                    cidx = np.nonzero(keep & ~fk)[0]
                    lgc = SCALE * (q @ Kp[keep].T)
                    lz = lse(lgc)
                    ks = np.exp(SCALE * (q @ Kp[cidx].T) - lz).sum(0)
                    best = cidx[np.argsort(-ks)[:room]]
                    keep = fk.copy()
                    keep[best] = True
                kept = probs[:, keep].sum() / H
                covV = keep[v0:v1].mean()
                # ranks among candidate chunks (inside the free middle)
                sink_end = min(cfg.sink, p + 1)
                local_start = max(p - cfg.local, sink_end)
                cand = (st + ln > sink_end) & (st < local_start)
                order = np.argsort(-np.where(cand, sc, -np.inf), kind="stable")
                rank = np.empty(len(st), int)
                rank[order] = np.arange(len(st))
                taken = np.array([keep[s : s + l].any() for s, l in zip(st, ln)]) & cand
                vch = np.nonzero((st < v1) & (st + ln > v0))[0]
                vr = sorted(int(rank[c]) for c in vch if cand[c])
                rows.append(
                    dict(
                        layer=layer,
                        step=j,
                        p=p,
                        rule=name,
                        kept=float(kept),
                        covV=float(covV),
                        vmass=float(vmass),
                        nmass=float(nmass),
                        vkept=float((probs[:, v0:v1] * keep[v0:v1]).sum() / H / max(vmass, 1e-12)),
                        vranks=vr,
                        n_taken=int(taken.sum()),
                        n_cand=int(cand.sum()),
                        vchunks=[(int(st[c]), int(ln[c])) for c in vch],
                    )
                )
    return rows


if __name__ == "__main__":
    ctx, budget = int(sys.argv[1]), int(sys.argv[2])
    variants = sys.argv[3].split(",")
    for f in sorted(x for x in glob.glob(f"/tmp/acc16/data_{ctx}_*.json") if ".rows" not in x):
        import os

        if os.path.exists(f.replace(".json", f".rows{budget}.json")) and len(sys.argv) < 5:
            continue
        meta = json.load(open(f))
        z = np.load(f.replace(".json", ".npz"))
        rows = analyze(meta, z, budget, variants)
        json.dump(rows, open(f.replace(".json", f".rows{budget}.json"), "w"))
        sys.stdout.flush()
        print(f, {k: sum(v["hits"]) for k, v in meta["res"].items()})
