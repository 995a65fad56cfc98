"""Attention over a quantized KV cache (issue 18): DHSA's kernels reading 4- and 8-bit keys and
values directly, against dense attention over the same quantized cache and against DHSA over
a bf16 cache. gemma-2-2b's global-layer attention shapes (8 query heads, 4 KV heads, head dim
256, scale 256^-0.5), random keys, values and queries, ``--layers`` layers per step (13: the
model's global layers) chained as in a forward pass (each layer's query depends on the last
layer's output), the methods taking turns ``--trials`` times (medians; ``paired``: the median
of the per-trial ratios, which cancels the slow spells of a shared machine).

Methods (each over the same keys and values):

- ``dense_q``: mlx-lm's ``quantized_scaled_dot_product_attention`` over the quantized cache
  (what mlx-lm runs with ``--kv-bits``; no soft cap: it has none).
- ``dense_q_kernel``: the fused dense kernel over the quantized cache (with the soft cap).
- ``dhsa_q``: DHSA over the quantized cache: the planning kernels, then the attention kernel
  reading the packed keys and values; plus the dequantization of the keys the planner reads
  (the newest key at decode, the open chunk at prefill: the chunk summaries of closed chunks
  are kept by the cache).
- ``dhsa_bf16``: DHSA over the bf16 cache (the planning kernels, then the attention kernel).

Decode: tokens/s of ``--steps`` steps (one query per layer), each evaluated. Prefill: one
``--chunk``-query prefill step at the end of each length (mlx-lm prefills in 2048-token steps):
the first ``chunk - dense_tail`` queries over a plan, the last ``dense_tail`` dense, as
DHSAAttention does. Memory: the cache's bytes and the step's peak above what was resident.

    python scripts/bench_quantized.py --lengths 32768 131072 --bits 4 8 --json quantized.json
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

import mlx_dhsa
from mlx_dhsa import kernels
from mlx_dhsa.cache import ClosedChunks, ClosedSummaries
from mlx_dhsa.quantized import QuantizedKV

H, H_KV, D = 8, 4, 256  # gemma-2-2b
SCALE, SOFTCAP = 256**-0.5, 50.0


class Layer:
    """One layer's cache in both forms, its chunk table and kernel state."""

    def __init__(self, S: int, bits: int, group: int, config, dtype):
        shape = (1, H_KV, S, D)
        self.k = mx.random.normal(shape).astype(dtype)
        self.v = mx.random.normal(shape).astype(dtype)
        self.kq = QuantizedKV.quantize(self.k, bits, group)
        self.vq = QuantizedKV.quantize(self.v, bits, group)
        closed = ClosedChunks().sync(self.k, config)
        self.table = ClosedSummaries().table(self.k, closed, config)
        self.state = {m: kernels.KernelState() for m in ("dhsa_q", "dhsa_bf16")}
        mx.eval(self.k, self.v, *self.kq.triple(), *self.vq.triple(), self.table.summaries)

    def cache_bytes(self, quantized: bool) -> int:
        if quantized:
            return sum(x.nbytes for kv in (self.kq, self.vq) for x in kv.triple())
        return self.k.nbytes + self.v.nbytes


def attend(method: str, layer: Layer, q: mx.array, offset: int, config) -> list[mx.array]:
    """One layer's attention of queries q at ``offset`` by ``method``: [output, extras]."""
    S = layer.k.shape[2]
    quant = method.endswith("_q") or method == "dense_q_kernel"
    k, v = (layer.kq, layer.vq) if quant else (layer.k, layer.v)
    if method == "dense_q":
        mask = None if q.shape[2] == 1 else "causal"
        kq, vq = layer.kq, layer.vq
        out = quantized_scaled_dot_product_attention(
            q, kq.triple(), vq.triple(), SCALE, mask, group_size=kq.group_size, bits=kq.bits
        )
        return [out]
    if method == "dense_q_kernel":
        return [kernels.dense_attention(q, k, v, scale=SCALE, softcap=SOFTCAP, q_offset=offset)]
    state = layer.state[method]
    L = q.shape[2]
    n_sparse = L - min(config.dense_tail, L) if L > 1 else 1
    extras = []
    start = S - 1 if L == 1 else layer.table.open_start
    if quant and start < S:  # the keys the planner reads (the cache keeps closed chunks')
        kq = layer.kq
        extras.append(
            mx.dequantize(
                *(x[:, :, start:] for x in kq.triple()), group_size=kq.group_size, bits=kq.bits
            )
        )
    qs = q[:, :, :n_sparse]
    plan = kernels.select_chunks(qs, layer.table, config, q_offset=offset, state=state)
    outs = [kernels.sparse_attention(qs, k, v, plan, scale=SCALE, softcap=SOFTCAP, state=state)]
    if n_sparse < L:
        outs.append(
            kernels.dense_attention(
                q[:, :, n_sparse:], k, v, scale=SCALE, softcap=SOFTCAP, q_offset=offset + n_sparse
            )
        )
    out = mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return [out, *extras]


