"""Next-token statistics of a causal LM over one sequence: NLL, perplexity, greedy tokens.

The vocabulary projection runs over slices of positions, so a 16k-token window of a 262k
vocabulary never materialises all logits at once.
"""

import math

import mlx.core as mx
import mlx.nn as nn

LOGIT_ROWS = 512  # positions projected to the vocabulary at a time


def _head(model: nn.Module):
    """The model's output projection: ``lm_head`` or the tied embedding."""
    if "lm_head" in model:
        return model.lm_head
    return model.model.embed_tokens.as_linear


def next_token_stats(model: nn.Module, tokens: mx.array) -> tuple[mx.array, mx.array]:
    """Per-position NLL of the next token and the greedy (top-1) prediction, in one forward.

    Works for mlx-lm models whose ``model.model(tokens)`` returns the final hidden states
    (Gemma, Llama families); a final logit softcap, if the model has one, is applied.

    Args:
        model (nn.Module): an mlx-lm model (patched or not).
        tokens (mx.array): (1, T) int token ids.

    Returns:
        tuple: ``(nll, top1)``, each (T - 1,): ``nll[i] = -log p(tokens[i + 1] | tokens[:i + 1])``
        (float32) and ``top1[i]`` the argmax prediction at position i (int32).
    """
    hidden = model.model(tokens[:, :-1])
    head, cap = _head(model), getattr(model, "final_logit_softcapping", None)
    targets = tokens[0, 1:]
    nll, top1 = [], []
    for i in range(0, hidden.shape[1], LOGIT_ROWS):
        logits = head(hidden[0, i : i + LOGIT_ROWS]).astype(mx.float32)
        if cap:
            logits = mx.tanh(logits / cap) * cap
        t = targets[i : i + LOGIT_ROWS]
        nll.append(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t[:, None], -1)[:, 0])
        top1.append(mx.argmax(logits, axis=-1).astype(mx.int32))
        mx.eval(nll[-1], top1[-1])
    return mx.concatenate(nll), mx.concatenate(top1)


def perplexity(nll: mx.array) -> float:
    """``exp(mean(nll))`` of per-token negative log-likelihoods."""
    return math.exp(nll.astype(mx.float32).mean().item())
