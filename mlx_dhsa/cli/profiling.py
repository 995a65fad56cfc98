"""Latency and memory of dense attention vs DHSA (and baselines), in one process, on one prompt.

Numbers come from mlx-lm's ``GenerationResponse`` (prompt_tps, generation_tps, peak_memory);
the attention path that ran is read from the DHSA layers while the prompt is processed.
"""

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate
from mlx_lm.models import gemma2
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from ..device import GPU_SIZES
from ..evaluation.methods import Method
from ..evaluation.runinfo import PrefillPaths, attention_path, environment, model_dtype
from ..extras import require
from ..patching import make_prompt_cache

DEFAULT_CONTEXTS = GPU_SIZES.profile_contexts  # the CLI's defaults depend on the device
DEFAULT_TRIALS = GPU_SIZES.profile_trials
DEFAULT_DECODE_TOKENS = 32
GEMMA2_2B = dict(
    hidden_size=2304,
    num_hidden_layers=26,
    intermediate_size=9216,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    vocab_size=256000,
    query_pre_attn_scalar=256.0,
    rms_norm_eps=1e-6,
)
# Random-weight Gemma2 architectures: profile runs without downloading anything.
SHAPES: dict[str, dict] = {
    "gemma-2-2b": GEMMA2_2B,
    # gemma-2-2b's attention, cache and vocabulary at a width a CPU prefills in seconds.
    "gemma-2-2b-narrow": dict(GEMMA2_2B, hidden_size=256, intermediate_size=512),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1024,
        query_pre_attn_scalar=32.0,
        rms_norm_eps=1e-6,
    ),
}


@dataclass(frozen=True)
class Measurement:
    """Mean time and peak memory of a timed call (see :func:`measure`)."""

    seconds: float  # mean wall time per call
    peak_gb: float  # mx.get_peak_memory() / 1e9 over the timed calls


def measure(fn: Callable, *args, warmup: int = 1, trials: int = 3) -> Measurement:
    """Time ``fn(*args)``: ``warmup`` untimed calls (JIT), then the mean of ``trials`` calls."""
    for _ in range(warmup):
        mx.eval(fn(*args))
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in range(trials):
        mx.eval(fn(*args))
    return Measurement((time.perf_counter() - tic) / trials, mx.get_peak_memory() / 1e9)


class _NullDetokenizer(StreamingDetokenizer):
    def reset(self):
        self.text, self.tokens, self.offset = "", [], 0

    def add_token(self, token):
        self.tokens.append(token)

    def finalize(self):
        pass

    @property
    def last_segment(self):
        return ""


class TokenIds(TokenizerWrapper):
    """Stands in for a tokenizer when the prompt is token ids and the reply is not read
    (random-weight shapes); it never stops on an end-of-sequence token."""

    def __init__(self):
        self._tokenizer, self._detokenizer, self._eos_token_ids = None, _NullDetokenizer(), set()


def random_model(
    shape: str, dtype: mx.Dtype = mx.float32, *, weight_bits: int | None = None, **overrides
) -> nn.Module:
    """A Gemma2 with the architecture ``SHAPES[shape]`` and random weights.

    Args:
        shape (str): a key of ``SHAPES``.
        dtype (mx.Dtype): weight dtype. Default: ``mx.float32``.
        weight_bits (int, optional): quantize the linear and embedding weights to 4 or 8 bits
            (``nn.quantize``, group size 64), as a converted 4-bit model is.
        **overrides: ModelArgs fields to change, e.g. ``num_hidden_layers=2``.

    Raises:
        ValueError: ``shape`` is not in ``SHAPES``.
    """
    model = unbuilt(shape, **overrides)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    if weight_bits is not None:
        nn.quantize(model, group_size=64, bits=weight_bits)
        mx.eval(model.parameters())
    return model


