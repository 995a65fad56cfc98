"""One rank of tests/test_distributed.py, started by ``mlx.launch`` (not a test module).

Every rank builds the same tiny random model (same seed), computes the one-process references
on its own full copy, then shards copies across the launched group and writes what it measured
to ``OUT/rank<r>.json`` for the test to check:

- ``dense``: sharded dense logits vs one-process dense logits (max abs difference);
- ``dhsa_full``: sharded DHSA at budget >= S (sparse path forced) vs one-process DHSA;
- ``patch_order``: patched then sharded vs sharded then patched (max abs difference);
- ``sparse``: greedy tokens of a sparse DHSA run (prompt past the dense limit, sparse decode),
  whether its logits stayed finite, and the paths its layers took; ``unshared``: the same run
  with ``share_boundaries=False``, and the one-process tokens of both.

- ``caches``: the prompt cache's classes, one per layer this rank holds, and ``windows``:
  each DHSA layer's sliding window (None: global).

Models: ``llama`` and ``gemma2`` split by tensor parallelism; ``qwen2-pipeline`` by mlx-lm's
pipeline parallelism (2 of its 4 layers per rank), ``gemma2-pipeline`` and
``gemma3-pipeline`` by the project's (3 of 6 layers per rank: rank 0 holds layers 3-5, whose
sliding / global kinds are not those of layers 0-2).

Usage: mlx.launch -n 2 --backend ring python tests/distributed_worker.py llama OUT
"""

import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import clone, small_config, tiny_gemma2, tiny_gemma3, tiny_llama  # noqa: E402

from mlx_dhsa import make_prompt_cache, patch, unpatch  # noqa: E402
from mlx_dhsa.distributed import pipeline, shard, world  # noqa: E402
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


def pipeline_gemma2():
    """Random gemma2, 6 layers, with a sliding window (64) that a 160-token prompt passes:
    DHSA keeps it on the even layers, so a stage must number its layers from the model's."""
    model = tiny_gemma2(n_layers=6)
    model.args.sliding_window = 64
    return model


# name -> (model, how to split it across the group)
MODELS = {
    "llama": (tiny_llama, shard),
    "gemma2": (tiny_gemma2, shard),
    "qwen2-pipeline": (tiny_qwen2, pipeline),
    "gemma2-pipeline": (pipeline_gemma2, pipeline),
    "gemma3-pipeline": (lambda: tiny_gemma3(n_layers=6), pipeline),
}
PROMPT = 160  # past small_config's dense limit (2 x 48 keys)
NEW_TOKENS = 6
FULL = small_config(budget=512, dense_below=0)  # every key kept, on the sparse path
SPARSE = small_config()
UNSHARED = small_config(share_boundaries=False)  # every layer finds its own chunk boundaries


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
        ref_unshared, _ = greedy(patch(unpatch(one), UNSHARED), tokens, NEW_TOKENS)

        after = split(clone(model), group)
        dense = logits(after, tokens)
        dhsa_after = logits(patch(after, FULL), tokens)
        full_paths = sorted({a.last_path for a in dhsa_layers(after)})
        before = split(patch(clone(model), FULL), group)
        dhsa_before = logits(before, tokens)
        sparse_tokens, finite = greedy(patch(unpatch(after), SPARSE), tokens, NEW_TOKENS)
        sparse_paths = sorted({a.last_path for a in dhsa_layers(after)})
        unshared_tokens, _ = greedy(patch(unpatch(after), UNSHARED), tokens, NEW_TOKENS)
        heads = [after.layers[0].self_attn.n_heads, after.layers[0].self_attn.n_kv_heads]
        caches = [type(c).__name__ for c in make_prompt_cache(after)]
        windows = [a.window for a in dhsa_layers(after)]

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
        unshared_tokens=unshared_tokens,
        one_process_unshared_tokens=ref_unshared,
        sparse_paths=sparse_paths,
        caches=caches,
        windows=windows,
    )
    (out / f"rank{group.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
