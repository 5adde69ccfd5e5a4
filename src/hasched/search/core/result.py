"""The result every searcher returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SearchResult:
    """Outcome of one search run.

    Frozen so results can be shared safely; the tensors inside are still mutable, so
    callers that edit ``best`` should clone first.

    Attributes:
        best: ``{layer: LongTensor[n]}``, the fittest permutation per layer found.
        best_fitness: its fitness (as returned by the problem, as a Python float); NaN
            when a run stopped (``stop_after``) before scoring any schedule.
        history: one dict per generation (GA) or batch (random search) with keys
            ``generation``, ``best_fitness``, ``mean_fitness``, ``evaluations`` (individuals
            evaluated so far, cumulative).
        evaluations: total individuals evaluated, the budget to hand a baseline.
        seconds: wall time spent, summed over resumed pieces of the run.
        info: searcher-specific extras for reports (e.g. the criticality probe rates).
    """

    best: dict[str, torch.Tensor]
    best_fitness: float
    history: list[dict]
    evaluations: int
    seconds: float
    info: dict = field(default_factory=dict)