def step(method, layers, qs, offset, config):
    """One forward step over all layers, each layer's query shifted by the last output."""
    outs, prev = [], None
    for layer, q in zip(layers, qs):
        if prev is not None:
            q = q + 1e-3 * prev
        res = attend(method, layer, q, offset, config)
        prev = res[0]
        outs.extend(res)
    mx.eval(outs)


def timed(method, layers, qs, offset, config, steps, warmup) -> tuple[float, float]:
    """(seconds per step, GB of peak memory above the resident)."""
    for _ in range(warmup):
        step(method, layers, qs, offset, config)
    mx.synchronize()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    for _ in range(steps):
        step(method, layers, qs, offset, config)
    mx.synchronize()
    dt = (time.perf_counter() - t) / steps
    return dt, (mx.get_peak_memory() - resident) / 1e9


def bench(S, bits, group, args, config, dtype) -> dict:
    layers = [Layer(S, bits, group, config, dtype) for _ in range(args.layers)]
    methods = args.methods
    row = {"length": S, "bits": bits, "group_size": group, "layers": args.layers}
    row["cache_gb"] = {
        "quantized": sum(x.cache_bytes(True) for x in layers) / 1e9,
        "bf16": sum(x.cache_bytes(False) for x in layers) / 1e9,
    }
    for phase in ("decode", "prefill"):
        if phase == "prefill" and args.chunk <= 0:
            continue
        L = 1 if phase == "decode" else min(args.chunk, S)
        qs = [mx.random.normal((1, H, L, D)).astype(dtype) for _ in layers]
        mx.eval(qs)
        steps = args.steps if phase == "decode" else args.prefill_steps
        runs = {m: [] for m in methods}
        peaks = {m: 0.0 for m in methods}
        for _ in range(args.trials):
            for m in methods:
                dt, peak = timed(m, layers, qs, S - L, config, steps, args.warmup)
                runs[m].append(dt)
                peaks[m] = max(peaks[m], peak)
        res = {m: {"seconds": statistics.median(r), "runs": r} for m, r in runs.items()}
        for m in methods:
            res[m]["peak_extra_gb"] = peaks[m]
            if phase == "decode":
                res[m]["tokens_per_s"] = 1.0 / res[m]["seconds"]
        base = "dense_q" if "dense_q" in methods else None
        for m in methods:
            for ref in (base, "dhsa_bf16"):
                if ref in methods and ref != m:
                    ratios = [a / b for a, b in zip(runs[ref], runs[m])]
                    res[m][f"speedup_vs_{ref}"] = statistics.median(ratios)
        row[phase] = res
    del layers
    mx.clear_cache()
    return row


def print_row(row):
    head = f"S={row['length']:>7} {row['bits']}-bit g{row['group_size']}"
    cache = row["cache_gb"]
    print(f"{head}  cache {cache['quantized']:.2f} GB (bf16 {cache['bf16']:.2f} GB)")
    for phase in ("decode", "prefill"):
        if phase not in row:
            continue
        for m, r in row[phase].items():
            extra = "  ".join(f"{k[11:]} {v:.2f}x" for k, v in r.items() if k.startswith("speed"))
            what = f"{r['tokens_per_s']:8.1f} tok/s" if phase == "decode" else ""
            print(
                f"  {phase:7} {m:15} {1e3 * r['seconds']:9.3f} ms {what:>14}  "
                f"peak+{r['peak_extra_gb']:.3f} GB  {extra}"
            )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=13, help="layers per step (gemma-2-2b: 13)")
    p.add_argument("--budget", type=int, default=None, help="DHSA budget (default: config's)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill step queries (0: no prefill)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per trial")
    p.add_argument("--prefill-steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["dense_q", "dense_q_kernel", "dhsa_q", "dhsa_bf16"],
        choices=["dense_q", "dense_q_kernel", "dhsa_q", "dhsa_bf16"],
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    dtype = getattr(mx, args.dtype)
    overrides = {} if args.budget is None else {"budget": args.budget}
    config = mlx_dhsa.DHSAConfig(**overrides)
    print(f"backend {kernels.backend().name}, device {mx.default_device()}, {args.dtype}")
    rows = []
    for S in args.lengths:
        for bits in args.bits:
            row = bench(S, bits, args.group_size, args, config, dtype)
            print_row(row)
            rows.append(row)
    if args.json:
        meta = {"backend": kernels.backend().name, "dtype": args.dtype, "argv": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
