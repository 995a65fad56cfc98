"""Prefilled documents kept on disk: round trip, hit, miss on each key part, corruption, LRU."""

import json
import os

import mlx.core as mx
import mlx_lm
import pytest
from test_cli import SMALL, _run, _text, model_dir  # noqa: F401  (the tiny model directory)

from mlx_dhsa import DHSACache, DHSAConfig, patch
from mlx_dhsa.cli.chat import ChatSession
from mlx_dhsa.cli.doc_cache import CorruptEntry, DocCache, namespace, open_document

CONFIG = DHSAConfig(budget=64, block_size=16, sink=8, local=16, dense_tail=8)


@pytest.fixture
def loaded(model_dir):  # noqa: F811
    model, tokenizer = mlx_lm.load(str(model_dir))
    return patch(model, CONFIG), tokenizer


def _open(loaded, store, space, doc=None):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, doc or _text(20))
    return session, open_document(session, store, space)


def _answer(session) -> str:
    return "".join(session.ask("What is it?", max_tokens=5))


def test_hit_restores_the_same_cache_and_answer(loaded, model_dir, tmp_path):  # noqa: F811
    store = DocCache(tmp_path)
    space = namespace(model_dir, loaded[0], CONFIG, loaded[1])
    first, opened = _open(loaded, store, space)
    assert opened.saved is not None and opened.hit is None
    assert opened.stats.prefill_path == "dhsa(reference)"
    keys = [c.state[0] for c in first.cache]
    again, reopened = _open(loaded, store, space)
    assert reopened.hit is not None and reopened.stats.prompt_tokens == len(first.cached)
    kinds = [type(c) for c in again.cache]  # DHSACache (and Gemma2's window caches) round-trip
    assert kinds == [type(c) for c in first.cache] and DHSACache in kinds
    assert all(c.offset == len(first.cached) for c in again.cache)
    for a, c in zip(keys, again.cache):
        assert mx.array_equal(a, c.state[0])
    assert _answer(again) == _answer(first)


def test_every_key_part_misses(loaded, model_dir, tmp_path):  # noqa: F811
    model, tokenizer = loaded
    store = DocCache(tmp_path / "store")
    space = namespace(model_dir, model, CONFIG, tokenizer)
    session, _ = _open(loaded, store, space)
    tokens = session.cached
    assert store.load(store.key(space, tokens)) is not None

    other_model = tmp_path / "other"
    other_model.mkdir()
    for f in model_dir.iterdir():
        (other_model / f.name).symlink_to(f)
    (other_model / "config.json").unlink()
    config = json.loads((model_dir / "config.json").read_text())
    (other_model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    tokenizer.chat_template, template = tokenizer.chat_template + " ", tokenizer.chat_template
    other_tokenizer = namespace(model_dir, model, CONFIG, tokenizer)
    tokenizer.chat_template = template
    variants = {
        "model": namespace(other_model, model, CONFIG, tokenizer),
        "config": namespace(model_dir, model, CONFIG.replace(budget=96), tokenizer),
        "dense": namespace(model_dir, model, None, tokenizer),
        "tokenizer": other_tokenizer,
    }
    for part, other in variants.items():
        assert other != space, part
        assert store.load(store.key(other, tokens)) is None, part
    changed = ChatSession(model, tokenizer, _text(20, seed=1)).render(None)
    assert store.load(store.key(space, changed)) is None, "content"


@pytest.mark.parametrize("damage", ["truncate", "flip", "no sidecar", "bad sidecar"])
def test_corrupt_entry_is_reported_deleted_and_rebuilt(  # noqa: F811
    loaded, model_dir, tmp_path, damage  # noqa: F811
):
    store = DocCache(tmp_path)
    space = namespace(model_dir, loaded[0], CONFIG, loaded[1])
    session, opened = _open(loaded, store, space)
    data = tmp_path / f"{opened.saved.key}.safetensors"
    meta = data.with_suffix(".json")
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-10] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "no sidecar":
        meta.unlink()
    else:
        meta.write_text("{not json")
    with pytest.raises(CorruptEntry, match="deleted"):
        store.load(opened.saved.key)
    assert not data.exists() and not meta.exists()
    if damage == "truncate":  # the next open prefills again and stores a good entry
        data_again = _open(loaded, store, space)[1]
        assert data_again.saved is not None and store.load(opened.saved.key) is not None


def test_least_recently_used_entries_are_evicted(loaded, model_dir, tmp_path):  # noqa: F811
    store = DocCache(tmp_path)
    space = namespace(model_dir, loaded[0], CONFIG, loaded[1])
    keys = []
    for seed in range(3):
        _, opened = _open(loaded, store, space, _text(20, seed))
        keys.append(opened.saved.key)
        os.utime(tmp_path / f"{keys[-1]}.safetensors", (seed, seed))  # distinct ages
    size = opened.saved.nbytes
    assert store.load(keys[0]) is not None  # now the most recently used
    store.max_bytes = int(2.5 * size)
    assert store.evict() == [keys[1]]
    assert [store.load(k) is not None for k in keys] == [True, False, True]
    store.max_bytes = size // 2  # an entry over the cap is not stored
    assert _open(loaded, store, space, _text(20, 7))[1].saved is None


def test_chat_loads_the_document_the_second_time(model_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLX_DHSA_CACHE", str(tmp_path))
    doc = tmp_path / "doc.txt"
    doc.write_text(_text(20))
    args = ("chat", "--model", model_dir, "--doc", doc, "-m", "4", *SMALL, "-q", "What?")
    first, second = _run(*args), _run(*args)
    assert "kept in" in first.output and "loaded from the prefill cache" not in first.output
    assert "loaded from the prefill cache" in second.output and "s saved" in second.output
    answer = [r.output.split("Attention: dhsa(reference) (prefill)")[-1] for r in (first, second)]
    assert answer[0].split("==========")[0] == answer[1].split("==========")[0]
    off = _run(*args, "--no-doc-cache")
    assert "prefill cache" not in off.output and "kept in" not in off.output
    for entry in (tmp_path / "prompt-cache").glob("*.safetensors"):
        os.truncate(entry, 10)
    broken = _run(*args)
    assert broken.exit_code == 0 and "corrupt cache entry" in broken.output
    assert "kept in" in broken.output
