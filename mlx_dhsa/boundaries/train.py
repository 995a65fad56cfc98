"""Training pieces for the boundary predictor: focal BCE, an Adam step, and gap metrics.

Loss and optimiser follow design.md section 5: focal binary cross-entropy (gamma 2, positive
weight 1.3) over the valid gaps, Adam with learning rate 1e-4. The data pipeline, progress
bar and checkpoints live in ``scripts/train_boundary_predictor.py``.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .predictor import BoundaryPredictor


def focal_bce(
    logits: mx.array,
    labels: mx.array,
    mask: mx.array,
    *,
    gamma: float = 2.0,
    pos_weight: float = 1.3,
) -> mx.array:
    """Mean focal BCE over the masked entries.

    ``-(pw * y * (1 - p)^gamma * log p + (1 - y) * p^gamma * log(1 - p))`` with p = sigmoid(x).

    Args:
        logits (mx.array): any shape; entries outside ``mask`` may be ``-inf``.
        labels (mx.array): same shape, bool or {0, 1}.
        mask (mx.array): same shape, bool: entries that count.
        gamma (float): focusing exponent. Default: ``2.0``.
        pos_weight (float): weight of positive entries. Default: ``1.3``.

    Returns:
        mx.array: scalar loss.
    """
    x = mx.where(mask, logits, 0.0)
    y = labels.astype(mx.float32)
    p = mx.sigmoid(x)
    log_p, log_q = -nn.softplus(-x), -nn.softplus(x)  # log p, log(1 - p), stable
    loss = -(pos_weight * y * (1 - p) ** gamma * log_p + (1 - y) * p**gamma * log_q)
    m = mask.astype(mx.float32)
    return (loss * m).sum() / mx.maximum(m.sum(), 1.0)


class Trainer:
    """Adam on :func:`focal_bce` of :meth:`BoundaryPredictor.gap_logits` over key sequences.

    Args:
        model (BoundaryPredictor): trained in place.
        learning_rate (float): Adam step size. Default: ``1e-4``.
        gamma (float), pos_weight (float): as :func:`focal_bce`.
    """

    def __init__(
        self,
        model: BoundaryPredictor,
        *,
        learning_rate: float = 1e-4,
        gamma: float = 2.0,
        pos_weight: float = 1.3,
    ):
        self.model = model
        self.optimizer = optim.Adam(learning_rate=learning_rate)
        self.gamma, self.pos_weight = gamma, pos_weight
        self._grad = nn.value_and_grad(model, self._loss)

    def _loss(self, keys: mx.array, labels: mx.array, valid: mx.array) -> mx.array:
        logits = self.model.gap_logits(keys)
        return focal_bce(logits, labels, valid, gamma=self.gamma, pos_weight=self.pos_weight)

    def step(self, keys: mx.array, labels: mx.array, valid: mx.array) -> float:
        """One Adam step on a batch: keys (B, H_kv, S, D), labels and valid (B, S) bool."""
        self.model.train()
        loss, grads = self._grad(keys, labels, valid)
        self.optimizer.update(self.model, grads)
        mx.eval(loss, self.model.parameters(), self.optimizer.state)
        return loss.item()

    def loss(self, keys: mx.array, labels: mx.array, valid: mx.array) -> float:
        """The loss without a step (validation)."""
        self.model.eval()
        return self._loss(keys, labels, valid).item()


@dataclass(frozen=True)
class GapMetrics:
    """Boundary detection quality over valid gaps."""

    precision: float
    recall: float
    f1: float
    density: float  # share of valid gaps predicted as boundaries
    threshold: float  # score above which a gap is predicted a boundary


def gap_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> GapMetrics:
    """Precision, recall and F1 of ``scores > threshold`` against ``labels`` (1-D, valid gaps)."""
    pred, labels = scores > threshold, labels.astype(bool)
    tp = float((pred & labels).sum())
    precision = tp / max(pred.sum(), 1)
    recall = tp / max(labels.sum(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return GapMetrics(precision, recall, f1, float(pred.mean()) if pred.size else 0.0, threshold)


def threshold_at_density(scores: np.ndarray, density: float) -> float:
    """The threshold under which ``1 - density`` of ``scores`` fall (same boundary density)."""
    if density <= 0:
        return float(np.max(scores))
    return float(np.quantile(scores, 1.0 - density, method="lower"))


def best_f1(scores: np.ndarray, labels: np.ndarray) -> GapMetrics:
    """The metrics at the threshold that maximises F1 (an upper bound: chosen on the labels)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    tp = np.cumsum(y)
    k = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (k + y.sum())
    last = np.r_[s[1:] != s[:-1], True]  # only cut between distinct scores
    i = int(np.argmax(np.where(last, f1, -1)))
    threshold = float(s[i + 1]) if i + 1 < len(s) else float(s[i]) - 1.0
    return gap_metrics(scores, labels, (float(s[i]) + threshold) / 2)
