"""Issue 20, the first hour: bad input gives one line (exit 1, or 2 for a usage error), never a
traceback, and leaves nothing on disk; interrupted or truncated model files are recovered."""

import importlib
import itertools
import json
import os
import pickle
import sys
import types

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama
from mlx.utils import tree_flatten
from test_cli import _one_line_error, _run, model_dir  # noqa: F401 (model_dir is a fixture)
from test_gguf import write_gguf

from mlx_dhsa import DHSAConfig, load
from mlx_dhsa.boundaries.convert import STATE_DICT_KEYS
from mlx_dhsa.boundaries.predictor import (
    BoundaryPredictor,
    PredictorArgs,
    PredictorError,
    load_predictor,
    save_predictor,
)
from mlx_dhsa.cli.documents import read_document, samples
from mlx_dhsa.loading import ModelFileError
from mlx_dhsa.models import packaged
from mlx_dhsa.models.integrity import SafetensorsError, check_safetensors

app_module = importlib.import_module("mlx_dhsa.cli.app")  # mlx_dhsa.cli.app is the Typer app
chat_module = importlib.import_module("mlx_dhsa.cli.chat")
TINY_KV_CHANNELS = 64  # test_cli's model: 2 KV heads x head_dim 32


def _usage_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.replace("│", " ").split())  # rich's box, unwrapped


# --- DHSAConfig: types, and errors said as the flags typed --------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(budget=True), "budget must be an integer, got True"),
        (dict(block_size=2.0), "block_size must be an integer, got 2.0"),
        (dict(use_kernel="no"), "use_kernel must be True or False, got 'no'"),
        (dict(boundary_threshold="x"), "boundary_threshold must be a finite number or None"),
        (dict(predictor_threshold=float("nan")), "predictor_threshold must be a finite number"),
        (dict(dense_below=False), "dense_below must be an integer or None, got False"),
        (dict(method=["dhsa"]), "method must be a string"),
        (dict(block_size=1), "raise block_size to at least 2"),
    ],
)
def test_config_rejects_wrong_types_by_field_name(kwargs, words):
    with pytest.raises(ValueError) as e:
        DHSAConfig(**kwargs)
    assert words in str(e.value) and "DHSAConfig." not in str(e.value)
    assert DHSAConfig(boundary_threshold=1, predictor_threshold=0.5).boundary_threshold == 1


@pytest.mark.parametrize(
    "args, words",
    [
        (["--block-size", "1"], "raise --block-size to at least 2"),
        (["--budget", "100"], "--budget (100) must be at least --sink + --local + --block-size"),
        (["--min-chunk", "2"], "--min-chunk (2) must be at least --boundary-window (4)"),
    ],
)
def test_config_errors_name_the_flags(args, words):
    text = _usage_error(_run("chat", "--model", "never-loaded", "-q", "hi", *args))
    assert words in text and "DHSAConfig" not in text and "block_size" not in text


# --- boundary predictors ----------------------------------------------------------------


def _predictor(tmp_path, channels=TINY_KV_CHANNELS, name="p"):
    return save_predictor(BoundaryPredictor(PredictorArgs(channels, heads=4, hidden=16)),
                          tmp_path / name)  # fmt: skip


def _learned(path):
    return ["--boundaries", "learned", "--predictor-path", path]


def test_predictor_files_that_cannot_be_used(model_dir, tmp_path):  # noqa: F811
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    garbage.with_suffix(".json").write_text(json.dumps({"channels": TINY_KV_CHANNELS}))
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes((tmp_path / _predictor(tmp_path).name).read_bytes())
    other = _predictor(tmp_path, channels=32, name="other")  # made for a 32-channel model
    bad_json = _predictor(tmp_path, name="badjson")
    bad_json.with_suffix(".json").write_text("{not json")
    nan = _predictor(tmp_path, name="nan")
    weights = dict(mx.load(str(nan)))
    weights["mlp.0.weight"] = weights["mlp.0.weight"] * float("nan")
    mx.save_safetensors(str(nan), weights)
    cases = [
        (garbage, "is not a boundary predictor's weights"),
        (lonely, "lonely.json (the predictor's hyper-parameters) is missing"),
        (other, "trained for keys of 32 channels, but this model's have 64"),
        (bad_json, "does not hold a predictor's hyper-parameters"),
        (nan, "NaN or infinite values in ['mlp.0.weight']"),
    ]
    for path, words in cases:
        # exit 1, one line, before any prefill (the predictor is loaded when the model is patched)
        result = _run("chat", "--model", model_dir, "-q", "hi", "-m", "1", *_learned(path))
        line = _one_line_error(result)
        assert words in line and path.stem in line, line
        assert "Generation:" not in result.output
    ok = _run("chat", "--model", model_dir, "-q", "hi", "-m", "1", *_learned(_predictor(tmp_path)))
    assert ok.exit_code == 0, ok.output
    with pytest.raises(PredictorError, match="NaN"):
        load_predictor(nan)


