"""Host cost of one custom-kernel call: what building the graph of a decode step pays per
kernel, against a plain MLX op, and how it depends on the kernel's source size.

MLX assembles the full kernel source (header + body) on every call of a custom kernel,
before any caching, so a call costs more than an op. This times ``--calls`` calls (graph
construction only, no GPU work) of: ``mx.add``; block_scores as DHSA builds it; the same
body with comments and indentation removed; and a one-line kernel with the same inputs.

    python scripts/profile_calls.py --calls 2000
"""

import argparse
import re
import time

import mlx.core as mx

from mlx_dhsa import kernels


def strip(text: str) -> str:
    """Comments and indentation removed, line breaks kept (compiler line numbers stay)."""
    return "\n".join(re.sub(r"//.*", "", line).strip() for line in text.split("\n"))


def per_call_us(fn, calls):
    fn()
    tic = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - tic) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    backend = kernels.backend().name
    if backend is None:
        raise SystemExit("no GPU backend: custom kernels cannot be built here")
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    header, source = kernels.kernel_source("block_scores", backend)
    ins = ["queries", "keys", "summaries", "open_prev", "iparams"]
    outs = ["scores", "open_sum"]
    variants = {
        "block_scores": (header, source),
        "block_scores (stripped)": (strip(header), strip(source)),
        "one-line body": ("", "scores[0] = 0.0f;"),
    }
    q = mx.zeros((1, 8, 1, 256), mx.bfloat16)
    k = mx.zeros((1, 4, 1024, 256), mx.bfloat16)
    s = mx.zeros((1, 64, 256))
    prev = mx.zeros((1, 256))
    params = mx.zeros((11,), mx.int32)
    mx.eval(q, k, s, prev, params)
    rows = {"mx.add": per_call_us(lambda: q + q, args.calls)}
    for name, (h, src) in variants.items():
        kern = make(name="dhsa_calls_" + str(abs(hash(name))), input_names=ins,
                    output_names=outs, source=src, header=h, ensure_row_contiguous=False)
        rows[f"{name} [{len(h) + len(src)} chars]"] = per_call_us(
            lambda: kern(inputs=[q, k, s, prev, params], template=[("T", q.dtype), ("D", 256), ("NT", 256)],
                         grid=(256, 1, 1), threadgroup=(256, 1, 1),
                         output_shapes=[(1, 1, 33), (1, 256)],
                         output_dtypes=[mx.float32, mx.float32]),
            args.calls)
    for name, us in rows.items():
        print(f"{name:<40} {us:8.2f} us per call", flush=True)


if __name__ == "__main__":
    main()
