import io

import pytest

from mlx_dhsa.cli.documents import DocumentError, read_document, read_documents


def _pdf(path, text: str | None):
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"pdf.fonttype": 42}):  # TrueType: pypdf can map the glyphs
        fig = Figure(figsize=(4, 2))
        if text:
            fig.text(0.1, 0.5, text)
        fig.savefig(path)
    return path


def test_text_markdown_and_pdf(tmp_path):
    (tmp_path / "a.txt").write_text("  plain text\n")
    (tmp_path / "b.md").write_text("# Title\n\nbody")
    pdf = _pdf(tmp_path / "c.pdf", "Hello from a PDF")
    assert read_document(tmp_path / "a.txt") == "plain text"
    assert read_document(tmp_path / "b.md") == "# Title\n\nbody"
    assert "Hello from a PDF" in read_document(pdf)


def test_stdin_and_several_documents(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("from a pipe\n"))
    (tmp_path / "a.txt").write_text("first")
    text = read_documents([tmp_path / "a.txt", "-"])
    assert text == "# a.txt\n\nfirst\n\n# stdin\n\nfrom a pipe"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", b"  \n", "empty"),
        ("blob.bin", b"\x00\x01\x02", "binary"),
        ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("broken.pdf", b"%PDF-1.4 garbage", "cannot read PDF"),
    ],
)
def test_bad_documents(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DocumentError, match=message):
        read_document(path)


def test_pdf_without_text_and_directory(tmp_path):
    with pytest.raises(DocumentError, match="OCR"):
        read_document(_pdf(tmp_path / "blank.pdf", None))
    with pytest.raises(DocumentError, match="not a file"):
        read_document(tmp_path)
