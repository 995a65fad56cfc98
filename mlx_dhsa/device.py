"""Settings that depend on the GPU: measured where they were tuned, estimated elsewhere.

MLX reports a device's name and architecture (``mx.device_info``) but not its core count or
memory bandwidth, so those come from the name. Two settings depend on them:

- ``decode_groups``: decode_attention.metal splits a step's keys until about this many groups
  run, 4 per streaming multiprocessor (CUDA) or GPU core (Metal), rounded to a power of two.
- ``decode_dense_below``: decode steps stay dense up to this many keys. A sparse step costs
  more launches (planning), a dense one reads every key: the crossover grows with memory
  bandwidth. Measured on the H200 (docs/benchmarks.md, decode); elsewhere scaled from it by
  bandwidth, an estimate (Metal: never measured).
"""

import math
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
        below = 1 << round(math.log2(below))
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
