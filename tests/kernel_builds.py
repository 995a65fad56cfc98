"""Full kernel sources as each backend's compiler sees them, built on any machine.

Metal: the text MLX generates (header, signature, body, instantiation) is read back from an
exported function. CUDA: the wrapper of mlx/backend/cuda/custom_kernel.cpp (build_kernel),
re-created here. Used by test_kernel_sources.py to compile both off-GPU.
"""

import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_dhsa import kernels
from mlx_dhsa.kernels import attention as attn_launch
from mlx_dhsa.kernels import planning

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
        ["queries", "keys", "summaries", "open_prev", "iparams"],
        ["scores", "open_sum"],
    ),
    "select_keys": (["scores", "starts", "lengths", "iparams"], ["indices", "n_valid"]),
    "plan": (
        [
            "queries",
            "keys",
            "summaries",
            "open_prev",
            "iparams",
            "starts",
            "lengths",
            "sel_params",
            "tickets",
        ],
        ["scores", "open_sum", "indices", "n_valid"],
    ),
}


def instances(name: str, backend: str):
    """(inputs, template, output dtypes) for every variant the dispatcher can launch."""
    out = []
    if name == "select_keys":
        ins = [
            mx.zeros((1, 2, 9)),
            mx.zeros((1, 8), mx.int32),
            mx.zeros((1, 8), mx.int32),
            mx.zeros((len(kernels.sources.SelectParams._fields),), mx.int32),
        ]
        return [
            (ins, [("MAX_IV", planning.MAX_INTERVALS), ("NT", nt)], [mx.int32, mx.int32])
            for nt in (256, planning.SELECT_THREADS)
        ]
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        if name == "merge_splits":
            ins = [mx.zeros((2, 4, 256)), mx.zeros((2, 4)), mx.zeros((2,), mx.int32)]
            out.append((ins, [("T", dtype), ("D", 256), ("NW", attn_launch.MERGE_WARPS)], [dtype]))
            continue
        if name == "decode_attention":
            for D, reps in ((256, 2), (128, 8), (64, 1)):  # distinct REPS: nvcc builds each
                ins = [
                    mx.zeros((1, 4 * reps, 1, D), dtype),
                    mx.zeros((1, 4, 64, D), dtype),
                    mx.zeros((1, 4, 64, D), dtype),
                    mx.zeros((1, 1, 16), mx.int32),
                    mx.zeros((1, 1), mx.int32),
                    mx.zeros((4,), mx.int32),
                    mx.zeros((10,), mx.int32),
                    mx.zeros((2,)),
                ]
                for all_keys in (False, True):
                    for fold in (False, True):
                        tmpl = [
                            ("T", dtype),
                            ("D", D),
                            ("REPS", reps),
                            ("NW", attn_launch.DECODE_WARPS),
                            ("KB", attn_launch.DECODE_KEYS),
                            ("ALL_KEYS", all_keys),
                            ("FOLD", fold),
                        ]
                        out.append((ins, tmpl, [mx.float32, mx.float32, dtype]))
            continue
        if name in ("block_scores", "plan"):
            for D in (64, 256):
                ins = [
                    mx.zeros((1, 8, 64, D), dtype),
                    mx.zeros((1, 4, 64, D), dtype),
                    mx.zeros((1, 8, D)),
                    mx.zeros((1, D)),
                    mx.zeros((len(kernels.sources.BlockScoreParams._fields),), mx.int32),
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
                tmpl = [
                    ("T", dtype),
                    ("D", D),
                    ("MAX_IV", planning.MAX_INTERVALS),
                    ("NT", planning.SCORE_THREADS),
                ]
                out.append((ins, tmpl, [mx.float32, mx.float32, mx.int32, mx.int32]))
            continue
        warps, wrows, bk = attn_launch.TILES[(backend, dtype.size)]
        stages = attn_launch.STAGES[backend]
        for D in (64, 256):
            ins = [
                mx.zeros((1, 8, 64, D), dtype),
                mx.zeros((1, 4, 64, D), dtype),
                mx.zeros((1, 4, 64, D), dtype),
                mx.zeros((1, 1, 16), mx.int32),
                mx.zeros((1, 1), mx.int32),
                mx.zeros((12,), mx.int32),
                mx.zeros((2,)),
            ]
            for all_keys in (False, True):
                for split in (False, True):
                    tmpl = [
                        ("T", dtype),
                        ("D", D),
                        ("BK", bk),
                        ("WARPS", warps),
                        ("WROWS", wrows),
                        ("ALL_KEYS", all_keys),
                        ("SPLIT", split),
                        ("STAGES", 1 if all_keys else stages),
                    ]
                    out.append((ins, tmpl, [dtype, mx.float32, mx.float32]))
    return out


def signature(name: str, quantized: bool = False) -> tuple[list[str], list[str]]:
    """Input and output names of kernel ``name`` (its variant over quantized K/V)."""
    in_names, out_names = SIGNATURES[name]
    if quantized:
        in_names = ["queries", *kernels.sources.QUANTIZED_KV_INPUTS, *in_names[3:]]
    return in_names, out_names


def quantized_instances(name: str, backend: str):
    """(inputs, template, output dtypes) of the quantized variants: every dtype, both bit
    widths, group sizes 64 and 128 (32 once), plan and all-keys (and split) launches."""
    out = []
    cases = [
        (mx.float32, 4, 64, 64),
        (mx.float32, 8, 32, 128),
        (mx.float16, 8, 128, 256),
        (mx.bfloat16, 4, 128, 128),
        (mx.bfloat16, 8, 64, 256),
    ]
    for dtype, bits, group, D in cases:

        def kv(dtype=dtype, bits=bits, group=group, D=D):
            words = mx.zeros((1, 4, 64, D * bits // 32), mx.uint32)
            scales = mx.zeros((1, 4, 64, D // group), dtype)
            return [words, scales, scales]

        quant = [("BITS", bits), ("GROUP", group)]
        if name == "decode_attention":
            reps = 2
            ins = [mx.zeros((1, 4 * reps, 1, D), dtype), *kv(), *kv()]
            ins += [
                mx.zeros((1, 1, 16), mx.int32),
                mx.zeros((1, 1), mx.int32),
                mx.zeros((4,), mx.int32),
                mx.zeros((10,), mx.int32),
                mx.zeros((2,)),
            ]
            for all_keys, fold in ((False, backend == "cuda"), (True, False)):
                tmpl = [
                    ("T", dtype),
                    ("D", D),
                    ("REPS", reps),
                    ("NW", attn_launch.DECODE_WARPS),
                    ("KB", attn_launch.DECODE_KEYS),
                    ("ALL_KEYS", all_keys),
                    ("FOLD", fold),
                    *quant,
                ]
                out.append((ins, tmpl, [mx.float32, mx.float32, dtype]))
            continue
        warps, wrows, bk = attn_launch.TILES[(backend, dtype.size)]
        ins = [mx.zeros((1, 8, 64, D), dtype), *kv(), *kv()]
        ins += [
            mx.zeros((1, 1, 16), mx.int32),
            mx.zeros((1, 1), mx.int32),
            mx.zeros((12,), mx.int32),
            mx.zeros((2,)),
        ]
        for all_keys, split in ((False, False), (True, True)):
            tmpl = [
                ("T", dtype),
                ("D", D),
                ("BK", bk),
                ("WARPS", warps),
                ("WROWS", wrows),
                ("ALL_KEYS", all_keys),
                ("SPLIT", split),
                ("STAGES", 1),
                *quant,
            ]
            out.append((ins, tmpl, [dtype, mx.float32, mx.float32]))
    return out


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
