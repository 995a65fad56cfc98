"""Full kernel sources as each backend's compiler sees them, built on any machine.

Metal: the text MLX generates (header, signature, body, instantiation) is read back from an
exported function. CUDA: the wrapper of mlx/backend/cuda/custom_kernel.cpp (build_kernel),
re-created here. Used by test_kernel_sources.py to compile both off-GPU.
"""

import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_dhsa import kernels
from mlx_dhsa.cache import SUMMARY_DTYPE
from mlx_dhsa.kernels import attention as attn_launch
from mlx_dhsa.kernels import planning, refining

SHIMS = Path(__file__).parent / "shims"

# Per kernel: input names, output names, and per instantiation the inputs, templates and outputs.
SIGNATURES = {
    "sparse_attention": (
        ["queries", "keys", "values", "kv_index", "kv_count", "iparams", "fparams"],
        ["out", "part", "lse"],
    ),
    "decode_attention": (
        ["queries", "keys", "values", "kv_index", "kv_count", "tickets", "iparams", "fparams"],
        ["part", "lse", "out"],
    ),
    "merge_splits": (["part", "lse", "iparams"], ["out"]),
    "block_scores": (
        ["queries", "keys", "summaries", "spreads", "open_prev", "iparams", "fparams"],
        ["scores", "open_sum"],
    ),
    "select_keys": (["scores", "starts", "lengths", "iparams"], ["indices", "n_valid"]),
    "plan": (
        [
            "queries",
            "keys",
            "summaries",
            "spreads",
            "open_prev",
            "iparams",
            "fparams",
            "starts",
            "lengths",
            "sel_params",
            "tickets",
        ],
        ["scores", "open_sum", "indices", "n_valid"],
    ),
    "refine_scores": (
        ["queries", "keys", "kv_index", "kv_count", "iparams", "fparams"],
        ["scores"],
    ),
}


# (dtype, bits, group_size, D) of the quantized variants' instances: every dtype, both bit
# widths, group sizes 64 and 128 (32 once).
QUANT_CASES = [
    (mx.float32, 4, 64, 64),
    (mx.float32, 8, 32, 128),
    (mx.float16, 8, 128, 256),
    (mx.bfloat16, 4, 128, 128),
    (mx.bfloat16, 8, 64, 256),
    (mx.float16, 4, 32, 128),  # DHSAConfig's default group at 4 bits
]
BOTH = ((False, False), (False, True), (True, False), (True, True))


def instances(name: str, backend: str, quantized: bool = False):
    """(inputs, template, output dtypes) for every variant the dispatcher can launch; with
    ``quantized``, of the variants over quantized K/V (QUANT_CASES: plan and all-keys, and
    split, launches)."""
    if quantized:
        return [
            x
            for dtype, bits, group, D in QUANT_CASES
            for x in _attention_instances(name, backend, dtype, D, (bits, group))
        ]
    if name == "select_keys":
        ins = [
            mx.zeros((1, 2, 9)),
            mx.zeros((1, 8), mx.int32),
            mx.zeros((1, 8), mx.int32),
            mx.zeros((len(kernels.sources.SelectParams._fields),), mx.int32),
        ]
        return [
            (ins, [("MAX_IV", iv), ("NT", nt)], [mx.int32, mx.int32])
            for nt in (256, planning.SELECT_THREADS)
            for iv in planning.INTERVAL_SIZES
        ]
    out = []
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        if name == "merge_splits":
            ins = [mx.zeros((2, 4, 256)), mx.zeros((2, 4)), mx.zeros((2,), mx.int32)]
            out.append((ins, [("T", dtype), ("D", 256), ("NW", attn_launch.MERGE_WARPS)], [dtype]))
            continue
        if name in ("block_scores", "plan"):
            for D in (64, 256):
                ins = [
                    mx.zeros((1, 8, 64, D), dtype),
                    mx.zeros((1, 4, 64, D), dtype),
                    mx.zeros((1, 8, D), SUMMARY_DTYPE),  # as the cache stores them
                    mx.zeros((1, 8, D), SUMMARY_DTYPE),  # spreads, likewise
                    mx.zeros((1, D)),  # open_prev: a carried sum, or planning's placeholder
                    mx.zeros((len(kernels.sources.BlockScoreParams._fields),), mx.int32),
                    mx.zeros((1,)),  # fparams: the spread factor
                ]
                if name == "block_scores":
                    tmpl = [("T", dtype), ("D", D), ("NT", planning.SCORE_THREADS)]
                    out.append((ins, tmpl, [mx.float32, mx.float32]))
                    continue
                ins += [
                    mx.zeros((1, 8), mx.int32),
                    mx.zeros((1, 8), mx.int32),
                    mx.zeros((len(kernels.sources.SelectParams._fields),), mx.int32),
                    mx.zeros((1,), mx.int32),
                ]
                for iv in planning.INTERVAL_SIZES:
                    tmpl = [("T", dtype), ("D", D), ("MAX_IV", iv), ("NT", planning.SCORE_THREADS)]
                    out.append((ins, tmpl, [mx.float32, mx.float32, mx.int32, mx.int32]))
            continue
        if name == "refine_scores":
            out += _refine_instances(backend, dtype)
            continue
        heads = ((256, 2), (128, 8), (64, 1))  # decode: distinct REPS, nvcc builds each
        if name == "sparse_attention":
            heads = ((64, 2), (256, 2))
        for D, reps in heads:
            out += _attention_instances(name, backend, dtype, D, None, reps)
    return out


