"""Attention mass kept by DHSA's prefill plans when chunk summaries are stored in fp16 or bf16.

The summaries are computed in float32 as always, then stored by the cache in each dtype
(``mlx_dhsa.cache.SUMMARY_DTYPE``, float16 since stop 32: set per row here); ``zero`` (every
summary 0, open chunk's included) checks that the storage reaches the planner. One multi-key
prompt (seed 3, sample 2), budget 1024, the global layers of the model (gemma-3-270m: 3;
smollm2-135m, a Llama without key norms: all 30), float32, pure MLX: every planned prefill
block, and 16 decode steps (single-query plans, the default decode_refine=4 and head max)
spread over the prompt's second half.

python summary_dtype.py 8192 [gemma-3-270m | smollm2-135m]   (from /tmp, essays in
/tmp/essays as in ../cpu_prefill_refine/)

Before stop 32 the rows rounded inside ``chunk_summaries`` and ``open_summary`` (float32
storage); the cache now keeps the open chunk's summary in float32, as here.
"""

import sys

import mlx.core as mx

import mlx_dhsa.cache as cache_mod
import mlx_dhsa.chunking as chunking
from mlx_dhsa import DHSAConfig
from mlx_dhsa.evaluation import niah
from mlx_dhsa.evaluation.mass import capture, layer_mass
from mlx_dhsa.evaluation.tasks import build_samples, split_tokens
from mlx_dhsa.loading import load

ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
model, tok = load(sys.argv[2] if len(sys.argv) > 2 else "gemma-3-270m", patch=False)
model.set_dtype(mx.float32)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)
task_ids, _ = split_tokens(ids)
sample = build_samples(tok, task_ids, tasks=["multikey"], contexts=[ctx], n=3, seed=3)[2]
base = DHSAConfig(budget=1024, decode_dense_below=0)
layers = list(capture(model, sample.prompt))
L = len(sample.prompt)
DECODE = [L // 2 + i * (L // 2) // 16 for i in range(16)]
chunk_summaries, open_summary = chunking.chunk_summaries, cache_mod.open_summary
STORES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16, "zero": None}


def zeroed(f):
    return lambda *a, **k: f(*a, **k) * 0


for name, dtype in STORES.items():
    cache_mod.SUMMARY_DTYPE = dtype or mx.float32
    if dtype is None:
        chunking.chunk_summaries = cache_mod.chunk_summaries = zeroed(chunk_summaries)
        cache_mod.open_summary = zeroed(open_summary)
    cache_mod._compiled_summaries.cache_clear()
    shares = {"prefill": [], "decode": []}
    for layer in layers:
        for r in layer_mass(layer, {"dhsa": base}, decode_positions=DECODE):
            shares[r.phase] += r.shares
    print(
        name, ctx, {p: (round(sum(v) / len(v), 5), len(v)) for p, v in shares.items()}, flush=True
    )
