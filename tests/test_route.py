"""route(): the one decision of what runs an attention call, as a table of cases."""

import mlx.core as mx
import pytest
from conftest import small_config

from mlx_dhsa import kernels
from mlx_dhsa.attention import Path, route
from mlx_dhsa.kernels import PlanLaunch

F16, F32, I32 = mx.float16, mx.float32, mx.int32
# small_config: budget 48 (dense_limit 96), block 16, dense_tail 8, decode_dense_below 0.
BASE = dict(
    offset=None,
    dtypes=(F16,) * 3,
    head_dim=64,
    n_heads=8,
    n_kv_heads=4,
    softcap=50.0,
    window=None,
    base=False,
    per_sequence_mask=False,
)

# (backend, config overrides, call overrides) -> (path, decode kernel, plan launch, n_sparse,
# tail on a kernel, own mask); None in a kernel column: no kernel launch.
CASES = [
    # No GPU backend: the reference everywhere; decode steps mlx-lm can run stay there.
    (None, {}, dict(L=300, S=300), (Path.SPARSE_REFERENCE, None, None, 292, None, False)),
    (None, {}, dict(L=64, S=64), (Path.DENSE_REFERENCE, None, None, 0, None, True)),
    (
        None,
        {"decode_dense_below": 1000},
        dict(L=1, S=500, base=True),
        (Path.BASE, None, None, 0, None, False),
    ),
    (
        None,
        {"decode_dense_below": 1000},
        dict(L=1, S=500),
        (Path.DENSE_REFERENCE, None, None, 0, None, False),
    ),
    (None, {}, dict(L=1, S=500, base=True), (Path.SPARSE_REFERENCE, None, None, 1, None, False)),
    # CUDA: kernels, one-query steps on the decode kernel, one-block plans fused (a decode
    # step's plan with decode_head_scores="max", the default, takes two launches).
    ("cuda", {}, dict(L=300, S=300), (Path.SPARSE_KERNEL, False, PlanLaunch.TWO, 292, True, False)),
    (
        "cuda",
        {"decode_head_scores": "mean"},
        dict(L=1, S=500, base=True),
        (Path.SPARSE_KERNEL, True, PlanLaunch.FUSED, 1, None, False),
    ),
    (
        "cuda",
        {"decode_head_scores": "mean"},
        dict(L=9, S=500),  # one planned query (8 in the dense tail) plans as a decode step
        (Path.SPARSE_KERNEL, True, PlanLaunch.FUSED, 1, True, False),
    ),
    ("cuda", {}, dict(L=9, S=500), (Path.SPARSE_KERNEL, True, PlanLaunch.TWO, 1, True, False)),
    ("cuda", {}, dict(L=16, S=400), (Path.SPARSE_KERNEL, False, PlanLaunch.FUSED, 8, True, False)),
    (
        "cuda",
        {},
        dict(L=1, S=500, base=True),
        (Path.SPARSE_KERNEL, True, PlanLaunch.TWO, 1, None, False),
    ),
    ("cuda", {}, dict(L=8, S=400), (Path.DENSE_KERNEL, False, None, 0, None, True)),  # all tail
    ("cuda", {}, dict(L=64, S=64), (Path.DENSE_KERNEL, False, None, 0, None, True)),
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, base=True),  # soft cap: fused
        (Path.DENSE_KERNEL, True, None, 0, None, True),
    ),
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, base=True, softcap=None),
        (Path.BASE, None, None, 0, None, False),
    ),
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, base=True, softcap=None, window=64),
        (Path.DENSE_REFERENCE, None, None, 0, None, False),
    ),  # mlx-lm would ignore the window
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, window=64),
        (Path.DENSE_KERNEL, True, None, 0, None, True),
    ),
    (
        "cuda",
        {},
        dict(L=1, S=500, window=64),  # the window bounds the keys: dense
        (Path.DENSE_KERNEL, True, None, 0, None, True),
    ),
    (
        "cuda",
        {"sliding_window": False},
        dict(L=1, S=500, window=64),
        (Path.SPARSE_KERNEL, True, PlanLaunch.TWO, 1, None, False),
    ),
    (
        "cuda",
        {},
        dict(L=1, S=500, n_heads=16, n_kv_heads=1),  # 16 heads a KV head: tile kernel
        (Path.SPARSE_KERNEL, False, PlanLaunch.TWO, 1, None, False),
    ),
    (
        "cuda",
        {},
        dict(L=64, S=64, per_sequence_mask=True),
        (Path.DENSE_REFERENCE, None, None, 0, None, False),
    ),
    (
        "cuda",
        {},
        dict(L=64, S=90, offset=0),  # queries not last: the model's mask
        (Path.DENSE_REFERENCE, None, None, 0, None, False),
    ),
    (
        "cuda",
        {},
        dict(L=300, S=300, dtypes=(F16, F32, F16)),
        (Path.SPARSE_REFERENCE, None, None, 292, None, False),
    ),
    (
        "cuda",
        {},
        dict(L=300, S=300, head_dim=48),  # plans need D % 32; attention D % 16
        (Path.SPARSE_KERNEL, False, None, 292, True, False),
    ),
    (
        "cuda",
        {},
        dict(L=300, S=300, head_dim=72),
        (Path.SPARSE_REFERENCE, None, None, 292, None, False),
    ),
    (
        "cuda",
        {"head_scores": "max"},
        dict(L=300, S=300),
        (Path.SPARSE_KERNEL, False, None, 292, True, False),
    ),
    (
        "cuda",
        {"method": "streaming"},
        dict(L=300, S=300),
        (Path.SPARSE_KERNEL, False, None, 292, True, False),
    ),
    (
        "cuda",
        {"use_kernel": False},
        dict(L=300, S=300),
        (Path.SPARSE_REFERENCE, None, None, 292, None, False),
    ),
    (
        "cuda",
        {"use_kernel": False, "decode_dense_below": 1000},
        dict(L=1, S=500, base=True),
        (Path.BASE, None, None, 0, None, False),
    ),
    # Quantized K/V (bits, group size): the kernels' quantized variant; planned on the
    # planning kernels as without (they read the chunk table's model-dtype keys).
    (
        "cuda",
        {},
        dict(L=300, S=300, quantized=(4, 64)),
        (Path.SPARSE_KERNEL, False, PlanLaunch.TWO, 292, True, False),
    ),
    (
        "cuda",
        {},
        dict(L=1, S=500, base=True, quantized=(8, 64)),
        (Path.SPARSE_KERNEL, True, PlanLaunch.TWO, 1, None, False),
    ),
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, base=True, quantized=(4, 64)),  # soft cap: not mlx-lm's module
        (Path.DENSE_KERNEL, True, None, 0, None, True),
    ),
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, base=True, softcap=None, quantized=(4, 64)),
        (Path.BASE, None, None, 0, None, False),
    ),
    (
        "cuda",
        {},
        dict(L=300, S=300, quantized=(4, 128)),  # group larger than the head dim
        (Path.SPARSE_REFERENCE, None, PlanLaunch.TWO, 292, None, False),
    ),
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, base=True, quantized=(4, 128)),
        (Path.DENSE_REFERENCE, None, None, 0, None, True),
    ),
    (
        "cuda",
        {"decode_dense_below": 1000},
        dict(L=1, S=500, quantized=(2, 64)),  # bits no kernel reads
        (Path.DENSE_REFERENCE, None, None, 0, None, False),
    ),
    # Metal: the same kernels, but one-block plans in two launches.
    ("metal", {}, dict(L=1, S=500), (Path.SPARSE_KERNEL, True, PlanLaunch.TWO, 1, None, False)),
    (
        "metal",
        {},
        dict(L=1, S=500, quantized=(4, 64)),
        (Path.SPARSE_KERNEL, True, PlanLaunch.TWO, 1, None, False),
    ),
    (
        "metal",
        {},
        dict(L=300, S=300, dtypes=(I32,) * 3),
        (Path.SPARSE_REFERENCE, None, None, 292, None, False),
    ),
]


