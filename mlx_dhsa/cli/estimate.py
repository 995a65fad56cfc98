"""How long a command will run, estimated from its sizes before it starts.

A forward pass costs 2 FLOPs per layer weight per token, plus the attention's 4 x keys x heads x
head_dim per token and layer (dense, over the full square as mlx-lm computes it: an upper bound
for sparse methods), plus the output projection of the tokens whose logits are read. The total
is divided by :func:`mlx_dhsa.device.device_rate`. Decode on a GPU is bound by launches, not
FLOPs, so GPU estimates are low there; they only decide whether to warn.
"""

import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..device import device_rate

LONG_S = 600.0  # runs estimated to take longer than this are announced before they start


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs to know about a model."""

    layers: int
    layer_weights: int  # weights of one layer, on average (quantized ones unpacked)
    heads: int  # query heads
    head_dim: int
    vocab: int
    hidden: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelSize":
        """Read from an mlx-lm model; its arrays need not be evaluated (shapes suffice)."""
        args = model.args
        args = getattr(args, "text_config", None) or args
        get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
        layers = list(model.layers)
        weights = 0
        for layer in layers:
            for _, module in layer.named_modules():
                if isinstance(module, nn.QuantizedLinear):
                    weights += module.weight.size * 32 // module.bits
                elif isinstance(module, nn.Linear):
                    weights += module.weight.size
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(
            layers=len(layers),
            layer_weights=weights // max(len(layers), 1),
            heads=heads,
            head_dim=get("head_dim") or hidden // heads,
            vocab=get("vocab_size"),
            hidden=hidden,
        )

    def forward_flops(self, tokens: int, cached: int = 0, logits: int = 1) -> float:
        """FLOPs of ``tokens`` new tokens after ``cached`` keys, reading ``logits`` outputs."""
        keys = cached + tokens
        per_layer = 2 * self.layer_weights * tokens + 4 * self.heads * self.head_dim * keys * tokens
        return self.layers * per_layer + 2 * self.vocab * self.hidden * logits

    def generate_flops(self, prompt: int, new_tokens: int) -> float:
        """A prefill of ``prompt`` tokens, then ``new_tokens`` decode steps."""
        decode = sum(self.forward_flops(1, prompt + i) for i in range(new_tokens))
        return self.forward_flops(prompt) + decode


def profile_flops(
    size: ModelSize,
    contexts: Sequence[int],
    methods: int,
    trials: int,
    decode_tokens: int,
    warmup: int = 1,
) -> float:
    """What ``profile`` runs: per method, ``warmup`` runs at the shortest context, then
    ``trials`` at every context."""
    runs = [min(contexts)] * warmup + [c for c in contexts for _ in range(trials)]
    return methods * sum(size.generate_flops(c, decode_tokens) for c in runs)


def niah_flops(size: ModelSize, contexts: Sequence[int], cells: int, max_tokens: int) -> float:
    """What ``niah`` runs: ``cells`` answers (methods x depths) at every context."""
    return cells * sum(size.generate_flops(c, max_tokens) for c in contexts)


def seconds(flops: float) -> float:
    return flops / device_rate().flops


def duration(s: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# Debian/Ubuntu's libopenblas0-pthread: MLX's Linux CPU build uses a reference BLAS, and
# preloading OpenBLAS made its fp32 matmuls about 20x faster here (README, install).
OPENBLAS = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3"


def blas_tip() -> str | None:
    """How to make CPU runs faster on Linux, or None where it does not apply."""
    if sys.platform != "linux" or mx.default_device() != mx.cpu:
        return None
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return None
    if os.path.exists(OPENBLAS):
        return f"LD_PRELOAD={OPENBLAS} before the command makes CPU runs much faster"
    return (
        "`apt install libopenblas0-pthread`, then LD_PRELOAD=" + OPENBLAS + " before the "
        "command makes CPU runs much faster"
    )


def long_run_warning(flops: float, what: str) -> str | None:
    """A line saying ``what`` will take long, or ``None`` when it is estimated under LONG_S."""
    s = seconds(flops)
    if s <= LONG_S:
        return None
    tip = blas_tip()
    return (
        f"{what} is estimated at about {duration(s)} here ({flops:.2g} FLOPs at "
        f"{device_rate().basis}); Ctrl-C stops it." + (f" On Linux: {tip}." if tip else "")
    )
