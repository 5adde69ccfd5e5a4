"""Random search: the baseline the paper compares HAS's GA against (§5, Fig. 10).

Draws uniform random permutations in batches of ``batch`` individuals (one
``problem.evaluate`` call each) until ``evaluations`` individuals have been scored, and keeps
the best. Give it the GA's ``SearchResult.evaluations`` for an equal-budget comparison.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hasched.errors import HaschedError
from hasched.search.core.problem import PermutationProblem, evaluate_population
from hasched.search.core.registry import register_searcher
from hasched.search.core.result import SearchResult
from hasched.search.core.state import load_checkpoint, make_generator, save_checkpoint, seed_tag
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
class RandomSearch:
    """Uniform random permutations at a fixed evaluation budget.

    Args:
        config: settings; ``None`` uses the defaults.
    """

    name = "random"
    config_cls = RandomSearchConfig

    def __init__(self, config: RandomSearchConfig | None = None) -> None:
        self.config = config if config is not None else RandomSearchConfig()

    def run(
        self,
        problem: PermutationProblem,
        seed: int | torch.Generator,
        progress: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        *,
        stop_after: int | None = None,
    ) -> SearchResult:
        """Evaluate random permutations until the budget is spent.

        Arguments and checkpoint/resume behave as in
        :meth:`hasched.search.algorithms.ga.GeneticAlgorithm.run`, with a batch in place
        of a generation: history entry ``generation`` is the 0-based batch index,
        ``mean_fitness`` is that batch's mean and ``stop_after`` counts batches.
        """
        cfg = self.config
        g = make_generator(seed)
        t0 = time.perf_counter()
        meta = {
            "algorithm": self.name,
            "config": dataclasses.asdict(cfg),
            "sizes": [list(kv) for kv in problem.sizes.items()],
            "seed": seed_tag(seed),
        }
        state = load_checkpoint(checkpoint, meta) if checkpoint is not None else None
        if state is not None:
            best, best_fit = state["best"], state["best_fitness"]
            history, evaluations = state["history"], state["evaluations"]
            seconds_before = state["seconds"]
            g.set_state(state["rng_state"])
        else:
            best, best_fit, history, evaluations, seconds_before = None, float("-inf"), [], 0, 0.0

        while evaluations < cfg.evaluations and (stop_after is None or len(history) < stop_after):
            count = min(cfg.batch, cfg.evaluations - evaluations)
            first = evaluations == 0
            pop = sample_population(problem.sizes, count, g, cfg.include_identity and first)
            fit = evaluate_population(problem, pop)  # (count,)
            i = int(torch.argmax(fit))  # first maximum: earlier individuals win ties
            # Strict '>' keeps the earliest best across batches too (deterministic ties).
            if best is None or float(fit[i]) > best_fit:
                best = {k: v[i].clone() for k, v in pop.items()}
                best_fit = float(fit[i])
            evaluations += count
            history.append({
                "generation": len(history),
                "best_fitness": best_fit,
                "mean_fitness": float(fit.mean()),
                "evaluations": evaluations,
            })
            seconds = seconds_before + time.perf_counter() - t0
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "meta": meta,
                    "best": best,
                    "best_fitness": best_fit,
                    "rng_state": g.get_state(),
                    "history": history,
                    "evaluations": evaluations,
                    "seconds": seconds,
                })
            if progress is not None:
                progress(dict(history[-1]))

        if best is None:  # only reachable with stop_after=0 on a fresh run
            raise HaschedError("random search stopped before evaluating anything")
        return SearchResult(
            best={k: v.clone() for k, v in best.items()},
            best_fitness=best_fit,
            history=[dict(h) for h in history],
            evaluations=evaluations,
            seconds=seconds_before + time.perf_counter() - t0,
        )
