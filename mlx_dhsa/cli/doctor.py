"""``mlx-dhsa doctor``: what a bug report needs, in one run.

Versions, the device as MLX reports it, whether the GPU kernels run here and agree with the
pure-MLX reference (a tiny random Gemma2 through DHSA's sparse prefill and sparse decode, once
with the kernels and once without), a short timing of dense attention against DHSA, and the
resolved defaults. ``as_dict`` gives the JSON form.
"""

import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import mlx.core as mx

from ..config import DHSAConfig
from ..device import run_sizes
from ..evaluation.methods import Method
from ..evaluation.runinfo import environment
from ..patching import dhsa_layers, patch, unpatch
from .profiling import TINY_SPARSE

# profiling's tiny sparse config, decoding sparsely too.
CHECK_CONFIG = dict(TINY_SPARSE, decode_dense_below=0)
# Whole-model logits of the kernel path against the reference path on the kernel path's own
# plans (replayed): max |difference| over max |reference logit|. Not zero: the two paths sum in
# different orders and a GPU's fp32 matmuls may round like TF32. Replaying the plans keeps
# near-ties between chunk scores, which the two paths may break differently, from moving a
# tiny random model's logits by far more (counted in the detail). A broken kernel is off by
# the size of the logits themselves.
CHECK_TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2}


def _quiet(what: str) -> None:
    pass


@dataclass
class Check:
    """One comparison of the kernel path with the reference path."""

    name: str
    status: str  # "pass", "fail", "error" or "reference only"
    max_error: float | None = None  # max |kernel - reference| / max |reference|
    tolerance: float | None = None
    detail: str = ""


@dataclass
class Timing:
    """Prefill of one prompt through a random Gemma2 with gemma-2-2b's attention."""

    context: int
    dense_s: float
    dhsa_s: float
    attention: str  # the path DHSA's prefill ran

    @property
    def speedup(self) -> float:
        return self.dense_s / self.dhsa_s


@dataclass
class Report:
    environment: dict
    device: dict
    checks: list[Check]
    timings: list[Timing] = field(default_factory=list)
    timing_note: str = ""
    config: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status in ("pass", "reference only") for c in self.checks)

    def as_dict(self) -> dict:
        d = asdict(self)
        for t, row in zip(self.timings, d["timings"]):
            row["speedup"] = t.speedup
        d["ok"] = self.ok
        return d


def gpu_backend() -> str | None:
    """``"metal"``, ``"cuda"`` or ``None`` (CPU only)."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else None


def device_facts() -> dict:
    """What MLX reports about the default device (name, architecture, memory), JSON-ready."""
    try:
        info = mx.device_info()
    except (RuntimeError, AttributeError):
        info = {}
    facts = {"default_device": str(mx.default_device()), "gpu_backend": gpu_backend() or "none"}
    for k, v in info.items():
        facts[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return facts


def kernel_report() -> dict:
    """Each GPU kernel's state in this process (``kernels.kernel_status``: ok, off and why,
    unused, no GPU backend) and the device's decode tuning, as report rows."""
    from ..device import device_tuning
    from ..kernels import kernel_status

    tuning = device_tuning()
    rows = {f"kernel {name}": state for name, state in kernel_status().items()}
    rows["decode tuning"] = (
        f"decode_dense_below={tuning.decode_dense_below}, decode_groups={tuning.decode_groups} "
        f"({tuning.basis})"
    )
    return rows


def _tiny_model(dtype):
    from .profiling import random_model

    return random_model("tiny", dtype, num_hidden_layers=2)


def kernel_checks(
    dtypes: Sequence[str] = ("float32", "bfloat16"), on_step: Callable[[str], None] = _quiet
) -> list[Check]:
    """Sparse prefill and sparse decode of a tiny random Gemma2, kernels vs reference
    (``on_step(what)`` before each)."""
    if gpu_backend() is None:
        return [Check("kernels", "reference only", detail="no GPU backend: the pure-MLX path runs")]
    checks = []
    tokens = mx.random.randint(0, 1024, (1, 160), key=mx.random.key(1))
    for dtype in dtypes:
        model = _tiny_model(getattr(mx, dtype))
        for phase in ("prefill", "decode"):
            name = f"{phase} {dtype}"
            on_step(f"kernels vs reference, {name}")
            try:
                logits, plans = {}, []
                for use_kernel in (True, False):  # the reference replays the kernels' plans
                    patch(model, DHSAConfig(**CHECK_CONFIG, use_kernel=use_kernel))
                    with _same_plans(model, plans, replay=not use_kernel) as differ:
                        logits[use_kernel] = _run(model, tokens, phase)
                    unpatch(model)
                ref, out = logits[False], logits[True]
                err = (mx.abs(out - ref).max() / mx.abs(ref).max()).item()
                same = (out.argmax(-1) == ref.argmax(-1)).mean().item()
                tol = CHECK_TOLERANCE[dtype]
                ok = err <= tol  # NaN fails too
                detail = (
                    f"relative error on the same plans; greedy tokens agree at {same:.0%} of "
                    f"positions; the reference's own plans differ in {sum(differ)} of "
                    f"{len(differ)} calls"
                )
                checks.append(Check(name, "pass" if ok else "fail", err, tol, detail))
            except Exception as e:  # noqa: BLE001 - a report, not a crash
                unpatch(model)
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                checks.append(Check(name, "error", detail=last))
    return checks


