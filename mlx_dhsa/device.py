"""Settings that depend on the device: measured where they were tuned, estimated elsewhere.

MLX reports a device's name and architecture (``mx.device_info``) but not its core count or
memory bandwidth, so those come from the name. Two settings depend on them:

- ``decode_groups``: decode_attention.metal splits a step's keys until about this many groups
  run, 4 per streaming multiprocessor (CUDA) or GPU core (Metal), rounded to a power of two.
- ``decode_dense_below``: decode steps stay dense up to this many keys. A sparse step costs
  more launches (planning), a dense one reads every key: the crossover grows with memory
  bandwidth. Measured on the H200 (docs/benchmarks.md, decode); elsewhere scaled from it by
  bandwidth, an estimate (Metal: never measured), and on Metal not below
  ``SPARSE_DECODE_FLOOR`` keys, for accuracy.

The commands' default run sizes (:func:`run_sizes`: a GPU grid, or one a CPU finishes quickly)
and the rate their run times are estimated at (:func:`device_rate`) also live here.
"""

import math
import statistics
import time
from functools import cache
from typing import NamedTuple

import mlx.core as mx


class Tuning(NamedTuple):
    decode_groups: int
    decode_dense_below: int
    basis: str  # "measured (...)" or "estimated (...)"


H200 = Tuning(512, 98304, "measured (CUDA, H200)")
H200_BANDWIDTH = 4800  # GB/s
# Streaming multiprocessors by CUDA device name (the H100 SXM has the H200's 132).
CUDA_SMS = {
    "H200": 132,
    "GH200": 132,
    "H100": 132,
    "A100": 108,
    "L40S": 142,
    "L40": 142,
    "L4": 58,
    "A10": 72,
    "RTX 4090": 128,
    "RTX 3090": 82,
}
# (GPU cores, memory bandwidth GB/s) by Apple chip tier, the larger configuration of each.
APPLE_TIERS = {"Ultra": (76, 800), "Max": (40, 400), "Pro": (18, 200), "": (10, 100)}


# Least estimated decode_dense_below: bandwidth alone would start sparse decode at 4-16k keys on
# a Mac, where sparse decode was measured losing needles that dense decode finds (gemma-3-270m,
# budget 1024, 16k: docs/accuracy/README.md); set decode_dense_below to go lower.
SPARSE_DECODE_FLOOR = 32768


def _groups(units: int) -> int:
    return 1 << round(math.log2(4 * units))


def tuning_for(backend: str | None, info: dict) -> Tuning:
    """The settings for a device of ``backend`` (``"metal"``, ``"cuda"``, None) described by
    ``info`` (``mx.device_info`` of the GPU)."""
    name = str(info.get("device_name", ""))
    if backend == "cuda":
        if "H200" in name:
            return H200
        key = next((k for k in CUDA_SMS if k in name), None)
        sms = CUDA_SMS.get(key, 132)
        return Tuning(
            _groups(sms),
            H200.decode_dense_below,
            f"estimated (CUDA, {sms} SMs {'of a ' + key if key else 'assumed'})",
        )
    if backend == "metal":
        tier = next((t for t in ("Ultra", "Max", "Pro") if t in name), "")
        cores, bandwidth = APPLE_TIERS[tier]
        below = H200.decode_dense_below * bandwidth / H200_BANDWIDTH
        below = max(1 << round(math.log2(below)), SPARSE_DECODE_FLOOR)
        return Tuning(
            _groups(cores),
            below,
            f"estimated (Metal, {cores} GPU cores and {bandwidth} GB/s assumed)",
        )
    return H200._replace(basis="the H200's (no GPU)")


@cache
def device_tuning() -> Tuning:
    """:func:`tuning_for` the GPU MLX runs on (the H200's settings without one)."""
    if mx.metal.is_available():
        return tuning_for("metal", mx.device_info(mx.gpu))
    if mx.cuda.is_available():
        return tuning_for("cuda", mx.device_info(mx.gpu))
    return tuning_for(None, {})


class RunSizes(NamedTuple):
    """What ``profile``, ``niah`` and ``doctor`` run when their sizes are not given."""

    device: str  # "GPU" or "CPU"
    profile_shape: str  # a key of cli.profiling.SHAPES
    profile_contexts: tuple[int, ...]
    profile_trials: int
    niah_contexts: tuple[int, ...]
    niah_depths: tuple[float, ...]  # percent
    doctor_contexts: tuple[int, ...]
    budget: int | None  # DHSA budget that makes these contexts sparse (None: DHSAConfig's)


GPU_SIZES = RunSizes(
    "GPU",
    "gemma-2-2b",
    (4096, 8192, 16384, 32768),
    3,
    (1024, 2048, 4096, 8192),
    (0.0, 25.0, 50.0, 75.0, 100.0),
    (8192, 32768),
    None,
)
# Sized for a CPU: 1-2k tokens on a 4-layer model. Budget 384 is the least the default sink,
# local window and block allow, so that 1k tokens (past 2 x 384) already run sparse.
CPU_SIZES = RunSizes("CPU", "tiny", (1024, 2048), 2, (1024,), (0.0, 50.0, 100.0), (1024,), 384)


def run_sizes() -> RunSizes:
    """:data:`GPU_SIZES` when MLX runs on a GPU, else :data:`CPU_SIZES`."""
    return CPU_SIZES if mx.default_device() == mx.cpu else GPU_SIZES


class Rate(NamedTuple):
    flops: float  # floating-point operations per second a model's forward pass is assumed to reach
    basis: str  # where the figure comes from, said with every estimate


# The H200's effective rate in gemma-2-2b's dense 32k prefill (bf16): that prefill's FLOPs
# divided by its time in docs/benchmarks.md. Other GPUs: scaled by SMs or memory bandwidth.
H200_FLOPS = 1.3e14
CALIBRATION_SIZE = 256  # a CPU's rate: the median of 5 fp32 matmuls of this size


def rate_for(backend: str | None, info: dict) -> Rate | None:
    """The assumed rate of a GPU (``backend`` ``"metal"`` or ``"cuda"``); None for a CPU."""
    name = str(info.get("device_name", ""))
    if backend == "cuda":
        key = next((k for k in CUDA_SMS if k in name), None)
        sms = CUDA_SMS.get(key, 132)
        return Rate(H200_FLOPS * sms / 132, f"the H200's prefill rate scaled to {sms} SMs")
    if backend == "metal":
        tier = next((t for t in ("Ultra", "Max", "Pro") if t in name), "")
        bandwidth = APPLE_TIERS[tier][1]
        return Rate(
            H200_FLOPS * bandwidth / H200_BANDWIDTH,
            f"the H200's prefill rate scaled to {bandwidth} GB/s, a guess",
        )
    return None


@cache
def device_rate() -> Rate:
    """The rate run times are estimated at: assumed for a GPU (:func:`rate_for`), measured on
    a CPU (a few small fp32 matmuls, which tracks the BLAS MLX's CPU build uses)."""
    if mx.default_device() != mx.cpu:
        backend = "metal" if mx.metal.is_available() else "cuda"
        return rate_for(backend, mx.device_info(mx.gpu))
    n = CALIBRATION_SIZE
    a = mx.random.normal((n, n), key=mx.random.key(0))
    mx.eval(a @ a)
    seconds = []
    for _ in range(5):
        tic = time.perf_counter()
        mx.eval(a @ a)
        seconds.append(time.perf_counter() - tic)
    flops = 2 * n**3 / max(statistics.median(seconds), 1e-9)
    return Rate(flops, f"{flops / 1e9:.1f} GFLOP/s, this CPU's fp32 matmul rate measured now")
