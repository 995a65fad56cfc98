"""GPU probe: where a decode token's host time goes (build / encode / wait), and host cost per kernel call."""
import sys, time, statistics, cProfile, pstats, io
import mlx.core as mx
import mlx_dhsa
from mlx_dhsa import kernels
from mlx_dhsa.profiling import random_model
from bench_prefill import set_method
from bench_decode import filled_caches, decode_methods

S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
dtype = mx.bfloat16
config = mlx_dhsa.DHSAConfig()
import os; model = random_model(os.environ.get("PROBE_MODEL", "gemma-2-2b"), dtype)
methods = {m: decode_methods(config)[m] for m in ["floor", "dense", "dhsa", "dhsa_sparse"]}
caches = filled_caches(model, methods, S, dtype, config)

def med(x): return statistics.median(x) * 1e3

# A: build / encode / wait per token
for rnd in range(2):
    for name in methods:
        set_method(model, *methods[name])
        c = caches[name]
        tok = mx.array([[1]])
        for _ in range(3):
            tok = model(tok, cache=c)[:, -1].argmax(-1, keepdims=True); mx.eval(tok)
        b, e, w = [], [], []
        for i in range(20):
            t0 = time.perf_counter()
            tok = model(tok, cache=c)[:, -1].argmax(-1, keepdims=True)
            t1 = time.perf_counter(); mx.async_eval(tok)
            t2 = time.perf_counter(); mx.eval(tok)
            t3 = time.perf_counter()
            b.append(t1 - t0); e.append(t2 - t1); w.append(t3 - t2)
        print(f"A {name:12s} build {med(b):6.2f} encode {med(e):6.2f} wait {med(w):6.2f} total {med([x+y+z for x,y,z in zip(b,e,w)]):6.2f} ms", flush=True)

# C: cProfile of sparse build, real kernels
set_method(model, *methods["dhsa_sparse"])
c = caches["dhsa_sparse"]; tok = mx.array([[1]])
pr = cProfile.Profile()
for i in range(20):
    pr.enable(); out = model(tok, cache=c)[:, -1].argmax(-1, keepdims=True); pr.disable(); mx.eval(out)
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(s.getvalue()[:6000])

# B: per-call host cost of single ops (no eval), and encode cost
layer = [l for l in model.layers if l.self_attn.window is None][0].self_attn if hasattr(model.layers[0].self_attn, "window") else None
q = mx.random.normal((1, 8, 1, 256)).astype(dtype)
k = mx.random.normal((1, 4, S, 256)).astype(dtype); v = mx.random.normal((1, 4, S, 256)).astype(dtype)
mx.eval(q, k, v)
idx = mx.sort(mx.random.randint(0, S, (1, 1, 2048)).astype(mx.int32), axis=-1); cnt = mx.array([[2048]], mx.int32); mx.eval(idx, cnt)
from mlx_dhsa.selection import Plan
plan = Plan(idx, cnt, q_offset=S - 1, block_size=128, window=None)
tk = mx.zeros((4,), mx.int32); mx.eval(tk)
cases = {
    "mx.add": lambda: q + q,
    "mx.matmul small": lambda: q @ q.swapaxes(-1, -2),
    "decode plan2048": lambda: kernels.sparse_attention(q, k, v, plan, scale=0.0625, softcap=50.0, tickets=tk),
    "decode dense window4096": lambda: kernels.dense_attention(q, k, v, scale=0.0625, softcap=50.0, q_offset=S - 1, window=4096, tickets=tk),
    "decode dense all": lambda: kernels.dense_attention(q, k, v, scale=0.0625, softcap=50.0, q_offset=S - 1, tickets=tk),
}
for name, fn in cases.items():
    mx.eval(fn())
    calls, enc, waits = [], [], []
    for i in range(200):
        t0 = time.perf_counter(); o = fn(); t1 = time.perf_counter(); mx.async_eval(o); t2 = time.perf_counter(); mx.eval(o); t3 = time.perf_counter()
        calls.append(t1 - t0); enc.append(t2 - t1); waits.append(t3 - t2)
    print(f"B {name:24s} call {med(calls)*1e3:7.1f} us  encode {med(enc)*1e3:7.1f} us  wait {med(waits)*1e3:7.1f} us", flush=True)
# chained: 26 calls in one graph
for name in ("mx.add", "decode plan2048", "decode dense window4096"):
    fn = cases[name]
    ts = []
    for r in range(30):
        t0 = time.perf_counter(); outs = [fn() for _ in range(26)]; t1 = time.perf_counter(); mx.async_eval(outs); t2 = time.perf_counter(); mx.eval(outs); t3 = time.perf_counter()
        ts.append((t1 - t0, t2 - t1, t3 - t2))
    ts.sort(key=sum); a, b, cc = ts[15]
    print(f"B26 {name:24s} call {a*1e6/26:7.1f} us/op encode {b*1e6/26:7.1f} us/op wait {cc*1e3:6.2f} ms", flush=True)
