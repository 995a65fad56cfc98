"""Kernel sources, parameter layouts and the backend that builds them.

Kernel bodies live in ``metal/`` and are written once for both GPU backends: each build
prepends the backend's thread ids (``ids_<backend>.h``) and the named offsets of the launch's
parameter arrays to the body, and passes the backend's prelude plus ``common.h`` as the header,
for ``mx.fast.metal_kernel`` on Macs and ``mx.fast.cuda_kernel`` on NVIDIA. Sequence lengths,
offsets and counts travel as runtime parameters, so a new prompt length never compiles a new
kernel. Every build goes through one factory call of the current :class:`Backend`, which
tests may replace (:func:`use_backend`).
"""

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx

BACKENDS = ("metal", "cuda")
KERNELS = (
    "sparse_attention",
    "decode_attention",
    "merge_splits",
    "block_scores",
    "select_keys",
    "plan",
    "refine_scores",
)
# Kernels with a variant over quantized keys and values (mlx_dhsa.quantized.QuantizedKV): the
# same body with DHSA_QUANTIZED_KV defined, its K/V inputs the packed words, scales and biases
# (QUANTIZED_KV_INPUTS), and template parameters BITS and GROUP.
QUANTIZED_KERNELS = ("sparse_attention", "decode_attention")
QUANTIZED_KV_INPUTS = ["keys", "key_scales", "key_biases", "values", "value_scales", "value_biases"]
# Kernels assembled from several bodies, each in a scope of its own: the fused planning kernel
# runs block_scores, hands each query block to the group that finishes it last, and selects.
PARTS = {"plan": ("block_scores", "plan_handoff", "select_keys")}


# Parameter layouts: the int32 / float32 arrays a launch passes, one NamedTuple each. The body
# reads field ``f`` of layout ``P`` as ``params[P_F]``: the offsets are generated from these
# definitions (``layout_constants``), so Python and the kernels cannot disagree on positions.
class SparseParams(NamedTuple):
    """iparams of sparse_attention.metal."""

    n_q: int  # L
    n_k: int  # S
    q_offset: int
    window: int  # 0 = none
    block_size: int
    n_heads: int
    n_kv: int
    n_blocks: int  # NB of kv_index
    n_slots_max: int  # K of kv_index
    qt: int  # queries per group
    n_splits: int
    n_batch: int


class DecodeParams(NamedTuple):
    """iparams of decode_attention.metal."""

    n_k: int  # S
    q_pos: int  # the query's position
    window: int  # 0 = none
    n_heads: int
    n_kv: int
    n_blocks: int
    n_slots_max: int
    n_splits: int
    per_split: int  # slots per split, a multiple of NW * KB
    n_batch: int


class AttentionScalars(NamedTuple):
    """fparams of sparse_attention.metal and decode_attention.metal."""

    scale: float
    cap: float  # logit soft cap, 0 = none


class MergeParams(NamedTuple):
    """iparams of merge_splits.metal."""

    n_splits: int
    n_rows: int


class BlockScoreParams(NamedTuple):
    """iparams of block_scores.metal (and of the first part of ``plan``)."""

    n_q: int
    n_heads: int
    n_kv: int
    block_size: int
    n_closed: int
    open_start: int
    n_k: int
    cap: int  # chunk slots of the table
    per_group: int  # chunks per group
    sqrt_norm: int  # 1: sqrt(n) summaries (paper), 0: plain means
    prev_end: int  # keys [open_start, prev_end) are in open_prev
    n_open: int  # chunk slots after the closed ones: 1, or the open pieces
    open_piece: int  # keys per open piece (DHSAConfig.open_pieces); 0: one open chunk
    keys_start: int  # position of the keys input's first row (ChunkTable.keys_start)


class RefineParams(NamedTuple):
    """iparams of refine_scores.metal."""

    n_q: int  # L
    q_offset: int
    window: int  # 0 = none
    block_size: int
    stride: int  # DHSAConfig.refine_stride
    n_heads: int
    n_kv: int
    n_blocks: int  # NB of kv_index
    n_slots_max: int  # K of kv_index
    qt: int  # scoring queries per query tile
    n_qtiles: int  # query tiles per block (a group walks them in turn)


