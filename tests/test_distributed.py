"""DHSA under MLX's distributed inference: tensor and pipeline parallelism, mlx.launch ranks.

In-process tests check the splitting itself (with a stand-in group: shapes, heads, layers,
errors). The launched tests start two ranks on localhost with ``mlx.launch`` (ring backend,
loopback only), each running tests/distributed_worker.py on a tiny random llama, Gemma2,
Gemma3 or Qwen2 split two ways, and check what the ranks wrote; and they run ``mlx-dhsa
chat / profile / serve`` on two ranks.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import default_sigint, small_config, tiny_gemma2, tiny_gemma3, tiny_llama

from mlx_dhsa import make_prompt_cache, patch, unpatch
from mlx_dhsa.distributed import ShardingError, is_pipelined, is_sharded, pipeline, shard
from mlx_dhsa.patching import dhsa_layers

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT = 120  # seconds; a launch takes well under this, the guard ends a hung one
# fp32 logits: a sharded o_proj / down_proj sums partial products in another order.
LOGIT_TOL = 1e-4


class FakeGroup:
    """A stand-in for mx.distributed.Group: enough for building sharded layers, not running."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma2, tiny_gemma3], ids=lambda f: f.__name__)
def test_shard_splits_heads_and_mlp(make):
    model = make()
    attn = model.layers[0].self_attn
    H, H_kv, rows = attn.n_heads, attn.n_kv_heads, attn.q_proj.weight.shape[0]
    if H_kv % 2:
        model = make(num_key_value_heads=2)
        attn = model.layers[0].self_attn
        H, H_kv, rows = attn.n_heads, attn.n_kv_heads, attn.q_proj.weight.shape[0]
    shard(model, FakeGroup(2, 1))
    assert is_sharded(model)
    for layer in model.layers:
        a = layer.self_attn
        assert (a.n_heads, a.n_kv_heads) == (H // 2, H_kv // 2)
        assert a.q_proj.weight.shape[0] == rows // 2
        assert type(layer.mlp.down_proj).__name__ == "ShardedToAllLinear"


def test_patch_then_shard_reaches_the_wrapped_module():
    """shard() on a patched model also splits the mlx-lm module DHSA wraps (used by unpatch
    and by dense decode steps), so patch -> shard is the model shard -> patch gives."""
    model = patch(tiny_gemma2(), small_config())
    shard(model, FakeGroup(2, 0))
    for attn in dhsa_layers(model):
        base = attn._base
        assert base.q_proj is attn.q_proj and base.o_proj is attn.o_proj
        assert (base.n_heads, base.n_kv_heads) == (attn.n_heads, attn.n_kv_heads) == (2, 1)
    unpatch(model)
    assert is_sharded(model) and model.layers[0].self_attn.n_heads == 2


def test_group_of_one_changes_nothing():
    model = tiny_llama()
    before = model.layers[0].self_attn.q_proj
    assert shard(model, FakeGroup(1)) is model
    assert model.layers[0].self_attn.q_proj is before


def test_refusals_say_why():
    with pytest.raises(ShardingError, match="cannot be split 2 ways"):
        shard(tiny_gemma3(), FakeGroup(2))  # one KV head
    model = tiny_llama()
    shard(model, FakeGroup(2))
    with pytest.raises(ShardingError, match="split already"):
        shard(model, FakeGroup(2))
    odd = tiny_llama()
    odd.model_type = "mamba"
    object.__setattr__(odd, "shard", None)
    with pytest.raises(ShardingError, match="no tensor-parallel shard"):
        shard(odd, FakeGroup(2))


@pytest.mark.parametrize("patch_first", [False, True])
def test_pipeline_stage_keeps_each_layers_kind(patch_first):
    """Rank 0 of 2 holds gemma3 layers 3-5 (global, sliding, global with pattern 2): DHSA on
    3 and 5, a window cache for 4, the stage's first DHSA layer owning the shared boundaries,
    whether patched before or after the split."""
    model = tiny_gemma3(n_layers=6)
    if patch_first:
        patch(model, small_config())
    pipeline(model, FakeGroup(2, 0))
    if not patch_first:
        patch(model, small_config())
    assert is_pipelined(model) and len(model.layers) == 3 and model.model.start_idx == 3
    assert [type(c).__name__ for c in make_prompt_cache(model)] == [
        "DHSACache", "WindowKVCache", "DHSACache"
    ]  # fmt: skip
    assert [a._owner for a in dhsa_layers(model)] == [True, False]


def test_pipeline_gemma2_windows_follow_layer_numbers():
    """Gemma2's sliding layers are the even-numbered ones of the whole model."""
    model = tiny_gemma2(n_layers=6)
    model.args.sliding_window = 64
    pipeline(model, FakeGroup(2, 0))  # layers 3, 4, 5
    layers = dhsa_layers(patch(model, small_config()))
    assert [a.window for a in layers] == [None, 64, None]
    assert [a._owner for a in layers] == [True, False, False]  # the first global layer
    first = pipeline(tiny_gemma2(n_layers=6), FakeGroup(2, 1))  # layers 0, 1, 2
    layers = dhsa_layers(patch(first, small_config()))
    # Layer 0 (windowed, before any global layer) chunks its own keys if it chunks at all.
    assert [a._owner for a in layers] == [True, True, False]


def test_pipeline_refusals_say_why():
    with pytest.raises(ShardingError, match="'llama' has no pipeline parallelism"):
        pipeline(tiny_llama(), FakeGroup(2))
    with pytest.raises(ShardingError, match="1 layers cannot be split over 2"):
        pipeline(tiny_gemma2(n_layers=1), FakeGroup(2))
    with pytest.raises(ShardingError, match=r"split \[4, 1\] must be 2 positive"):
        pipeline(tiny_gemma2(), FakeGroup(2), split=[4, 1])
    model = pipeline(tiny_gemma2(), FakeGroup(2))
    with pytest.raises(ShardingError, match="split already"):
        shard(model, FakeGroup(2))
    with pytest.raises(ShardingError, match="split already"):
        pipeline(shard(tiny_gemma2(), FakeGroup(2)), FakeGroup(2))


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring backend listens on both)."""
    for _ in range(20):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def launcher() -> list[str]:
    """The ``mlx.launch`` of this interpreter's environment."""
    script = Path(sys.executable).with_name("mlx.launch")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def start_launched(*command: str) -> subprocess.Popen:
    """``mlx.launch -n 2 --backend ring`` on 127.0.0.1, in a session of its own (text pipes)."""
    cmd = [
        *launcher(),
        "-n", "2",
        "--backend", "ring",
        "--starting-port", str(_free_port_pair()),
        sys.executable, *command,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=default_sigint,
    )  # fmt: skip


