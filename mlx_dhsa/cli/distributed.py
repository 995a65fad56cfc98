"""``mlx-dhsa chat / serve / profile`` started by ``mlx.launch`` on several Macs.

Every rank runs the same command on its share of the model (tensor parallelism,
:func:`mlx_dhsa.distributed.shard`, or with ``--pipeline`` pipeline parallelism,
:func:`mlx_dhsa.distributed.pipeline`); rank 0 talks to the user and the others follow: they
print nothing, and what rank 0 reads (documents, questions, the sampling seed) reaches them
through ``mx.distributed`` so that every rank runs the same forward passes. ``serve`` uses
mlx-lm's own request sharing (rank 0 answers HTTP). Run alone, every function here is a
no-op or the one-process behaviour.
"""

import json
from collections.abc import Iterable, Iterator
from typing import Any

import mlx.core as mx

from ..config import DHSAConfig
from ..distributed import sharded_load, world
from . import ui


def launched() -> bool:
    """Whether this process is one of several ranks (``mlx.launch``)."""
    return world().size() > 1


def leader() -> bool:
    """Rank 0 (or the only process): the one that reads input and prints."""
    return world().rank() == 0


SPLIT = {"pipeline": False}  # how this command's ranks split a model: set by start()


def start(pipeline: bool = False) -> None:
    """Call first in a command: followers print nothing (errors still go to stderr), and
    every rank seeds its sampler with rank 0's seed, so temperature sampling draws the same
    tokens from the same (all-reduced or gathered) logits. ``pipeline``: the ranks split
    models by layers, not by heads."""
    SPLIT["pipeline"] = pipeline
    if not launched():
        return
    if not leader():
        ui.console.quiet = True
    seed = int(mx.random.randint(0, 1 << 30, ()).item()) if leader() else 0
    mx.random.seed(share(seed))


def share(obj: Any) -> Any:
    """Rank 0's ``obj`` (JSON-able) on every rank; the others pass anything."""
    if not launched():
        return obj
    from mlx_lm.generate import generation_stream

    # mlx-lm evaluates the next token ahead (async_eval): let its collectives finish before
    # these start, or two rings of messages would interleave.
    mx.synchronize(generation_stream)
    cpu = mx.cpu
    data = json.dumps(obj).encode() if leader() else b""
    n = mx.distributed.all_sum(mx.array(len(data)), stream=cpu).item()
    buf = mx.array(list(data), dtype=mx.int32) if leader() else mx.zeros((n,), mx.int32)
    got = mx.distributed.all_sum(buf, stream=cpu)
    return json.loads(bytes(got.astype(mx.uint8).tolist()).decode())


def follow(source: Iterable[str]) -> Iterator[str]:
    """Rank 0 iterates ``source`` (e.g. questions typed at its terminal) and every rank gets
    each item; the followers never touch ``source``."""
    if not launched():
        yield from source
        return
    items = iter(source) if leader() else None
    while True:
        item = share(next(items, None) if leader() else None)
        if item is None:
            return
        yield item


def load(model: str, config: DHSAConfig, *, patch: bool):
    """:func:`mlx_dhsa.load`, or on launched ranks :func:`mlx_dhsa.distributed.sharded_load`."""
    if launched():
        return sharded_load(model, config, patch=patch, pipeline=SPLIT["pipeline"])
    from ..loading import load as load_one

    return load_one(model, config, patch=patch)


def shard_random(model):
    """A random-weight model (``profile --shape``) split across the ranks: every rank drew
    the same weights (``start`` shared the seed)."""
    if launched():
        from ..distributed import pipeline, shard

        (pipeline if SPLIT["pipeline"] else shard)(model)
        mx.eval(model.parameters())
    return model


def describe() -> str | None:
    """``"rank 0 of 2"``-style note for the banner, or None when run alone."""
    if not launched():
        return None
    how = "pipeline" if SPLIT["pipeline"] else "tensor"
    return f"{how} parallel over {world().size()} ranks (this is rank 0)"