def unbuilt(shape: str, **overrides) -> nn.Module:
    """The Gemma2 of ``SHAPES[shape]`` with its weights not yet computed: it takes no memory
    until evaluated, and tells its sizes (``estimate.ModelSize.of``)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return gemma2.Model(gemma2.ModelArgs(model_type="gemma2", **{**SHAPES[shape], **overrides}))


@dataclass(frozen=True)
class ProfileRow:
    """One trial (or the mean of trials) of one method at one context length."""

    method: str
    context: int  # prompt tokens
    prefill_s: float  # prompt_tokens / prompt_tps
    prompt_tps: float
    generation_tps: float
    peak_gb: float
    attention: str  # path the prefill ran
    kv_gb: float = 0.0  # what the prompt cache holds after the run, GB (kept keys included)


@dataclass
class ProfileReport:
    """What :func:`compare` measured, with the environment it ran in; ``as_dict`` for JSON."""

    environment: dict
    methods: list[Method]
    rows: list[ProfileRow]  # means over trials, per (context, method)
    trials: list[ProfileRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "environment": self.environment,
            "methods": [m.as_dict() for m in self.methods],
            "results": [asdict(r) for r in self.rows],
            "trials": [asdict(r) for r in self.trials],
        }

    def series(self, key: str) -> dict[str, tuple[list[int], list[float]]]:
        """Per method: (contexts, values of ``key``), in context order."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for r in sorted(self.rows, key=lambda r: r.context):
            xs, ys = out.setdefault(r.method, ([], []))
            xs.append(r.context)
            ys.append(getattr(r, key))
        return out


def _trial(model, tokenizer, prompt: mx.array, method: str, decode_tokens: int) -> ProfileRow:
    paths = PrefillPaths(model)
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=decode_tokens,
        prompt_cache=cache,
        prompt_progress_callback=paths,
    ):
        pass
    return ProfileRow(
        method=method,
        context=response.prompt_tokens,
        prefill_s=response.prompt_tokens / response.prompt_tps,
        prompt_tps=response.prompt_tps,
        generation_tps=response.generation_tps,
        peak_gb=response.peak_memory,
        attention=paths.path,
        kv_gb=kv_bytes(cache) / 1e9,
    )


def kv_bytes(cache: list) -> int:
    """Bytes a prompt cache holds: keys and values (quantized: packed words, scales and
    biases; spare capacity included), plus the model-dtype keys a QuantizedDHSACache keeps."""
    return sum((c.nbytes if not c.empty() else 0) + getattr(c, "pending_nbytes", 0) for c in cache)


def _mean(rows: list[ProfileRow]) -> ProfileRow:
    keys = ("prefill_s", "prompt_tps", "generation_tps", "peak_gb", "kv_gb")
    means = {k: statistics.fmean(getattr(r, k) for r in rows) for k in keys}
    return ProfileRow(rows[0].method, rows[0].context, attention=rows[0].attention, **means)


