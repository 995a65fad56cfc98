"""GPU probe 2: cost of a custom-kernel call vs its source size; a layer's attention host time."""
import sys, time, statistics, cProfile, pstats, io, os
import mlx.core as mx
import mlx_dhsa
from mlx_dhsa import kernels

def med(x): return statistics.median(x) * 1e6
S = 65536
dtype = mx.bfloat16
q = mx.random.normal((1, 8, 1, 256)).astype(dtype)
k = mx.random.normal((1, 4, S, 256)).astype(dtype); v = mx.random.normal((1, 4, S, 256)).astype(dtype)
tk = mx.zeros((4,), mx.int32); mx.eval(q, k, v, tk)

def timeit(label, fn, n=300, chain=26):
    mx.eval(fn())
    calls, enc = [], []
    for r in range(n // chain + 5):
        t0 = time.perf_counter(); outs = [fn() for _ in range(chain)]; t1 = time.perf_counter()
        mx.async_eval(outs); t2 = time.perf_counter(); mx.eval(outs)
        calls.append((t1 - t0) / chain); enc.append((t2 - t1) / chain)
    print(f"{label:40s} call {med(calls):6.1f} us  encode {med(enc):6.1f} us", flush=True)

# 1. the raw decode kernel call, args precomputed
n_splits, per_split = kernels._decode_splits(4096, 4)
ip = kernels._params((S, S - 1, 4096, 8, 4, 1, 1, n_splits, per_split, 1))
fp = kernels._params((0.0625, 50.0), mx.float32)
none = kernels._no_plan()
tmpl = [("T", dtype), ("D", 256), ("REPS", 2), ("NW", kernels._DECODE_WARPS), ("KB", kernels._DECODE_KEYS), ("ALL_KEYS", True), ("FOLD", True)]
kw = dict(inputs=[q, k, v, none, none, tk, ip, fp], template=tmpl, grid=(n_splits * kernels._DECODE_WARPS * 32, 4, 1),
          threadgroup=(kernels._DECODE_WARPS * 32, 1, 1), output_shapes=[(n_splits, 1, 8, 256), (n_splits, 1, 8), (1, 8, 1, 256)],
          output_dtypes=[mx.float32, mx.float32, dtype])
timeit("raw _decode_kernel call", lambda: kernels._decode_kernel(**kw)[2])
timeit("kernels.dense_attention window", lambda: kernels.dense_attention(q, k, v, scale=0.0625, softcap=50.0, q_offset=S - 1, window=4096, tickets=tk))

# 2. a trivial custom kernel, small vs padded source, few vs many inputs
body = "int i = threadIdx.x + blockIdx.x * blockDim.x; if (i < 256) out[i] = a[i];"
for pad in (0, 30000):
    for n_in in (1, 8):
        names = ["a"] + [f"x{i}" for i in range(n_in - 1)]
        kern = mx.fast.cuda_kernel(name=f"probe_{pad}_{n_in}", input_names=names, output_names=["out"],
                                   source=body + "\n//" + "x" * pad, header="// h\n", ensure_row_contiguous=False)
        a = mx.zeros((256,), mx.float32); mx.eval(a)
        ins = [a] + [tk] * (n_in - 1)
        timeit(f"trivial kernel pad={pad} inputs={n_in}", lambda: kern(inputs=ins, grid=(256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(256,)], output_dtypes=[mx.float32])[0])
        kern2 = kern
    timeit(f"trivial kernel pad={pad} + template", lambda: kern2(inputs=ins, template=tmpl, grid=(256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(256,)], output_dtypes=[mx.float32])[0])
timeit("mx.add", lambda: q + q)
timeit("mx.fast.rope", lambda: mx.fast.rope(q, 256, traditional=False, base=10000.0, scale=1.0, offset=S))
