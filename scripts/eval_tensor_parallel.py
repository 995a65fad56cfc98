"""DHSA on a model split across ranks (tensor or pipeline parallel) vs one process: accuracy.

Under tensor parallelism each rank plans from its own heads (design.md section 11), so its
plans differ from the plans one process makes from all heads. Every rank loads the whole
model; rank 0 computes the one-process references (dense and DHSA logits) before the model
is split; then all ranks run the sharded model (dense, then DHSA) on the same tokens. Rank 0
prints one JSON line per budget: next-token NLL of each variant on the text, and KL(dense ||
variant) and top-1 agreement with dense, over the positions past the dense limit. The text:
docs/design.md and README.md (``--text`` for others).

    # 3 ranks on this machine (smollm2-135m: 9 query / 3 KV heads, so 3 ways), CPU
    mlx.launch -n 3 --backend ring python scripts/eval_tensor_parallel.py \\
        --model smollm2-135m --tokens 1024 --budgets 128,256 --block-size 32 --local 32
    # pipeline parallelism instead (gemma-3-270m: 18 layers, 9 per rank): stages plan as one
    # process does, except where each stage's first DHSA layer finds the shared boundaries
    mlx.launch -n 2 --backend ring python scripts/eval_tensor_parallel.py --pipeline \
        --model gemma-3-270m --tokens 1024 --budgets 128,256 --block-size 32 --local 32
    # alone: the attention-mass diagnostic, per-rank plans simulated on head subsets
    python scripts/eval_tensor_parallel.py --model smollm2-135m --tokens 1024 \\
        --budgets 128,256 --block-size 32 --local 32 --mass-ranks 3 --every 5
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

from mlx_dhsa import DHSAConfig, load, patch, unpatch
from mlx_dhsa.distributed import barrier, pipeline, shard, world

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "docs" / "design.md", ROOT / "README.md"]  # real English text, in the repo


def logits(model, tokens) -> mx.array:
    out = model(mx.array(tokens)[None])[0].astype(mx.float32)
    mx.eval(out)
    return out


def metrics(dense: mx.array, other: mx.array, tokens: list[int], start: int) -> dict:
    """NLL of the text under ``other``; KL(dense || other), top-1 agreement from ``start``."""
    target = mx.array(tokens[1:])
    lp = other - mx.logsumexp(other, axis=-1, keepdims=True)
    ld = dense - mx.logsumexp(dense, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(lp[:-1], target[:, None], axis=-1).mean().item()
    kl = (mx.exp(ld) * (ld - lp)).sum(-1)[start:].mean().item()
    top1 = (dense.argmax(-1) == other.argmax(-1))[start:].astype(mx.float32).mean().item()
    return {"nll": round(nll, 4), "kl": round(kl, 5), "top1": round(top1, 4)}


def mass_split(model, tokens, config: DHSAConfig, ranks: int, every: int) -> dict:
    """Share of dense attention mass the plans keep, planned from all heads (one machine) or
    per rank from ``1/ranks`` of the query and KV heads (tensor parallel), in one process.
    Prefill query blocks past the budget, every ``every``-th DHSA layer."""
    from mlx_dhsa.evaluation.mass import LayerQK, block_key_mass, capture, kept_share, plan_layer

    def kept(layer: LayerQK, q: mx.array, k: mx.array) -> mx.array:  # (NB,) kept mass sums
        mass = block_key_mass(
            q, k, offset=0, block_size=config.block_size, scale=layer.scale, softcap=layer.softcap
        )
        part = LayerQK(layer.layer, q, k, layer.scale, layer.softcap, q.shape[1], k.shape[1])
        weight = mx.ones((mass.shape[1],))  # sums, not shares: divided once below
        return kept_share(plan_layer(config, part, q, k, 0), mass, weight).mean(0)

    one, split = [], []
    for layer in capture(model, tokens)[::every]:
        q, k = layer.queries, layer.keys
        H, H_kv, L, bs = q.shape[1], k.shape[1], q.shape[2], config.block_size
        h, h_kv = H // ranks, H_kv // ranks
        NB = -(-L // bs)
        n_q = mx.minimum((mx.arange(NB) + 1) * bs, L) - mx.arange(NB) * bs
        total = (n_q * H).astype(mx.float32)
        parts = [
            kept(layer, q[:, r * h : (r + 1) * h], k[:, r * h_kv : (r + 1) * h_kv])
            for r in range(ranks)
        ]
        keep = [b for b in range(NB) if min((b + 1) * bs, L) > config.budget]
        one.append((kept(layer, q, k) / total)[mx.array(keep)])
        split.append((sum(parts) / total)[mx.array(keep)])
    return {
        "one_process_mass": round(mx.concatenate(one).mean().item(), 4),
        "per_rank_mass": round(mx.concatenate(split).mean().item(), 4),
        "blocks": sum(x.size for x in one),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--budgets", default="256,512")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local", type=int, default=64)
    p.add_argument("--text", nargs="+", type=Path, default=TEXTS, help="text files to read")
    p.add_argument(
        "--mass-ranks",
        type=int,
        default=0,
        help="run alone: the attention-mass diagnostic, plans from all heads vs per rank of "
        "this many ranks (simulated in one process), instead of the launched comparison",
    )
    p.add_argument("--every", type=int, default=5, help="--mass-ranks: every n-th layer")
    p.add_argument(
        "--pipeline", action="store_true", help="split by layers (pipeline), not by heads"
    )
    args = p.parse_args()
    group = world()
    rank0 = group.rank() == 0
    configs = [
        DHSAConfig(budget=int(b), block_size=args.block_size, local=args.local, use_kernel=False)
        for b in args.budgets.split(",")
    ]
    model, tokenizer = load(args.model, patch=False)
    text = "\n\n".join(f.read_text() for f in args.text)
    tokens = tokenizer.encode(text)[: args.tokens]
    if args.mass_ranks:
        for c in configs:
            row = mass_split(model, tokens, c, args.mass_ranks, args.every)
            print(json.dumps({"model": args.model, "ranks": args.mass_ranks,
                              "tokens": len(tokens), "budget": c.budget, **row}), flush=True)  # fmt: skip
        return
    refs = {}
    if rank0:  # the one-process model, before it is split
        refs["dense"] = logits(model, tokens)
        for c in configs:
            refs[c.budget] = logits(patch(model, c), tokens)
            unpatch(model)
    barrier(group)
    (pipeline if args.pipeline else shard)(model, group)
    mx.eval(model.parameters())
    split_dense = logits(model, tokens)
    tp = "pp" if args.pipeline else "tp"  # keys: pipeline or tensor parallel
    heads = model.layers[0].self_attn.n_heads, model.layers[0].self_attn.n_kv_heads
    for c in configs:
        split = logits(patch(model, c), tokens)
        unpatch(model)
        if rank0:
            start = c.dense_limit  # queries past it are planned; before it all is dense
            row = {
                "model": args.model,
                "ranks": group.size(),
                "split": "pipeline" if args.pipeline else "tensor",
                "heads_per_rank": heads,
                "layers_per_rank": len(model.layers),
                "tokens": len(tokens),
                "budget": c.budget,
                "block_size": c.block_size,
                "dense": metrics(refs["dense"], refs["dense"], tokens, start),
                f"{tp}_dense_max_abs_diff": mx.abs(split_dense - refs["dense"]).max().item(),
                "one_process_dhsa": metrics(refs["dense"], refs[c.budget], tokens, start),
                f"{'pipeline' if args.pipeline else 'tensor'}_parallel_dhsa": metrics(
                    refs["dense"], split, tokens, start
                ),
                f"{tp}_vs_one_process_top1": round(
                    (split.argmax(-1) == refs[c.budget].argmax(-1))[start:]
                    .astype(mx.float32)
                    .mean()
                    .item(),
                    4,
                ),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
