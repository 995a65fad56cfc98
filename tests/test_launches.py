"""Every kernel launch of representative calls, recorded through a fake kernel factory under a
forced backend, equals the recorded launches in tests/data/launches.json: grids, threadgroups,
templates, input shapes and parameter values, output shapes, and the path each layer took.

The record was made before the kernels became a package (and checked equal to the launches
of the code before it, up to the template parameters that replaced constants written twice
in the sources). Regenerate after an intended launch change with
``DHSA_RECORD_LAUNCHES=1 python3 -m pytest tests/test_launches.py`` and review the diff."""

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_qkv, small_config, tiny_gemma2, tiny_llama

import mlx_dhsa
from mlx_dhsa import kernels
from mlx_dhsa.cache import ClosedChunks, ClosedSummaries
from mlx_dhsa.patching import dhsa_layers
from mlx_dhsa.plan import Plan

RECORD = Path(__file__).parent / "data" / "launches.json"
SCALE = 0.125


class Recorder:
    """A factory with ``mx.fast.metal_kernel``'s call shape whose kernels record each launch
    and return zeros."""

    def __init__(self):
        self.launches = []

    def __call__(
        self,
        *,
        name,
        input_names,
        output_names,
        source,
        header,
        ensure_row_contiguous=True,
        **extra,
    ):
        base = "_".join(
            name.split("_")[1:-1]
            if "shared_memory" not in extra or not extra["shared_memory"]
            else name.split("_")[1:-2]
        )
        head = f"{base} in={input_names} out={output_names} rc={ensure_row_contiguous} {extra}"

        def launch(
            *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None
        ):
            args = []
            for n, x in zip(input_names, inputs):
                arg = f"{n}{list(x.shape)}:{x.dtype}"
                if n in ("iparams", "fparams", "sel_params"):
                    arg += f"={np.array(x).tolist()}"
                args.append(arg)
            self.launches.append(
                f"{head} template={[(k, str(v)) for k, v in template]} grid={list(grid)} "
                f"tg={list(threadgroup)} outs={[list(s) for s in output_shapes]}:"
                f"{[str(d) for d in output_dtypes]} init={init_value} args={args}"
            )
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

        return launch


def _table(k, config):
    closed = ClosedChunks().sync(k, config)
    return ClosedSummaries().table(k, closed, config)


def _attention_calls():
    for dtype in (mx.float16, mx.float32):
        q, k, v = make_qkv(B=1, H=8, H_kv=4, L=64, S=1024, D=128, dtype=dtype)
        idx = mx.broadcast_to(mx.arange(48, dtype=mx.int32), (1, 4, 48))
        nv = mx.full((1, 4), 48, mx.int32)
        kernels.sparse_attention(q, k, v, Plan(idx, nv, 960, 16, None), scale=SCALE, softcap=50.0)
        plan1 = Plan(idx[:, :1], nv[:, :1], q_offset=1023, block_size=16, window=None)
        kernels.sparse_attention(q[:, :, :1], k, v, plan1, scale=SCALE, softcap=50.0)
        kernels.sparse_attention(q[:, :, :1], k, v, plan1, scale=SCALE, softcap=None)
        q2, k2, v2 = make_qkv(B=2, H=4, H_kv=2, L=1, S=512, D=48, dtype=dtype)  # tile kernel
        plan2 = Plan(mx.zeros((2, 1, 48), mx.int32), mx.ones((2, 1), mx.int32), 511, 16, None)
        kernels.sparse_attention(q2, k2, v2, plan2, scale=SCALE)
    for dtype in (mx.bfloat16, mx.float32):
        for L, S, off, window in (
            (256, 256, 0, None),
            (64, 2048, 1984, 512),
            (1, 4096, 4095, None),
            (1, 4096, 4095, 1024),
            (1, 100, 99, None),
            (3, 3000, 2997, None),
        ):
            q, k, v = make_qkv(B=1, H=8, H_kv=2, L=L, S=S, D=64, dtype=dtype)
            kernels.dense_attention(q, k, v, scale=SCALE, softcap=30.0, q_offset=off, window=window)
        q, k, v = make_qkv(B=1, H=16, H_kv=1, L=1, S=300, D=256, dtype=dtype)  # 16 heads a KV
        kernels.dense_attention(q, k, v, scale=SCALE, q_offset=299)
    return []


