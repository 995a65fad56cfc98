"""First open (prefill, then store on disk) vs second open (load from disk) of a document.

Usage:
    python scripts/bench_doc_cache.py --model gemma-3-270m --tokens 2048
    python scripts/bench_doc_cache.py --model /path/to/model-dir --tokens 8192,32768
    python scripts/bench_doc_cache.py --shape gemma-2-2b --tokens 8192,32768   # offline

With --model the document is the needle-in-a-haystack text (Paul Graham essays) cut to the token
count; with --shape (a random-weight model, bf16 on a GPU, no tokenizer or network needed) it is
random token ids. Entries go to a temporary store, deleted at the end. Prints one key=value line
per size.
"""

import argparse
import tempfile
import time

import mlx.core as mx

from mlx_dhsa import DHSAConfig, load
from mlx_dhsa.cli.chat import ChatSession
from mlx_dhsa.cli.doc_cache import DocCache, namespace, open_document
from mlx_dhsa.cli.profiling import SHAPES, random_model
from mlx_dhsa.evaluation.niah import read_haystack
from mlx_dhsa.evaluation.runinfo import environment
from mlx_dhsa.loading import resolve


class IdTokenizer:
    """Stands in for a tokenizer with a random-weight shape: text is space-separated ids."""

    has_chat_template, chat_template = False, None

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def get_vocab(self):
        return {}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="alias or model directory")
    p.add_argument("--tokens", default="2048", help="comma-separated document lengths")
    p.add_argument("--shape", choices=list(SHAPES), help="random-weight model instead of --model")
    p.add_argument("--dense", action="store_true", help="unpatched model")
    args = p.parse_args()
    config = DHSAConfig()
    cpu = mx.default_device() == mx.cpu
    sizes = [int(t) for t in args.tokens.split(",")]
    if args.shape:
        from mlx_dhsa import patch

        model = random_model(args.shape, mx.float32 if cpu else mx.bfloat16)
        model = model if args.dense else patch(model, config)
        tokenizer, name = IdTokenizer(), f"random {args.shape}"
        key = mx.random.key(0)
        ids = mx.random.randint(
            0, SHAPES[args.shape]["vocab_size"], (max(sizes),), key=key
        ).tolist()
    else:
        model, tokenizer = load(args.model, config, patch=not args.dense)
        if cpu:
            model.set_dtype(mx.float32)
        name = args.model
        ids = tokenizer.encode(read_haystack(), add_special_tokens=False)
    env = environment()
    print(f"device={env['device']} device_name={env['device_name']!r} model={name}")
    path = name if args.shape else resolve(args.model)
    space = namespace(path, model, None if args.dense else config, tokenizer)
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as scratch:
        store = DocCache(root)
        for n in sizes:
            doc = tokenizer.decode(ids[:n])
            if not cpu:  # an untimed open first: the kernels compile per length class
                open_document(ChatSession(model, tokenizer, doc), DocCache(scratch), space)
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
