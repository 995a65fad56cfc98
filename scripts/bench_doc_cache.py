"""First open (prefill, then store on disk) vs second open (load from disk) of a document.

Usage:
    python scripts/bench_doc_cache.py --model gemma-3-270m --tokens 2048
    python scripts/bench_doc_cache.py --model /path/to/model-dir --tokens 8192,32768

The document is the needle-in-a-haystack text (Paul Graham essays) cut to the token count.
Entries go to a temporary store, deleted at the end. Prints one key=value line per size.
"""

import argparse
import tempfile
import time

import mlx.core as mx

from mlx_dhsa import DHSAConfig, load
from mlx_dhsa.cli.chat import ChatSession
from mlx_dhsa.cli.doc_cache import DocCache, namespace, open_document
from mlx_dhsa.evaluation.niah import read_haystack
from mlx_dhsa.evaluation.runinfo import environment
from mlx_dhsa.loading import resolve


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="alias or model directory")
    p.add_argument("--tokens", default="2048", help="comma-separated document lengths")
    p.add_argument("--dense", action="store_true", help="unpatched model")
    args = p.parse_args()
    config = DHSAConfig()
    model, tokenizer = load(args.model, config, patch=not args.dense)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    env = environment()
    print(f"device={env['device']} device_name={env['device_name']!r} model={args.model}")
    space = namespace(resolve(args.model), model, None if args.dense else config, tokenizer)
    ids = tokenizer.encode(read_haystack(), add_special_tokens=False)
    with tempfile.TemporaryDirectory() as root:
        store = DocCache(root)
        for n in (int(t) for t in args.tokens.split(",")):
            doc = tokenizer.decode(ids[:n])
            tic = time.perf_counter()
            first = open_document(ChatSession(model, tokenizer, doc), store, space)
            first_s = time.perf_counter() - tic
            tic = time.perf_counter()
            second = open_document(ChatSession(model, tokenizer, doc), store, space)
            second_s = time.perf_counter() - tic
            assert second.hit is not None, "the second open missed the store"
            print(
                f"tokens={first.stats.prompt_tokens} prefill_s={first.stats.prefill_s:.3f} "
                f"first_open_s={first_s:.3f} (prefill + store) second_open_s={second_s:.3f} "
                f"load_s={second.hit.load_s:.3f} entry_mb={second.hit.entry.nbytes / 1e6:.1f} "
                f"speedup={first.stats.prefill_s / second_s:.1f}x attention={first.stats.prefill_path}"
            )


if __name__ == "__main__":
    main()