def _quantized_calls():
    """Attention over quantized K/V (QuantizedKV, as QuantizedKVCache holds it)."""
    from mlx_dhsa.quantized import QuantizedKV

    for dtype, bits, group, D in ((mx.bfloat16, 4, 64, 128), (mx.float16, 8, 128, 256)):
        q, k, v = make_qkv(B=1, H=8, H_kv=4, L=64, S=1024, D=D, dtype=dtype)
        kq, vq = (QuantizedKV.quantize(x, bits, group) for x in (k, v))
        idx = mx.broadcast_to(mx.arange(48, dtype=mx.int32), (1, 4, 48))
        nv = mx.full((1, 4), 48, mx.int32)
        kernels.sparse_attention(q, kq, vq, Plan(idx, nv, 960, 16, None), scale=SCALE, softcap=50.0)
        plan1 = Plan(idx[:, :1], nv[:, :1], q_offset=1023, block_size=16, window=None)
        kernels.sparse_attention(q[:, :, :1], kq, vq, plan1, scale=SCALE, softcap=50.0)
        kernels.dense_attention(q, kq, vq, scale=SCALE, softcap=30.0, q_offset=960, window=512)
        kernels.dense_attention(q[:, :, :1], kq, vq, scale=SCALE, q_offset=1023)
    return []


def _plan_calls():
    config = small_config(budget=64, block_size=16)
    for dtype in (mx.float16, mx.float32):
        for L, S in ((64, 700), (1, 700), (16, 900), (40, 1200)):
            q, k, _ = make_qkv(B=1, H=8, H_kv=4, L=L, S=S, D=64, dtype=dtype)
            kernels.select_chunks(q, _table(k, config), config, q_offset=S - L, window=None)
    return []


def _model_calls(family, prompt_len, steps, **overrides):
    def run():
        make = tiny_gemma2 if family == "gemma2" else tiny_llama
        model = mlx_dhsa.patch(make(dtype=mx.float16), small_config(**overrides))
        cache = mlx_dhsa.make_prompt_cache(model)
        tokens = mx.random.randint(0, 1000, (1, prompt_len))
        paths = []
        for i in range(0, prompt_len, 128):
            model(tokens[:, i : i + 128], cache=cache)
            paths.append([a.last_path for a in dhsa_layers(model)])
        for _ in range(steps):
            model(mx.array([[5]]), cache=cache)
            paths.append([a.last_path for a in dhsa_layers(model)])
        model(tokens[:, :200])  # no cache
        paths.append([a.last_path for a in dhsa_layers(model)])
        return paths

    return run


SECTIONS = {
    "attention": _attention_calls,
    "plan": _plan_calls,
    "quantized": _quantized_calls,
    "gemma2_sparse_decode": _model_calls("gemma2", 300, 3),
    "gemma2_dense_decode": _model_calls("gemma2", 300, 3, decode_dense_below=1000),
    "llama_dense_decode": _model_calls("llama", 300, 2, decode_dense_below=1000),
    "gemma2_block_sparse": _model_calls("gemma2", 300, 2, method="block_sparse"),
    # 4-bit KV (QuantizedDHSACache): planned on the kernels over the table's model-dtype keys
    # from keys_start on.
    "gemma2_quantized_kv": _model_calls("gemma2", 300, 3, kv_bits=4, kv_group_size=32),
}


def _record(backend: str) -> dict:
    out = {}
    for name, fn in SECTIONS.items():
        recorder = Recorder()
        mx.random.seed(0)
        with kernels.use_backend(backend, recorder, any_device=True, self_check=False):
            paths = fn()
        launches = recorder.launches
        if name in ("attention", "plan", "quantized"):
            out[name] = launches
        else:  # long: kept as a digest and the first launches of each kernel
            digest = hashlib.sha256("\n".join(launches).encode()).hexdigest()
            firsts = {}
            for line in launches:
                firsts.setdefault(line.split(" ", 1)[0], line)
            out[name] = {"paths": paths, "count": len(launches), "sha256": digest, "first": firsts}
    return out


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_launches_equal_the_record(backend):
    got = _record(backend)
    if os.environ.get("DHSA_RECORD_LAUNCHES"):
        record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
        record[backend] = got
        RECORD.write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
    want = json.loads(RECORD.read_text())[backend]
    for name in SECTIONS:
        assert got[name] == want[name], name
