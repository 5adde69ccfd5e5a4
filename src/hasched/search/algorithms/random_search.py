"""Random search: the baseline the paper compares HAS's GA against (§5, Fig. 10).

Draws uniform random permutations in batches of ``batch`` individuals (one
``problem.evaluate`` call each) until ``evaluations`` individuals have been scored, and keeps
the best. Give it the GA's ``SearchResult.evaluations`` for an equal-budget comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hasched.errors import HaschedError
from hasched.search.core.loop import SearchLoop
from hasched.search.core.problem import PermutationProblem
from hasched.search.core.registry import register_searcher
from hasched.search.operators.sampling import sample_population


@dataclass(frozen=True)
class RandomSearchConfig:
    """Random-search settings.

    Attributes:
        evaluations: total individuals to evaluate (the budget). The default matches the
            GA's worst case with paper settings: 20 + 100 * 20.
        batch: individuals per ``problem.evaluate`` call (the last batch may be smaller).
        include_identity: make the very first individual the unshuffled order, as the GA
            does, so both start from the same reference point.
    """

    evaluations: int = 2020
    batch: int = 20
    include_identity: bool = True

    def __post_init__(self) -> None:
        for name in ("evaluations", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HaschedError(f"random search {name} must be an integer >= 1, got {v!r}")


@register_searcher("random")
class RandomSearch(SearchLoop):
    """Uniform random permutations at a fixed evaluation budget.

    A step is a batch: history entry ``generation`` is the 0-based batch index,
    ``mean_fitness`` is that batch's mean and ``best_fitness`` the best so far (the
    loop's best-ever schedule, which is also the result).

    Args:
        config: settings; ``None`` uses the defaults.
    """

    config_cls = RandomSearchConfig

    def _setup(self, problem: PermutationProblem, g: torch.Generator) -> dict:
        return {"evaluations": 0, "best_fitness": float("-inf")}

    def _ask(self, problem, state, g):
        cfg = self.config
        count = min(cfg.batch, cfg.evaluations - state["evaluations"])
        first = state["evaluations"] == 0
        return sample_population(problem.sizes, count, g, cfg.include_identity and first)

    def _tell(self, problem, state, asked, fitness, g):
        state["evaluations"] += int(fitness.numel())
        state["best_fitness"] = max(state["best_fitness"], float(fitness.max()))
        return {"best_fitness": state["best_fitness"], "mean_fitness": float(fitness.mean())}

    def _done(self, state, step):
        return state["evaluations"] >= self.config.evaluations
