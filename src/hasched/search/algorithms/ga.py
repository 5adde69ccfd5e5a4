"""The HAS genetic algorithm (paper §3.3, hyper-parameters §4.4).

One chromosome per layer (a row permutation); layers are searched jointly, each operator
acting per layer. Per generation:

1. shuffle the ``P`` parents into ``P // 2`` random pairs (an odd one out is copied);
2. per pair and per layer, with probability ``crossover_rate`` apply order crossover,
   else copy the parents;
3. per child and per layer, with probability ``mutation_rate`` apply swap mutation;
4. evaluate, in one batched call, only children that differ from the parent they were
   copied from (unchanged copies keep that parent's fitness, DEAP's ``eaMuPlusLambda``
   convention; fitness is assumed deterministic for a given schedule);
5. truncation selection: the fittest ``P`` of parents + children survive (stable sort, so
   ties go to parents, then to earlier children: fully deterministic).

Selection is elitist, so the best fitness never decreases (paper Fig. 10), and with
``include_identity`` the result is never worse than the unshuffled schedule.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hasched.errors import HaschedError
from hasched.search.core.problem import Perms, PermutationProblem, evaluate_population
from hasched.search.core.registry import register_searcher
from hasched.search.core.result import SearchResult
from hasched.search.core.state import load_checkpoint, make_generator, save_checkpoint, seed_tag
from hasched.search.operators.crossover import order_crossover
from hasched.search.operators.mutation import swap_mutation
from hasched.search.operators.sampling import sample_population


@dataclass(frozen=True)
class GAConfig:
    """GA hyper-parameters; defaults are the paper's (§4.4).

    Attributes:
        population: individuals kept per generation (``P``).
        generations: generations after the initial population.
        crossover_rate: per pair and layer, probability of order crossover.
        mutation_rate: per child and layer, probability of a swap mutation.
        include_identity: seed the initial population with the unshuffled order.
    """

    population: int = 20
    generations: int = 100
    crossover_rate: float = 0.6
    mutation_rate: float = 0.2
    include_identity: bool = True

    def __post_init__(self) -> None:
        for name in ("population", "generations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise HaschedError(f"GA {name} must be an integer, got {v!r}")
        if self.population < 1:
            raise HaschedError(f"GA population must be >= 1, got {self.population}")
        if self.generations < 0:
            raise HaschedError(f"GA generations must be >= 0, got {self.generations}")
        for name in ("crossover_rate", "mutation_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise HaschedError(f"GA {name} must be in [0, 1], got {v!r}")


def truncate(pop: Perms, fitness: torch.Tensor, keep: int) -> tuple[Perms, torch.Tensor]:
    """Keep the ``keep`` fittest individuals, best first.

    The sort is stable, so among equal fitness the earlier individual wins.

    Args:
        pop: ``{layer: LongTensor[Q, n]}``.
        fitness: ``Tensor[Q]``.
        keep: number of survivors (``<= Q``).
    """
    order = torch.sort(fitness, descending=True, stable=True).indices[:keep]  # (keep,)
    return {k: v[order] for k, v in pop.items()}, fitness[order]


def _record(generation: int, fitness: torch.Tensor, evaluations: int) -> dict:
    return {
        "generation": generation,
        "best_fitness": float(fitness.max()),
        "mean_fitness": float(fitness.mean()),
        "evaluations": evaluations,
    }


@register_searcher("ga")
class GeneticAlgorithm:
    """The paper's GA behind the common searcher interface.

    Args:
        config: hyper-parameters; ``None`` uses the paper's defaults.
    """

    name = "ga"
    config_cls = GAConfig

    def __init__(self, config: GAConfig | None = None) -> None:
        self.config = config if config is not None else GAConfig()

    def run(
        self,
        problem: PermutationProblem,
        seed: int | torch.Generator,
        progress: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        *,
        stop_after: int | None = None,
    ) -> SearchResult:
        """Search for the fittest per-layer permutations.

        Args:
            problem: what to maximise.
            seed: an int (a fresh generator is made from it) or a generator to draw from.
            progress: called with each history entry (generation 0 = initial population)
                after that generation is checkpointed; an exception it raises aborts the
                run, leaving a checkpoint to resume from.
            checkpoint: file holding the full state, rewritten atomically after every
                generation; if it exists the run resumes from it, giving bit-for-bit the
                result of an uninterrupted run.
            stop_after: return once this many generations have completed in total
                (counting ones done before a resume), e.g. to time-slice a long search;
                the result is then the best so far.

        Returns:
            The best individual of the final population (the best ever evaluated, since
            selection is elitist) and the run's history.

        Raises:
            HaschedError: bad seed, a checkpoint from a different run, or a problem that
                returns malformed fitness.
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
            pop, fit = state["population"], state["fitness"]
            generation, history = state["generation"], state["history"]
            evaluations, seconds_before = state["evaluations"], state["seconds"]
            g.set_state(state["rng_state"])
        else:
            seconds_before = 0.0
            pop = sample_population(problem.sizes, cfg.population, g, cfg.include_identity)
            fit = evaluate_population(problem, pop)  # (P,) one batched call
            pop, fit = truncate(pop, fit, cfg.population)  # sort best-first
            generation, evaluations = 0, cfg.population
            history = [_record(0, fit, evaluations)]
            self._emit(checkpoint, progress, meta, pop, fit, g, history, evaluations,
                       seconds_before + time.perf_counter() - t0)

        while generation < cfg.generations and (stop_after is None or generation < stop_after):
            pop, fit, evaluated = self._generation(problem, pop, fit, g)
            generation += 1
            evaluations += evaluated
            history.append(_record(generation, fit, evaluations))
            self._emit(checkpoint, progress, meta, pop, fit, g, history, evaluations,
                       seconds_before + time.perf_counter() - t0)

        return SearchResult(
            best={k: v[0].clone() for k, v in pop.items()},
            best_fitness=float(fit[0]),
            history=[dict(h) for h in history],
            evaluations=evaluations,
            seconds=seconds_before + time.perf_counter() - t0,
        )

    @staticmethod
    def _emit(checkpoint, progress, meta, pop, fit, g, history, evaluations, seconds) -> None:
        # Checkpoint first: a progress callback that raises (or a kill right after it)
        # must find the generation it was told about already on disk.
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "meta": meta,
                "population": pop,
                "fitness": fit,
                "rng_state": g.get_state(),
                "generation": history[-1]["generation"],
                "history": history,
                "evaluations": evaluations,
                "seconds": seconds,
            })
        if progress is not None:
            progress(dict(history[-1]))

    def _generation(
        self,
        problem: PermutationProblem,
        pop: Perms,
        fit: torch.Tensor,
        g: torch.Generator,
    ) -> tuple[Perms, torch.Tensor, int]:
        """One generation; returns survivors, their fitness and how many were evaluated."""
        cfg = self.config
        p = cfg.population
        order = torch.randperm(p, generator=g)  # (P,) random mating pairs
        m = p // 2
        ia, ib = order[0 : 2 * m : 2], order[1 : 2 * m : 2]  # (M,) each: pair i = (ia[i], ib[i])
        rest = order[2 * m :]  # (P % 2,) odd one out, copied
        parent_of = torch.cat([ia, ib, rest])  # (P,) the parent each child starts as a copy of

        children: Perms = {}
        for layer, x in pop.items():  # x: (P, n)
            pa, pb = x[ia], x[ib]  # (M, n)
            c1, c2 = order_crossover(pa, pb, g)  # (M, n) each
            cross = (torch.rand(m, generator=g) < cfg.crossover_rate).unsqueeze(1)  # (M, 1)
            kids = torch.cat([torch.where(cross, c1, pa), torch.where(cross, c2, pb), x[rest]])
            mutate = torch.rand(p, generator=g) < cfg.mutation_rate  # (P,)
            children[layer] = swap_mutation(kids, mutate, g)  # (P, n)

        changed = torch.zeros(p, dtype=torch.bool)  # (P,)
        for layer, kids in children.items():
            changed |= (kids != pop[layer][parent_of]).any(dim=1)
        kid_fit = fit[parent_of].clone()  # (P,) inherited unless re-evaluated
        idx = changed.nonzero().squeeze(1)  # (K,)
        if idx.numel() > 0:
            kid_fit[idx] = evaluate_population(problem, {k: v[idx] for k, v in children.items()})

        both = {k: torch.cat([pop[k], children[k]]) for k in pop}  # (2P, n) parents first
        survivors, surv_fit = truncate(both, torch.cat([fit, kid_fit]), p)
        return survivors, surv_fit, int(idx.numel())
