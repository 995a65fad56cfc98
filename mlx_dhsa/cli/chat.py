"""A chat about a long document that prefills the document once and keeps the prompt cache.

Every turn renders the whole conversation with the tokenizer's chat template (plain text when
there is none), then feeds only the tokens the cache does not hold yet: the document is never
processed twice unless the cache cannot be trimmed back to a common prefix.
"""

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ..evaluation.runinfo import PrefillPaths, attention_path
from ..loading import resolve
from ..patching import make_prompt_cache

DEFAULT_PREFILL_STEP = 2048  # tokens per prefill call, as mlx-lm
# On a CPU a 2048-token step takes minutes, and the progress bar and Ctrl-C wait for a step
# to end: steps there start at MIN_STEP tokens and are sized to take about STEP_SECONDS.
STEP_SECONDS = 1.0
MIN_STEP = 16
QUESTION_RESERVE = 128  # context tokens kept free for the questions and chat markup
TRUNCATE_MODES = ("start", "middle", "end")  # where an over-long document is cut
CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "context_length")
_CUT = "\n[...]\n"  # marks where the middle of a document was cut
_SLOT = "\x00QUESTION\x00"  # marks where the first question goes in the rendered document turn


class ContextTooLong(ValueError):
    """The document does not fit: ``tokens`` needed, ``limit`` available."""

    def __init__(self, tokens: int, limit: int, context: int):
        self.tokens, self.limit, self.context = tokens, limit, context
        super().__init__(
            f"the document is {tokens:,} tokens but at most {limit:,} fit in the model's "
            f"{context:,}-token context (the rest is kept for questions and answers)"
        )


def model_context(path_or_alias: str) -> int | None:
    """The context length in the model's ``config.json`` (local or cached), else ``None``."""
    from huggingface_hub import try_to_load_from_cache

    repo = resolve(path_or_alias)
    path = Path(repo).expanduser() / "config.json"
    if not path.is_file():
        cached = try_to_load_from_cache(repo, "config.json")
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    config = json.loads(path.read_text())
    for c in (config, config.get("text_config", {})):
        for key in CONTEXT_KEYS:
            if isinstance(c.get(key), int):
                return c[key]
    return None


