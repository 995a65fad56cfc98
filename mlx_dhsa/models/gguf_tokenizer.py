"""Rebuild a transformers tokenizer from a GGUF file's vocabulary (design.md section 8).

A GGUF carries no ``tokenizer.json``: tokens, scores, token types, merges and special-token ids
are metadata. The backend is built with ``tokenizers`` and wrapped in the public
``PreTrainedTokenizerFast``, following transformers' own GGUF builders (5.25's
``gguf_tokenizer_mapping``) without importing them: those are private, and were renamed
between releases. Two ``tokenizer.ggml.model`` values are read:

- ``"llama"``, sentencepiece BPE with byte fallback: merges rebuilt from the vocabulary, ranked
  by token score, or, for Gemma, by the order of the tokens in the file.
- ``"gpt2"``, byte-level BPE with the file's merges (llama-architecture BPE, e.g. SmolLM2).
"""

from .gguf import GGUFError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
TOKENIZER_MODELS = ("llama", "gpt2")

# Llama 3's pre-tokenizer split (``tokenizer.ggml.pre`` llama-bpe); other byte-level files get
# GPT-2's, as in transformers.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe")

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)  # Gemma3's template (google/gemma-3-*), text only; the base GGUF carries none


def tokenizer_model(meta: dict) -> str:
    """The file's ``tokenizer.ggml.model``, or :class:`GGUFError` for one this module cannot
    rebuild."""
    model = meta.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise GGUFError(
            f"GGUF tokenizer model {model!r} is not supported; supported: {list(TOKENIZER_MODELS)}"
        )
    return model


def build_tokenizer(meta: dict):
    """A ``PreTrainedTokenizerFast`` rebuilt from GGUF metadata (``meta``: key -> value).

    Raises:
        GGUFError: a tokenizer model other than ``llama`` or ``gpt2``, or one without its
            scores (``llama``) or merges (``gpt2``).
    """
    from transformers import PreTrainedTokenizerFast

    model, arch = tokenizer_model(meta), meta["general.architecture"]
    tokens = meta["tokenizer.ggml.tokens"]
    special = {}  # bos_token, ... -> token text
    for name, key in [("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")]:  # fmt: skip
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None:
            special[f"{name}_token"] = tokens[index]
    if model == "gpt2":
        backend, vocab = _byte_level(meta)
    else:
        backend, vocab = _sentencepiece(meta, special.get("unk_token"), arch in GEMMA_ARCHS)
    _add_typed_tokens(backend, meta, vocab)

    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos = special.get("bos_token") if add_bos else None
    eos = special.get("eos_token") if add_eos else None
    backend.post_processor = _template(backend, bos, eos)  # v5 sets the same from add_*_token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **special,
    )
    template = meta.get("tokenizer.chat_template")
    if template is None and arch == "gemma3":
        template = GEMMA3_CHAT_TEMPLATE
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _sentencepiece(meta: dict, unk: str | None, gemma: bool):
    """Sentencepiece BPE with byte fallback (transformers' ``LlamaTokenizer`` /
    ``GemmaTokenizer``); returns ``(backend, vocab)``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokens = meta["tokenizer.ggml.tokens"]
    if gemma:  # a run of spaces is stored as spaces; Gemma's tokenizer spells it with U+2581
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Gemma's scores do not follow its merge order; the order of its tokens in the file does.
    ranks = {t: -i for i, t in enumerate(tokens)} if gemma else None
    if ranks is None and "tokenizer.ggml.scores" not in meta:
        raise GGUFError("the GGUF's sentencepiece (llama) tokenizer has no tokenizer.ggml.scores")
    scores = ranks or dict(zip(tokens, meta["tokenizer.ggml.scores"]))
    backend = Tokenizer(
        BPE(vocab, _merges(vocab, scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma or not meta.get("tokenizer.ggml.add_space_prefix", True):
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:  # a space is prepended to the text, and stripped again when decoding
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            "\u2581", prepend_scheme="first", split=False
        )
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend, vocab


def _merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best-scored token first, longer left piece first (transformers' ``generate_merges``)."""
    merges = []
    for token, score in scores.items():
        for i in range(1, len(token)):
            if token[:i] in vocab and token[i:] in vocab:
                merges.append((token[:i], token[i:], score))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable
    return [(left, right) for left, right, _ in merges]


def _byte_level(meta: dict):
    """GPT-2 style byte-level BPE with the file's merges; returns ``(backend, vocab)``."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    if "tokenizer.ggml.merges" not in meta:
        raise GGUFError("the GGUF's byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i
        for i, t in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(
        BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if meta.get("tokenizer.ggml.pre") in LLAMA3_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _add_typed_tokens(backend, meta: dict, vocab: dict[str, int]) -> None:
    """Control tokens become special added tokens and user-defined ones (``<think>``, Gemma's
    runs of newlines) plain added tokens, so that text containing them keeps them whole.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
    mislabel and is skipped, as is a user-defined token the vocabulary spells differently.
    """
    from tokenizers import AddedToken

    types = meta.get("tokenizer.ggml.token_type") or []
    pairs = list(zip(meta["tokenizer.ggml.tokens"], types))
    alphabet = set(_byte_alphabet().values())
    byte_level = meta["tokenizer.ggml.model"] == "gpt2"
    control = [t for t, k in pairs if k == CONTROL and not (byte_level and set(t) - alphabet)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in pairs if k == USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _template(backend, bos: str | None, eos: str | None):
    """The post-processor adding ``bos`` / ``eos`` (None: not added) around each sequence."""
    from tokenizers import processors

    a = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    b = f"{bos + ':1 ' if bos else ''}$B:1{' ' + eos + ':1' if eos else ''}"
    ids = {t: backend.token_to_id(t) for t in (bos, eos) if t}
    return processors.TemplateProcessing(
        single=a, pair=f"{a} {b}", special_tokens=list(ids.items())
    )


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (``bytes_to_unicode``)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return dict(zip(printable + others, map(chr, chars)))
