"""The one place that points mlx_dhsa.kernels at the Metal emulator: backend "metal" with its
Metal-only launch choices (merge_splits as a second launch, block scores and selection as two
launches), every kernel built through ``factory.metal_kernel``, and kernels used although
MLX's default device is the CPU (``kernels.Backend``'s test hook)."""

from mlx_dhsa import kernels
from mlx_dhsa.kernels import sources


def emulate_metal(monkeypatch, factory) -> None:
    """Make ``mlx_dhsa.kernels`` launch its Metal kernels on ``factory`` (a MetalEmulator) for
    the rest of the test; ``monkeypatch`` undoes it. A fresh Backend builds every kernel
    again (so a patched ``kernels.sources.kernel_source`` takes effect)."""
    backend = kernels.Backend(
        "metal",
        factory.metal_kernel,
        any_device=True,
        fold_decode=False,
        fused_plan=False,
        self_check=False,
    )
    monkeypatch.setattr(sources, "_current", backend)