def compare(
    model: nn.Module,
    tokenizer: TokenizerWrapper | None,
    *,
    contexts: Sequence[int],
    methods: Sequence[Method],
    trials: int = DEFAULT_TRIALS,
    warmup: int | None = None,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    on_trial: Callable[[int, ProfileRow], Any] | None = None,
    on_run: Callable[[int, int, str], Any] | None = None,
    info: dict | None = None,
) -> ProfileReport:
    """Prefill latency, decode tokens/s and peak memory of each method at each context length.

    Every method sees the same random prompt at a given length. Each (context, method) gets
    ``warmup`` untimed runs before its timed trials (they compile the kernels that length
    launches), and the MLX cache is cleared between methods. The model is left unpatched.

    Args:
        model (nn.Module): an mlx-lm model (patched or not; it is re-patched per method).
        tokenizer (TokenizerWrapper, optional): ``None`` for random-weight shapes.
        contexts (Sequence[int]): prompt lengths in tokens.
        methods (Sequence[Method]): from :func:`mlx_dhsa.evaluation.methods.parse_methods`.
        trials (int): timed runs per (context, method). Default: ``3``.
        warmup (int, optional): untimed runs per (context, method). Default: ``1`` on a GPU
            (kernels compile on first use), ``0`` on a CPU (nothing to compile).
        decode_tokens (int): tokens generated per run. Default: ``32``.
        on_trial (callable, optional): called as ``on_trial(i, row)`` after every trial.
        on_run (callable, optional): called as ``on_run(runs done, runs in all, what runs
            now)`` before every run (warm-ups and trials), and once at the end.
        info (dict, optional): extra fields for the environment record (model name, ...).

    Returns:
        ProfileReport: per-trial rows and their means.
    """
    tokenizer = tokenizer or TokenIds()
    vocab = model.args.vocab_size
    key = mx.random.key(0)
    prompts = {n: mx.random.randint(0, vocab, (n,), key=key) for n in sorted(contexts)}
    if warmup is None:
        warmup = 0 if mx.default_device() == mx.cpu else 1
    all_trials: list[ProfileRow] = []
    rows: list[ProfileRow] = []
    runs, total = 0, len(methods) * len(prompts) * (warmup + trials)

    def starting(now: str) -> None:
        nonlocal runs
        if on_run is not None:
            on_run(runs, total, now)
        runs += 1

    for n, prompt in prompts.items():
        for m in methods:
            m.apply(model)
            # Untimed runs at this very length: a kernel's template parameters (split or
            # whole-key launches, tile sizes) depend on the length, and each new set compiles.
            for _ in range(warmup):
                starting(f"{m.label} at {n} tokens, warm-up")
                _trial(model, tokenizer, prompt, m.label, decode_tokens)
            mx.clear_cache()
            done = []
            for i in range(trials):
                starting(f"{m.label} at {n} tokens, trial {i + 1}/{trials}")
                done.append(_trial(model, tokenizer, prompt, m.label, decode_tokens))
                if on_trial is not None:
                    on_trial(i, done[-1])
            all_trials += done
            rows.append(_mean(done))
    if on_run is not None:
        on_run(total, total, "done")
    Method("dense", None).apply(model)
    env = environment(dtype=model_dtype(model), **(info or {}))
    env["configs"] = {m.label: m.as_dict()["config"] for m in methods}
    return ProfileReport(env, list(methods), rows, all_trials)


def plot(report: ProfileReport, path: str | Path) -> Path:
    """Write prefill latency, decode tokens/s and peak memory vs context, one line per method
    (needs the ``plot`` extra)."""
    require("matplotlib", "a profile plot")
    from matplotlib.figure import Figure

    panels = [
        ("prefill_s", "prefill latency (s)"),
        ("generation_tps", "decode (tokens/s)"),
        ("peak_gb", "peak memory (GB)"),
    ]
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (key, label) in zip(fig.subplots(1, len(panels)), panels):
        for method, (xs, ys) in report.series(key).items():
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        contexts = sorted({r.context for r in report.rows})
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax.legend()
    env = report.environment
    fig.suptitle(f"{env.get('model', '')} {env.get('dtype', '')} on {env['device_name']}")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# Sparse on a tiny model at 128 tokens: every kernel family runs (planning, sparse attention,
# the dense tail). Used by probe_path and doctor's kernel checks.
TINY_SPARSE = dict(
    budget=48,
    block_size=16,
    sink=4,
    local=8,
    dense_tail=8,
    target_chunk=8,
    min_chunk=2,
    nms_window=2,
    boundary_window=2,
)


def probe_path(use_kernel: bool = True) -> str:
    """The attention path a sparse DHSA prefill takes here (a tiny random Gemma2, 128 tokens)."""
    from ..config import DHSAConfig
    from ..patching import patch

    config = DHSAConfig(**TINY_SPARSE, use_kernel=use_kernel)
    model = patch(random_model("tiny"), config)
    mx.eval(model(mx.arange(128)[None]))
    return attention_path(model)
