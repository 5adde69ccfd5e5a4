"""The HAS genetic algorithm (paper §3.3, hyper-parameters §4.4).

One chromosome per layer (a row permutation); layers are searched jointly, each operator
acting per layer. Step 0 evaluates the initial population; every later step is a
generation:

1. shuffle the ``P`` parents into ``P // 2`` random pairs (an odd one out is copied);
2. per pair and per layer, with probability ``crossover_rate`` apply order crossover,
   else copy the parents;
3. per child and per layer, with probability ``mutation_rate`` apply swap mutation;
4. evaluate, in one batched call, only children that differ from the parent they were
   copied from (unchanged copies keep that parent's fitness, DEAP's ``eaMuPlusLambda``
   convention);
5. truncation selection: the fittest ``P`` of parents + children survive (stable sort, so
   ties go to parents, then to earlier children: fully deterministic).

**Noisy fitness.** The simulator's fitness is a mean over fresh error draws, so one lucky
draw can keep a mediocre schedule on top for the rest of a run. ``noise`` says what to do:

* ``"none"`` (the paper's GA): a fitness, once drawn, is kept;
* ``"reevaluate"``: the survivors (all, or the best ``reevaluate_top``) are evaluated
  again with fresh draws in every generation, in the same batch as the children, and the
  new draw replaces the old one;
* ``"mean"``: as ``"reevaluate"``, but a survivor's fitness is the running mean of all its
  draws, so a schedule that stays on top has an ever more precise fitness.

With ``"none"`` selection is elitist and the best fitness never decreases (paper Fig. 10);
with ``include_identity`` the result is never worse than the unshuffled schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hasched.errors import HaschedError
from hasched.search.core.loop import SearchLoop
from hasched.search.core.problem import Perms, PermutationProblem
from hasched.search.core.registry import register_searcher
from hasched.search.operators.crossover import order_crossover
from hasched.search.operators.mutation import swap_mutation
from hasched.search.operators.sampling import sample_population

NOISE_MODES = ("none", "reevaluate", "mean")


@dataclass(frozen=True)
class GAConfig:
    """GA hyper-parameters; defaults are the paper's (§4.4).

    Attributes:
        population: individuals kept per generation (``P``).
        generations: generations after the initial population.
        crossover_rate: per pair and layer, probability of order crossover.
        mutation_rate: per child and layer, probability of a swap mutation.
        include_identity: seed the initial population with the unshuffled order.
        noise: ``"none"``, ``"reevaluate"`` or ``"mean"`` (module docstring).
        reevaluate_top: with noise handling, re-evaluate only the best this many survivors
            per generation; 0 re-evaluates all of them.
    """

    population: int = 20
    generations: int = 100
    crossover_rate: float = 0.6
    mutation_rate: float = 0.2
    include_identity: bool = True
    noise: str = "none"
    reevaluate_top: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "generations", "reevaluate_top"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise HaschedError(f"GA {name} must be an integer, got {v!r}")
        if self.population < 1:
            raise HaschedError(f"GA population must be >= 1, got {self.population}")
        if self.generations < 0 or self.reevaluate_top < 0:
            raise HaschedError("GA generations and reevaluate_top must be >= 0")
        for name in ("crossover_rate", "mutation_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise HaschedError(f"GA {name} must be in [0, 1], got {v!r}")
        if self.noise not in NOISE_MODES:
            raise HaschedError(f"GA noise must be one of {', '.join(NOISE_MODES)}, "
                               f"got {self.noise!r}")


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


def breed(pop: Perms, cfg: GAConfig, g: torch.Generator) -> tuple[Perms, torch.Tensor]:
    """Children of one generation (steps 1-3 of the module docstring).

    Returns:
        ``(children {layer: LongTensor[P, n]}, parent_of LongTensor[P])`` where
        ``parent_of[i]`` is the parent child ``i`` started as a copy of.
    """
    p = next(iter(pop.values())).shape[0]
    order = torch.randperm(p, generator=g)  # (P,) random mating pairs
    m = p // 2
    ia, ib = order[0 : 2 * m : 2], order[1 : 2 * m : 2]  # (M,) each: pair i = (ia[i], ib[i])
    rest = order[2 * m :]  # (P % 2,) odd one out, copied
    parent_of = torch.cat([ia, ib, rest])  # (P,)
    children: Perms = {}
    for layer, x in pop.items():  # x: (P, n)
        pa, pb = x[ia], x[ib]  # (M, n)
        c1, c2 = order_crossover(pa, pb, g)  # (M, n) each
        cross = (torch.rand(m, generator=g) < cfg.crossover_rate).unsqueeze(1)  # (M, 1)
        kids = torch.cat([torch.where(cross, c1, pa), torch.where(cross, c2, pb), x[rest]])
        mutate = torch.rand(p, generator=g) < cfg.mutation_rate  # (P,)
        children[layer] = swap_mutation(kids, mutate, g)  # (P, n)
    return children, parent_of


@register_searcher("ga")
class GeneticAlgorithm(SearchLoop):
    """The paper's GA on the shared search loop.

    State: ``pop`` (survivors, best first), ``fit`` (their fitness), ``draws`` (fitness
    draws behind each, for ``noise="mean"``) and ``generation``.

    Args:
        config: hyper-parameters; ``None`` uses the paper's defaults.
    """

    config_cls = GAConfig

    def _setup(self, problem: PermutationProblem, g: torch.Generator) -> dict:
        return {"pop": None, "fit": None, "draws": None, "generation": -1}

    def _initial_population(self, problem: PermutationProblem, state: dict,
                            g: torch.Generator) -> Perms:
        cfg = self.config
        return sample_population(problem.sizes, cfg.population, g, cfg.include_identity)

    def _ask(self, problem, state, g):
        if state["pop"] is None:
            pop = self._initial_population(problem, state, g)
            state["_pending"] = {"initial": pop}
            return pop
        pop = state["pop"]
        children, parent_of = breed(pop, self.config, g)
        changed = torch.zeros(len(parent_of), dtype=torch.bool)  # (P,)
        for layer, kids in children.items():
            changed |= (kids != pop[layer][parent_of]).any(dim=1)
        idx = changed.nonzero().squeeze(1)  # (K,) children to evaluate
        again = self._reevaluated(len(parent_of))  # (R,) survivors to draw again
        state["_pending"] = {"children": children, "parent_of": parent_of, "idx": idx,
                             "again": again}
        return {k: torch.cat([pop[k][again], children[k][idx]]) for k in pop}

    def _reevaluated(self, p: int) -> torch.Tensor:
        cfg = self.config
        if cfg.noise == "none":
            return torch.zeros(0, dtype=torch.long)
        return torch.arange(min(cfg.reevaluate_top or p, p))

    def _tell(self, problem, state, asked, fitness, g):
        pending = state.pop("_pending")
        keep = self.config.population
        if "initial" in pending:
            pop, fit, draws = pending["initial"], fitness, torch.ones_like(fitness)
            state["generation"] = 0
        else:
            again, idx = pending["again"], pending["idx"]
            fit, draws = state["fit"].clone(), state["draws"].clone()
            new = fitness[: len(again)]  # (R,)
            if self.config.noise == "mean":
                fit[again] = (fit[again] * draws[again] + new) / (draws[again] + 1)
                draws[again] += 1
            else:  # "reevaluate" (with "none", ``again`` is empty)
                fit[again] = new
            parent_of = pending["parent_of"]
            kid_fit, kid_draws = fit[parent_of].clone(), draws[parent_of].clone()
            kid_fit[idx], kid_draws[idx] = fitness[len(again):], 1.0
            children = pending["children"]
            pop = {k: torch.cat([state["pop"][k], children[k]]) for k in children}  # parents 1st
            fit, draws = torch.cat([fit, kid_fit]), torch.cat([draws, kid_draws])
            state["generation"] += 1
        order = torch.sort(fit, descending=True, stable=True).indices[:keep]  # (P,)
        state["pop"] = {k: v[order] for k, v in pop.items()}
        state["fit"], state["draws"] = fit[order], draws[order]
        return {"best_fitness": float(state["fit"].max()),
                "mean_fitness": float(state["fit"].mean())}

    def _done(self, state, step):
        return state["generation"] >= self.config.generations

    def _incumbent(self, state, tracked):
        return {k: v[0] for k, v in state["pop"].items()}, float(state["fit"][0])
