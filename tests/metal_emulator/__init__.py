"""Metal kernels on the CPU: a stand-in for ``mx.fast.metal_kernel`` that builds the source
MLX would hand to the Metal compiler (header, generated signature, body, template
instantiation: mlx/backend/common/metal_kernel.cpp, write_signature), compiles it with the
host C++ compiler against tests/shims/metal_emu.h and runs it over the grid.

Host compilation needs three textual rewrites, and only these: Metal's ``[[...]]``
attributes are dropped (as tests/test_kernel_sources.py does), ``device``/``constant``
pointers become bounds-checked views (``emu::dptr``), and ``threadgroup`` array
declarations become one array per group (``EMU_TG_DECL``).
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIMS = Path(__file__).resolve().parent.parent / "shims"
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the constant address space

_TYPES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint32: "uint32_t",
    mx.int16: "int16_t",
    mx.uint16: "uint16_t",
    mx.int8: "int8_t",
    mx.uint8: "uint8_t",
    mx.bool_: "bool",
}
# MLX's list of Metal thread attributes: each is added to the signature if the source names it.
_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

_ATTRIBUTE_TEXT = re.compile(r"\[\[(?:[^\[\]]|\[[^\]]*\])*?\]\]")
_TYPE = r"[A-Za-z_][\w:]*(?:<[^<>;()\n]*>)?"
_DEVICE_CAST = re.compile(
    rf"\(\s*(const\s+)?(?:device|constant|DHSA_DEVICE)[ \t]+(const\s+)?" rf"({_TYPE})\s*\*\s*\)"
)
_DEVICE_PTR = re.compile(
    rf"\b(const[ \t]+)?(?:device|constant|DHSA_DEVICE)[ \t]+" rf"(const[ \t]+)?({_TYPE})[ \t]*\*"
)
_TG_DECL = re.compile(
    r"\bthreadgroup[ \t]+([A-Za-z_][\w:]*)[ \t]+([A-Za-z_]\w*)[ \t]*" r"((?:\[[^\]\n]*\])+)"
)


def compiler() -> str | None:
    """The host C++ compiler the emulator uses: clang++ if present, else g++, else None."""
    for name in ("clang++", "g++"):
        if shutil.which(name):
            return name
    return None


def template_text(template) -> str:
    """MLX's write_template: ``<float, 64, 1>`` (bools as 0/1)."""
    parts = []
    for _, v in template:
        if isinstance(v, bool):
            parts.append(str(int(v)))
        elif isinstance(v, int):
            parts.append(str(v))
        else:
            parts.append(_TYPES[v])
    return "<" + ", ".join(parts) + ">"


def generate_source(
    name,
    input_names,
    output_names,
    source,
    header,
    inputs,
    template,
    output_dtypes,
    atomic_outputs=False,
) -> tuple[str, str, list]:
    """(kernel name, full source, params) as MLX's metal_kernel builds them.

    ``inputs`` are (dtype, size, ndim) triples. ``params``: the signature's parameters in
    order, as (kind, input/output index, name) with kind in input, shape, strides, ndim,
    output, attribute.
    """
    kname = "custom_kernel_" + name
    tdef = ""
    if template:
        tdef = template_text(template)
        thash = tdef.replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]
        kname += "_" + thash
    for dtype, size, ndim in inputs:
        kname += "_" + _TYPES[dtype] + ("s" if ndim == 0 else "c" if size < 8 else "")
    for dtype in output_dtypes:
        kname += "_" + _TYPES[dtype]
    attributes = [(a, t) for a, t in _ATTRIBUTES if a in source]
    text = header
    if template:
        kinds = [
            "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
            for _, v in template
        ]
        text += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template))
        text += ">\n"
    text += f"[[kernel]] void {kname}(\n"
    params, index = [], 0
    for i, (n, (dtype, size, ndim)) in enumerate(zip(input_names, inputs)):
        loc = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if ndim == 0 else "*"
        text += f"  const {loc} {_TYPES[dtype]}{ref} {n} [[buffer({index})]],\n"
        params.append(("input", i, n))
        index += 1
        if ndim > 0:
            for suffix, decl in (
                ("shape", "const constant int*"),
                ("strides", "const constant int64_t*"),
                ("ndim", "const constant int&"),
            ):
                if f"{n}_{suffix}" in source:
                    text += f"  {decl} {n}_{suffix} [[buffer({index})]],\n"
                    params.append((suffix, i, f"{n}_{suffix}"))
                    index += 1
    for i, (n, dtype) in enumerate(zip(output_names, output_dtypes)):
        t = f"atomic<{_TYPES[dtype]}>" if atomic_outputs else _TYPES[dtype]
        text += f"  device {t}* {n} [[buffer({index})]]"
        last = index >= len(inputs) + len(output_names) - 1 and not attributes
        text += ") {\n" if last else ",\n"
        params.append(("output", i, n))
        index += 1
    for j, (a, t) in enumerate(attributes):
        text += f"  {t} {a} [[{a}]]" + (") {\n" if j == len(attributes) - 1 else ",\n")
        params.append(("attribute", j, a))
    text += source + "\n}\n"
    if template:
        tdef = kname + tdef
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return kname, text, params


