"""Self-check: a kernel's first use in a process runs it on a tiny input against the reference.

MLX compiles custom kernels lazily, at evaluation, so a kernel that fails to compile or
launch on a user's machine, or returns a wrong result, shows up only inside a forward pass.
Each kernel instantiation a call would use is therefore run once, before its first real
launch, on a tiny input of the same template parameters; on any error or mismatch the
kernels it involves are switched off for the process, with one warning, and calls take the
pure-MLX path. :func:`kernel_status` says which kernels run.
"""

import warnings
from collections.abc import Callable, Hashable

from .sources import KERNELS, Backend, backend


def verified(be: Backend, key: Hashable, names: tuple, run: Callable[[], str | None]) -> bool:
    """Whether the kernels ``names`` may run the instantiation ``key``: checked once per
    process by ``run`` (None: it matched the reference, else what was wrong)."""
    if not be.self_check:
        return True
    result = be.checked.get(key)
    if result is None:
        off = [n for n in names if be.status.get(n, "").startswith("off")]
        if off:  # needs a kernel already switched off (and warned about)
            for n in names:
                be.status.setdefault(n, f"off: needs {off[0]}, which is off")
            return False
        try:
            problem = run()
        except Exception as e:  # noqa: BLE001 (any compile or launch failure, raised at eval)
            lines = str(e).strip().splitlines() or [""]
            problem = f"{type(e).__name__}: {lines[0][:200]}"
        result = be.checked[key] = problem is None
        for n in names:
            if result:
                be.status.setdefault(n, "ok")
            else:
                be.status[n] = f"off: {problem}"
        if not result:
            warnings.warn(
                f"mlx-dhsa: the {' + '.join(names)} kernel failed its self-check on this "
                f"device ({problem}); it is switched off for this process and those calls "
                "run on the pure-MLX path",
                RuntimeWarning,
                stacklevel=2,
            )
    return result


def mismatch(out, ref, tol: float) -> str | None:
    """None if ``out`` is within ``tol`` (relative to the reference's size) of ``ref``."""
    import mlx.core as mx

    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    if out.shape != ref.shape:
        return f"shape {out.shape}, expected {ref.shape}"
    err = mx.abs(out - ref).max().item()
    scale = mx.abs(ref).max().item()
    if not err <= tol * (1.0 + scale):  # also catches NaN
        return f"max error {err:.3g} against the reference"
    return None


def kernel_status() -> dict[str, str]:
    """Each kernel's state in this process: ``"ok"`` (passed its self-check), ``"off: why"``
    (failed it: the pure-MLX path runs instead), ``"unused"`` (not needed yet), or
    ``"no GPU backend"``; for ``mlx-dhsa info`` and the chat's ``/stats``."""
    be = backend()
    if be.name is None:
        return dict.fromkeys(KERNELS, "no GPU backend")
    if not be.self_check:
        return dict.fromkeys(KERNELS, "unchecked")
    return {name: be.status.get(name, "unused") for name in KERNELS}