def run_launched(*command: str) -> str:
    """:func:`start_launched` with a time limit; returns stdout."""
    proc = start_launched(*command)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher, its shells and both ranks
        proc.communicate()
        pytest.fail(f"mlx.launch did not finish in {LAUNCH_TIMEOUT} s")
    check_ranks(proc.returncode, stdout, stderr)
    return stdout


def check_ranks(returncode: int, stdout: str, stderr: str) -> None:
    """The launcher and every rank exited 0 (mlx.launch exits 0 whatever its ranks did, and
    warns "Node with rank R exited with code C" or "... was killed")."""
    ok = returncode == 0 and "Node with rank" not in stderr
    assert ok, f"mlx.launch or a rank failed ({returncode}):\n{stdout}\n{stderr}"


def launch(model: str, out: Path) -> list[dict]:
    """Run the worker on two local ranks; returns what each rank wrote, rank order."""
    run_launched(str(WORKER), model, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


ring = pytest.mark.skipif(
    not mx.distributed.is_available("ring"), reason="this MLX build has no ring backend"
)


W, G = 64, None  # a DHSA layer's window: gemma2's sliding layers (even numbers), global
# Per rank (rank 0 first): the prompt cache of each layer it holds, its DHSA layers' windows.
# Rank 0 holds the last layers (3-5 of 6), as mlx-lm's pipeline splits.
PIPELINE_LAYERS = {
    "gemma2-pipeline": [
        (["DHSACache", "WindowKVCache", "DHSACache"], [G, W, G]),  # layers 3, 4, 5
        (["WindowKVCache", "DHSACache", "WindowKVCache"], [W, G, W]),  # layers 0, 1, 2
    ],
    "gemma3-pipeline": [
        (["DHSACache", "WindowKVCache", "DHSACache"], [G, G]),  # layers 3 (global), 4, 5
        (["WindowKVCache", "DHSACache", "WindowKVCache"], [G]),  # layers 0, 1 (global), 2
    ],
}


@ring
@pytest.mark.parametrize(
    "model, heads, layers",
    [
        ("llama", [2, 1], 3),
        ("gemma2", [2, 1], 4),
        ("qwen2-pipeline", [4, 2], 2),
        ("gemma2-pipeline", [4, 2], 3),
        ("gemma3-pipeline", [4, 1], 3),
    ],
)
def test_two_ranks_match_one_process(model, heads, layers, tmp_path):
    """Tensor parallel: each rank holds 2 of 4 query and 1 of 2 KV heads of every layer.
    Pipeline: each rank holds half the layers, with all their heads; gemma2 and gemma3 keep
    each layer's own sliding / global kind and prompt cache on the stage that holds it."""
    ranks = launch(model, tmp_path)
    for r in ranks:
        assert r["size"] == 2 and r["heads"] == heads and r["layers"] == layers
        if model in PIPELINE_LAYERS:
            assert (r["caches"], r["windows"]) == tuple(PIPELINE_LAYERS[model][r["rank"]])
        assert r["dense"] <= LOGIT_TOL  # sharded dense = one-process dense
        assert r["full_paths"] == ["dhsa(reference)"]  # the sparse path, every key kept
        assert r["dhsa_full"] <= LOGIT_TOL  # = one-process DHSA
        assert r["patch_order"] == 0.0  # patch -> shard is shard -> patch, bit for bit
        # the last decode step; gemma2's windowed layers attend densely over their window cache
        paths = ["dense"] * model.startswith("gemma2") + ["dhsa(reference)"]
        assert r["sparse_finite"] and r["sparse_paths"] == paths
    assert ranks[0]["sparse_tokens"] == ranks[1]["sparse_tokens"]
    if model.endswith("pipeline"):
        # A stage plans as one process does, except that its first DHSA layer finds the
        # boundaries its other layers share: without sharing, the tokens are the same.
        for r in ranks:
            assert r["unshared_tokens"] == r["one_process_unshared_tokens"]


# Small settings that put a few hundred tokens on the sparse path (prefill and decode).
CLI_SPARSE = ["--budget", "64", "--block-size", "16", "--local", "16", "--dense-tail", "8"]
SMOLLM2 = Path.home() / ".cache" / "mlx_dhsa" / "models" / "smollm2-135m"


def tiny_model_dir(path: Path, make=tiny_llama, **args) -> Path:
    """A tiny random model (default: llama, 4 query / 2 KV heads: splits 2 ways) with
    SmolLM2's tokenizer."""
    import shutil

    from mlx.utils import tree_flatten

    model = make(vocab_size=49152, **args)
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = {k: v for k, v in vars(model.args).items() if isinstance(v, (int, float, str))}
    config = dict(config, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SMOLLM2 / name, path / name)
    return path


def tiny_dir(split: str, path: Path) -> Path:
    """A tiny llama to split by heads, or a tiny gemma3 (4 layers) to split by layers."""
    if split == "tensor":
        return tiny_model_dir(path)
    # an int scalar: transformers checks the config of the tokenizer's model type
    return tiny_model_dir(path, tiny_gemma3, n_layers=4, query_pre_attn_scalar=32)


@ring
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="needs the smollm2-135m tokenizer (demo extra)")
@pytest.mark.parametrize("split", ["tensor", "pipeline"])
def test_chat_under_mlx_launch(split, tmp_path):
    """Rank 0 prints one answer per question; the follower prints nothing."""
    model = tiny_dir(split, tmp_path / "tiny")
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog near the river bank.\n" * 30)
    out = run_launched(
        "-m", "mlx_dhsa", "chat", "--model", str(model), "--doc", str(doc),
        "--question", "What jumps?", "--question", "Where?", "--max-tokens", "3",
        "--decode-dense-below", "0", *CLI_SPARSE, *["--pipeline"] * (split == "pipeline"),
    )  # fmt: skip
    assert out.count("mlx-dhsa chat") == 1 and f"{split} parallel over 2 ranks" in out
    assert out.count("Generation: 3 tokens") == 2
    assert "Attention: dhsa(reference) (prefill), dhsa(reference) (decode)" in out