@pytest.mark.parametrize("backend,config,call,want", CASES)
def test_route_table(backend, config, call, want):
    call = {**BASE, **call}
    L, S = call.pop("L"), call.pop("S")
    offset = S - L if call.pop("offset") is None else 0
    with kernels.use_backend(backend, lambda **kw: None, any_device=True, self_check=False):
        r = route(small_config(**config), n_queries=L, n_keys=S, offset=offset, **call)
    path, decode, plan, n_sparse, tail, own = want
    assert r.path is path
    assert (None if r.kernel is None else r.kernel.decode) == decode
    assert r.plan is plan and r.n_sparse == n_sparse and r.own_mask == own
    assert (None if r.tail is None else True) == tail
    label = {Path.SPARSE_KERNEL: "dhsa(kernel)", Path.SPARSE_REFERENCE: "dhsa(reference)"}
    assert r.label == label.get(path, "dense")


def test_route_without_a_gpu_device_is_the_reference():
    """A backend whose kernels need the GPU, with the CPU as default device: no kernel."""
    with kernels.use_backend("cuda", lambda **kw: None, self_check=False), mx.stream(mx.cpu):
        r = route(
            small_config(),
            n_queries=300,
            n_keys=300,
            offset=0,
            **{k: v for k, v in BASE.items() if k != "offset"},
        )
    assert r.path is Path.SPARSE_REFERENCE and r.plan is None


