"""DHSA over a quantized KV cache (issue 18): accuracy against the model-dtype cache.

Two measurements on one model, every condition on the same seeded samples:
1. mass: the share of dense attention mass DHSA's plans keep (``mlx_dhsa.evaluation.mass``)
   when chunk boundaries and summaries come from the keys before quantization (what
   ``QuantizedDHSACache`` does by default: the plans are those of the model-dtype cache) or
   from the keys dequantized after 8- or 4-bit quantization (``chunk_source="dequantized"``).
   One dense forward per prompt; queries and keys of every DHSA layer; prefill blocks past the
   budget and single-query decode plans. Paired differences per block / step.
2. niah: single-needle NIAH answers (``mlx_dhsa.evaluation.tasks``), greedy, scored right or
   wrong, with the cache in the model's dtype, 8-bit and 4-bit (both chunk sources), beside
   dense attention over the same caches.

    python scripts/eval_quantized_kv.py --model gemma-3-270m --context 4096 --budget 1024 \
        --mass-prompts 2 --niah 16 --out docs/accuracy/quantized_kv
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_dhsa import DHSAConfig, load
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import block_key_mass, capture, kept_share, plan_layer
from mlx_dhsa.evaluation.runner import answer
from mlx_dhsa.evaluation.stats import bootstrap, paired_difference
from mlx_dhsa.evaluation.tasks import build_samples, score, split_tokens
from mlx_dhsa.patching import patch, unpatch
from mlx_dhsa.quantized import QuantizedKV
from mlx_dhsa.quantized_cache import QuantizedDHSACache

# A cache name: "fp" (the model's dtype) or kv<bits>[g<group>][_deq], e.g. "kv4", "kv4g64",
# "kv4_deq" (chunk state from the dequantized keys). No group: --group-size, or if that is not
# given DHSAConfig's default for the bit width (DHSAConfig.kv_group: 32 at 4 bits, 64 at 8).
CACHE = re.compile(r"kv(?P<bits>4|8)(?:g(?P<group>32|64|128))?(?P<deq>_deq)?")


def parse_cache(name: str, group: int | None) -> tuple[int | None, int | None, str]:
    """(kv_bits, kv_group_size, chunk_source) of a cache name; None bits: the model's dtype."""
    if name == "fp":
        return None, group, "keys"
    m = CACHE.fullmatch(name)
    if m is None:
        raise SystemExit(f"unknown cache {name!r}: use fp or kv4 / kv8, optionally with g32 / "
                         "g64 / g128 and _deq (e.g. kv4g32, kv8_deq)")  # fmt: skip
    bits, deq = int(m["bits"]), m["deq"]
    return bits, int(m["group"]) if m["group"] else group, "dequantized" if deq else "keys"


def _fake(keys: mx.array, bits: int, group: int) -> mx.array:
    return QuantizedKV.quantize(keys, bits, group).dequantize()


