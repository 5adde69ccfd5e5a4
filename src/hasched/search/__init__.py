"""Fault-aware schedule search (paper §3.3): per-layer row permutations.

Laid out like pymoo: :mod:`~hasched.search.core` (problem, the shared ask/tell loop,
result, registry, checkpoints), :mod:`~hasched.search.operators` (sampling, crossover,
mutation) and :mod:`~hasched.search.algorithms`: ``"ga"`` (the paper's HAS GA, with
optional noise handling), ``"random"``, ``"criticality"`` (probe each row, sort),
``"hybrid"`` (criticality-seeded GA) and ``"cma"`` (CMA-ES through random keys). A new
searcher subclasses :class:`SearchLoop` and implements ``_setup/_ask/_tell/_done``.

Typical use::

    from hasched.search import FunctionProblem, create_searcher, run_many, best_of

    problem = FunctionProblem({"fc1": 128}, accuracy_of_schedules)  # fn(perms) -> Tensor[P]
    ga = create_searcher("ga")                                       # paper defaults
    runs = run_many(ga, problem, seeds=[0, 1, 2])                    # paper: 3 runs
    best = best_of(runs)
    baseline = create_searcher("random", {"evaluations": best.evaluations}).run(problem, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from hasched.errors import HaschedError
from hasched.search.algorithms import (
    CMAES,
    CMAConfig,
    CriticalityConfig,
    CriticalitySearch,
    GAConfig,
    GeneticAlgorithm,
    HybridConfig,
    HybridSearch,
    RandomSearch,
    RandomSearchConfig,
)
from hasched.search.core.loop import RateProbe, SearchLoop, StepInfo
from hasched.search.core.problem import (
    FunctionProblem,
    ModelAwareProblem,
    PermutationProblem,
    evaluate_population,
)
from hasched.search.core.registry import (
    Searcher,
    budget_options,
    create_searcher,
    list_searchers,
    register_searcher,
)
from hasched.search.core.result import SearchResult


def run_many(
    searcher: Searcher,
    problem: PermutationProblem,
    seeds: Sequence[int],
    progress: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | None = None,
) -> list[SearchResult]:
    """Independent runs, one per seed, in order (the paper keeps the best of 3).

    Args:
        searcher: from :func:`create_searcher`.
        problem: what to maximise.
        seeds: one int per run; must be distinct.
        progress: receives each history entry with an extra ``"seed"`` key.
        checkpoint_dir: if given, run ``i`` checkpoints to
            ``checkpoint_dir / f"{searcher.name}-seed{seed}.pt"`` and resumes from it, so a
            killed batch of runs picks up where it stopped.

    Returns:
        One :class:`SearchResult` per seed; see :func:`best_of`.
    """
    seeds = list(seeds)
    if not seeds:
        raise HaschedError("run_many needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise HaschedError(f"run_many seeds must be distinct, got {seeds}")
    results = []
    for seed in seeds:
        cb = None if progress is None else (lambda h, s=seed: progress({**h, "seed": s}))
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / (
            f"{searcher.name}-seed{seed}.pt"
        )
        results.append(searcher.run(problem, seed, cb, ckpt))
    return results


def best_of(results: Sequence[SearchResult]) -> SearchResult:
    """The result with the highest ``best_fitness`` (the earliest one on ties)."""
    if not results:
        raise HaschedError("best_of needs at least one result")
    return max(results, key=lambda r: r.best_fitness)  # max() keeps the first maximum


__all__ = [
    "CMAConfig",
    "CMAES",
    "CriticalityConfig",
    "CriticalitySearch",
    "FunctionProblem",
    "GAConfig",
    "GeneticAlgorithm",
    "HybridConfig",
    "HybridSearch",
    "ModelAwareProblem",
    "PermutationProblem",
    "RandomSearch",
    "RandomSearchConfig",
    "RateProbe",
    "SearchLoop",
    "SearchResult",
    "StepInfo",
    "Searcher",
    "best_of",
    "budget_options",
    "create_searcher",
    "evaluate_population",
    "list_searchers",
    "register_searcher",
    "run_many",
]
