"""How much 4- and 8-bit KV quantization moves dense attention on gemma-3-270m's global layers.

One essay prefix of N tokens (default 2048) runs densely through the model; for each global
layer the post-RoPE queries, keys and values go through mx.quantize / mx.dequantize (mlx-lm's
per-token storage), and the relative (Frobenius) error of causal dense attention's output is
printed for: plain keys; keys rotated by a Hadamard transform of the head dim (queries
rotated alike, so q.k is unchanged); keys minus their per-channel mean over the prefix (the
softmax does not see the shift); keys minus the mean of their first F keys only, F the second
argument (what a cache could fix after its first prefill step). Values are quantized plainly in
every case.

python key_error.py 2048        (from /tmp, essays in /tmp/essays; about a minute on 2 cores)
python key_error.py 8192 2048   (about 8 minutes)
"""

import sys

import mlx.core as mx
import mlx_lm.models.gemma3_text as gemma3
from mlx_lm.models.cache import make_prompt_cache

from mlx_dhsa import load
from mlx_dhsa.evaluation import niah

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
F = int(sys.argv[2]) if len(sys.argv) > 2 else None
model, tok = load("gemma-3-270m", patch=False)
ids = tok.encode(niah.read_haystack("/tmp/essays"), add_special_tokens=False)[:N]
captured = []
sdpa = gemma3.scaled_dot_product_attention


def recording(q, k, v, cache=None, scale=1.0, mask=None, **kw):
    captured.append((q, k, v, scale))
    return sdpa(q, k, v, cache=cache, scale=scale, mask=mask, **kw)


gemma3.scaled_dot_product_attention = recording
model(mx.array([ids]), cache=make_prompt_cache(model))
gemma3.scaled_dot_product_attention = sdpa
glob = [i for i, layer in enumerate(model.layers) if not layer.self_attn.is_sliding]


def qdq(x, bits, group):
    return mx.dequantize(*mx.quantize(x, group_size=group, bits=bits), group_size=group, bits=bits)


def attend(q, k, v, scale):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


def rel(a, b):
    return (mx.sqrt(((a - b) ** 2).sum() / (b**2).sum())).item()


for i in glob:
    q, k, v = (x.astype(mx.float32) for x in captured[i][:3])
    scale = captured[i][3]
    ref = attend(q, k, v, scale)
    D = k.shape[-1]
    mean = k.mean(axis=2, keepdims=True)
    variants = {  # queries, keys to quantize, what is added back to the dequantized keys
        "plain": (q, k, 0.0),
        "hadamard": (mx.hadamard_transform(q, scale=D**-0.5),
                     mx.hadamard_transform(k, scale=D**-0.5), 0.0),
        "minus mean": (q, k - mean, mean),
    }  # fmt: skip
    if F is not None:
        first = k[:, :, :F].mean(axis=2, keepdims=True)
        variants[f"first {F}"] = (q, k - first, first)
    for name, (qx, kx, shift) in variants.items():
        row = [f"layer {i:2d} {name:10s}"]
        for bits, group in ((4, 64), (4, 32), (8, 64)):
            out = attend(qx, qdq(kx, bits, group) + shift, qdq(v, bits, group), scale)
            row.append(f"{bits}-bit group {group}: {rel(out, ref):.3f}")
        print(" | ".join(row), flush=True)
