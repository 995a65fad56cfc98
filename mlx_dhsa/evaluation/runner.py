"""Run the harness's pieces on one patched model: task answers, perplexity by position, and
the attention-mass diagnostic, as plain dict rows for JSON."""

import math
import random
from collections.abc import Callable, Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate

from ..config import DHSAConfig
from ..patching import make_prompt_cache
from .mass import KEY_ORACLE, capture, layer_mass
from .perplexity import next_token_stats
from .runinfo import PrefillPaths
from .tasks import Sample, score

MAX_TOKENS = {"niah": 12, "multikey": 12, "multivalue": 36, "docqa": 16}


def answer(model: nn.Module, tokenizer, prompt: list[int], max_tokens: int) -> tuple[str, str]:
    """Greedy reply to ``prompt`` (stops at the first newline after some text) and the
    attention path its prefill took."""
    paths = PrefillPaths(model)
    reply = ""
    for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=max_tokens,
                             prompt_cache=make_prompt_cache(model),
                             prompt_progress_callback=paths):  # fmt: skip
        reply += r.text
        if "\n" in reply.strip():
            break
    return reply.strip().split("\n")[0], paths.path


def run_tasks(
    model: nn.Module, tokenizer, samples: Iterable[Sample], *, method: str, setting: str,
    log: Callable[[dict], None],
) -> list[dict]:  # fmt: skip
    """Answer every sample with the model as patched now; one row per sample."""
    rows = []
    for s in samples:
        reply, path = answer(model, tokenizer, s.prompt, MAX_TOKENS[s.task])
        row = dict(kind="task", method=method, setting=setting, task=s.task, context=s.context,
                   index=s.index, depth=round(s.depth, 4), score=score(reply, s.answers),
                   reply=reply, answers=list(s.answers), attention=path)  # fmt: skip
        rows.append(row)
        log(row)
    return rows


def held_out_windows(ids: list[int], context: int, n: int, bos: int | None, seed: int = 0):
    """``n`` seeded windows of ``context`` tokens (a BOS first, if the model has one)."""
    lead = [bos] if bos is not None else []
    width = context - len(lead)
    if len(ids) < width:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than --ppl-context {context}")
    rng = random.Random(f"{seed}/ppl/{context}")
    return [lead + ids[(s := rng.randrange(0, len(ids) - width + 1)) : s + width] for _ in range(n)]


def run_perplexity(
    model: nn.Module, windows: Sequence[list[int]], *, method: str, segment: int = 128,
    log: Callable[[dict], None],
) -> dict:  # fmt: skip
    """Mean NLL per ``segment`` positions of every window (the unit the intervals resample)."""
    segs = []
    for w in windows:
        nll = next_token_stats(model, mx.array(w)[None])[0]
        n = nll.shape[0] // segment * segment
        segs.append(nll[:n].reshape(-1, segment).mean(axis=1).tolist())
    row = dict(kind="ppl", method=method, context=len(windows[0]), windows=len(windows),
               segment=segment, segment_nll=segs,
               ppl=math.exp(sum(map(sum, segs)) / sum(map(len, segs))))  # fmt: skip
    log(row)
    return row


def run_mass(
    model: nn.Module, prompts: Sequence[list[int]], configs: dict[str, DHSAConfig | None], *,
    settings: dict[str, dict], n_decode: int, context: int, log: Callable[[dict], None],
    max_layers: int | None = None,
) -> list[dict]:  # fmt: skip
    """Attention mass kept by each config's plans (and the key oracle) on every prompt.

    Decode steps are single-query plans at ``n_decode`` evenly spaced positions of the
    prompt's second half; ``max_layers`` keeps that many patched layers, evenly spaced.
    Plans are made once; each setting (name -> config overrides, e.g.
    ``decode_dense_below``) then counts a call that it would run dense (``dense_limit``;
    decode: ``sparse_decode_at``) as keeping everything, as the patched model does.
    """
    rows = []
    for i, prompt in enumerate(prompts):
        S = len(prompt)
        step = max(1, (S - S // 2) // max(n_decode, 1))
        positions = list(range(S - 1, S // 2, -step))[:n_decode]
        layers = capture(model, prompt)
        if max_layers is not None and len(layers) > max_layers:
            step = len(layers) / max_layers
            layers = [layers[int(j * step)] for j in range(max_layers)]
        for layer in layers:
            for r in layer_mass(layer, configs, decode_positions=positions):
                for setting, overrides in settings.items():
                    config = configs[r.method]
                    shares = r.shares
                    if config is not None:
                        config = config.replace(**overrides)
                        if r.phase == "prefill" and S <= config.dense_limit:
                            shares = [1.0] * len(shares)
                        if r.phase == "decode":
                            shares = [1.0 if not config.sparse_decode_at(p + 1) else x
                                      for p, x in zip(positions, shares)]  # fmt: skip
                    row = dict(kind="mass", method=r.method, budget=r.budget, layer=r.layer,
                               phase=r.phase, context=context, prompt=i, setting=setting,
                               shares=shares)  # fmt: skip
                    rows.append(row)
                    log(row)
    return rows


def mass_configs(methods: dict[str, DHSAConfig | None], budgets: Sequence[int]) -> dict:
    """label@budget -> config for every method and budget, plus the key oracle per budget."""
    out = {}
    for b in budgets:
        for name, config in methods.items():
            if config is not None:
                out[f"{name}@{b}"] = config.replace(budget=b)
        out[f"{KEY_ORACLE}@{b}"] = None
    return out
