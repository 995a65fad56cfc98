"""One rank of tests/test_distributed.py, started by ``mlx.launch`` (not a test module).

Every rank builds the same tiny random model (same seed), computes the one-process references
on its own full copy, then shards copies across the launched group and writes what it measured
to ``OUT/rank<r>.json`` for the test to check:

- ``dense``: sharded dense logits vs one-process dense logits (max abs difference);
- ``dhsa_full``: sharded DHSA at budget >= S (sparse path forced) vs one-process DHSA;
- ``patch_order``: patched then sharded vs sharded then patched (max abs difference);
- ``sparse``: greedy tokens of a sparse DHSA run (prompt past the dense limit, sparse decode),
  whether its logits stayed finite, and the paths its layers took.

Models: ``llama`` and ``gemma2`` split by tensor parallelism, ``qwen2-pipeline`` by mlx-lm's
pipeline parallelism (2 of its 4 layers per rank).

Usage: mlx.launch -n 2 --backend ring python tests/distributed_worker.py llama OUT
"""

import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import clone, small_config, tiny_gemma2, tiny_llama  # noqa: E402

from mlx_dhsa import make_prompt_cache, patch, unpatch  # noqa: E402
from mlx_dhsa.distributed import shard, world  # noqa: E402
from mlx_dhsa.patching import dhsa_layers  # noqa: E402


def tiny_qwen2():
    """Random qwen2 (mlx-lm gives it pipeline parallelism), 4 layers, GQA 4/2, fp32."""
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=128, num_hidden_layers=4, intermediate_size=256,
        num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=1024, num_key_value_heads=2,
    )  # fmt: skip
    model = qwen2.Model(args)
    mx.eval(model.parameters())
    return model


def pipelined(model, group):
    """mlx-lm's pipeline parallelism: this rank keeps a contiguous range of layers."""
    model.model.pipeline(group)
    return model


# name -> (model, how to split it across the group)
MODELS = {
    "llama": (tiny_llama, shard),
    "gemma2": (tiny_gemma2, shard),
    "qwen2-pipeline": (tiny_qwen2, pipelined),
}
PROMPT = 160  # past small_config's dense limit (2 x 48 keys)
NEW_TOKENS = 6
FULL = small_config(budget=512, dense_below=0)  # every key kept, on the sparse path
SPARSE = small_config()


def logits(model, tokens):
    out = model(mx.array(tokens)[None])
    mx.eval(out)
    return out.astype(mx.float32)


def max_diff(a, b) -> float:
    return mx.abs(a - b).max().item()


def greedy(model, tokens, n):
    """``n`` greedy tokens after a prefill of ``tokens`` with a DHSA prompt cache."""
    cache = make_prompt_cache(model)
    out, finite, y = [], True, mx.array(tokens)[None]
    for _ in range(n):
        step = model(y, cache=cache)[:, -1].astype(mx.float32)
        finite = finite and bool(mx.isfinite(step).all().item())
        y = mx.argmax(step, axis=-1, keepdims=True)
        out.append(int(y.item()))
    return out, finite


def main(name: str, out: Path) -> None:
    group = world()
    mx.random.seed(0)
    with mx.stream(mx.cpu):
        make, split = MODELS[name]
        model = make()
        tokens = mx.random.randint(0, 1024, (PROMPT,), key=mx.random.key(1)).tolist()
        dense_ref = logits(model, tokens)
        one = patch(clone(model), FULL)
        dhsa_ref = logits(one, tokens)
        ref_tokens, _ = greedy(patch(unpatch(one), SPARSE), tokens, NEW_TOKENS)

        after = split(clone(model), group)
        dense = logits(after, tokens)
        dhsa_after = logits(patch(after, FULL), tokens)
        full_paths = sorted({a.last_path for a in dhsa_layers(after)})
        before = split(patch(clone(model), FULL), group)
        dhsa_before = logits(before, tokens)
        sparse_tokens, finite = greedy(patch(unpatch(after), SPARSE), tokens, NEW_TOKENS)
        sparse_paths = sorted({a.last_path for a in dhsa_layers(after)})
        heads = [after.layers[0].self_attn.n_heads, after.layers[0].self_attn.n_kv_heads]

    result = dict(
        rank=group.rank(),
        size=group.size(),
        heads=heads,
        layers=len(after.layers),
        dense=max_diff(dense, dense_ref),
        dhsa_full=max_diff(dhsa_after, dhsa_ref),
        dhsa_full_vs_dense=max_diff(dhsa_after, dense_ref),
        full_paths=full_paths,
        patch_order=max_diff(dhsa_before, dhsa_after),
        sparse_tokens=sparse_tokens,
        one_process_sparse_tokens=ref_tokens,
        sparse_finite=finite,
        sparse_paths=sparse_paths,
    )
    (out / f"rank{group.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