def mass(model, prompts, config: DHSAConfig, n_decode: int, group: int | None, log) -> dict:
    """Kept mass of plans from model-dtype keys vs dequantized keys, per block and step."""
    sources = {"keys": None, "deq8": 8, "deq4": 4}
    shares = {(s, ph): [] for s in sources for ph in ("prefill", "decode")}
    B = config.budget
    for i, prompt in enumerate(prompts):
        S = len(prompt)
        step = max(1, (S - S // 2) // n_decode)
        positions = list(range(S - 1, S // 2, -step))[:n_decode]
        for layer in capture(model, prompt):
            q, k = layer.queries, layer.keys
            H, L = q.shape[1], q.shape[2]
            m = block_key_mass(q, k, offset=0, block_size=config.block_size, scale=layer.scale,
                               softcap=layer.softcap)  # fmt: skip
            NB = m.shape[1]
            q1 = [min((b + 1) * config.block_size, L) for b in range(NB)]
            weight = mx.array([(q1[b] - b * config.block_size) * H for b in range(NB)], mx.float32)
            selective = [b for b in range(NB) if q1[b] > B]
            for name, bits in sources.items():
                g = DHSAConfig(kv_bits=bits, kv_group_size=group).kv_group
                kk = k if bits is None else _fake(k, bits, g)
                share = kept_share(plan_layer(config, layer, q, kk, 0), m, weight).mean(0)
                shares[(name, "prefill")] += [share[b].item() for b in selective]
                for p in positions:
                    qp = q[:, :, p : p + 1]
                    mp = block_key_mass(qp, k[:, :, : p + 1], offset=p, block_size=1,
                                        scale=layer.scale, softcap=layer.softcap)  # fmt: skip
                    plan = plan_layer(config, layer, qp, kk[:, :, : p + 1], p)
                    shares[(name, "decode")].append(
                        kept_share(plan, mp, mx.array([float(H)])).mean().item()
                    )
            log(dict(kind="mass_progress", prompt=i, layer=layer.layer))
    out = {}
    for (name, phase), xs in shares.items():
        out[f"{name}/{phase}"] = dict(interval=str(bootstrap(xs)), values=xs)
        if name != "keys":
            d = paired_difference(xs, shares[("keys", phase)])
            out[f"{name}-keys/{phase}"] = dict(interval=str(d))
    return out


def niah_run(model, tokenizer, samples, config: DHSAConfig, conditions, group, log) -> dict:
    """Greedy NIAH scores per condition (method x cache)."""
    scores = {}
    for cond in conditions:
        method, cache = cond.split(":")
        bits, group_size, source = parse_cache(cache, group)
        unpatch(model)
        cfg = (
            config
            if method == "dhsa"
            else config.replace(dense_below=1 << 30, decode_dense_below=1 << 30)
        )
        cfg = cfg.replace(kv_bits=bits, kv_group_size=group_size)
        patch(model, cfg)
        QuantizedDHSACache.chunk_source = source
        xs = []
        tic = time.perf_counter()
        for s in samples:
            reply, path = answer(model, tokenizer, s.prompt, 12)
            xs.append(score(reply, s.answers))
            log(dict(kind="niah", condition=cond, index=s.index, depth=round(s.depth, 4),
                     score=xs[-1], reply=reply, attention=path))  # fmt: skip
        scores[cond] = xs
        log(dict(kind="niah_done", condition=cond, bits=bits,
                 group_size=None if bits is None else cfg.kv_group,
                 seconds=round(time.perf_counter() - tic, 1), interval=str(bootstrap(xs))))  # fmt: skip
    QuantizedDHSACache.chunk_source = "keys"
    unpatch(model)
    return scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--group-size", type=int, default=None,
                    help="for cache names without g<group>; default: DHSAConfig's by bits")  # fmt: skip
    ap.add_argument("--mass-prompts", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--niah", type=int, default=16, help="NIAH samples per condition (0: none)")
    ap.add_argument("--conditions", default="dhsa:fp,dhsa:kv8,dhsa:kv4,dhsa:kv4_deq,dense:fp,"
                    "dense:kv4")  # fmt: skip
    ap.add_argument("--haystack", type=Path, default=None, help="Directory of .txt essays.")
    ap.add_argument(
        "--use-kernel",
        action="store_true",
        help="run the kernels (a GPU); default: the pure-MLX reference paths",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.group_size is not None and args.group_size not in (32, 64, 128):
        raise SystemExit(f"--group-size must be 32, 64 or 128, got {args.group_size}")
    conds = [c for c in args.conditions.split(",") if c]
    for c in conds:
        method, _, cache = c.partition(":")
        if method not in ("dhsa", "dense"):
            raise SystemExit(f"condition {c!r}: use dhsa:<cache> or dense:<cache>")
        parse_cache(cache, args.group_size)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = open(args.out / "results.jsonl", "a")

    def log(row):
        rows.write(json.dumps(row) + "\n")
        rows.flush()
        if row["kind"] != "mass_progress":
            print(json.dumps({k: v for k, v in row.items() if k != "values"}), file=sys.stderr)

    # Sparse decode forced, as the issue-16 CPU grid: decode steps plan over the cache.
    config = DHSAConfig(budget=args.budget, decode_dense_below=0, use_kernel=args.use_kernel)
    model, tokenizer = load(args.model, patch=False)
    ids = tokenizer.encode(niah.read_haystack(args.haystack), add_special_tokens=False)
    task_ids, _ = split_tokens(ids)
    result = dict(model=args.model, context=args.context, budget=args.budget,
                  group_size=args.group_size, device=str(mx.default_device()))  # fmt: skip
    if args.mass_prompts:
        prompts = [s.prompt for s in build_samples(tokenizer, task_ids, tasks=["niah"],
                   contexts=[args.context], n=args.mass_prompts, seed=1)]  # fmt: skip
        result["mass"] = mass(model, prompts, config, args.decode_steps, args.group_size, log)
        for k, v in result["mass"].items():
            log(dict(kind="mass", key=k, interval=v["interval"]))
    if args.niah:
        samples = build_samples(tokenizer, task_ids, tasks=["niah"], contexts=[args.context],
                                n=args.niah, seed=0)  # fmt: skip
        scores = niah_run(model, tokenizer, samples, config, conds, args.group_size, log)
        result["niah"] = {c: dict(interval=str(bootstrap(x)), scores=x) for c, x in scores.items()}
        base = {"dhsa": "dhsa:fp", "dense": "dense:fp"}
        for c, x in scores.items():
            ref = base.get(c.split(":")[0])
            if ref in scores and ref != c:
                result["niah"][c]["minus_fp"] = str(paired_difference(x, scores[ref]))
    (args.out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