def _refine_instances(backend: str, dtype) -> list:
    """refine_scores' instances at one dtype: the geometries refining.refine_config gives
    for head dims 64 and 256, 1-8 query heads per KV head, strides 1 and 8."""
    out = []
    for D, reps, stride in ((64, 1, 1), (256, 2, 8), (256, 4, 1), (128, 8, 16)):
        kernel = refining.refine_config(backend, dtype, D, 4 * reps, 4, 128, stride)
        ins = [mx.zeros((1, 4 * reps, 64, D), dtype), mx.zeros((1, 4, 64, D), dtype)]
        ins += [mx.zeros((1, 1, 16), mx.int32), mx.zeros((1, 1), mx.int32)]
        ins += [mx.zeros((len(kernels.sources.RefineParams._fields),), mx.int32), mx.zeros((2,))]
        tmpl = [("T", dtype), ("D", D), ("BK", kernel.bk), ("WARPS", kernel.warps)]
        out.append((ins, tmpl + [("WROWS", kernel.wrows)], [mx.float32]))
    return out


def _kv(dtype, D: int, quant) -> list:
    """Keys (or values) of 64 positions of 4 KV heads: an array, or a quantized triple."""
    if quant is None:
        return [mx.zeros((1, 4, 64, D), dtype)]
    bits, group = quant
    scales = mx.zeros((1, 4, 64, D // group), dtype)
    return [mx.zeros((1, 4, 64, D * bits // 32), mx.uint32), scales, scales]


def _attention_instances(name: str, backend: str, dtype, D: int, quant, reps: int = 2):
    """sparse_attention's or decode_attention's instances at one dtype and head dim, with the
    templates attention.py launches: every flag pair for arrays, two for quantized K/V."""
    kv = _kv(dtype, D, quant) + _kv(dtype, D, quant)
    index, count = mx.zeros((1, 1, 16), mx.int32), mx.zeros((1, 1), mx.int32)
    out = []
    if name == "decode_attention":
        ins = [mx.zeros((1, 4 * reps, 1, D), dtype), *kv, index, count]
        ins += [mx.zeros((4,), mx.int32), mx.zeros((10,), mx.int32), mx.zeros((2,))]
        flags = BOTH if quant is None else ((False, backend == "cuda"), (True, False))
        for all_keys, fold in flags:
            tmpl = attn_launch.decode_template(
                dtype, D, reps, all_keys=all_keys, fold=fold, quant=quant
            )
            out.append((ins, tmpl, [mx.float32, mx.float32, dtype]))
        return out
    ins = [mx.zeros((1, 4 * reps, 64, D), dtype), *kv, index, count]
    ins += [mx.zeros((12,), mx.int32), mx.zeros((2,))]
    for all_keys, split in BOTH if quant is None else ((False, False), (True, True)):
        block_size = None if all_keys else 16
        bits = None if quant is None else quant[0]
        tiles = attn_launch.tile_config(backend, dtype, D, 4 * reps, 4, block_size, bits)
        tmpl = attn_launch.sparse_template(
            dtype, D, tiles, all_keys=all_keys, split=split, quant=quant
        )
        out.append((ins, tmpl, [dtype, mx.float32, mx.float32]))
    return out


def signature(name: str, quantized: bool = False) -> tuple[list[str], list[str]]:
    """Input and output names of kernel ``name`` (its variant over quantized K/V)."""
    in_names, out_names = SIGNATURES[name]
    if quantized:
        in_names = ["queries", *kernels.sources.QUANTIZED_KV_INPUTS, *in_names[3:]]
    return in_names, out_names


def metal_source(name: str, inputs, template, output_dtypes, quantized: bool = False) -> str:
    """The Metal source MLX would compile for one instantiation (read from an export)."""
    header, source = kernels.kernel_source(name, "metal", quantized)
    in_names, out_names = signature(name, quantized)
    kernel = mx.fast.metal_kernel(
        name="dhsa_check",
        input_names=in_names,
        output_names=out_names,
        source=source,
        header=header,
    )

    def fn(*xs):
        return kernel(
            inputs=list(xs),
            template=template,
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(1,)] * len(out_names),
            output_dtypes=output_dtypes,
        )

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.mlxfn"
        mx.export_function(str(path), fn, *inputs)
        blob = path.read_bytes().decode("latin-1")
    start = blob.index('#line 1 "prelude_metal.h"')
    end = blob.index(">;", blob.index("[[host_name(", start)) + 2
    return blob[start:end]


_CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
}


def cuda_source(name: str, inputs, template, output_dtypes, quantized: bool = False) -> str:
    """The CUDA source MLX's cuda_kernel would hand to NVRTC for one instantiation."""
    header, source = kernels.kernel_source(name, "cuda", quantized)
    in_names, out_names = signature(name, quantized)
    params = []
    for n, x in zip(in_names, inputs):  # shape arguments appear only if the body names them
        params.append(f"    const {_CUDA_TYPES[x.dtype]}* {n}")
        for suffix, kind in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
            if f"{n}_{suffix}" in source:
                params.append(f"    const __grid_constant__ {kind} {n}_{suffix}")
    params += [f"    {_CUDA_TYPES[t]}* {n}" for n, t in zip(out_names, output_dtypes)]
    consts = []
    for key, val in template:
        if isinstance(val, bool):
            consts.append(f"  constexpr bool {key} = {'true' if val else 'false'};")
        elif isinstance(val, int):
            consts.append(f"  constexpr int {key} = {val};")
        else:
            consts.append(f"  using {key} = {_CUDA_TYPES[val]};")
    return (
        '#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
        "#define inf cuda::std::numeric_limits<float>::infinity()\n\n"
        f"{header}namespace mlx::core::cu {{\n\nnamespace cg = cooperative_groups;\n\n"
        f"__global__ void custom_kernel_dhsa_check(\n"
        + ",\n".join(params)
        + ") {\n"
        + "\n".join(consts)
        + "\n\n"
        + source
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )
