"""Pipeline parallelism for gemma2 and gemma3_text, whose mlx-lm models have none.

Written as mlx-lm writes it for qwen2 and deepseek_v3 (``mlx_lm.models.pipeline``): rank ``r``
keeps a contiguous range of layers (rank 0 the last ones, the last rank the first ones),
receives the hidden state from rank ``r + 1``, sends its output to rank ``r - 1``, and an
``all_gather`` gives every rank rank 0's final hidden state, so that every rank computes the
same logits. Every rank keeps the embeddings, the final norm and the head.

:func:`pipeline_gemma` swaps the model's classes, in place, for the subclasses below (same
weights, layer objects and layer numbers), so a model mlx-lm loaded (lazily or not) can be
split. Each layer keeps its own kind: the sliding / global choice and the masks follow the
layer's number in the whole model, not its place in the rank's range.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma2, gemma3_text
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.pipeline import PipelineMixin


def receive(model: PipelineMixin, h: mx.array) -> mx.array:
    """The hidden state from the previous stage (rank + 1); the first stage keeps ``h``."""
    if model.pipeline_rank < model.pipeline_size - 1:
        h = mx.distributed.recv_like(h, model.pipeline_rank + 1)
    return h


def pass_on(model: PipelineMixin, h: mx.array, cache: list) -> mx.array:
    """Send ``h`` to the next stage (rank - 1) and return rank 0's output on every rank.

    As in mlx-lm, the last cache's keys depend on the send, so that a prefill step that
    evaluates only the caches still sends."""
    rank, size = model.pipeline_rank, model.pipeline_size
    if rank != 0:
        h = mx.distributed.send(h, (rank - 1) % size)
        last = cache[-1] if cache else None
        keys = getattr(last, "keys", None)
        if isinstance(keys, mx.array):
            last.keys = mx.depends(keys, h)
        elif isinstance(keys, (tuple, list)):  # a quantized cache: (packed, scales, biases)
            last.keys = type(keys)(mx.depends(list(keys), h))
    if size > 1:
        h = mx.distributed.all_gather(h)[: h.shape[0]]
    return h


class Gemma2Pipeline(PipelineMixin, gemma2.GemmaModel):
    """``gemma2.GemmaModel`` running only this rank's layers."""

    def __call__(self, inputs: mx.array, cache=None):
        h = self.embed_tokens(inputs)
        h = h * (self.args.hidden_size**0.5)
        layers = self.pipeline_layers
        if cache is None:
            cache = [None] * len(layers)
        mask = create_attention_mask(h, cache[0], return_array=True)
        h = receive(self, h)
        for layer, c in zip(layers, cache):
            h = layer(h, mask, c)
        return self.norm(pass_on(self, h, cache))


class Gemma3Pipeline(PipelineMixin, gemma3_text.Gemma3Model):
    """``gemma3_text.Gemma3Model`` running only this rank's layers, each with its own mask."""

    def is_global(self, i: int) -> bool:
        """Whether layer ``i`` (of the whole model) attends globally, as mlx-lm decides."""
        return i % self.sliding_window_pattern == self.sliding_window_pattern - 1

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None):
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        h *= mx.array(self.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
        layers = self.pipeline_layers
        if cache is None:
            cache = [None] * len(layers)
        kinds = [self.is_global(self.start_idx + j) for j in range(len(layers))]

        def first(kind: bool):  # mlx-lm: the first global / first sliding layer's cache
            return next((c for c, g in zip(cache, kinds) if g == kind), None)

        global_mask = create_attention_mask(h, first(True))
        sliding_mask = None
        if self.sliding_window_pattern > 1:
            sliding_mask = create_attention_mask(h, first(False), window_size=self.window_size)
        h = receive(self, h)
        for layer, c, g in zip(layers, cache, kinds):
            h = layer(h, global_mask if g else sliding_mask, c)
        return self.norm(pass_on(self, h, cache))


class Gemma2PipelineModel(gemma2.Model):
    """``gemma2.Model`` whose ``layers`` are this rank's (prompt caches, patching)."""

    @property
    def layers(self):
        return self.model.pipeline_layers


class Gemma3PipelineModel(gemma3_text.Model):
    """``gemma3_text.Model`` whose ``layers`` and caches are this rank's."""

    @property
    def layers(self):
        return self.model.pipeline_layers

    def make_cache(self):
        inner = self.model
        stop = inner.end_idx if inner.end_idx is not None else len(inner.layers)
        return [
            KVCache() if inner.is_global(i) else RotatingKVCache(max_size=self.args.sliding_window)
            for i in range(inner.start_idx, stop)
        ]


CLASSES = {
    "gemma2": (Gemma2PipelineModel, Gemma2Pipeline),
    "gemma3_text": (Gemma3PipelineModel, Gemma3Pipeline),
}


def pipeline_gemma(model: nn.Module, group: mx.distributed.Group, split=None) -> None:
    """``model.model.pipeline(group, split)`` for gemma2 and gemma3_text, in place: gives the
    model mlx-lm's pipeline hook, then splits it (``split``: layers per rank, rank 0 first;
    default even)."""
    outer, inner = CLASSES[model.model_type]
    if not isinstance(model.model, PipelineMixin):
        model.__class__, model.model.__class__ = outer, inner
        m = model.model
        m.pipeline_rank, m.pipeline_size, m.start_idx, m.end_idx = 0, 1, 0, None
    model.model.pipeline(group, split)
