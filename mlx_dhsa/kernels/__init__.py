"""GPU kernels for DHSA, each beside the pure-MLX reference it falls back to.

- ``sources``: the kernel sources in ``metal/``, their parameter layouts, and the
  :class:`Backend` that builds every kernel through one factory (replaceable with
  :func:`use_backend`, e.g. by an emulator on the CPU).
- ``attention``: sparse and dense attention launches (query tiles, one-query decode, merge),
  over plain or quantized keys and values (:func:`accepts_quantized`).
- ``planning``: block x chunk scores and key selection, in two launches or one.
- ``refining``: the candidate scores of prefill refinement.
- ``state``: :class:`KernelState`, what a layer's kernels keep between calls.
- ``checks``: each kernel's self-check on first use; :func:`kernel_status`.
"""

from .attention import (
    AttentionKernel,
    Tiles,
    accepts_quantized,
    attention_active,
    attention_kernel,
    dense_attention,
    run_dense,
    run_sparse,
    sparse_attention,
)
from .checks import kernel_status
from .planning import PlanLaunch, plan_launch, run_plan, select_chunks
from .refining import RefineKernel, refine_kernel, run_refine
from .sources import (
    BACKENDS,
    KERNELS,
    Backend,
    backend,
    kernel_source,
    metal_dir,
    set_backend,
    use_backend,
)
from .state import KernelState

__all__ = [
    "BACKENDS",
    "KERNELS",
    "AttentionKernel",
    "Backend",
    "KernelState",
    "PlanLaunch",
    "RefineKernel",
    "Tiles",
    "accepts_quantized",
    "attention_active",
    "attention_kernel",
    "backend",
    "dense_attention",
    "kernel_source",
    "kernel_status",
    "metal_dir",
    "plan_launch",
    "refine_kernel",
    "run_dense",
    "run_plan",
    "run_refine",
    "run_sparse",
    "select_chunks",
    "set_backend",
    "sparse_attention",
    "use_backend",
]
