"""Device-dependent defaults: the H200's measured values there, estimates elsewhere,
overridable in DHSAConfig."""

import pytest

from mlx_dhsa import DHSAConfig, kernels
from mlx_dhsa.device import H200, SPARSE_DECODE_FLOOR, device_tuning, tuning_for


def test_the_h200_keeps_its_measured_values():
    t = tuning_for("cuda", {"device_name": "NVIDIA H200", "architecture": "sm_90"})
    assert t == H200 and (t.decode_groups, t.decode_dense_below) == (512, 98304)
    assert t.basis.startswith("measured")


@pytest.mark.parametrize(
    "backend,name,groups",
    [
        ("cuda", "NVIDIA H100 80GB HBM3", 512),
        ("cuda", "NVIDIA A100-SXM4-80GB", 512),
        ("cuda", "NVIDIA L4", 256),
        ("cuda", "Some future GPU", 512),
        ("metal", "Apple M2 Max", 128),
        ("metal", "Apple M2 Ultra", 256),
        ("metal", "Apple M3 Pro", 64),
        ("metal", "Apple M1", 32),
    ],
)
def test_other_devices_are_estimated(backend, name, groups):
    t = tuning_for(backend, {"device_name": name})
    assert t.decode_groups == groups and t.basis.startswith("estimated")
    if backend == "metal":  # less bandwidth than the H200: sparse decode pays off sooner,
        # but not below the floor that accuracy sets
        assert SPARSE_DECODE_FLOOR <= t.decode_dense_below < H200.decode_dense_below
        assert t.decode_dense_below & (t.decode_dense_below - 1) == 0


def test_no_gpu_uses_the_h200_values_and_config_overrides_them():
    assert (device_tuning().decode_groups, device_tuning().decode_dense_below) == (512, 98304)
    assert not DHSAConfig().sparse_decode_at(98304) and DHSAConfig().sparse_decode_at(98305)
    assert DHSAConfig(decode_dense_below=10000).sparse_decode_at(10001)
    with pytest.raises(ValueError, match="decode_groups"):
        DHSAConfig(decode_groups=0)


def test_config_decode_groups_reach_the_decode_launch():
    import mlx.core as mx

    with kernels.use_backend("cuda", lambda **kw: None, any_device=True, self_check=False):
        default = kernels.attention_kernel((mx.float16,) * 3, 128, 8, 4, 1, 5000, None)
        chosen = kernels.attention_kernel(
            (mx.float16,) * 3, 128, 8, 4, 1, 5000, None, decode_groups=128
        )
    assert (default.groups, chosen.groups) == (512, 128)


def test_run_sizes_and_estimates():
    from mlx_dhsa.cli.estimate import ModelSize, long_run_warning, profile_flops
    from mlx_dhsa.cli.profiling import unbuilt
    from mlx_dhsa.device import CPU_SIZES, GPU_SIZES, device_rate, rate_for, run_sizes

    assert run_sizes() is CPU_SIZES  # the tests run on MLX's CPU build
    assert DHSAConfig(budget=CPU_SIZES.budget).dense_limit < min(CPU_SIZES.profile_contexts)
    assert GPU_SIZES.budget is None and GPU_SIZES.profile_contexts[-1] == 32768
    size = ModelSize.of(unbuilt("tiny"))  # hidden 128, 4 layers, 4 x 32 query, 2 x 32 KV
    assert size.layer_weights == 128 * (128 + 64 + 64) + 128 * 128 + 3 * 128 * 256
    assert (size.layers, size.heads, size.head_dim, size.vocab) == (4, 4, 32, 1024)
    one = size.forward_flops(8, logits=0)
    assert one == 4 * (2 * size.layer_weights * 8 + 4 * 4 * 32 * 8 * 8)
    assert profile_flops(size, [8], methods=2, trials=3, decode_tokens=0) == 2 * 4 * (
        one + 2 * 1024 * 128
    )
    assert device_rate().flops > 0 and "CPU" in device_rate().basis
    assert (
        rate_for("cuda", {"device_name": "NVIDIA H200"}).flops
        > rate_for("metal", {"device_name": "Apple M2 Max"}).flops
    )
    assert long_run_warning(1.0, "x") is None
    assert long_run_warning(1e18, "This run").startswith("This run is estimated at about")


def test_long_cpu_runs_on_linux_name_openblas(monkeypatch):
    from mlx_dhsa.cli import estimate

    monkeypatch.setattr(estimate.sys, "platform", "linux")
    monkeypatch.setenv("LD_PRELOAD", "")
    warning = estimate.long_run_warning(1e18, "This run")
    assert "LD_PRELOAD=" in warning and "openblas-pthread/libblas.so.3" in warning
    monkeypatch.setenv("LD_PRELOAD", estimate.OPENBLAS)
    assert "LD_PRELOAD" not in estimate.long_run_warning(1e18, "This run")
    monkeypatch.setattr(estimate.sys, "platform", "darwin")
    monkeypatch.setenv("LD_PRELOAD", "")
    assert estimate.blas_tip() is None
