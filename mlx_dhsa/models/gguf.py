"""Convert llama.cpp GGUF checkpoints into mlx-lm model directories (design.md section 8).

``mx.load`` cannot read K-quants, so every tensor is dequantized with the ``gguf`` package,
renamed from llama.cpp's names to HF's, and written as safetensors with a ``config.json`` and
tokenizer files built from the GGUF metadata (``gguf_tokenizer.py``). Two llama.cpp conventions
are undone: Gemma RMSNorm weights are stored as ``1 + w``, and llama Q/K rows are permuted for
its RoPE layout.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

Progress = Callable[[int, int, str], None]  # (done, total, what), called once per tensor

MARKER = "mlx_dhsa_source.json"  # written into every directory convert_gguf makes


class OutputDirError(ValueError):
    """The output path of a conversion cannot be used (a file, or a directory not ours)."""


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file."""


# Per-layer llama.cpp name -> HF name (``blk.N.<key>.weight`` -> ``model.layers.N.<value>.weight``).
_LAYER_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
LAYER_NAMES: dict[str, dict[str, str]] = {
    "llama": {**_LAYER_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_LAYER_COMMON,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
MODEL_TYPES = {"llama": "llama", "gemma3": "gemma3_text"}  # GGUF architecture -> mlx-lm type


def hf_name(name: str, arch: str) -> str:
    """The HF (mlx-lm) name of a llama.cpp tensor, e.g. ``blk.3.ffn_norm.weight`` ->
    ``model.layers.3.pre_feedforward_layernorm.weight`` for ``gemma3``.

    Raises:
        KeyError: a tensor this converter does not know.
    """
    parts = name.split(".")
    if parts[0] == "blk":
        key = ".".join(parts[2:-1])
        return f"model.layers.{parts[1]}.{LAYER_NAMES[arch][key]}.{parts[-1]}"
    return f"{GLOBAL_NAMES['.'.join(parts[:-1])]}.{parts[-1]}"


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> HF's half-split RoPE layout).

    Args:
        w (np.ndarray): (n_heads * head_dim, ...) rows as llama.cpp stores them.
        n_heads (int): heads of the projection (``n_kv_heads`` for K).

    Returns:
        np.ndarray: same shape, rows in HF order.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensor(name: str, w: np.ndarray, arch: str, config: dict) -> tuple[str, np.ndarray]:
    """One dequantized llama.cpp tensor -> ``(hf_name, array)`` in HF convention."""
    if arch == "gemma3" and name.endswith("norm.weight"):
        w = w - 1.0  # llama.cpp stores Gemma norms as 1 + w; mlx-lm adds the 1 itself
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
        w = unpermute_rope(w, config["num_attention_heads"])
    if arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
        w = unpermute_rope(w, config["num_key_value_heads"])
    return hf_name(name, arch), w


def model_config(meta: dict, tensor_names: list[str]) -> dict:
    """An mlx-lm ``config.json`` from GGUF metadata (``meta``: key -> value).

    Raises:
        ValueError: an architecture other than ``llama`` or ``gemma3``.
    """
    arch = meta["general.architecture"]
    if arch not in MODEL_TYPES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(MODEL_TYPES)}"
        )
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    tokens = meta["tokenizer.ggml.tokens"]
    n_heads = g("attention.head_count")
    config = dict(
        model_type=MODEL_TYPES[arch],
        hidden_size=g("embedding_length"),
        num_hidden_layers=g("block_count"),
        intermediate_size=g("feed_forward_length"),
        num_attention_heads=n_heads,
        num_key_value_heads=g("attention.head_count_kv", n_heads),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"),
        vocab_size=g("vocab_size", len(tokens)),
        rope_theta=g("rope.freq_base", 10000.0),
        max_position_embeddings=g("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    head_dim = g("attention.key_length") or g("rope.dimension_count")
    config["head_dim"] = head_dim or config["hidden_size"] // n_heads
    factor = g("rope.scaling.factor")
    if factor:
        config["rope_scaling"] = {"rope_type": g("rope.scaling.type", "linear"), "factor": factor}
    if arch == "gemma3":
        # GGUF omits these; the values are Gemma3's (HF Gemma3TextConfig defaults).
        config.update(sliding_window=g("attention.sliding_window", 512), sliding_window_pattern=6)
        config.update(rope_local_base_freq=10000.0, final_logit_softcapping=None)
        # llama.cpp: 27B scales by (hidden / heads)^-0.5, the others by head_dim^-0.5.
        big = config["num_hidden_layers"] == 62
        config["query_pre_attn_scalar"] = (
            config["hidden_size"] // n_heads if big else config["head_dim"]
        )
        if "<end_of_turn>" in tokens:  # chat turns end with it (HF generation_config)
            config["eos_token_id"] = [config["eos_token_id"], tokens.index("<end_of_turn>")]
    return config


def read_metadata(reader) -> dict:
    """All GGUF key/value fields as Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float16",
    tokenizer_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert a GGUF file into an mlx-lm model directory loadable with ``mlx_lm.load``.

    The directory is written next to ``out_dir`` under a temporary name and renamed when
    complete, so an interrupted conversion leaves nothing half-written at ``out_dir``; the
    temporary is deleted on any failure or interrupt, and temporaries of processes that died
    are deleted by the next conversion to the same path.

    Args:
        gguf_path (str | Path): a llama.cpp GGUF file (architecture ``llama`` or ``gemma3``).
        out_dir (str | Path): the model directory to create: a new or empty directory, or one
            that an earlier conversion made (replaced). Anything else is refused.
        dtype (str): weight dtype, an ``mx`` dtype name. Default: ``"float16"``.
        tokenizer_dir (str | Path, optional): copy ``tokenizer*`` / ``special_tokens_map`` files
            from here instead of rebuilding the tokenizer from the GGUF. Default: ``None``.
        progress (Callable, optional): ``progress(done, total, name)`` per tensor.

    Returns:
        Path: ``out_dir``.

    Raises:
        OutputDirError: ``out_dir`` is a file or a directory mlx-dhsa did not make (checked
            before converting; nothing is written). GGUFError: an unsupported architecture or
            tokenizer model (without ``tokenizer_dir``), or an unreadable file.
        KeyError: an unknown tensor name.
        ImportError: the ``gguf`` package is missing.
    """
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        raise ImportError("GGUF conversion needs the gguf package: pip install gguf") from e
    from .gguf_tokenizer import build_tokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir).expanduser()
    check_output_dir(out_dir)
    remove_stale_temporaries(out_dir)
    reader, meta, config = open_gguf(_fast_reader(gguf), gguf_path)
    arch = meta["general.architecture"]
    tokenizer = None
    if tokenizer_dir is None:
        try:  # before the tensors: a vocabulary that cannot be rebuilt fails at once
            tokenizer = build_tokenizer(meta)
        except GGUFError as e:
            raise GGUFError(f"{gguf_path}: {e}") from None
    tmp = _temporary(out_dir, "tmp")
    tmp.mkdir(parents=True)
    try:
        weights = {}
        for i, t in enumerate(reader.tensors):
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            try:
                name, w = convert_tensor(t.name, w, arch, config)
            except KeyError:
                raise GGUFError(f"{gguf_path}: unknown {arch} tensor {t.name!r}") from None
            weights[name] = mx.array(w).astype(getattr(mx, dtype))
            mx.eval(weights[name])
            if progress is not None:
                progress(i + 1, len(reader.tensors), t.name)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        del weights
        if tokenizer is not None:  # as HF's save_pretrained: without it, transformers 5.17
            # warns of a wrong Mistral regex when loading a vocabulary over 100k (Gemma's)
            config = {**config, "transformers_version": _transformers_version()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        else:
            for f in Path(tokenizer_dir).iterdir():
                if f.name.startswith(("tokenizer", "special_tokens_map", "chat_template")):
                    shutil.copy(f, tmp / f.name)
        source = {"gguf": gguf_path.name, "architecture": arch, "dtype": dtype}
        (tmp / MARKER).write_text(json.dumps(source, indent=2))
        check_output_dir(out_dir)  # again: the conversion took a while
        old = None
        if out_dir.exists():  # a previous conversion of ours: swap, then delete it
            old = _temporary(out_dir, "old")
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:  # KeyboardInterrupt included: leave no temporary behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _fast_reader(gguf):
    """``gguf.GGUFReader`` slicing a plain ndarray view of its memmap: the same arrays, read
    about 3x faster (a vocabulary of 262k strings is a million small slices, and numpy's memmap
    subclass adds its bookkeeping to each)."""

    class FastGGUFReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return FastGGUFReader


def open_gguf(reader_class, path: Path):
    """``(reader, metadata, mlx-lm config)`` of a GGUF file, or :class:`GGUFError` naming it.

    The reader maps the whole file, so a truncated or corrupt file fails here, before any
    output is written.
    """
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = reader_class(path)
        meta = read_metadata(reader)
    except (ValueError, TypeError, KeyError, IndexError, OSError, UnicodeDecodeError) as e:
        raise GGUFError(
            f"{path} is not a readable GGUF file (truncated or corrupt? {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    try:
        config = model_config(meta, [t.name for t in reader.tensors])
    except KeyError as e:
        raise GGUFError(f"{path}: the GGUF metadata lacks {e}") from None
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None
    return reader, meta, config


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output path that a conversion would clobber.

    A missing path or an empty directory is fine, and so is a directory that an earlier
    conversion made (it holds ``MARKER``): it is replaced. Anything else is the user's.

    Raises:
        OutputDirError: ``out_dir`` is a file, or a non-empty directory mlx-dhsa did not make.
    """
    if out_dir.is_dir():
        if (out_dir / MARKER).is_file() or not any(out_dir.iterdir()):
            return
        raise OutputDirError(
            f"{out_dir} already exists and was not made by mlx-dhsa (no {MARKER} in it); "
            "nothing was written: choose a new or empty directory for --out"
        )
    if out_dir.exists() or out_dir.is_symlink():
        raise OutputDirError(f"{out_dir} exists and is not a directory; choose a directory path")


def temporary_path(out_dir: str | Path, kind: str) -> Path:
    """This process's temporary ``.NAME.KIND-PID`` beside ``out_dir`` (kinds: tmp, old, gguf);
    :func:`remove_stale_temporaries` deletes it once the process is gone."""
    out_dir = Path(out_dir).expanduser()
    return out_dir.with_name(f".{out_dir.name}.{kind}-{os.getpid()}")


_temporary = temporary_path


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete the temporaries (``.NAME.tmp-PID``, ``.NAME.old-PID``) that conversions of
    ``out_dir`` left when their process died; returns what was removed."""
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for path in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, pid = path.name[len(out_dir.name) + 2 :].partition("-")
        if kind in ("tmp", "old", "gguf") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