@ring
def test_profile_under_mlx_launch():
    out = run_launched(
        "-m", "mlx_dhsa", "profile", "--shape", "tiny", "--contexts", "256", "--trials", "1",
        "--generation-tokens", "2", "--methods", "dense,dhsa", *CLI_SPARSE,
    )  # fmt: skip
    assert out.count("method=dhsa context=256") == 2  # the trial and the average, rank 0 only
    assert "attention=dhsa(reference)" in out and "tensor parallel over 2 ranks" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (the launcher's shells and ranks), from ``ps``."""
    ps = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in ps.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


SERVE_STOP_TIMEOUT = 60  # seconds for both ranks to stop after Ctrl-C


@ring
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="needs the smollm2-135m tokenizer (demo extra)")
@pytest.mark.parametrize("split", ["tensor", "pipeline"])
def test_serve_under_mlx_launch(split, tmp_path):
    """Rank 0 serves on 127.0.0.1 and answers a completion that both ranks compute (a tiny
    llama split by heads, or a tiny gemma3 split by layers); Ctrl-C (SIGINT to every rank,
    as a terminal sends it) stops both ranks cleanly: the launcher exits 0."""
    import queue
    import threading
    import urllib.request

    model = tiny_dir(split, tmp_path / "tiny")
    port = _free_port()
    flags = ["--pipeline"] if split == "pipeline" else []
    proc = start_launched(
        "-m", "mlx_dhsa", "serve", "--model", str(model), "--port", str(port),
        "--no-doc-cache", "--max-tokens", "4", *flags, *CLI_SPARSE,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True)
    reader.start()
    out, url = [], f"http://127.0.0.1:{port}/v1"
    try:
        while not any(url in l for l in out):
            try:
                out.append(lines.get(timeout=LAUNCH_TIMEOUT))
            except queue.Empty:
                pytest.fail(f"serve did not start in {LAUNCH_TIMEOUT} s:\n{''.join(out)}")
        body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})
        request = urllib.request.Request(
            f"{url}/completions", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=LAUNCH_TIMEOUT) as response:
            reply = json.loads(response.read())
            assert response.headers["X-DHSA-Attention"].startswith("prefill=")
        assert reply["usage"]["completion_tokens"] == 4
        assert isinstance(reply["choices"][0]["text"], str)
        for pid in _descendants(proc.pid):
            os.kill(pid, signal.SIGINT)
        proc.wait(timeout=SERVE_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not stop in {SERVE_STOP_TIMEOUT} s after SIGINT")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
    while not lines.empty():
        out.append(lines.get())
    check_ranks(proc.returncode, "".join(out), proc.stderr.read())
    assert f"{split} parallel over 2 ranks" in "".join(out) and "stopped" in "".join(out)
