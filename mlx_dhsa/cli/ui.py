"""Rich presentation for the CLI: progress bars, stats lines, tables. No logic lives here."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
RULE = "=" * 10  # mlx-lm's separator before the stats lines


def fail(message: str, code: int = 1):
    """Print a one-line error and exit with ``code`` (no traceback)."""
    import typer

    error(message)
    raise typer.Exit(code)


def error(message: str) -> None:
    """One line on stderr; no traceback."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)


def warn(message: str) -> None:
    """A line that must be seen before a long run starts."""
    console.print(f"[bold yellow]Note:[/] {escape(message)}", soft_wrap=True)


def line(text: str) -> None:
    """A plain line, never wrapped (stats and key=value lines stay greppable)."""
    console.print(escape(text), soft_wrap=True)


@contextmanager
def status(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner with ``message``; yields ``say(now)``, which appends what runs now."""
    with console.status(escape(message)) as spinner:
        yield lambda now: spinner.update(escape(f"{message}: {now}"))


@contextmanager
def progress(description: str, unit: str = "tokens") -> Iterator[Callable[..., None]]:
    """A bar updated by ``update(done, total)`` (mlx-lm's ``prompt_progress_callback``), or
    ``update(done, total, now)`` to also say what runs now."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(escape(description), total=None)

        def update(done: int, total: int, now: str | None = None) -> None:
            text = description if now is None else f"{description}: {now}"
            bar.update(task, completed=done, total=total, description=escape(text))

        yield update


# --- chat -----------------------------------------------------------------------------------


def chat_banner(
    model: str, attention: str, document_tokens: int | None, interactive: bool = True
) -> None:
    doc = f"{document_tokens:,} document tokens" if document_tokens else "no document"
    console.print(f"[bold]mlx-dhsa chat[/] {escape(model)} ({escape(attention)}, {doc})")
    if interactive:  # with --question the answers follow; there is nothing to type
        console.print("[dim]Ask a question; /reset forgets the conversation, /stats, /quit.[/]")


def stream(segment: str) -> None:
    console.out(segment, end="", highlight=False)


def prefill_stats(stats) -> None:
    """The document prefill, in mlx-lm's format plus time and attention path."""
    line(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
    line(f"Prefill: {stats.prefill_s:.3f} s")
    line(f"Peak memory: {stats.peak_gb:.3f} GB")
    line(f"Attention: {stats.prefill_path} (prefill)")


def turn_stats(stats) -> None:
    """mlx-lm's closing lines after an answer, plus prefill time, path and context size."""
    console.print()
    line(RULE)
    line(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
    line(f"Prefill: {stats.prefill_s:.3f} s")
    line(f"Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.3f} tokens-per-sec")
    line(f"Peak memory: {stats.peak_gb:.3f} GB")
    line(f"Attention: {stats.prefill_path} (prefill), {stats.decode_path} (decode)")
    line(f"Context: {stats.context_tokens} tokens cached")


def session_stats(document, last) -> None:
    if document is not None:
        console.print("[bold]Document[/]")
        prefill_stats(document)
    if last is not None:
        console.print("[bold]Last answer[/]")
        turn_stats(last)
    if document is None and last is None:
        note("nothing measured yet")


# --- profile --------------------------------------------------------------------------------


def _kv(row) -> str:
    return (
        f"method={row.method} context={row.context} prefill_s={row.prefill_s:.4f} "
        f"prompt_tps={row.prompt_tps:.3f} generation_tps={row.generation_tps:.3f} "
        f"peak_memory={row.peak_gb:.3f} kv_gb={row.kv_gb:.4f} attention={row.attention}"
    )


def trial(i: int, row) -> None:
    line(f"Trial {i + 1}: {_kv(row)}")


def profile_report(report) -> None:
    env = report.environment
    line(f"Averages ({env['device']}, {env['device_name']}, {env['dtype']}):")
    for row in report.rows:
        line(_kv(row))
    dense = {r.context: r.prefill_s for r in report.rows if r.method == "dense"}
    table = Table(title="prefill / decode / memory")
    for name in ("method", "context", "prefill s", "vs dense", "decode tok/s", "peak GB", "KV GB"):
        table.add_column(name, justify="left" if name == "method" else "right", no_wrap=True)
    table.add_column("attention", no_wrap=True)
    for r in report.rows:
        speedup = f"{dense[r.context] / r.prefill_s:.2f}x" if r.context in dense else "-"
        table.add_row(
            r.method,
            str(r.context),
            f"{r.prefill_s:.3f}",
            speedup,
            f"{r.generation_tps:.1f}",
            f"{r.peak_gb:.3f}",
            f"{r.kv_gb:.3f}",
            r.attention,
        )
    console.print(table)
    if any("reference" in r.attention for r in report.rows):
        note("DHSA ran its pure-MLX reference path (no GPU kernel here): not kernel speed.")
    dense_dhsa = [r for r in report.rows if r.method != "dense" and r.attention == "dense"]
    if dense_dhsa:
        note("Rows whose attention is 'dense' never exceeded the dense threshold (budget).")


# --- niah -----------------------------------------------------------------------------------


def niah_report(report) -> None:
    table = Table(title=f"needle in a haystack: mean score over {len(report.depths)} depths")
    table.add_column("method")
    for c in report.contexts:
        table.add_column(str(c), justify="right")
    table.add_column("mean", justify="right")
    for method, mean in report.summary().items():
        cols = list(zip(*report.grid(method)))
        table.add_row(method, *(f"{sum(c) / len(c):.2f}" for c in cols), f"{mean:.2f}")
    console.print(table)
    for method, mean in report.summary().items():
        line(f"method={method} score={mean:.3f}")


# --- info -----------------------------------------------------------------------------------


def key_values(title: str, rows: dict) -> None:
    """A two-column table of ``rows`` under ``title``."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(str(key), escape(str(value)))
    console.print(table)


def info(versions: dict, config: dict, aliases: dict) -> None:
    key_values("environment", versions)
    key_values("DHSA config", config)
    key_values("model aliases", aliases)


def doctor(report: dict) -> None:
    """The doctor's report: environment and device, kernel checks, timings, verdict."""
    key_values("environment", report["environment"])
    key_values("device", report["device"])
    table = Table(title="kernels vs reference", title_justify="left")
    for col in ("check", "status", "rel. error", "tolerance", "detail"):
        table.add_column(col)
    colors = {"pass": "green", "reference only": "yellow", "fail": "red", "error": "red"}
    for c in report["checks"]:
        err = "" if c["max_error"] is None else f"{c['max_error']:.2e}"
        tol = "" if c["tolerance"] is None else f"{c['tolerance']:.0e}"
        status = f"[{colors[c['status']]}]{c['status']}[/]"
        table.add_row(c["name"], status, err, tol, escape(c["detail"]))
    console.print(table)
    if report["timings"]:
        table = Table(title="dense vs DHSA prefill", title_justify="left")
        for col in ("context", "dense", "DHSA", "speedup", "DHSA path"):
            table.add_column(col, justify="right" if col != "DHSA path" else "left")
        for t in report["timings"]:
            table.add_row(f"{t['context']:,}", f"{t['dense_s']:.3f} s", f"{t['dhsa_s']:.3f} s",
                          f"{t['speedup']:.2f}x", t["attention"])  # fmt: skip
        console.print(table)
        note(report["timing_note"])
    verdict = "[green]OK[/]" if report["ok"] else "[bold red]PROBLEMS FOUND[/] (see above)"
    console.print(f"doctor: {verdict}")
