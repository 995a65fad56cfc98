"""Property test (issue 20): any value of any numeric or choice option of ``chat``, ``profile``
and ``niah`` gives a run (exit 0) or one clear error (exit 1: one ``Error:`` line; exit 2: a
usage error), never a traceback. Models are never loaded: the loaders are replaced by ones
that stop the command right there, so each example takes milliseconds."""

import importlib
import inspect
import typing
from types import UnionType
from typing import Annotated, Literal, Union
from unittest import mock

import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mlx_dhsa.loading import ModelNotFoundError

app_module = importlib.import_module("mlx_dhsa.cli.app")
dist_module = importlib.import_module("mlx_dhsa.cli.distributed")
COMMANDS = ("chat", "profile", "niah")
# String options that hold numbers or names: fed like the typed ones.
LIST_OPTIONS = ("--contexts", "--depths", "--methods", "--shape")
runner = CliRunner()


def _options(command: str) -> dict[str, list[str]]:
    """Option flag -> valid choices (empty for numbers) of every numeric or choice option,
    read from the command's annotations (typer 0.29's parameters hide the click type)."""
    group = typer.main.get_command(app_module.app)
    flags = {p.name: max(p.opts, key=len) for p in group.commands[command].params}
    found = {}
    for name, param in inspect.signature(getattr(app_module, command)).parameters.items():
        if typing.get_origin(param.annotation) is not Annotated:
            continue  # typer.Context
        kind = typing.get_args(param.annotation)[0]  # Annotated[kind, typer.Option(...)]
        kinds = typing.get_args(kind) if typing.get_origin(kind) in (Union, UnionType) else [kind]
        kinds = [k for k in kinds if k is not type(None)]
        flag = flags[name]
        if typing.get_origin(kinds[0]) is Literal:
            found[flag] = [str(v) for v in typing.get_args(kinds[0])]
        elif kinds[0] in (int, float):
            found[flag] = []
        elif flag in LIST_OPTIONS:
            found[flag] = ["dense,dhsa", "tiny", "50,100"]
    return found


OPTIONS = {c: _options(c) for c in COMMANDS}
_number = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 3, 2**31, 2**63]),
).map(str)
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
_list = st.lists(st.one_of(_number, _text), min_size=1, max_size=3).map(",".join)


@st.composite
def _arguments(draw, command: str) -> list[str]:
    options = OPTIONS[command]
    chosen = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=4, unique=True))
    args = []
    for flag in chosen:
        valid = options[flag]
        pool = [_number, _text, _list] + ([st.sampled_from(valid)] if valid else [])
        args += [flag, draw(st.one_of(pool))]
    return args


def _stop(*args, **kwargs):
    raise ModelNotFoundError("stopped before loading")  # said by the CLI as one line, exit 1


def _built(*args, **kwargs):
    raise typer.Exit(0)  # profile's random model: a run, stopped before any timing


def _check(command: str, args: list[str]) -> None:
    extra = ["-q", "hi"] if command == "chat" else []
    with (
        mock.patch.object(dist_module, "load", _stop),
        mock.patch.object(app_module.profiling, "random_model", _built),
        mock.patch.object(app_module.needle, "read_haystack", lambda *a: "hay " * 50),
    ):
        result = runner.invoke(app_module.app, [command, *extra, *args])
    shown = f"{command} {args}: {result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    assert result.exit_code in (0, 1, 2), shown
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), shown
    if result.exit_code == 2:
        assert "Usage:" in result.output or result.stderr.startswith("Error: "), shown


def test_every_option_is_covered():
    assert {"--budget", "--block-size", "--method", "--max-tokens", "--temp"} <= set(
        OPTIONS["chat"]
    )
    assert {"--contexts", "--trials", "--dtype", "--shape"} <= set(OPTIONS["profile"])
    assert {"--contexts", "--depths", "--methods"} <= set(OPTIONS["niah"])


# The deadline only guards against an option that starts real work (a model, a grid): 2 s
# failed on a loaded 2-core machine (2.4 s for `profile --trials N`), so it is generous.
_settings = settings(max_examples=40, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(args=_arguments("chat"))
def test_chat_options(args):
    _check("chat", args)


@_settings
@given(args=_arguments("profile"))
def test_profile_options(args):
    _check("profile", args)


@_settings
@given(args=_arguments("niah"))
def test_niah_options(args):
    _check("niah", args)
