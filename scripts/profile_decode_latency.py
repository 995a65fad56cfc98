"""GPU latency of one decode step's attention: chained one-query calls, timed by CUDA's trace.

Each call's query is the previous call's output, so the calls run one after another, as a
model's layers do; ``torch.profiler`` (CUPTI) gives the kernels' own durations and the span
from the first kernel's start to the last one's end. Per call: kernels launched, kernel time
and span (kernel time plus the gaps between dependent launches). Cases, gemma-2-2b heads, bf16,
keys from a ``--context``-key cache: a sliding-window step over the last 4096 keys, a
2048-slot plan, a dense step over every key, the same 4096-key step on mlx-lm's ops, one step
over 64 keys (the fixed cost of a call) and two trivial MLX ops (the floor of any launch).
``--groups`` repeats the first two under other ``DHSAConfig.decode_groups``. CUDA only; needs a
CUDA build of PyTorch beside MLX's CUDA backend.

    python scripts/profile_decode_latency.py --calls 100 --groups 512 128 32
"""

import argparse

import mlx.core as mx

from mlx_dhsa import kernels, reference
from mlx_dhsa.device import device_tuning
from mlx_dhsa.kernels import attention as launches
from mlx_dhsa.plan import Plan

from profile_timeline import profiled, require_cupti

H, H_KV, D, SCALE, SOFTCAP = 8, 4, 256, 256**-0.5, 50.0  # gemma-2-2b


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--calls", type=int, default=100, help="chained calls per case")
    p.add_argument("--groups", type=int, nargs="+",
                   default=[device_tuning().decode_groups],
                   help="DHSAConfig.decode_groups settings for the window and plan cases")
    args = p.parse_args()
    require_cupti("profile_decode_latency")
    S = args.context
    k = mx.random.normal((1, H_KV, S, D)).astype(mx.bfloat16)
    v = mx.random.normal((1, H_KV, S, D)).astype(mx.bfloat16)
    q0 = mx.random.normal((1, H, 1, D)).astype(mx.bfloat16)
    slots = mx.sort(mx.random.permutation(S - 1)[:2048]).astype(mx.int32).reshape(1, 1, 2048)
    plan = Plan(slots, mx.array([[2048]], mx.int32), q_offset=S - 1, block_size=128, window=None)
    state = kernels.KernelState()  # one ticket buffer for the chained calls, as a layer's
    mx.eval(k, v, q0, slots)
    args_ = dict(scale=SCALE, softcap=SOFTCAP)
    steps = {
        "window 4096": lambda q: kernels.dense_attention(
            q, k, v, q_offset=S - 1, window=4096, state=state, **args_),
        "plan 2048": lambda q: kernels.sparse_attention(q, k, v, plan, state=state, **args_),
        f"dense {S}": lambda q: kernels.dense_attention(
            q, k, v, q_offset=S - 1, state=state, **args_),
        "64 keys": lambda q: kernels.dense_attention(
            q, k[:, :, :64], v[:, :, :64], q_offset=63, state=state, **args_),
        "window 4096, mlx-lm ops": lambda q: reference.dense_attention(
            q, k[:, :, -4096:], v[:, :, -4096:], mask=None, **args_),
        "two trivial ops": lambda q: q * 1.0001 + 0.0001,
    }

    def run(label, step):
        def chain():
            q = q0
            for _ in range(args.calls):
                q = step(q)
            return q

        mx.eval(chain())  # warm-up: JIT compiles
        seconds, events = profiled(lambda: mx.eval(chain()), host=False)
        events = [e for e in events if e.device_type.name == "CUDA"]
        n = args.calls
        busy = sum(e.time_range.elapsed_us() for e in events) / n
        span = (max(e.time_range.end for e in events)
                - min(e.time_range.start for e in events)) / n
        print(f"{label:<34} {len(events) / n:4.1f} kernels/call  kernel time {busy:7.1f} us  "
              f"span {span:7.1f} us  wall {seconds / n * 1e6:7.1f} us", flush=True)

    default = launches.device_tuning
    for groups in args.groups:
        launches.device_tuning = lambda g=groups: default()._replace(decode_groups=g)
        for name in ("window 4096", "plan 2048"):
            run(f"{name}, {groups} groups", steps[name])
    launches.device_tuning = default
    for name in list(steps)[2:]:
        run(name, steps[name])


if __name__ == "__main__":
    main()
