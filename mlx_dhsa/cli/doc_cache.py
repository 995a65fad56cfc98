"""Prefilled prompt caches kept on disk, so that a long document is prefilled once.

An entry is the prompt cache after some tokens (mlx-lm's ``save_prompt_cache`` format) plus a
JSON sidecar naming what it holds. Entries live under ``cache_dir()/prompt-cache`` and are
found by a key that hashes everything the cache depends on:

* the model: its name, ``config.json`` and the size and time of its weight files;
* the attention: the DHSA config (sparse prefill changes every later layer's keys), or
  ``dense``, and the weight dtype;
* the tokenizer: its serialised vocabulary, merges and chat template;
* the content: the token ids prefilled (the document's text rendered by that tokenizer).

Writes are atomic (temporary file, then rename); the sidecar, written last, carries the data
file's size and SHA-256, so a truncated or corrupt entry is detected, deleted and reported
(:class:`CorruptEntry`). The store is capped in bytes; the least recently used entries go first.
"""

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from .. import cache as _dhsa_cache  # noqa: F401  (registers DHSACache for load_prompt_cache)
from .._version import __version__
from ..config import DHSAConfig
from ..evaluation.runinfo import model_dtype
from ..models.packaged import cache_dir

FORMAT = 1  # bump when the entry layout changes: old entries then miss
DEFAULT_MAX_GB = 20.0
DATA, META = ".safetensors", ".json"
_WEIGHTS = ("*.safetensors", "*.gguf", "*.npz")


class CorruptEntry(RuntimeError):
    """An entry failed its checks; it has been deleted. The message says what was wrong."""


@dataclass(frozen=True)
class Entry:
    """What a sidecar records about one stored prompt cache."""

    key: str
    namespace: str  # hash of model, attention, dtype and tokenizer
    tokens: list[int]  # the token ids the cache holds, in order
    prefill_s: float  # what prefilling them cost when the entry was made
    prefill_path: str  # attention the prefill ran
    nbytes: int  # size of the data file
    sha256: str  # of the data file


@dataclass(frozen=True)
class Loaded:
    cache: list[Any]
    entry: Entry
    load_s: float  # reading and checking the entry


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
        h.update(b"\x00")
    return h.hexdigest()