def test_convert_predictor_garbage_nan_and_refused_pickles(tmp_path, monkeypatch):
    out = tmp_path / "out"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nonsense}......")
    line = _one_line_error(_run("convert-predictor", garbage, out))
    assert "garbage.safetensors is not a readable .safetensors file" in line
    args = PredictorArgs(channels=32, heads=4, hidden=16)
    sd = dict(tree_flatten(BoundaryPredictor(args).parameters()))
    assert sorted(sd) == sorted(STATE_DICT_KEYS)
    sd["mlp.2.bias"] = mx.array([float("inf")])
    nan = tmp_path / "nan.safetensors"
    mx.save_safetensors(str(nan), sd)
    line = _one_line_error(_run("convert-predictor", nan, out, "--heads", "4"))
    assert "NaN or infinite values in ['mlp.2.bias']" in line
    # torch's weights_only refusal (a pickled class) in one line. torch is not installed here,
    # so a stand-in raises the error torch raises (pickle.UnpicklingError, "Weights only ...").
    fake = types.ModuleType("torch")

    def refuse(*a, **k):
        raise pickle.UnpicklingError(
            "Weights only load failed. This file can still be loaded, to do so you have two "
            "options, do those steps only if you trust the source of the checkpoint.\n"
            "\t(1) ...\n\t(2) ...\nWeightsUnpickler error: Unsupported global: GLOBAL os.system"
        )

    fake.load = refuse
    monkeypatch.setitem(sys.modules, "torch", fake)
    code = tmp_path / "code.pt"
    code.write_bytes(b"not really a pickle")
    line = _one_line_error(_run("convert-predictor", code, out))
    assert "holds code or Python objects, not plain tensors" in line
    assert "nothing in it was executed" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.pt", "garbage.safetensors",
                                                         "nan.safetensors"]  # fmt: skip


# --- GGUF files and the model cache ----------------------------------------------------