def test_route_refuses_sparse_calls_with_per_sequence_masks():
    with pytest.raises(NotImplementedError, match="per-sequence"):
        route(
            small_config(),
            n_queries=300,
            n_keys=300,
            offset=0,
            **{**{k: v for k, v in BASE.items() if k != "offset"}, "per_sequence_mask": True},
        )


# Prefill refinement's candidate scores (refine_scores.metal): (backend, config overrides,
# call overrides) -> whether they run on the kernel.
REFINE_CASES = [
    ("cuda", {"prefill_refine": 4}, dict(L=300, S=300), True),
    ("metal", {"prefill_refine": 2, "refine_stride": 8}, dict(L=300, S=300), True),
    ("cuda", {}, dict(L=300, S=300), False),  # no refinement
    ("cuda", {"prefill_refine": 4}, dict(L=1, S=500), False),  # a decode step: MLX
    ("cuda", {"prefill_refine": 4}, dict(L=9, S=500), False),  # one planned query: decode
    ("cuda", {"prefill_refine": 4}, dict(L=300, S=300, quantized=(4, 64)), False),
    ("cuda", {"prefill_refine": 4}, dict(L=300, S=300, dtypes=(F16, F32, F16)), False),
    ("cuda", {"prefill_refine": 4}, dict(L=300, S=300, head_dim=72), False),
    ("cuda", {"prefill_refine": 4, "use_kernel": False}, dict(L=300, S=300), False),
    (None, {"prefill_refine": 4}, dict(L=300, S=300), False),
]


@pytest.mark.parametrize("backend,config,call,want", REFINE_CASES)
def test_route_refine_scores(backend, config, call, want):
    call = {**BASE, **call}
    L, S = call.pop("L"), call.pop("S")
    call.pop("offset")
    with kernels.use_backend(backend, lambda **kw: None, any_device=True, self_check=False):
        r = route(small_config(**config), n_queries=L, n_keys=S, offset=S - L, **call)
    assert (r.refine is not None) == want
    if want:
        reps = call["n_heads"] // call["n_kv_heads"]
        assert reps * r.refine.qt <= r.refine.warps * r.refine.wrows