@contextmanager
def _same_plans(model, plans: list, *, replay: bool) -> Iterator[list[bool]]:
    """Within: the model's DHSA layers append their plans to ``plans`` in call order, or with
    ``replay`` plan as usual but use ``plans`` instead, yielding whether each of their own
    plans differed."""
    differ: list[bool] = []
    recorded = iter(plans)

    def planning(original):
        def plan(*args, **kwargs):
            own = original(*args, **kwargs)
            if not replay:
                plans.append(own)
                return own
            given = next(recorded)
            differ.append(
                not (
                    mx.array_equal(own.n_valid, given.n_valid).item()
                    and mx.array_equal(own.indices, given.indices).item()
                )
            )
            return given

        return plan

    layers = dhsa_layers(model)
    for layer in layers:  # an instance attribute shadows DHSAAttention.plan
        object.__setattr__(layer, "plan", planning(layer.plan))
    try:
        yield differ
    finally:
        for layer in layers:
            object.__delattr__(layer, "plan")


def _run(model, tokens: mx.array, phase: str) -> mx.array:
    from .. import make_prompt_cache

    cache = make_prompt_cache(model)
    if phase == "prefill":
        out = model(tokens, cache=cache)
    else:
        model(tokens[:, :-4], cache=cache)
        for i in range(4, 0, -1):
            out = model(tokens[:, -i:][:, :1], cache=cache)
    out = out.astype(mx.float32)
    mx.eval(out)
    return out


def timings(
    contexts: Sequence[int],
    config: DHSAConfig | None = None,
    on_step: Callable[[str], None] = _quiet,
) -> list[Timing]:
    """Prefill time of dense attention and of DHSA (``config``, default: defaults) per context, on a
    random Gemma2 with gemma-2-2b's attention (8 heads, 4 KV heads, head dim 256): two layers
    (a sliding one, dense over its window cache, and a global one), after a warm-up that
    compiles the kernels on a GPU (none on a CPU)."""
    from .profiling import compare, random_model

    gpu = gpu_backend() is not None
    dtype = mx.bfloat16 if gpu else mx.float32
    model = random_model("gemma-2-2b-narrow", dtype, num_hidden_layers=2, vocab_size=4096)
    config = config or DHSAConfig()
    methods = [Method("dense", None), Method("dhsa", config)]
    report = compare(
        model,
        None,
        contexts=contexts,
        methods=methods,
        trials=1,
        warmup=int(gpu),
        decode_tokens=1,
        on_run=lambda done, total, now="done": on_step(f"timing {now}"),
    )
    by = {(r.method, r.context): r for r in report.rows}
    return [
        Timing(n, by["dense", n].prefill_s, by["dhsa", n].prefill_s, by["dhsa", n].attention)
        for n in sorted(contexts)
    ]


def diagnose(
    contexts: Sequence[int] | None = None,
    *,
    timing: bool = True,
    on_step: Callable[[str], None] = _quiet,
) -> Report:
    """Everything ``mlx-dhsa doctor`` reports. ``contexts`` defaults by device: 8k and 32k on
    a GPU, 1k on a CPU (with a CPU-sized budget, said in ``timing_note``). ``on_step(what)``
    is called as each check or timed run starts."""
    checks = kernel_checks(
        on_step=on_step
    )  # runs the kernels first: their self-checks fill kernel_status
    device = {**device_facts(), **kernel_report()}
    report = Report(environment(), device, checks, config=asdict(DHSAConfig()))
    if timing:
        gpu = gpu_backend() is not None
        sizes = run_sizes()
        contexts = tuple(contexts or sizes.doctor_contexts)
        budget = sizes.budget
        tic = time.perf_counter()
        config = DHSAConfig(budget=budget) if budget else None
        report.timings = timings(contexts, config, on_step)
        report.timing_note = (
            "prefill of a 2-layer random Gemma2 with gemma-2-2b's attention, "
            f"{'bfloat16' if gpu else 'float32'}, DHSA "
            f"{'defaults' if budget is None else f'budget {budget} (CPU-sized)'}; "
            f"{time.perf_counter() - tic:.1f} s in all"
        )
    return report