def truncate(tokenizer, text: str, drop: int, where: str) -> str:
    """Remove ``drop`` tokens of ``text`` at its ``start``, ``middle`` or ``end``."""
    if where not in TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {where!r}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    keep = max(len(ids) - drop, 0)
    if where == "start":
        return tokenizer.decode(ids[len(ids) - keep :])
    if where == "end":
        return tokenizer.decode(ids[:keep])
    keep = max(keep - len(tokenizer.encode(_CUT, add_special_tokens=False)), 0)
    head, tail = ids[: keep // 2], ids[len(ids) - (keep - keep // 2) :]
    return f"{tokenizer.decode(head)}{_CUT}{tokenizer.decode(tail)}"


@dataclass(frozen=True)
class TurnStats:
    """What one prefill or answer cost (``generation_*`` are 0 for a document prefill)."""

    prompt_tokens: int  # tokens fed this turn (not already in the cache)
    prompt_tps: float
    prefill_s: float
    generation_tokens: int
    generation_tps: float
    peak_gb: float
    prefill_path: str  # attention the prompt tokens ran through
    decode_path: str  # attention of the last generated token ("" when none)
    context_tokens: int  # tokens in the cache afterwards


class ChatSession:
    """Questions about ``document`` answered by ``model``, sharing one prompt cache.

    Args:
        model (nn.Module): an mlx-lm model, patched with DHSA or not.
        tokenizer (TokenizerWrapper): its tokenizer.
        document (str, optional): the text the first user turn starts with.
        prefill_step_size (int, optional): tokens per prefill call. Default: ``2048`` on a
            GPU; on a CPU, steps timed to take about ``STEP_SECONDS`` each.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        document: str | None = None,
        *,
        prefill_step_size: int | None = None,
    ):
        self.model, self.tokenizer, self.document = model, tokenizer, document
        self.timed_steps = prefill_step_size is None and mx.default_device() == mx.cpu
        self.prefill_step_size = prefill_step_size or DEFAULT_PREFILL_STEP
        self.turns: list[tuple[str, str]] = []
        self.cache = make_prompt_cache(model)
        self.cached: list[int] = []  # the tokens the cache holds, in order
        self.last: TurnStats | None = None
        self.prefill_stats: TurnStats | None = None

    def fit(self, context: int, *, max_tokens: int, where: str | None = None) -> int:
        """Make the document fit ``context`` with room for ``max_tokens`` and the questions.

        Args:
            context (int): the model's context length in tokens.
            max_tokens (int): tokens kept for each answer.
            where (str, optional): cut the document at its ``start``, ``middle`` or ``end``;
                ``None`` refuses a document that does not fit.

        Returns:
            int: the number of document tokens removed (0 if it fits).

        Raises:
            ContextTooLong: it does not fit and ``where`` is ``None``, or nothing would be left.
        """
        limit = context - max_tokens - QUESTION_RESERVE
        n = first = len(self.render(None))
        if n <= limit:
            return 0
        doc = len(self.tokenizer.encode(self.document or "", add_special_tokens=False))
        if where is None or limit <= n - doc:
            raise ContextTooLong(n, limit, context)
        original, drop = self.document, n - limit
        for _ in range(4):  # decoding and re-encoding can shift the count by a few tokens
            self.document = truncate(self.tokenizer, original, drop, where)
            n = len(self.render(None))
            if n <= limit:
                return first - n
            drop += n - limit
        raise ContextTooLong(n, limit, context)

    def _user(self, question: str, first: bool) -> str:
        return f"{self.document}\n\n{question}" if first and self.document else question

    def render(self, question: str | None) -> list[int]:
        """Tokens of the conversation so far plus ``question`` (``None``: the document only)."""
        tok = self.tokenizer
        if not getattr(tok, "has_chat_template", False) or not tok.chat_template:
            parts = [f"{self.document}\n\n"] if self.document else []
            parts += [f"Question: {q}\nAnswer: {a}\n\n" for q, a in self.turns]
            parts += [f"Question: {question}\nAnswer:"] if question is not None else []
            return tok.encode("".join(parts), add_special_tokens=True)
        messages = []
        for i, (q, a) in enumerate(self.turns):
            messages += [
                {"role": "user", "content": self._user(q, i == 0)},
                {"role": "assistant", "content": a},
            ]
        slot = question if question is not None else _SLOT
        messages.append({"role": "user", "content": self._user(slot, not self.turns)})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if question is None:
            text = text[: text.index(_SLOT)]
        return tok.encode(text, add_special_tokens=False)

    def _sync(self, tokens: list[int]) -> list[int]:
        """Trim the cache to its common prefix with ``tokens``; return the tokens to feed.

        The cache's own offset is the truth: an interrupted answer leaves tokens in it that
        ``cached`` does not list, and they are trimmed too.
        """
        offset = getattr(self.cache[0], "offset", len(self.cached))
        p = 0
        for a, b in zip(self.cached[:offset], tokens):
            if a != b:
                break
            p += 1
        p = min(p, len(tokens) - 1)  # generation needs at least one new token
        if offset > p:
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, offset - p)
            else:  # e.g. a rotating cache past its window: start over
                self.cache, p = make_prompt_cache(self.model), 0
        self.cached = tokens[:p]
        return tokens[p:]

    def prefill(self, progress: Callable[[int, int], None] | None = None) -> TurnStats:
        """Process the document (and chat markup before the first question) into the cache."""
        tokens = self.render(None)
        new = self._sync(tokens)
        paths = PrefillPaths(self.model, progress)
        tic = time.perf_counter()
        fed, step = self._timed_prefill(new, paths) if self.timed_steps else (0, None)
        for _ in generate_step(
            mx.array(new[fed:]),
            self.model,
            max_tokens=0,
            prompt_cache=self.cache,
            prefill_step_size=step or self.prefill_step_size,
            prompt_progress_callback=lambda done, total: paths(fed + done, fed + total),
        ):
            pass
        seconds = time.perf_counter() - tic
        self.cached = tokens
        self.prefill_stats = TurnStats(
            prompt_tokens=len(new),
            prompt_tps=len(new) / seconds,
            prefill_s=seconds,
            generation_tokens=0,
            generation_tps=0.0,
            peak_gb=mx.get_peak_memory() / 1e9,
            prefill_path=paths.path,
            decode_path="",
            context_tokens=len(tokens),
        )
        return self.prefill_stats

    def _timed_prefill(self, tokens: list[int], progress) -> tuple[int, int]:
        """Feed ``tokens`` (all but the last step) in steps of about ``STEP_SECONDS``.

        Returns ``(tokens fed, the step size reached)``; mlx-lm's ``generate_step`` feeds the
        rest, as it would have fed all of them.
        """
        step, fed, total = MIN_STEP, 0, len(tokens)
        progress(0, total)
        while total - fed > step:
            tic = time.perf_counter()
            self.model(mx.array(tokens[fed : fed + step])[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            fed += step
            progress(fed, total)
            rate = step / max(time.perf_counter() - tic, 1e-3)
            step = int(min(max(rate * STEP_SECONDS, MIN_STEP), DEFAULT_PREFILL_STEP))
        return fed, step

    def ask(
        self,
        question: str,
        *,
        max_tokens: int,
        sampler=None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[str]:
        """Stream the answer to ``question`` as text segments; ``self.last`` gets the stats."""
        tokens = self.render(question)
        new = self._sync(tokens)
        paths = PrefillPaths(self.model, progress)
        generated, text = [], []
        for r in stream_generate(
            self.model,
            self.tokenizer,
            mx.array(new),
            max_tokens=max_tokens,
            sampler=sampler,
            prompt_cache=self.cache,
            prefill_step_size=self.prefill_step_size,
            prompt_progress_callback=paths,
        ):
            generated.append(r.token)
            text.append(r.text)
            yield r.text
        self.turns.append((question, "".join(text).strip()))
        self.cached = tokens + generated  # mlx-lm feeds every yielded token, EOS included
        self.last = TurnStats(
            prompt_tokens=r.prompt_tokens,
            prompt_tps=r.prompt_tps,
            prefill_s=r.prompt_tokens / r.prompt_tps,
            generation_tokens=r.generation_tokens,
            generation_tps=r.generation_tps,
            peak_gb=r.peak_memory,
            prefill_path=paths.path,
            decode_path=attention_path(self.model),
            context_tokens=len(self.cached),
        )

    def reset(self) -> None:
        """Forget the questions and answers; the document stays in the cache."""
        self.turns = []
        self.last = None
