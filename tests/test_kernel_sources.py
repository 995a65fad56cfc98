"""Kernel sources on any machine: they assemble for both backends, the generated Metal source
type-checks with host clang++ against tests/shims/metal_shim.h, and the CUDA source compiles
to PTX with nvcc. The compilers are optional: a check whose tool is missing is skipped."""

import re
import shutil
import subprocess

import pytest
from kernel_builds import SHIMS, SIGNATURES, cuda_source, instances, metal_source, signature

from mlx_dhsa import kernels

ATTRIBUTES = re.compile(r"\[\[(?:[^\[\]]|\[[^\]]*\])*?\]\]")  # MLX's [[buffer(0)]] etc.


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("name", kernels.KERNELS)
def test_source_assembles(name, backend):
    header, source = kernels.kernel_source(name, backend)
    assert header.isascii() and source.isascii()
    assert f'#line 1 "prelude_{backend}.h"' in header and '#line 1 "common.h"' in header
    assert source.startswith(f'#line 1 "ids_{backend}.h"')
    for part in kernels.sources.PARTS.get(name, (name,)):
        assert f'#line 1 "{part}.metal"' in source
    strided = {
        "sparse_attention": {"queries", "keys", "values"},
        "decode_attention": {"queries", "keys", "values"},
        "block_scores": {"queries", "keys"},
        "plan": {"queries", "keys"},
        "refine_scores": {"queries", "keys"},
    }.get(name, set())
    for arg in SIGNATURES[name][0]:  # MLX adds shape arguments for these substrings
        assert arg + "_shape" not in source and arg + "_ndim" not in source
        assert (arg + "_strides" in source) == (arg in strided), arg
    code = re.sub(r"//[^\n]*", "", header + source)
    assert "inf" not in re.findall(r"\b\w+\b", code)  # CUDA's default header defines `inf`


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("name", kernels.sources.QUANTIZED_KERNELS)
def test_quantized_variant_assembles(name, backend):
    """The variant over quantized K/V is the same body with DHSA_QUANTIZED_KV defined; each
    of its K/V inputs is read through its strides (cache slices)."""
    header, source = kernels.kernel_source(name, backend, quantized=True)
    plain = kernels.kernel_source(name, backend)
    assert header == plain[0] and "#define DHSA_QUANTIZED_KV\n" in source
    assert source.replace("#define DHSA_QUANTIZED_KV\n", "") == plain[1]
    assert "DHSA_QUANTIZED_KV" in plain[1]  # the body has both paths
    for arg in signature(name, quantized=True)[0][:7]:
        assert arg + "_strides" in source, arg
    with pytest.raises(ValueError, match="no quantized variant"):
        kernels.kernel_source("merge_splits", backend, quantized=True)


def test_locator_and_unknown_kernel():
    assert (kernels.metal_dir() / "sparse_attention.metal").is_file()
    with pytest.raises(ValueError):
        kernels.kernel_source("nope", "metal")


def _run(cmd, path):
    result = subprocess.run(cmd + [str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{path.name}:\n{result.stderr[-4000:]}"


def metal_type_check_command() -> list[str]:
    """clang++ type-checking Metal source against tests/shims/metal_shim.h (path appended)."""
    return [
        "clang++",
        "-std=c++17",
        "-fsyntax-only",
        "-target",
        "aarch64-linux-gnu",
        "-nostdinc",
        "-Werror",
        "-Wno-unknown-attributes",
        "-I",
        str(SHIMS),
        "-include",
        str(SHIMS / "metal_shim.h"),
        "-x",
        "c++",
    ]


# Every kernel, and the variant over quantized K/V of those that have one.
VARIANTS = [(name, False) for name in kernels.KERNELS] + [
    (name, True) for name in kernels.sources.QUANTIZED_KERNELS
]


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed (apt clang)")
@pytest.mark.parametrize("name,quantized", VARIANTS)
def test_metal_source_type_checks(name, quantized, tmp_path):
    cmd = metal_type_check_command()
    for i, (inputs, template, dtypes) in enumerate(instances(name, "metal", quantized)):
        path = tmp_path / f"{name}_{'q' if quantized else ''}{i}.metal"
        source = metal_source(name, inputs, template, dtypes, quantized)
        path.write_text(ATTRIBUTES.sub("", source))
        _run(cmd, path)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("name,quantized", VARIANTS)
def test_cuda_source_compiles(name, quantized, tmp_path):
    cmd = ["nvcc", "-std=c++17", "-arch=sm_90", "-ptx", "-I", str(SHIMS), "-o", "/dev/null"]
    seen = set()
    for i, (inputs, template, dtypes) in enumerate(instances(name, "cuda", quantized)):
        key = str([v for k, v in template if k != "D"])
        if key in seen:  # one head dim per dtype and mode is enough for the compiler
            continue
        seen.add(key)
        path = tmp_path / f"{name}_{'q' if quantized else ''}{i}.cu"
        path.write_text(cuda_source(name, inputs, template, dtypes, quantized))
        _run(cmd, path)