def test_convert_gguf_names_a_truncated_or_garbage_file(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", "llama", tiny_llama(vocab_size=64))
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.gguf").write_bytes(os.urandom(64))
    for name in ("cut.gguf", "junk.gguf"):
        line = _one_line_error(_run("convert-gguf", tmp_path / name, "--out", tmp_path / "m"))
        assert f"{tmp_path / name} is not a readable GGUF file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "junk.gguf", "tiny.gguf"]


def test_convert_gguf_names_an_unsupported_tokenizer(tmp_path):
    src = write_gguf(tmp_path / "t5.gguf", "llama", tiny_llama(vocab_size=64), tokenizer="t5")
    line = _one_line_error(_run("convert-gguf", src, "--out", tmp_path / "m"))
    assert f"{src}: GGUF tokenizer model 't5' is not supported" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5.gguf"]


def _fake_assembled_package(tmp_path, monkeypatch, interrupt_assembly=False):
    """A packaged model split in parts (as Gemma3's): its assemble() writes the GGUF."""
    site = tmp_path / "site"
    pkg = site / "fake_parts_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    write_gguf(pkg / "whole.gguf", "llama", tiny_llama(vocab_size=64))
    body = "    raise KeyboardInterrupt\n" if interrupt_assembly else ""
    (pkg / "__init__.py").write_text(
        "import shutil\nfrom pathlib import Path\nMODEL_NAME = 'tiny.gguf'\n"
        "def assemble(target, overwrite=False):\n"
        "    shutil.copy(Path(__file__).parent / 'whole.gguf', target)\n"
        f"{body}    return Path(target)\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "fake_parts_pkg", raising=False)  # import the new one
    importlib.invalidate_caches()
    monkeypatch.setenv("MLX_DHSA_CACHE", str(tmp_path / "cache"))
    spec = packaged.PackagedModel("fake_parts_pkg", "pip install fake", "tiny", assemble=True)
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "tiny-parts", spec)


def _cache_files(tmp_path):
    return sorted(str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("during", ["assembly", "conversion"])
def test_interrupted_first_run_leaves_nothing(tmp_path, monkeypatch, during):
    _fake_assembled_package(tmp_path, monkeypatch, interrupt_assembly=during == "assembly")

    def interrupt(done, total, name):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the tensors

    with pytest.raises(KeyboardInterrupt):
        packaged.ensure_model("tiny-parts", progress=interrupt)
    assert _cache_files(tmp_path) == ["models"]  # no temporary, no assembled GGUF
    # A process killed outright leaves its temporaries: the next start removes them.
    for kind in ("tmp", "gguf"):
        (tmp_path / "cache" / "models" / f".tiny-parts.{kind}-999999999").mkdir()
    _fake_assembled_package(tmp_path, monkeypatch)
    path = packaged.ensure_model("tiny-parts", progress=None)
    assert [p.name for p in path.parent.iterdir()] == ["tiny-parts"]


def test_truncated_cached_model_is_rebuilt_or_named(tmp_path, monkeypatch, model_dir):  # noqa
    _fake_assembled_package(tmp_path, monkeypatch)
    path = packaged.ensure_model("tiny-parts", progress=None)
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 3)  # a full disk, a killed copy
    with pytest.raises(SafetensorsError, match="is truncated"):
        check_safetensors(weights)
    assert packaged.ensure_model("tiny-parts", progress=None) == path  # ours: rebuilt
    assert weights.stat().st_size == size
    # A directory that is not our cache: one line that names the file and the fix (exit 1).
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    os.truncate(copy / "model.safetensors", 1000)
    line = _one_line_error(_run("chat", "--model", copy, "-q", "hi"))
    assert f"{copy / 'model.safetensors'} is truncated: 1,000 bytes" in line
    assert "download or convert the model again" in line
    with pytest.raises(ModelFileError):
        load(str(copy))


def test_load_runs_float32_on_a_cpu(model_dir, tmp_path):  # noqa: F811
    half = tmp_path / "half"
    half.mkdir()
    for f in model_dir.iterdir():
        (half / f.name).write_bytes(f.read_bytes())
    weights = {k: v.astype(mx.float16) for k, v in mx.load(str(half / "model.safetensors")).items()}
    mx.save_safetensors(str(half / "model.safetensors"), weights)
    assert mx.default_device() == mx.cpu  # this machine; on a GPU the dtype is kept
    model, _ = load(str(half))
    assert model.model.embed_tokens.weight.dtype == mx.float32
    model, _ = load(str(half), float32_on_cpu=False)
    assert model.model.embed_tokens.weight.dtype == mx.float16


# --- chat -------------------------------------------------------------------------------


def test_chat_stdin_document_without_question_fails_first(monkeypatch, tmp_path):
    monkeypatch.setattr(app_module, "TTY", str(tmp_path / "no-terminal"))
    result = _run("chat", "--model", "never-loaded", "--doc", "-", input="a document\n")
    line = _one_line_error(result, code=2)
    assert "pass them with --question" in line and "never-loaded" not in result.output


def test_chat_unknown_command_lists_the_known_ones(model_dir):  # noqa: F811
    result = _run("chat", "--model", model_dir, "-m", "1", input="/bogus\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "unknown command /bogus; commands: /reset, /stats, /quit" in result.output
    assert "Generation:" not in result.output  # not sent to the model
    assert "Ask a question" in result.output


def test_chat_banner_without_prompt_when_questions_are_given(model_dir):  # noqa: F811
    result = _run("chat", "--model", model_dir, "-m", "1", "-q", "hi")
    assert result.exit_code == 0, result.output
    assert "mlx-dhsa chat" in result.output and "Ask a question" not in result.output


def test_shipped_sample_document(model_dir):  # noqa: F811
    assert "dhsa" in samples()
    text = read_document("sample:dhsa")
    assert text.startswith("# Dynamic Hierarchical Sparse Attention") and len(text) < 4000
    line = _one_line_error(_run("chat", "--model", model_dir, "--doc", "sample:nope", "-q", "x"))
    assert "no sample document 'nope'; shipped: sample:dhsa" in line


def test_cpu_prefill_moves_in_timed_steps(model_dir, monkeypatch):  # noqa: F811
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_dir))
    document = "word " * 600
    dense = chat_module.ChatSession(model, tokenizer, document, prefill_step_size=4096)
    dense.prefill()
    monkeypatch.setattr(chat_module, "STEP_SECONDS", 0.0)  # every step as short as allowed
    session = chat_module.ChatSession(model, tokenizer, document)
    assert session.timed_steps  # this machine: a CPU
    seen = []
    stats = session.prefill(lambda done, total: seen.append((done, total)))
    steps = [b[0] - a[0] for a, b in itertools.pairwise(seen) if b[0] > a[0]]
    assert len(steps) >= 600 // chat_module.MIN_STEP - 1 and steps[0] == chat_module.MIN_STEP
    assert {t for _, t in seen} == {stats.prompt_tokens} and seen[-1][0] == stats.prompt_tokens
    # the cache holds the same keys as one big step
    k1, k2 = dense.cache[0].state[0], session.cache[0].state[0]
    np.testing.assert_allclose(np.array(k1), np.array(k2), atol=1e-4)
