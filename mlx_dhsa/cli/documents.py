"""Read the documents a chat is about: plain text, Markdown, PDF (through pypdf) or stdin."""

import sys
from pathlib import Path

from ..extras import MissingExtraError, require

STDIN = "-"  # the path that means "read standard input"
PDF_SUFFIXES = (".pdf",)
SAMPLE = "sample:"  # `--doc sample:NAME` names a document shipped in mlx_dhsa/data/samples
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "samples"


class DocumentError(ValueError):
    """A document that is missing, unreadable or has no text; the message names it."""


def _read_pdf(path: Path) -> str:
    try:
        require("pypdf", f"reading {path}")
    except MissingExtraError as e:
        raise DocumentError(str(e)) from None
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"cannot read PDF {path}: {e}") from e
    return "\n\n".join(p.strip() for p in pages if p.strip())


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise DocumentError(f"{path} looks like a binary file, not text, Markdown or PDF")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def samples() -> list[str]:
    """Names of the documents shipped with the package (``--doc sample:NAME``)."""
    return sorted(p.stem for p in SAMPLES_DIR.glob("*.md"))


def sample_path(name: str) -> Path:
    """The shipped document ``name`` (``sample:NAME`` or ``NAME``).

    Raises:
        DocumentError: no such sample; the message lists those that ship.
    """
    name = name.removeprefix(SAMPLE)
    path = SAMPLES_DIR / f"{name}.md"
    if not path.is_file():
        shipped = ", ".join(SAMPLE + s for s in samples())
        raise DocumentError(f"no sample document {name!r}; shipped: {shipped}")
    return path


def read_document(path: str | Path) -> str:
    """Return the text of one document.

    Args:
        path (str or Path): a ``.txt``/``.md`` (or other UTF-8 text) file, a ``.pdf``, ``"-"``
            for standard input, or ``sample:NAME`` for a document shipped with mlx-dhsa.

    Returns:
        str: the document's text, stripped of leading and trailing whitespace.

    Raises:
        DocumentError: the file is missing, is a directory, cannot be decoded or parsed, or
            holds no text (a scanned PDF without a text layer, an empty file).
    """
    if str(path) == STDIN:
        text, name = sys.stdin.read(), "standard input"
    else:
        if str(path).startswith(SAMPLE) and not Path(path).exists():
            path = sample_path(str(path))
        path = Path(path).expanduser()
        name = str(path)
        if not path.exists():
            raise DocumentError(f"document not found: {path}")
        if not path.is_file():
            raise DocumentError(f"not a file: {path}")
        try:
            text = _read_pdf(path) if path.suffix.lower() in PDF_SUFFIXES else _read_text(path)
        except PermissionError as e:
            raise DocumentError(f"cannot read {path}: permission denied") from e
    text = text.strip()
    if not text:
        hint = " (a scanned PDF needs OCR first)" if name.lower().endswith(".pdf") else ""
        raise DocumentError(f"document is empty: {name}{hint}")
    return text


def read_documents(paths: list[str | Path]) -> str:
    """Read several documents and join them, each under a ``# name`` heading.

    A single document is returned as is. Raises :class:`DocumentError` as :func:`read_document`.
    """
    texts = [read_document(p) for p in paths]
    if len(texts) == 1:
        return texts[0]
    names = ["stdin" if str(p) == STDIN else Path(p).name for p in paths]
    return "\n\n".join(f"# {name}\n\n{text}" for name, text in zip(names, texts))
