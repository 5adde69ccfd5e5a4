"""Per-sample metrics of a faulty run: top-1, top-5, SDC-1, or any callable.

A metric maps ``(logits (n, classes), labels (n,), clean_pred (n,))`` to per-sample scores
in [0, 1]; the evaluator reports their mean. ``clean_pred`` is the fault-free prediction of
the same accelerator, which is what a silent data corruption (SDC) is measured against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hasched.registry import Registry

__all__ = ["Metric", "METRICS", "resolve_metric"]

Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
METRICS: Registry[Metric] = Registry("metric")


@METRICS.register("top1")
def top1(logits: torch.Tensor, labels: torch.Tensor, clean_pred: torch.Tensor) -> torch.Tensor:
    """top-1 accuracy: the highest logit is the label."""
    return (logits.argmax(-1) == labels).double()


@METRICS.register("top5")
def top5(logits: torch.Tensor, labels: torch.Tensor, clean_pred: torch.Tensor) -> torch.Tensor:
    """top-5 accuracy: the label is among the five highest logits."""
    k = min(5, logits.shape[-1])
    return (logits.topk(k, -1).indices == labels[:, None]).any(-1).double()


@METRICS.register("sdc1")
def sdc1(logits: torch.Tensor, labels: torch.Tensor, clean_pred: torch.Tensor) -> torch.Tensor:
    """SDC-1 rate: the top-1 prediction differs from the fault-free run's."""
    return (logits.argmax(-1) != clean_pred).double()


def resolve_metric(metric: str | Metric) -> tuple[str, Metric]:
    """``(name, function)`` for a registered name or a callable."""
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    return metric, METRICS.get(metric)
