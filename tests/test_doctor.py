"""``mlx-dhsa doctor``: runs here, reports the reference path honestly, and fails on a mismatch."""

import json
from dataclasses import replace

import mlx.core as mx
from typer.testing import CliRunner

from mlx_dhsa import DHSAConfig
from mlx_dhsa.cli import app, doctor


def test_doctor_reports_the_reference_path_on_cpu(tmp_path):
    out = tmp_path / "doctor.json"
    result = CliRunner().invoke(app, ["doctor", "--no-timing", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["ok"] and report["device"]["gpu_backend"] == "none"
    assert [c["status"] for c in report["checks"]] == ["reference only"]
    assert report["environment"]["mlx"] == mx.__version__
    assert report["config"]["budget"] == 2048 and "doctor: OK" in result.output


def test_doctor_fails_when_the_kernel_path_disagrees(monkeypatch, tmp_path):
    # Pretend a GPU is present and make the "kernel" run return wrong logits.
    used = []
    real_patch, real_run = doctor.patch, doctor._run
    monkeypatch.setattr(doctor, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(doctor, "patch", lambda m, c: used.append(c.use_kernel) or real_patch(m, c))
    monkeypatch.setattr(
        doctor, "_run", lambda m, t, p: real_run(m, t, p) + (0.5 if used[-1] else 0.0)
    )
    checks = doctor.kernel_checks(dtypes=("float32",))
    assert [(c.name, c.status) for c in checks] == [
        ("prefill float32", "fail"),
        ("decode float32", "fail"),
    ]
    assert all(c.max_error > c.tolerance for c in checks)
    assert all("greedy tokens agree" in c.detail for c in checks)
    monkeypatch.setattr(doctor, "_run", lambda m, t, p: 1 / 0)
    check, _ = doctor.kernel_checks(dtypes=("float32",))
    assert check.status == "error" and "ZeroDivisionError" in check.detail
    result = CliRunner().invoke(app, ["doctor", "--no-timing"])
    assert result.exit_code == 1 and "PROBLEMS FOUND" in result.output
    assert "Traceback" not in result.output


def test_doctor_times_dense_and_dhsa():
    rows = doctor.timings([256], DHSAConfig(**doctor.CHECK_CONFIG))
    assert len(rows) == 1 and rows[0].context == 256
    assert rows[0].attention == "dhsa(reference)" and rows[0].dense_s > 0 and rows[0].dhsa_s > 0


def test_doctor_passes_rounding_sized_differences(monkeypatch):
    # Differences of the size summation order and TF32-like rounding make (1e-3 of the logits'
    # scale) pass; the check is relative to the logits' size.
    used = []
    real_patch, real_run = doctor.patch, doctor._run
    monkeypatch.setattr(doctor, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(doctor, "patch", lambda m, c: used.append(c.use_kernel) or real_patch(m, c))

    def run(m, t, p):
        out = real_run(m, t, p)
        return out * (1 + 1e-3) if used[-1] else out

    monkeypatch.setattr(doctor, "_run", run)
    checks = doctor.kernel_checks(dtypes=("float32",))
    assert [c.status for c in checks] == ["pass", "pass"]
    assert all(abs(c.max_error - 1e-3) < 1e-5 for c in checks)


def test_the_reference_run_replays_the_kernel_runs_plans(monkeypatch):
    # Near-tied chunk scores may plan differently on the two paths, which moves a tiny random
    # model's logits far more than rounding; the reference run must use the kernel run's plans.
    from mlx_dhsa.attention import DHSAAttention

    monkeypatch.setattr(doctor, "gpu_backend", lambda: "cuda")  # both runs are pure MLX here
    real_plan, kernel_run = DHSAAttention.plan, []

    def plan(layer, queries, keys, **kw):
        p = real_plan(layer, queries, keys, **kw)
        if layer.config.use_kernel:  # the "kernel" run plans other keys: the last ones
            kernel_run.append(p)
            last = mx.arange(keys.shape[2] - p.indices.shape[-1], keys.shape[2])
            p = replace(p, indices=mx.broadcast_to(last, p.indices.shape).astype(mx.int32))
        return p

    monkeypatch.setattr(DHSAAttention, "plan", plan)
    checks = doctor.kernel_checks(dtypes=("float32",))
    assert kernel_run and [c.status for c in checks] == ["pass", "pass"]
    assert all(c.max_error < 1e-5 for c in checks)
    assert all("differ in 0 of" not in c.detail for c in checks)  # its own plans did differ