def host_source(metal_text: str) -> str:
    """The three rewrites that let the host compiler take Metal source (see the module doc)."""
    text = _ATTRIBUTE_TEXT.sub("", metal_text)

    def cast(m):
        const = "const " if m.group(1) or m.group(2) else ""
        return f"emu::dptr_cast<{const}{m.group(3)}>"

    def ptr(m):
        const = "const " if m.group(1) or m.group(2) else ""
        return f"emu::dptr<{const}{m.group(3)}>"

    text = _DEVICE_CAST.sub(cast, text)
    text = _DEVICE_PTR.sub(ptr, text)
    return _TG_DECL.sub(r"EMU_TG_DECL(\1, \2, \3)", text)


def _driver(kname: str, template, params, inputs, output_dtypes, atomic_outputs) -> str:
    call = kname + (template_text(template) if template else "")
    args = []
    for k, (kind, i, n) in enumerate(params):
        ptr, lo, hi = f"a.ptr[{k}]", f"a.lo[{k}]", f"a.hi[{k}]"
        if kind == "attribute":
            args.append(f"t.{n}")
            continue
        if kind == "input":
            ctype = _TYPES[inputs[i][0]]
            if inputs[i][2] == 0:
                args.append(f"*(const {ctype}*)({ptr})")
                continue
            ctype = "const " + ctype
        elif kind == "output":
            ctype = _TYPES[output_dtypes[i]]
            ctype = f"metal::atomic<{ctype}>" if atomic_outputs else ctype
        elif kind == "ndim":
            args.append(f"*(const int*)({ptr})")
            continue
        else:
            ctype = "const int" if kind == "shape" else "const int64_t"
        args.append(
            f"emu::dptr<{ctype}>(({ctype}*)({ptr}), (const char*)({lo}), "
            f'(const char*)({hi}), "{n}")'
        )
    body = ",\n      ".join(args)
    return f"""
namespace emu_driver {{
struct Args {{
  void* const* ptr;
  void* const* lo;
  void* const* hi;
}};
static void body(void* p) {{
  const Args& a = *static_cast<const Args*>(p);
  emu::Thread& t = emu::self();
  (void)t;
  {call}(
      {body});
}}
}}  // namespace emu_driver

extern "C" int emu_launch(void* const* ptr, void* const* lo, void* const* hi, const int* grid,
                          const int* tg, char* err, int errlen) {{
  emu_driver::Args a{{ptr, lo, hi}};
  return emu::run_launch(grid, tg, emu_driver::body, &a, err, errlen);
}}
"""


class EmulatorError(RuntimeError):
    """A launch the emulator stopped: out-of-bounds access, a limit, a barrier or simd-group
    misuse."""