def model_fingerprint(path: str | Path) -> dict:
    """The model's name, its ``config.json`` hash and its weight files' sizes and times."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return {"name": str(path)}
    config = root / "config.json"
    weights = sorted(p for pattern in _WEIGHTS for p in root.glob(pattern))
    return {
        "name": str(root.resolve()),
        "config": _sha(config.read_bytes()) if config.is_file() else None,
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialisation (vocabulary, merges, normalisers) and its
    chat template."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(inner, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(inner.get_vocab().items())
    return _sha(body, getattr(tokenizer, "chat_template", None) or "")


def namespace(model_path: str | Path, model: nn.Module, config: DHSAConfig | None, tokenizer):
    """Everything a prompt cache depends on except the tokens; ``config=None`` means dense."""
    return _sha(
        FORMAT,
        __version__,
        model_fingerprint(model_path),
        asdict(config) if config is not None else "dense",
        model_dtype(model),
        tokenizer_fingerprint(tokenizer),
    )


class DocCache:
    """A size-capped, least-recently-used store of prompt caches on disk.

    Args:
        root (Path, optional): the store's directory. Default: ``cache_dir()/prompt-cache``.
        max_gb (float): cap on the stored bytes; older entries are evicted past it.
    """

    def __init__(self, root: Path | None = None, max_gb: float = DEFAULT_MAX_GB):
        self.root = Path(root) if root is not None else cache_dir() / "prompt-cache"
        self.max_bytes = int(max_gb * 1e9)

    def key(self, namespace: str, tokens: Sequence[int]) -> str:
        return _sha(namespace, list(map(int, tokens)))[:40]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}{DATA}", self.root / f"{key}{META}"

    def _drop(self, key: str) -> None:
        for p in self._paths(key):
            p.unlink(missing_ok=True)

    def _entry(self, key: str) -> Entry | None:
        """The sidecar of ``key``; ``None`` if there is none. Raises CorruptEntry."""
        data, meta = self._paths(key)
        if not meta.exists():
            if data.exists():  # the writer died between the two renames
                self._drop(key)
                raise CorruptEntry(f"incomplete cache entry {data.name} (no sidecar): deleted")
            return None
        try:
            entry = Entry(**json.loads(meta.read_text()))
        except (ValueError, TypeError) as e:
            self._drop(key)
            raise CorruptEntry(f"unreadable cache sidecar {meta.name} ({e}): deleted") from e
        return entry

    def load(self, key: str) -> Loaded | None:
        """The prompt cache stored under ``key``, checked; ``None`` on a miss.

        Raises:
            CorruptEntry: the entry is truncated, altered or unreadable (it is deleted).
        """
        tic = time.perf_counter()
        entry = self._entry(key)
        if entry is None:
            return None
        data, _ = self._paths(key)
        size = data.stat().st_size if data.exists() else -1
        problem = None
        if size != entry.nbytes:
            problem = f"size {size} bytes, expected {entry.nbytes} (truncated or missing)"
        else:
            with data.open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != entry.sha256:
                    problem = "checksum mismatch"
        if problem is None:
            try:
                cache = load_prompt_cache(str(data))
                mx.eval([c.state for c in cache])
            except Exception as e:  # any parse failure means the file is not what we wrote
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem is not None:
            self._drop(key)
            raise CorruptEntry(f"corrupt cache entry {data.name} ({problem}): deleted")
        os.utime(data)  # recently used
        return Loaded(cache, entry, time.perf_counter() - tic)

    def save(
        self,
        namespace: str,
        tokens: Sequence[int],
        cache: list[Any],
        *,
        prefill_s: float,
        prefill_path: str,
    ) -> Entry | None:
        """Store ``cache`` (holding ``tokens``) atomically; ``None`` if it exceeds the cap."""
        nbytes = sum(getattr(c, "nbytes", 0) for c in cache)
        if nbytes > self.max_bytes:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.key(namespace, tokens)
        data, meta = self._paths(key)
        tmp = None
        try:
            # The suffix must stay .safetensors: MLX appends it otherwise.
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=f".tmp{DATA}")
            os.close(fd)
            save_prompt_cache(tmp, cache, {"mlx_dhsa_key": key})
            with open(tmp, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            entry = Entry(
                key=key,
                namespace=namespace,
                tokens=[int(t) for t in tokens],
                prefill_s=float(prefill_s),
                prefill_path=prefill_path,
                nbytes=os.path.getsize(tmp),
                sha256=digest,
            )
            os.replace(tmp, data)
            tmp = None
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=f".tmp{META}")
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(entry), f)
            os.replace(tmp, meta)
            tmp = None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self.evict(keep=key)
        return entry

    def entries(self) -> list[Entry]:
        """The readable entries (corrupt sidecars are skipped, not deleted, here)."""
        out = []
        for meta in self.root.glob(f"*{META}") if self.root.is_dir() else ():
            try:
                out.append(Entry(**json.loads(meta.read_text())))
            except (ValueError, TypeError, OSError):
                continue
        return out

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used entries until the store fits its cap; never ``keep``."""
        if not self.root.is_dir():
            return []
        for tmp in self.root.glob(".*.tmp*"):  # a writer that died; an hour is plenty
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink(missing_ok=True)
        files = [(p, p.stat()) for p in self.root.glob(f"*{DATA}") if not p.name.startswith(".")]
        total = sum(s.st_size for _, s in files)
        dropped = []
        for p, s in sorted(files, key=lambda f: f[1].st_mtime):
            if total <= self.max_bytes:
                break
            key = p.name.removesuffix(DATA)
            if key == keep:
                continue
            self._drop(key)
            total -= s.st_size
            dropped.append(key)
        return dropped

    def nearest(self, namespace: str, tokens: Sequence[int], at_least: int) -> Loaded | None:
        """The stored cache sharing the longest prefix (``>= at_least`` tokens) with ``tokens``,
        trimmed to that prefix (leaving one token to feed). Raises CorruptEntry."""
        best, best_n = None, at_least - 1
        for e in self.entries():
            if e.namespace != namespace:
                continue
            n = _common_prefix(e.tokens, tokens)
            if n > best_n:
                best, best_n = e, n
        if best is None:
            return None
        loaded = self.load(best.key)
        if loaded is None:
            return None
        keep = min(best_n, len(tokens) - 1)
        extra = len(best.tokens) - keep
        if extra > 0:
            if not can_trim_prompt_cache(loaded.cache):
                return None
            trim_prompt_cache(loaded.cache, extra)
        trimmed = Entry(**{**asdict(best), "tokens": best.tokens[:keep]})
        return Loaded(loaded.cache, trimmed, loaded.load_s)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Opened:
    """How a chat's document got into its prompt cache."""

    stats: Any  # chat.TurnStats of the prefill (or of the load, on a hit)
    hit: Loaded | None = None  # loaded from disk
    saved: Entry | None = None  # prefilled and stored
    problem: str | None = None  # a corrupt entry that was deleted (then rebuilt)


def open_document(session, store: DocCache | None, space: str | None, progress=None) -> Opened:
    """Fill ``session``'s cache with its document: from ``store`` when it holds the same
    namespace and tokens, else by prefilling (then stored). ``store=None`` only prefills."""
    from .chat import TurnStats

    if store is None:
        return Opened(session.prefill(progress))
    tokens = session.render(None)
    key, problem = store.key(space, tokens), None
    try:
        hit = store.load(key)
    except CorruptEntry as e:
        hit, problem = None, str(e)
    if hit is not None:
        session.cache, session.cached = hit.cache, list(tokens)
        session.prefill_stats = TurnStats(
            prompt_tokens=len(tokens),
            prompt_tps=len(tokens) / max(hit.load_s, 1e-9),
            prefill_s=hit.load_s,
            generation_tokens=0,
            generation_tps=0.0,
            peak_gb=mx.get_peak_memory() / 1e9,
            prefill_path=hit.entry.prefill_path,
            decode_path="",
            context_tokens=len(tokens),
        )
        return Opened(session.prefill_stats, hit=hit)
    stats = session.prefill(progress)
    saved = store.save(
        space, tokens, session.cache, prefill_s=stats.prefill_s, prefill_path=stats.prefill_path
    )
    return Opened(stats, saved=saved, problem=problem)
