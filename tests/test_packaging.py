"""The built wheel carries the kernel sources where kernels.metal_dir() looks first."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from mlx_dhsa import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_kernel_sources(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.insert(4, "--no-build-isolation")  # build offline with the installed backend
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("mlx_dhsa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mlx_dhsa/metal/{p.name}" for p in (ROOT / "metal").iterdir() if p.is_file()}
    assert {"mlx_dhsa/metal/common.h", "mlx_dhsa/metal/sparse_attention.metal"} <= expected
    assert expected <= names, sorted(expected - names)
    assert "mlx_dhsa/data/samples/dhsa.md" in names  # the quick start's `--doc sample:dhsa`
    for name in kernels.KERNELS:
        for part in kernels.sources.PARTS.get(name, (name,)):
            assert f"mlx_dhsa/metal/{part}.metal" in names