class MetalEmulator:
    """``mx.fast.metal_kernel``'s factory, running kernels on the CPU; compiled instantiations
    are cached (in memory and in ``cache_dir``) for the object's life."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        cxx: str | None = None,
        opt: str = "-O1",
        defines: tuple[str, ...] = (),
    ):
        self.cxx = cxx or compiler()
        if self.cxx is None:
            raise RuntimeError("no host C++ compiler (clang++ or g++) for the Metal emulator")
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="metal_emu_"))
        self.opt = opt
        self.defines = [f"-D{d}" for d in defines]  # e.g. EMU_UCONTEXT: the portable fibers
        self._libs: dict[str, ctypes.CDLL] = {}
        self.log: list[str] = []  # the name of every kernel launched
        self.compiles = 0
        self._pch: list[str] | None = None

    def metal_kernel(
        self,
        name,
        input_names,
        output_names,
        source,
        header="",
        ensure_row_contiguous=True,
        atomic_outputs=False,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        spec = dict(
            name=name,
            input_names=list(input_names),
            output_names=list(output_names),
            source=source,
            header=header,
            contiguous=ensure_row_contiguous,
            atomic_outputs=atomic_outputs,
        )

        def kernel(
            *,
            inputs,
            output_shapes,
            output_dtypes,
            grid,
            threadgroup,
            template=None,
            init_value=None,
            verbose=False,
            stream=None,
        ):
            return self._launch(
                spec,
                inputs,
                template or [],
                grid,
                threadgroup,
                output_shapes,
                output_dtypes,
                init_value,
                verbose,
            )

        return kernel

    def _flags(self) -> list[str]:
        """Compiler flags; with clang++, the shim as a precompiled header (built once: it is
        a good part of each instantiation's compile time)."""
        flags = ["-std=c++17", self.opt, "-fPIC", "-w", *self.defines, "-I", str(SHIMS / "emu")]
        if "clang" not in Path(self.cxx).name:
            return flags
        if self._pch is None:
            shim = (SHIMS / "metal_emu.h").read_bytes()
            tag = hashlib.sha1(shim + str(flags).encode()).hexdigest()[:12]
            pch = self.cache_dir / f"metal_emu_{tag}.pch"
            if not pch.exists():
                cmd = [
                    self.cxx,
                    *flags,
                    "-x",
                    "c++-header",
                    str(SHIMS / "metal_emu.h"),
                    "-o",
                    str(pch) + ".tmp",
                ]
                result = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise EmulatorError(f"precompiling the shim failed:\n{result.stderr[-4000:]}")
                os.replace(str(pch) + ".tmp", pch)
            self._pch = ["-include-pch", str(pch)]
        return flags + self._pch

    def library(self, metal_text: str, driver: str) -> ctypes.CDLL:
        """The shared library of one instantiation, compiled once."""
        code = "#include <metal_stdlib>\n" + host_source(metal_text) + driver
        shim = (SHIMS / "metal_emu.h").read_text()  # part of what is compiled
        key = hashlib.sha1(
            str([self.cxx, self.opt, self.defines, shim, code]).encode()
        ).hexdigest()[:20]
        if key in self._libs:
            return self._libs[key]
        so = self.cache_dir / f"{key}.so"
        if not so.exists():
            src = self.cache_dir / f"{key}.cpp"
            src.write_text(code)
            cmd = [self.cxx, *self._flags(), "-shared", "-o", str(so) + ".tmp", str(src)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise EmulatorError(f"host compile of {src} failed:\n{result.stderr[-6000:]}")
            os.replace(str(so) + ".tmp", so)
            self.compiles += 1
        lib = ctypes.CDLL(str(so))
        lib.emu_launch.restype = ctypes.c_int
        self._libs[key] = lib
        return lib

    def _launch(
        self,
        spec,
        inputs,
        template,
        grid,
        threadgroup,
        output_shapes,
        output_dtypes,
        init_value,
        verbose,
    ):
        if len(inputs) != len(spec["input_names"]):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size "
                f"{len(spec['input_names'])} but got size {len(inputs)}."
            )
        arrays = [_host_view(x, spec["contiguous"]) for x in inputs]
        described = [(x.dtype, x.size, x.ndim) for x in inputs]
        kname, text, params = generate_source(
            spec["name"],
            spec["input_names"],
            spec["output_names"],
            spec["source"],
            spec["header"],
            described,
            template,
            output_dtypes,
            spec["atomic_outputs"],
        )
        if verbose:
            print(text)
        tsize = threadgroup[0] * threadgroup[1] * threadgroup[2]
        if tsize > 1024:
            raise ValueError(
                f"Thread group size ({tsize}) is greater than  the maximum "
                "allowed threads per threadgroup (1024)."
            )
        lib = self.library(
            text, _driver(kname, template, params, described, output_dtypes, spec["atomic_outputs"])
        )
        outs = [
            _output(shape, dtype, init_value) for shape, dtype in zip(output_shapes, output_dtypes)
        ]
        keep, ptr, lo, hi = [], [], [], []
        for kind, i, _ in params:
            if kind == "attribute":
                continue
            if kind == "output":
                buf = outs[i]
                p, lo_, hi_ = _span(buf)
            elif kind == "input":
                p, lo_, hi_ = _span(arrays[i])
            else:
                x = arrays[i]
                itemsize = x.itemsize
                vals = {
                    "shape": np.array(x.shape, np.int32),
                    "strides": np.array([s // itemsize for s in x.strides], np.int64),
                    "ndim": np.array([x.ndim], np.int32),
                }[kind]
                keep.append(vals)
                p, lo_, hi_ = _span(vals)
            ptr.append(p)
            lo.append(lo_)
            hi.append(hi_)
        n = len(ptr)
        err = ctypes.create_string_buffer(1024)
        rc = lib.emu_launch(
            (ctypes.c_void_p * n)(*ptr),
            (ctypes.c_void_p * n)(*lo),
            (ctypes.c_void_p * n)(*hi),
            (ctypes.c_int * 3)(*grid),
            (ctypes.c_int * 3)(*threadgroup),
            err,
            1024,
        )
        self.log.append(spec["name"])
        if rc != 0:
            raise EmulatorError(
                f"{spec['name']}{template_text(template) if template else ''}"
                f": {err.value.decode()}"
            )
        return [_to_mx(o, dtype) for o, dtype in zip(outs, output_dtypes)]


def _host_view(x: mx.array, contiguous: bool) -> np.ndarray:
    """x's elements as numpy (16-bit floats as their bits), read in place through its strides
    unless MLX would copy it (ensure_row_contiguous)."""
    mx.eval(x)
    if x.dtype in (mx.bfloat16, mx.float16):
        x = x.view(mx.uint16)
    a = np.asarray(x)
    if contiguous or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    return a


def _span(a: np.ndarray) -> tuple[int, int, int]:
    """(pointer to element 0, first byte, one past the last byte) of the elements a views."""
    p = a.ctypes.data
    if a.size == 0:
        return p, p, p
    last = sum((n - 1) * s for n, s in zip(a.shape, a.strides))
    return p, p, p + last + a.itemsize


_NP = {
    mx.float32: np.float32,
    mx.float16: np.uint16,
    mx.bfloat16: np.uint16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.uint32: np.uint32,
    mx.int16: np.int16,
    mx.uint16: np.uint16,
    mx.int8: np.int8,
    mx.uint8: np.uint8,
    mx.bool_: np.bool_,
}


def _output(shape, dtype, init_value) -> np.ndarray:
    """An output buffer: init_value, else poison (MLX leaves it uninitialised): NaN for
    floats, 0x7f7f7f7f-like bytes for integers."""
    if init_value is not None:
        return np.ascontiguousarray(_from_mx(mx.full(shape, init_value, dtype)))
    out = np.empty(shape, _NP[dtype])
    out.view(np.uint8)[...] = 0xFF if dtype in (mx.float32, mx.float16, mx.bfloat16) else 0x7F
    return out


def _from_mx(x: mx.array) -> np.ndarray:
    if x.dtype in (mx.bfloat16, mx.float16):
        x = x.view(mx.uint16)
    return np.array(x)


def _to_mx(a: np.ndarray, dtype) -> mx.array:
    if dtype in (mx.bfloat16, mx.float16):
        return mx.array(a).view(dtype)
    return mx.array(a)
