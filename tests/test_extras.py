"""A lean core: `import mlx_dhsa` loads no CLI, plotting or PDF library, and a missing optional
dependency is one line naming the pip extra that installs it."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_dhsa.cli.app import app
from mlx_dhsa.cli.documents import DocumentError, read_document
from mlx_dhsa.extras import MissingExtraError, require

OPTIONAL = ("matplotlib", "pypdf", "typer", "rich")  # only the modules that use them import them


def test_import_mlx_dhsa_loads_no_optional_dependency():
    code = (
        "import json, sys; import mlx_dhsa; "
        f"print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []


@pytest.fixture
def without(monkeypatch):
    """Make ``import NAME`` fail as if NAME were not installed (None in sys.modules)."""

    def hide(name):
        for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, m)
        monkeypatch.setitem(sys.modules, name, None)

    return hide


def test_require_names_the_extra(without):
    without("matplotlib")
    with pytest.raises(MissingExtraError) as e:
        require("matplotlib", "--plot")
    message = str(e.value)
    assert "\n" not in message and "--plot needs matplotlib" in message
    assert "pip install 'mlx-dhsa[plot]'" in message


def test_pdf_without_pypdf_is_a_document_error(tmp_path, without):
    without("pypdf")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n")
    with pytest.raises(DocumentError, match=r"mlx-dhsa\[pdf\]"):
        read_document(pdf)


@pytest.mark.parametrize(
    "args",
    [
        ["profile", "--shape", "tiny", "--plot", "x.png"],
        ["niah", "--model", "no-such-model", "--plot-dir", "plots"],
    ],
)
def test_cli_plot_without_matplotlib_fails_first(args, tmp_path, without, monkeypatch):
    """The check runs before any model is built or loaded: one line, exit 1, no file."""
    without("matplotlib")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "mlx-dhsa[plot]" in lines[0], result.output
    assert not any(tmp_path.iterdir())