class SelectParams(NamedTuple):
    """iparams of select_keys.metal (``sel_params`` of ``plan``)."""

    n_q: int
    q_offset: int
    block_size: int
    window: int  # 0 = none
    sink: int
    local: int
    budget: int
    n_closed: int
    open_start: int
    n_k: int
    cap: int
    n_open: int  # as BlockScoreParams
    open_piece: int


LAYOUTS: dict[type, str] = {  # layout -> prefix of its offsets in the kernel source
    SparseParams: "SA",
    DecodeParams: "DA",
    AttentionScalars: "AF",
    MergeParams: "MS",
    BlockScoreParams: "BS",
    SelectParams: "SK",
    RefineParams: "RS",
}
KERNEL_LAYOUTS = {
    "sparse_attention": (SparseParams, AttentionScalars),
    "decode_attention": (DecodeParams, AttentionScalars),
    "merge_splits": (MergeParams,),
    "block_scores": (BlockScoreParams,),
    "select_keys": (SelectParams,),
    "plan": (BlockScoreParams, SelectParams),
    "refine_scores": (RefineParams, AttentionScalars),
}


def layout_constants(layout: type) -> str:
    """``constexpr int <PREFIX>_<FIELD> = i;`` for every field of ``layout``."""
    prefix = LAYOUTS[layout]
    return "".join(
        f"constexpr int {prefix}_{name.upper()} = {i};\n" for i, name in enumerate(layout._fields)
    )


@lru_cache(maxsize=64)
def params(values: tuple, dtype=mx.int32) -> mx.array:
    """The parameter array for ``values`` (a layout instance), made once per distinct tuple:
    within a decode step every global layer passes the same sizes, so one host array serves
    them all instead of a fresh allocation and transfer per layer and kernel."""
    return mx.array(tuple(values), dtype)


def metal_dir() -> Path:
    """The folder of the kernel sources: in the installed wheel, else in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for d in (package / "metal", package.parent / "metal"):
        if (d / "sparse_attention.metal").is_file():
            return d
    raise FileNotFoundError(
        f"kernel sources not found in {package / 'metal'} or {package.parent / 'metal'}"
    )


_COMMENT = re.compile(r"[ \t]*//[^\n]*")


@cache
def _read(name: str) -> str:
    """File ``name`` of the kernel folder without its comments (MLX builds a custom kernel's
    whole source text on every call: fewer bytes, less host time a launch), lines kept so
    that compiler messages point at the right line."""
    text = _COMMENT.sub("", (metal_dir() / name).read_text())
    return f'#line 1 "{name}"\n{text}'


def kernel_source(name: str, backend: str, quantized: bool = False) -> tuple[str, str]:
    """The ``(header, source)`` pair that builds kernel ``name`` on ``backend``.

    Args:
        name (str): one of ``KERNELS``.
        backend (str): ``"metal"`` or ``"cuda"``.
        quantized (bool): the variant over quantized keys and values (``QUANTIZED_KERNELS``
            only): the body with ``DHSA_QUANTIZED_KV`` defined. Default: ``False``.

    Returns:
        tuple[str, str]: header (prelude + common.h) and body (thread ids, parameter offsets,
        kernel body).
    """
    if backend not in BACKENDS or name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r} or backend {backend!r}")
    if quantized and name not in QUANTIZED_KERNELS:
        raise ValueError(f"kernel {name!r} has no quantized variant")
    header = _read(f"prelude_{backend}.h") + "\n" + _read("common.h")
    parts = PARTS.get(name)
    if parts is None:
        body = _read(f"{name}.metal")
    else:
        first, handoff, last = (_read(f"{part}.metal") for part in parts)
        # The last part reads its own parameters, sel_params, under the name it uses alone.
        body = (
            f"{{\n{first}\n}}\n{handoff}\n{{\n"
            f"const DHSA_DEVICE int* iparams = sel_params;\n{last}\n}}"
        )
    offsets = "".join(layout_constants(layout) for layout in KERNEL_LAYOUTS[name])
    if quantized:
        offsets += "#define DHSA_QUANTIZED_KV\n"
    return header, _read(f"ids_{backend}.h") + "\n" + offsets + body


Factory = Callable[..., Any]  # mx.fast.metal_kernel's call shape (cuda_kernel: + shared_memory)


@dataclass(eq=False)
class Backend:
    """The GPU backend the kernels are built for, and how.

    ``name`` is ``"metal"``, ``"cuda"`` or None (no kernels: everything runs on the pure-MLX
    reference). ``factory`` builds a kernel with ``mx.fast.metal_kernel``'s arguments (name,
    input_names, output_names, source, header, ensure_row_contiguous; CUDA adds
    ``shared_memory``). Kernels run when MLX's default device is the GPU, or on any device
    with ``any_device`` (an emulated backend on the CPU).
    """

    name: str | None
    factory: Factory | None = None
    any_device: bool = False
    # decode_attention.metal merges its own splits (FOLD: the last group of a KV head to
    # finish does it, after a device-scope fence and an atomic ticket), and a call with one
    # query block plans in one launch (``plan``): one launch fewer each, which is what a
    # host-bound decode step pays for. CUDA only by default: the Metal side of those fences
    # has not run on a Mac, so Macs keep the merge_splits launch and two planning launches.
    fold_decode: bool | None = None
    fused_plan: bool | None = None
    # Run each kernel instantiation once against the reference before its first use
    # (kernels.checks); fakes that only record launches turn it off.
    self_check: bool = True
    _builds: dict = field(default_factory=dict, repr=False)
    checked: dict = field(default_factory=dict, repr=False)  # instantiation -> passed
    status: dict = field(default_factory=dict, repr=False)  # kernel name -> "ok" / "off: why"

    def __post_init__(self):
        if self.name is not None and self.name not in BACKENDS:
            raise ValueError(f"unknown backend {self.name!r}; expected one of {BACKENDS}")
        if self.factory is None and self.name is not None:
            self.factory = mx.fast.metal_kernel if self.name == "metal" else mx.fast.cuda_kernel
        if self.fold_decode is None:
            self.fold_decode = self.name == "cuda"
        if self.fused_plan is None:
            self.fused_plan = self.name == "cuda"

    def active(self, use_kernel: bool = True) -> bool:
        """Whether kernels run now: a backend, ``use_kernel`` and the GPU as default device."""
        return (
            use_kernel
            and self.name is not None
            and (self.any_device or mx.default_device() == mx.gpu)
        )

    def kernel(
        self,
        name: str,
        inputs: list[str],
        outputs: list[str],
        *,
        contiguous: bool = True,
        shared_memory: int = 0,
        quantized: bool = False,
    ):
        """Kernel ``name`` for this backend, built on first use (one build per shared-memory
        size on CUDA, which sizes it at launch); ``quantized``: its variant over quantized
        keys and values (:func:`kernel_source`)."""
        key = (name, shared_memory, quantized)
        built = self._builds.get(key)
        if built is None:
            # (the plain call as before: tests replace kernel_source with two-argument fakes)
            args = dict(quantized=True) if quantized else {}
            header, source = kernel_source(name, self.name, **args)
            tag = hashlib.sha1((header + source).encode()).hexdigest()[:8]  # no stale JIT cache
            kwargs = dict(
                name=f"dhsa_{name}{'_q' if quantized else ''}_{tag}",
                input_names=inputs,
                output_names=outputs,
                source=source,
                header=header,
                ensure_row_contiguous=contiguous,
            )
            if self.name == "metal":
                built = self.factory(**kwargs)
            else:
                if shared_memory:
                    kwargs["name"] += f"_{shared_memory}"
                built = self.factory(**kwargs, shared_memory=shared_memory)
            self._builds[key] = built
        return built


def _detect() -> str | None:
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


_current = Backend(_detect())


def backend() -> Backend:
    """The backend kernels are built and launched on (detected at import)."""
    return _current


def set_backend(new: Backend) -> Backend:
    """Make ``new`` the backend; returns the previous one."""
    global _current
    previous, _current = _current, new
    return previous


@contextmanager
def use_backend(name: str | None, factory: Factory | None = None, **options) -> Iterator[Backend]:
    """Run the kernels on backend ``name`` built by ``factory`` within the block.

    For tests and emulators: ``use_backend("metal", fake_metal_kernel, any_device=True)``
    launches the Metal path through ``fake_metal_kernel`` on the CPU. ``options``: the other
    :class:`Backend` fields (``any_device``, ``fold_decode``, ``fused_plan``, ``self_check``).
    """
    previous = set_backend(Backend(name, factory, **options))
    try:
        yield _current
    finally:
        set_backend(previous)
